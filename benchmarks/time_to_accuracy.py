"""Time to accuracy: the wall time and meta-steps a fit takes to reach a validation accuracy.

    FMAML_DATA_ROOT=<folder holding omniglot/> uv run python benchmarks/time_to_accuracy.py \\
        --target 0.97 --budget-minutes 4 --json benchmarks/results/time_to_accuracy_gpu.json

Trains `--config` (default configs/omniglot.yaml, Omniglot 5-way 5-shot: the main command's config,
strategy=auto included) in this process through `fmaml.cli.main`, validating every `--val-every` meta-steps
(the resolution of the step count), and stops at the first validation whose `val/accuracy` is at least
`--target`, or at the first step boundary past `--budget-minutes` of wall time since training started
(then `reached` is false and `best_accuracy` says how close it got). Arguments after `--` go to fmaml
unchanged (a smoke run passes tiny settings there). Logs and checkpoints go to a temporary folder: the JSON
is the result.

JSON: target, reached, steps (the meta-step of the validation that reached the target, else null), seconds
(wall time from the start of training to the end of that validation, validation and strategy=auto's
measuring included; else null), train_seconds (the same span counting training steps only, fmaml's
TrainingTime), best_accuracy, elapsed_seconds, budget_minutes, curve ([{step, seconds, accuracy}], one
entry per validation), args (fmaml's), torch, device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from fmaml.callbacks import TrainingTime
from fmaml.cli import main as fmaml_main

ROOT = Path(__file__).resolve().parent.parent
METRIC = "val/accuracy"  # fmaml.module logs every evaluation metric as "<stage>/<name>"


class StopAtAccuracy(Callback):
    """Records `val/accuracy` after every validation of the fit and stops the fit once it reaches
    `target`, or once `budget_seconds` of wall time have passed since training started."""

    def __init__(self, target: float, budget_seconds: float) -> None:
        self.target = target
        self.budget_seconds = budget_seconds
        self.started: float | None = None
        self.curve: list[dict] = []
        self.reached: dict | None = None
        self.train_seconds: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.elapsed() > self.budget_seconds:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.started is None or METRIC not in trainer.callback_metrics:
            return
        point = {
            "step": trainer.global_step,
            "seconds": self.elapsed(),
            "accuracy": trainer.callback_metrics[METRIC].item(),
        }
        self.curve.append(point)
        print(
            f"step {point['step']}: {METRIC} {point['accuracy']:.4f} at {point['seconds']:.1f} s", flush=True
        )
        if self.reached is None and point["accuracy"] >= self.target:
            self.reached = point
            self.train_seconds = training_seconds(trainer)
            trainer.should_stop = True

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started


def training_seconds(trainer) -> float | None:
    """fmaml's TrainingTime count (training steps only), when the trainer has that callback."""
    counters = [c for c in trainer.callbacks if isinstance(c, TrainingTime)]
    return counters[0].seconds if counters else None


def fit_args(config: Path, val_every: int, logs: str, extra: list[str]) -> list[str]:
    # Validation every `val_every` steps; no cap on the steps but the config's max_steps (the stop is ours).
    return [
        "fit",
        f"--config={config}",
        f"--trainer.val_check_interval={val_every}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={logs}",
        *extra,
    ]


def result(stop: StopAtAccuracy, args: argparse.Namespace, fmaml_args: list[str], device: str) -> dict:
    reached = stop.reached
    return {
        "target": args.target,
        "reached": reached is not None,
        "steps": reached["step"] if reached else None,
        "seconds": reached["seconds"] if reached else None,
        "train_seconds": stop.train_seconds,
        "best_accuracy": max((p["accuracy"] for p in stop.curve), default=None),
        "elapsed_seconds": stop.elapsed(),
        "budget_minutes": args.budget_minutes,
        "curve": stop.curve,
        "args": fmaml_args,
        "torch": torch.__version__,
        "device": device,
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs/omniglot.yaml")
    parser.add_argument("--target", type=float, default=0.97, help="validation accuracy to reach, in (0, 1]")
    parser.add_argument("--val-every", type=int, default=100, help="meta-steps between validations")
    parser.add_argument("--budget-minutes", type=float, default=4.0, help="wall time before giving up")
    parser.add_argument("--json", type=Path, required=True, help="write the result here")
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    if not 0 < args.target <= 1:
        parser.error(f"--target={args.target}: give an accuracy in (0, 1], e.g. 0.97")
    if args.val_every < 1:
        parser.error(f"--val-every={args.val_every}: give a number of meta-steps >= 1, e.g. 100")
    if not args.budget_minutes > 0:
        parser.error(f"--budget-minutes={args.budget_minutes}: give a positive number of minutes, e.g. 4")
    return args, extra


def main(argv: list[str] | None = None) -> dict:
    args, extra = parse_args(argv)
    stop = StopAtAccuracy(args.target, 60 * args.budget_minutes)
    with tempfile.TemporaryDirectory(prefix="time_to_accuracy_") as logs:
        fmaml_args = fit_args(args.config, args.val_every, logs, extra)
        cli = fmaml_main(fmaml_args, callbacks=[stop])
        device = str(cli.trainer.strategy.root_device)
    record = result(stop, args, fmaml_args, device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    if record["reached"]:
        print(f"reached {METRIC} >= {args.target} at step {record['steps']} after {record['seconds']:.1f} s")
    else:
        print(f"not reached in {args.budget_minutes} min: best {METRIC} {record['best_accuracy']}")
    return record


if __name__ == "__main__":
    main()
