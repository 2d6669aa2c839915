"""Training survives kill -9 bit for bit: SIGKILL at random moments and in the middle of checkpoint writes,
each time resumed with `--ckpt_path last`, ends with the weights, optimizer state and logged values of an
uninterrupted run.

A kill cannot be caught, so what makes this hold is that a checkpoint file is written whole or not at all
(fmaml.callbacks.Checkpoint: a temporary file in the same folder, then os.replace) and that a resume
continues the exact task stream. The kills during a write are deterministic: the child runs fmaml under a
wrapper that writes half of the N-th checkpoint of that process to its file and then kills itself, as a
kill -9 mid-write would leave it (Lightning's own save writes in place, so that file would be last.ckpt).
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from fixtures import tiny_omniglot_root

from fmaml.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import io, os, signal, sys
kill_at = int(os.environ.get("KILL_DURING_SAVE", "0"))
if kill_at:
    import torch
    from lightning.fabric.plugins.io import torch_io

    saves = 0
    write = torch_io._atomic_save

    def save_then_die_midway(checkpoint, filepath):
        global saves
        saves += 1
        if saves < kill_at:
            return write(checkpoint, filepath)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(filepath, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch_io._atomic_save = save_then_die_midway
from fmaml.cli import main
main(sys.argv[1:])
"""
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
SINUSOID = [
    "--config", os.path.join(REPO, "configs", "sinusoid.yaml"), "--data.meta_batch_size=5",
    "--trainer.max_steps=200", "--trainer.val_check_interval=50", "--data.evaluation.num_val_tasks=4",
    "--checkpoint.every_n_train_steps=10",
    # fixed: auto's choice follows live timings, and the killed and whole runs are compared bit for bit
    "--model.execution.strategy=vmap", "--model.execution.memory=store",
]  # fmt: skip
OMNIGLOT = [
    "--config", os.path.join(REPO, "configs", "omniglot.yaml"), "--model.network.filters=4",
    "--data.meta_batch_size=2", "--trainer.max_steps=60", "--trainer.val_check_interval=20",
    "--data.evaluation.num_val_tasks=4", "--model.execution.strategy=loop",
    # time-based checkpoints only: a save every few hundredths of a second of training
    "--checkpoint.every_n_train_steps=0", "--checkpoint.every_n_minutes=0.0005",
]  # fmt: skip


def fit_process(zygote, folder, args, resume: bool, kill_during_save: int = 0):
    """The fit in a process of its own, forked from the zygote (tests/zygote.py: fmaml already imported), its
    output to a log file in `folder`; returns (process, log path)."""
    env = os.environ | {"KILL_DURING_SAVE": str(kill_during_save), "OMP_NUM_THREADS": "1"}
    command = ["-c", CHILD, "fit", *args, *QUIET, *(["--ckpt_path=last"] if resume else [])]
    log = os.path.join(folder, f"process-{len(glob.glob(os.path.join(folder, 'process-*.log')))}.log")
    with open(log, "w") as output:
        return zygote.popen(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT), log


def output_of(process, log) -> str:
    process.wait(timeout=300)
    with open(log, errors="replace") as f:
        return f.read()


def last_checkpoint(folder) -> str | None:
    found = glob.glob(os.path.join(folder, "logs", "fmaml", "version_*", "checkpoints", "last.ckpt"))
    return found[0] if found else None


def saved_at(folder) -> float:
    path = last_checkpoint(folder)
    return os.stat(path).st_mtime_ns if path else 0


def train_with_kills(zygote, folder, args, random_kills: int, kills_in_writes: list[int], seed: int) -> dict:
    """Train to the end through the given kills (in a seeded random order), resuming with `--ckpt_path last`
    after each; returns counts. Every process but the last must die by SIGKILL: a resume that fails on a
    half-written checkpoint exits with an error instead, and fails the test."""
    folder.mkdir()
    rng = random.Random(seed)
    plan = ["random"] * random_kills + [f"write:{n}" for n in kills_in_writes]
    rng.shuffle(plan)
    steps_at_kill = []
    for kind in plan:
        resume = last_checkpoint(folder) is not None
        before = saved_at(folder)
        if kind == "random":
            process, log = fit_process(zygote, folder, args, resume)
            deadline = time.time() + 600  # a guard against a hang only: a busy machine may take minutes
            # Kill once this process has saved (so each kill is past some progress), a random moment later:
            # in a step, in validation or in the middle of a write.
            while saved_at(folder) == before and process.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
        else:
            process, log = fit_process(zygote, folder, args, resume, kill_during_save=int(kind.split(":")[1]))
        output = output_of(process, log)
        assert process.returncode == -signal.SIGKILL, (
            f"{kind}: exit {process.returncode}, not killed:\n{output[-3000:]}"
        )
        path = last_checkpoint(folder)
        steps_at_kill.append(torch.load(path, weights_only=False)["global_step"] if path else 0)
    process, log = fit_process(zygote, folder, args, resume=True)
    output = output_of(process, log)
    assert process.returncode == 0, output[-3000:]
    partials = glob.glob(os.path.join(folder, "logs", "fmaml", "version_*", "checkpoints", ".*.partial"))
    return {"kills": len(plan), "steps_at_kill": steps_at_kill, "partials_left": len(partials)}


def uninterrupted(folder, args) -> None:
    """The reference run, here in-process: what is tested is the killed runs, and this saves an interpreter
    start. Single-threaded, as the killed runs are (OMP_NUM_THREADS=1), so that both compare bit for bit."""
    folder.mkdir()
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(folder)
    try:
        main(["fit", *args, *QUIET])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def assert_same_state(a, b, path="checkpoint") -> float:
    """Exact equality of two (nested) checkpoint states; returns the largest difference seen (0)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        difference = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert torch.equal(a, b), f"{path}: largest difference {difference}"
        return difference
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        return max([assert_same_state(a[k], b[k], f"{path}.{k}") for k in a], default=0.0)
    if isinstance(a, list | tuple):
        assert len(a) == len(b), path
        return max(
            [assert_same_state(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))],
            default=0.0,
        )
    assert a == b, f"{path}: {a!r} != {b!r}"
    return 0.0


def last_logged_values(folder) -> dict[tuple[str, int], float]:
    """The last value logged for each (tag, step), over every event file of the run, in the order written
    (a resume logs the steps after its checkpoint again). Training time is wall-clock: left out."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = glob.glob(os.path.join(folder, "logs", "fmaml", "version_*", "events.out.tfevents.*"))
    events = []
    for path in files:
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                # Scalars only (add_scalar writes simple_value); text and hparams summaries are not values.
                if value.HasField("simple_value") and not value.tag.startswith("time/"):
                    events.append((event.wall_time, value.tag, event.step, value.simple_value))
    return {(tag, step): number for _, tag, step, number in sorted(events, key=lambda e: e[0])}


def check_kills(zygote, tmp_path, args, random_kills, kills_in_writes, seed):
    uninterrupted(tmp_path / "whole", args)
    report = train_with_kills(zygote, tmp_path / "killed", args, random_kills, kills_in_writes, seed)
    whole = torch.load(last_checkpoint(tmp_path / "whole"), weights_only=False)
    killed = torch.load(last_checkpoint(tmp_path / "killed"), weights_only=False)
    assert killed["global_step"] == whole["global_step"]
    largest = assert_same_state(whole["state_dict"], killed["state_dict"], "state_dict")
    largest = max(
        largest, assert_same_state(whole["optimizer_states"], killed["optimizer_states"], "optimizer")
    )
    logged_whole, logged_killed = (
        last_logged_values(tmp_path / "whole"),
        last_logged_values(tmp_path / "killed"),
    )
    assert logged_whole.keys() == logged_killed.keys(), set(logged_whole) ^ set(logged_killed)
    differing = {
        key: (logged_whole[key], logged_killed[key])
        for key in logged_whole
        if logged_whole[key] != logged_killed[key]
    }
    assert not differing, differing
    print(
        f"\n{report['kills']} SIGKILLs survived (steps at each kill: {report['steps_at_kill']}), largest difference {largest}"
    )
    return report


@pytest.mark.slow
def test_sinusoid_survives_sigkill_at_random_moments_and_during_writes(zygote, tmp_path):
    report = check_kills(zygote, tmp_path, SINUSOID, random_kills=2, kills_in_writes=[2], seed=0)
    assert report["kills"] == 3
    # Progress between kills: never back, and killed at different steps, not always at the start.
    steps = report["steps_at_kill"]
    assert steps == sorted(steps) and len(set(steps)) >= 2, report


@pytest.mark.slow
def test_tiny_omniglot_survives_sigkill_with_time_based_checkpoints(zygote, tmp_path, tmp_path_factory):
    root = tiny_omniglot_root(tmp_path_factory)
    report = check_kills(
        zygote, tmp_path, [*OMNIGLOT, f"--data.root={root}"], random_kills=1, kills_in_writes=[1], seed=1
    )
    assert report["kills"] == 2


@pytest.mark.parametrize("value", [0, -1.0])
def test_bad_checkpoint_minutes_are_refused(value):
    from fmaml.callbacks import Checkpoint

    with pytest.raises(ValueError, match=r"checkpoint.every_n_minutes=.*positive number of minutes"):
        Checkpoint(every_n_minutes=value)
