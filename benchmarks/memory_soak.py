"""Peak RSS over a long CPU fit, to show that memory stays flat across meta-steps and validation loops.

    uv run python benchmarks/memory_soak.py --steps 2000 --config configs/sinusoid.yaml \\
        --json benchmarks/results/memory_soak_cpu.json

Runs `fit` through the same CLI users run (validation every --val-every steps) and prints the process's
resident memory at a few steps, plus its peak, so a leak shows up as growth between the rows.
"""

import argparse
import json
import resource
import tempfile

import lightning as L

from fmaml.cli import MAMLCLI, TRAINER_DEFAULTS
from fmaml.data import MetaDataModule
from fmaml.module import MAML


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class RSSProbe(L.Callback):
    def __init__(self, at: list[int]):
        self.at, self.rows = set(at), []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step in self.at:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.rows.append((trainer.global_step, rss_mb(), peak))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/sinusoid.yaml")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--json", help="write the rows (step, RSS MB, peak RSS MB) here")
    args = parser.parse_args()
    probe = RSSProbe([1, 100, 500, 1000, args.steps // 2, args.steps])
    with tempfile.TemporaryDirectory() as logs:
        MAMLCLI(
            MAML,
            MetaDataModule,
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [probe]},
            seed_everything_default=0,
            args=["fit", "--config", args.config, f"--trainer.max_steps={args.steps}"]
            + [
                f"--trainer.val_check_interval={args.val_every}",
                f"--trainer.logger.init_args.save_dir={logs}",
            ]
            + [
                "--trainer.enable_progress_bar=false",
                "--trainer.accelerator=cpu",
                "--data.evaluation.num_val_tasks=100",
            ],
        )
    print("| step | RSS MB | peak RSS MB |\n| --- | --- | --- |")
    for step, rss, peak in probe.rows:
        print(f"| {step} | {rss:.0f} | {peak:.0f} |")
    if args.json:
        rows = [{"step": step, "rss_mb": rss, "peak_rss_mb": peak} for step, rss, peak in probe.rows]
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "val_every": args.val_every, "rows": rows}, f, indent=1)
