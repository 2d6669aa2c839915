"""MAML++'s per-step running statistics (BNRS) at evaluation: one checkpoint trained with them, tested on the
same tasks twice, normalising with the per-step running statistics (eval mode, as the MAML++ paper
describes) and with each batch's own statistics (as MAML++'s code does: F.batch_norm(training=True) always).

    FMAML_DATA_ROOT=<folder with omniglot/> OMP_NUM_THREADS=1 uv run python benchmarks/mamlpp_bn_statistics.py \\
        --ckpt <mamlpp run with batch_norm.running_stats: true>/checkpoints/last.ckpt \\
        --json benchmarks/results/mamlpp_bn_statistics.json -- <the run's data and model arguments>

The second test keeps the network in train mode through a Lightning callback (nothing is patched): in
train mode fmaml's PerStepBatchNorm2d normalises with batch statistics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fmaml.cli import main  # noqa: E402


class BatchStatistics(L.Callback):
    """Test with the network in train mode: each batch normalised with its own statistics."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pl_module.network.train()


def accuracy(arguments: list[str], callbacks: list) -> dict:
    cli = main(arguments, callbacks=callbacks)
    metrics = cli.trainer.callback_metrics
    return {"mean": metrics["test/accuracy_mean"].item(), "ci95": metrics["test/accuracy_ci95"].item()}


def run(ckpt: str, extra: list[str]) -> dict:
    arguments = ["test", *extra, f"--ckpt_path={ckpt}", "--trainer.logger=false"]
    return {
        "command": "uv run python benchmarks/mamlpp_bn_statistics.py " + " ".join(sys.argv[1:]),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "torch": torch.__version__,
        "checkpoint_step": torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"],
        "per_step_running_statistics": accuracy(arguments, []),
        "batch_statistics": accuracy(arguments, [BatchStatistics()]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("extra", nargs="*", help="after --: the run's config and overrides")
    args = parser.parse_args()
    result = run(args.ckpt, args.extra)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
