"""DDP on CPU (gloo): each process adapts its share of the meta-batch, the meta-gradient is averaged.

Through the code path users get: the MAML LightningModule's training_step under Lightning's DDP, with
`manual_backward` through fmaml's autograd.Function (vmap strategy) or plain autograd (loop).
"""

import csv
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fmaml.cli import main
from fmaml.data import EvaluationTasks, MetaDataModule, Sinusoid
from fmaml.inner_optimizers import SGD
from fmaml.models import MLP
from fmaml.module import MAML
from fmaml.settings import grouped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sinusoid_tasks(num_tasks: int, k: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    amplitude, phase = (
        torch.rand(num_tasks, 1, 1, generator=g) * 4.9 + 0.1,
        torch.rand(num_tasks, 1, 1, generator=g),
    )
    x = torch.rand(num_tasks, 2 * k, 1, generator=g) * 10 - 5
    y = amplitude * torch.sin(x - phase)
    return {"support": (x[:, :k], y[:, :k]), "query": (x[:, k:], y[:, k:])}


class Shares(L.LightningDataModule):
    """One fixed meta-batch; each process trains on its contiguous share of the tasks."""

    def __init__(self, tasks: dict):
        super().__init__()
        self.tasks = tasks

    def train_dataloader(self):
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        n = self.tasks["support"][0].shape[0] // world_size
        share = {key: tuple(t[rank * n : (rank + 1) * n] for t in pair) for key, pair in self.tasks.items()}
        return DataLoader([share], batch_size=None)


def one_meta_step(tasks: dict, devices: int, strategy: str, meta_strategy: str) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)  # the same initial weights in every call
    model = MAML(
        MLP,
        num_outputs=1,
        loss="mse",
        optimizer=partial(torch.optim.SGD, lr=0.1),  # an update proportional to the gradient
        **grouped(inner_optimizer=SGD(lr=0.01), strategy=meta_strategy),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=Shares(tasks))
    # ddp_fork (like ddp_spawn) hands rank 0's trained weights back to this process.
    return {name: p.detach().clone() for name, p in model.network.named_parameters()}


@pytest.mark.parametrize("meta_strategy", ["vmap", "loop"])
def test_two_processes_with_half_the_tasks_each_equal_one_with_all(meta_strategy):
    tasks = sinusoid_tasks(4)
    single = one_meta_step(tasks, 1, "auto", meta_strategy)
    # Forked, not spawned: the two children start without importing torch and Lightning again (10+ s
    # each on this CPU). test_cli_fit_and_test_with_ddp runs `ddp` as users do.
    ddp = one_meta_step(tasks, 2, "ddp_fork", meta_strategy)
    difference = max((single[n] - ddp[n]).abs().max().item() for n in single)
    print(f"{meta_strategy}: max |single - ddp| over params: {difference:.3g}")
    assert difference < 1e-6
    # Without the all-reduce, rank 0 would have stepped on its 2 tasks alone: far from both.
    first_half = {key: tuple(t[:2] for t in pair) for key, pair in tasks.items()}
    alone = one_meta_step(first_half, 1, "auto", meta_strategy)
    assert max((alone[n] - ddp[n]).abs().max().item() for n in single) > 1e-3


def test_each_process_gets_its_share_of_tasks():
    dm = MetaDataModule(
        Sinusoid(), shots=3, query_shots=2, meta_batch_size=4, evaluation=EvaluationTasks(num_val_tasks=5)
    )
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(
            world_size=2,
            global_rank=rank,
            global_step=0,
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=False),
        )
        train = next(iter(dm.train_dataloader()))["support"][0]
        val = [b["support"][0].shape[0] for b in dm.val_dataloader()]
        shares.append((train, val))
    assert shares[0][0].shape[0] == shares[1][0].shape[0] == 2  # half of the meta-batch each
    assert not torch.equal(shares[0][0], shares[1][0])  # other tasks
    assert sum(shares[0][1]) == 3 and sum(shares[1][1]) == 2  # 5 validation tasks, split 3 + 2

    with pytest.raises(ValueError, match=r"data\.meta_batch_size=3 must be a multiple of the 2"):
        dm.meta_batch_size = 3
        dm.train_dataloader()
    dm.meta_batch_size = 4
    dm.evaluation = EvaluationTasks(num_val_tasks=1)
    with pytest.raises(
        ValueError, match=r"data\.evaluation\.num_val_tasks=1 is fewer than the 2 DDP processes"
    ):
        dm.val_dataloader()
    dm.trainer._accelerator_connector.use_distributed_sampler = True
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


@pytest.mark.slow
def test_cli_fit_and_test_with_ddp(zygote, tmp_path, monkeypatch, capsys):
    """`python -m fmaml fit|test --trainer.strategy=ddp --trainer.devices=2` as a user runs it: the fit in a
    fresh interpreter, Lightning starting the second process as a fresh `python -m fmaml`; the test's two
    processes forked from the zygote (tests/zygote.py: no 10+ s of imports each), the second started by
    Lightning with the same command line, its `sys.executable` being the zygote's (ZYGOTE_PYTHON)."""
    common = [
        "--config",
        os.path.join(REPO, "configs", "sinusoid.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.enable_progress_bar=false",
        "--data.meta_batch_size=4",
        "--data.evaluation.num_val_tasks=4",
        "--data.evaluation.num_test_tasks=5",  # uneven: 3 + 2 tasks, gathered for the confidence interval
    ]

    def run(subcommand, *args, fresh=False):  # --config first: what follows it overrides it
        command = ["-m", "fmaml", subcommand, *common, *args]
        with open(tmp_path / f"{subcommand}.stderr", "w+") as stderr:
            streams = dict(stdout=subprocess.PIPE, stderr=stderr, text=True)
            if fresh:
                process = subprocess.Popen([sys.executable, *command], cwd=tmp_path, **streams)
            else:
                env = os.environ | {"ZYGOTE_PYTHON": zygote.python}
                process = zygote.popen(command, cwd=tmp_path, env=env, **streams)
            output = process.communicate(timeout=300)[0]
            stderr.seek(0)
            assert process.returncode == 0, output[-3000:] + stderr.read()[-3000:]
        return output

    run("fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2", fresh=True)
    last = tmp_path / "logs" / "fmaml" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # Test on 2 processes (3 + 2 tasks) against 1 process on the same 5 tasks: the same per-task values
    # in the same order, so the same mean and confidence interval.
    ddp = run("test", f"--ckpt_path={last}", "--per_task_csv.path=ddp.csv")
    # The single process runs here, in-process: one interpreter start fewer.
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    main(
        ["test", *common, f"--ckpt_path={last}", "--per_task_csv.path=single.csv"]
        + ["--trainer.strategy=auto", "--trainer.devices=1"]
    )
    single = capsys.readouterr().out

    def read(name):
        with open(tmp_path / name) as f:
            return [(int(r["task"]), float(r["loss"])) for r in csv.DictReader(f)]

    assert [t for t, _ in read("ddp.csv")] == list(range(5))
    assert [v for _, v in read("ddp.csv")] == pytest.approx([v for _, v in read("single.csv")], rel=1e-6)

    def summary(out):
        (line,) = [line for line in out.splitlines() if line.startswith("test loss over 5 tasks")]
        return line

    assert summary(ddp) == summary(single)
