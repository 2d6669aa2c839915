"""Mixed precision (bf16, fp16) against float32 under every strategy: the meta-gradient, its time, and
whether training still gets there.

    uv run python benchmarks/mixed_precision.py gradient --json benchmarks/results/mixed_precision/gradient.json
    FMAML_DATA_ROOT=<folder with omniglot/> uv run python benchmarks/mixed_precision.py train \\
        --out benchmarks/results/mixed_precision --steps 300 --strategy vmap

`gradient`: the meta-gradient of one synthetic Omniglot 5-way 5-shot meta-batch (bench_vs_higher.py's
ConvNet and tasks, meta-batch 8, one inner step) in bf16 and fp16 by the engine's explicit casts
(`meta_loss(compute_dtype=...)`, what `--trainer.precision=bf16-mixed` / `16-mixed` run), for each
strategy and memory mode, against float32: relative error in norm, cosine, and the median seconds of a
meta-gradient beside float32's. One more row per memory mode is what fmaml ran before the casts: the loop
under `torch.autocast(bfloat16)` (vmap fails under autocast in this torch).

`train`: two fits of configs/omniglot.yaml (real Omniglot 5-way 5-shot) of the same number of steps and
strategy, float32 and `--trainer.precision=bf16-mixed`, at the same time, each pinned to its own core
with one thread (or, with `--core N`, one after the other on core N), then each tested on the same 600
meta-test tasks (mean ± 95% CI, and the paired difference).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def gradient(
    json_path: Path | None,
    device: str,
    strategies: list[str],
    precisions: list[str],
    steps: int,
    meta_batch: int,
    repeats: int,
) -> None:
    from bench_vs_higher import WORKLOADS, _sync, make_model, make_tasks

    from fmaml import meta_loss

    workload = WORKLOADS["omniglot5w5s"]
    model = make_model(workload, device, 0)
    tasks = make_tasks(workload, meta_batch, device, 0)

    def meta_gradient(strategy: str, memory: str, compute_dtype=None, autocast: bool = False):
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            value, _ = meta_loss(
                params, {}, tasks, model=model, loss="cross_entropy", steps=steps, lr=0.4,
                strategy=strategy, memory=memory, compute_dtype=compute_dtype, metrics_before=False,
            )  # fmt: skip
        value.backward()
        return torch.cat([p.grad.flatten() for p in params.values()])

    def agreement(low: torch.Tensor, reference: torch.Tensor) -> dict:
        error = ((low - reference).norm() / reference.norm()).item()
        return {
            "relative_error": error,
            "cosine": torch.nn.functional.cosine_similarity(low, reference, 0).item(),
        }

    def seconds(strategy: str, memory: str, compute_dtype=None) -> float:
        """The median of `repeats` meta-gradients, after one untimed (warm-up)."""
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            meta_gradient(strategy, memory, compute_dtype)
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    rows = []
    for memory in ("store", "recompute"):
        reference = meta_gradient("loop", memory)
        # What fmaml did before explicit casts: the loop under torch.autocast (vmap fails under it).
        row = {"strategy": "loop", "memory": memory, "precision": "bf16 autocast"}
        rows.append(row | agreement(meta_gradient("loop", memory, autocast=True), reference))
        for strategy in strategies:
            float32_seconds = seconds(strategy, memory) if repeats else None
            for name in precisions:
                dtype = DTYPES[name]
                row = {"strategy": strategy, "memory": memory, "precision": name}
                row |= agreement(meta_gradient(strategy, memory, dtype), reference)
                if repeats:  # timings only from a run alone on its device (--repeats 0: none)
                    row |= {"seconds": seconds(strategy, memory, dtype), "float32_seconds": float32_seconds}
                rows.append(row)
    for row in rows:
        timing = (
            f", {row['seconds']:.3f} s vs float32 {row['float32_seconds']:.3f} s" if "seconds" in row else ""
        )
        print(
            f"{row['strategy']:>10} {row['memory']:>9} {row['precision']:>13}: relative error "
            f"{row['relative_error']:.3g}, cosine {row['cosine']:.4f}{timing}"
        )
    if json_path:
        setup = {"device": device, "steps": steps, "meta_batch": meta_batch, "repeats": repeats}
        record = {"rows": rows, "setup": setup, "torch": torch.__version__}
        json_path.write_text(json.dumps(record, indent=1) + "\n")


def accuracies(path: Path) -> list[float]:
    with open(path) as f:
        return [float(row["accuracy"]) for row in csv.DictReader(f)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    n, mean = len(values), sum(values) / len(values)
    return mean, 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def train(out: Path, steps: int, meta_batch: int, core: int | None, strategy: str) -> None:
    if "FMAML_DATA_ROOT" not in os.environ:
        sys.exit("set FMAML_DATA_ROOT to the folder holding omniglot/ (the two official zips)")
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "--config", "configs/omniglot.yaml", f"--model.execution.strategy={strategy}", f"--trainer.max_steps={steps}",
        f"--data.meta_batch_size={meta_batch}", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
    ]  # fmt: skip
    processes = {}
    for i, precision in enumerate(("32-true", "bf16-mixed")):
        name = precision.replace("-", "_")
        run = [*common, f"--trainer.precision={precision}", f"--trainer.logger.init_args.name={name}"]
        ckpt = out / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"
        fit = [sys.executable, "-m", "fmaml", "fit", *run]
        test = [sys.executable, "-m", "fmaml", "test", *run, f"--ckpt_path={ckpt}", "--trainer.logger=false"]
        test += [f"--per_task_csv.path={out / (name + '_test.csv')}"]
        pinned = str(i if core is None else core)
        script = " && ".join(subprocess.list2cmdline(["taskset", "-c", pinned, *c]) for c in (fit, test))
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        processes[name] = (
            subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log, stderr=log),
            log,
        )
    for name, (process, log) in processes.items():
        process.wait()
        log.close()
        if process.returncode:
            sys.exit(f"{name} failed (exit {process.returncode}); see {out / (name + '.log')}")
    results = {name: accuracies(out / f"{name}_test.csv") for name in processes}
    for name, values in results.items():
        mean, ci = mean_ci(values)
        print(
            f"{name}: test accuracy {100 * mean:.2f} ± {100 * ci:.2f} % on {len(values)} tasks after {steps} steps"
        )
    difference = [b - a for a, b in zip(results["32_true"], results["bf16_mixed"], strict=True)]
    mean, ci = mean_ci(difference)
    print(f"bf16-mixed minus float32, paired over the same tasks: {100 * mean:+.2f} ± {100 * ci:.2f} points")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    grad = sub.add_parser("gradient")
    grad.add_argument("--json", type=Path, help="write the relative error, cosine and seconds per row here")
    grad.add_argument("--device", default="cpu")
    grad.add_argument("--strategies", nargs="+", default=["loop", "vmap", "chunked:4"])
    grad.add_argument("--precisions", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    grad.add_argument("--steps", type=int, default=1, help="inner steps")
    grad.add_argument("--meta-batch", type=int, default=8)
    grad.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed meta-gradients per row (median); 0: agreement only, untimed",
    )
    training = sub.add_parser("train")
    training.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mixed_precision")
    training.add_argument("--steps", type=int, default=300)
    training.add_argument("--meta-batch", type=int, default=8)
    training.add_argument("--core", type=int, help="run both on this core, one after the other")
    training.add_argument("--strategy", default="vmap", help="model.execution.strategy of both runs")
    args = parser.parse_args()
    if args.command == "gradient":
        gradient(
            args.json,
            args.device,
            args.strategies,
            args.precisions,
            args.steps,
            args.meta_batch,
            args.repeats,
        )
    else:
        train(args.out, args.steps, args.meta_batch, args.core, args.strategy)


if __name__ == "__main__":
    main()
