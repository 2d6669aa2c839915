"""Several nodes, launched as users launch them: two `torchrun` commands on this machine, each one "node"
(its own --node_rank, one process, gloo on 127.0.0.1), running `--trainer.num_nodes=2`.

After 3 meta-steps the two nodes hold the weights one process gets with the whole meta-batch, under
`vmap` and `loop`; the validation and test tasks are split across the nodes and gathered, so the logged
validation loss, the per-task test values and the printed test mean ± CI equal one process's.

Each node's process runs this file (see the bottom): the fmaml commands, one after the other, through
`fmaml.cli.command_line`, what `python -m fmaml` runs. One process per node for all of them, and forked
from the zygote (tests/zygote.py, given to torchrun as its PYTHON_EXEC): every interpreter start costs 10-30
s of imports on this CPU. torchrun itself, the agent that starts the node's process and joins the nodes,
is the real command.

Also, in-process: the processes' shares of a meta-batch make up one process's (both samplers), two nodes
prepare one shared data folder at once, and configs/slurm/fmaml.sbatch runs a valid fmaml command.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
STRATEGIES = ("vmap", "loop")
TIMEOUT_S = 480  # both nodes together; a node that never joins, or a hang, fails the test
TINY = [
    "--config",
    os.path.join(REPO, "configs", "sinusoid.yaml"),
    "--trainer.accelerator=cpu",
    "--trainer.precision=64-true",  # float64: the bound tests the method, not rounding
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",  # validation at the last step: 5 tasks, 3 + 2 on the nodes
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.meta_batch_size=4",
    "--data.evaluation.num_val_tasks=5",
    "--data.evaluation.num_test_tasks=5",
]
TWO_NODES = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]


def fit_args(root: str, strategy: str, *extra: str) -> list[str]:
    return [
        "fit",
        *TINY,
        *extra,
        f"--model.execution.strategy={strategy}",
        f"--trainer.default_root_dir={root}/{strategy}",
    ]


def evaluation_args(root: str, ckpt: str, name: str, *extra: str) -> list[str]:
    return [
        "test",
        *TINY,
        *extra,
        "--model.execution.strategy=vmap",
        f"--ckpt_path={ckpt}",
        f"--trainer.default_root_dir={root}/{name}",
        f"--per_task_csv.path={root}/{name}.csv",
    ]


def run_dir(root: str, name: str) -> str:
    return os.path.join(root, name, "logs", "fmaml", "version_0")


def weights(root: str, strategy: str) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(
        os.path.join(run_dir(root, strategy), "checkpoints", "last.ckpt"), weights_only=False
    )
    assert checkpoint["global_step"] == 3
    return checkpoint["state_dict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(commands: list[list[str]], cwd, python: str) -> list[tuple[subprocess.Popen, str]]:
    """The two torchrun commands; `python` is the executable torchrun starts each node's process with."""
    port, nodes = free_port(), []
    env = os.environ | {"PYTHON_EXEC": python}
    for node_rank in (0, 1):
        log = os.path.join(cwd, f"node{node_rank}.log")
        launch = [TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}"]
        launch += ["--master_addr=127.0.0.1", f"--master_port={port}", __file__, json.dumps(commands)]
        with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall a node
            # Its own session: a timeout kills the node's agent and its worker together.
            process = subprocess.Popen(
                launch, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        nodes.append((process, log))
    return nodes


def wait_for(nodes: list[tuple[subprocess.Popen, str]], timeout: float) -> list[str]:
    try:
        for process, _ in nodes:
            process.wait(timeout=timeout)  # the nodes run together: the first wait takes nearly all
    except subprocess.TimeoutExpired:
        for process, _ in nodes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    outputs = [open(log).read() for _, log in nodes]
    for (process, _), output in zip(nodes, outputs, strict=True):
        assert process.returncode == 0, (
            f"a node failed or hung (exit {process.returncode}):\n{output[-4000:]}"
        )
    return outputs


def summary(out: str) -> str:
    (line,) = re.findall(r"^test loss over 5 tasks after 10 inner steps: .* \(95% CI\)", out, re.M)
    return line


def read_csv(path: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(row["task"]), float(row["loss"])) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_process(zygote, tmp_path, monkeypatch, capsys):
    from fmaml.cli import main
    from fmaml.curves import read_scalars

    nodes_root, single_root = str(tmp_path / "nodes"), str(tmp_path / "single")
    ckpt = os.path.join(run_dir(nodes_root, "vmap"), "checkpoints", "last.ckpt")
    commands = [fit_args(nodes_root, s, *TWO_NODES) for s in STRATEGIES]
    commands.append(evaluation_args(nodes_root, ckpt, "test", *TWO_NODES))
    nodes = start_two_nodes(commands, tmp_path, python=zygote.python)
    monkeypatch.chdir(tmp_path)
    for strategy in STRATEGIES:  # one process with the whole meta-batch, here while the nodes run
        main(fit_args(single_root, strategy))
    outputs = wait_for(nodes, TIMEOUT_S)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]  # node 1 joined as the second process

    report = []  # printed last: capsys takes what is printed before its last read
    for strategy in STRATEGIES:
        single, nodes_weights = weights(single_root, strategy), weights(nodes_root, strategy)
        difference = max((single[n] - nodes_weights[n]).abs().max().item() for n in single)
        report.append(
            f"{strategy}: max |one process - two nodes| over the weights after 3 steps: {difference:.3g}"
        )
        assert difference <= 1e-6
        # Validation at step 3: 3 + 2 tasks on the nodes, the mean over all 5.
        val = [read_scalars(run_dir(root, strategy))["val/loss"][-1] for root in (single_root, nodes_root)]
        report.append(f"{strategy}: val/loss (step, value), one process {val[0]}, two nodes {val[1]}")
        assert val[0][0] == val[1][0] and val[0][1] == pytest.approx(val[1][1], rel=1e-6)

    # The same checkpoint tested by one process: the nodes' 3 + 2 test tasks, gathered in task order.
    capsys.readouterr()
    main(evaluation_args(single_root, ckpt, "test"))
    single_out = capsys.readouterr().out
    report += [f"one process: {summary(single_out)}", f"two nodes:   {summary(outputs[0])}"]
    assert summary(single_out) == summary(outputs[0])
    assert [t for t, _ in read_csv(f"{nodes_root}/test.csv")] == list(range(5))
    assert [v for _, v in read_csv(f"{nodes_root}/test.csv")] == pytest.approx(
        [v for _, v in read_csv(f"{single_root}/test.csv")], rel=1e-9
    )
    logged = [read_scalars(run_dir(root, "test")) for root in (single_root, nodes_root)]
    for tag in ("test/loss", "test/loss_mean", "test/loss_ci95", "test/num_tasks"):
        (one,), (two,) = logged[0][tag], logged[1][tag]  # (step, value): one test epoch each
        report.append(f"{tag}: one process {one[1]!r}, two nodes {two[1]!r}")
        assert one[1] == pytest.approx(two[1], rel=1e-6), tag
    print("\n".join(report))


@pytest.mark.parametrize("sampler", ["tensor", "torchmeta"])
def test_the_processes_shares_make_up_the_meta_batch_of_one_process(sampler, monkeypatch):
    from fmaml.data import Loading, MetaDataModule, Sinusoid

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    data = MetaDataModule(
        Sinusoid(), shots=3, query_shots=2, meta_batch_size=4, loading=Loading(sampler=sampler)
    )

    def meta_batch(rank: int, world_size: int) -> torch.Tensor:
        connector = SimpleNamespace(use_distributed_sampler=False)
        data.trainer = SimpleNamespace(
            world_size=world_size, global_rank=rank, global_step=2, _accelerator_connector=connector
        )
        batch = next(iter(data.train_dataloader()))  # meta-batch 2: the stream's position is the step
        return torch.cat([t.flatten(1) for pair in batch.values() for t in pair], dim=1)

    shares = [meta_batch(rank, 2) for rank in (0, 1)]
    assert shares[0].shape[0] == 2
    assert torch.equal(torch.cat(shares), meta_batch(0, 1))


def test_nodes_sharing_the_data_folder_prepare_it_at_once(tmp_path, monkeypatch):
    """Lightning prepares the data on each node: on a shared filesystem two nodes download and convert the
    same Omniglot folder at once, and both must succeed (here two threads, the download a slow copy)."""
    from concurrent.futures import ThreadPoolExecutor

    from fixtures import write_omniglot_zips
    from torchvision.datasets import utils

    from fmaml.data.omniglot_files import is_prepared, prepare_omniglot

    write_omniglot_zips(tmp_path / "served", chars_per_split=2, drawings=4)
    both_downloading = threading.Barrier(2)

    def slow_download(url, root, filename, md5=None):
        both_downloading.wait(timeout=10)
        data = (tmp_path / "served" / os.path.basename(url)).read_bytes()
        os.makedirs(root, exist_ok=True)  # as torchvision's does
        with open(os.path.join(root, filename), "wb") as f:
            for start in range(0, len(data), len(data) // 4 + 1):
                f.write(data[start : start + len(data) // 4 + 1])
                f.flush()
                time.sleep(0.02)

    monkeypatch.setattr(utils, "download_url", slow_download)
    folder = str(tmp_path / "shared" / "omniglot")
    with ThreadPoolExecutor(2) as nodes:
        for node in [nodes.submit(prepare_omniglot, folder) for _ in range(2)]:
            node.result(timeout=120)  # re-raises a node's error
    assert is_prepared(folder)
    assert not [name for name in os.listdir(folder) if ".tmp-" in name]  # no temporary file left behind


def test_sbatch_script_runs_a_valid_fmaml_command(tmp_path, monkeypatch, capsys):
    """configs/slurm/fmaml.sbatch under a fake 2-node job: its srun line, as bash expands it, is a valid
    fmaml command with the job's nodes and tasks per node (no cluster here: `srun` only records it)."""
    script = os.path.join(REPO, "configs", "slurm", "fmaml.sbatch")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    slurm = {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1"}
    env = os.environ | slurm | {"PATH": f"{fake}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args")}
    subprocess.run(["bash", script, "--trainer.max_steps=7"], env=env, check=True, timeout=30)
    command = (tmp_path / "args").read_text().splitlines()
    assert command[:4] == ["python", "-m", "fmaml", "fit"]

    from fmaml.cli import main

    monkeypatch.chdir(REPO)  # the script's paths are the repository's
    with pytest.raises(SystemExit) as exit_status:
        main([*command[3:], "--print_config"])
    assert exit_status.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    trainer = config["trainer"]
    assert (trainer["num_nodes"], str(trainer["devices"]), trainer["strategy"]) == (2, "1", "ddp")
    assert trainer["max_steps"] == 7  # the script passes its own arguments on
    assert config["data"]["dataset"]["class_path"] == "fmaml.data.Omniglot"


if __name__ == "__main__":
    # One node's process under torchrun: the fmaml commands given as JSON, in order, as `python -m fmaml`
    # runs each; the process group of the first is reused by the next.
    from fmaml.cli import command_line

    for args in json.loads(sys.argv[1]):
        if command_line(args):
            sys.exit(1)
