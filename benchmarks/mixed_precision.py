"""bf16 mixed precision against float32: the meta-gradient, and whether training still gets there.

    uv run python benchmarks/mixed_precision.py gradient --json benchmarks/results/mixed_precision/gradient.json
    FMAML_DATA_ROOT=<folder with omniglot/> uv run python benchmarks/mixed_precision.py train \\
        --out benchmarks/results/mixed_precision --steps 300

`gradient`: the meta-gradient of one synthetic Omniglot 5-way 5-shot meta-batch (bench_vs_higher.py's
ConvNet and tasks, meta-batch 8, one inner step) under `torch.autocast(bfloat16)`, against the same in
float32: relative error in norm and cosine, for the loop with memory "store" and "recompute" (vmap over
the inner gradient fails under autocast in torch 2.15, so fmaml refuses it with a mixed precision).

`train`: two fits of configs/omniglot.yaml (real Omniglot 5-way 5-shot) of the same number of steps,
float32 and `--trainer.precision=bf16-mixed`, at the same time, each pinned to its own core with one
thread (or, with `--core N`, one after the other on core N), then each tested on the same 600 meta-test
tasks (mean ± 95% CI, and the paired difference).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def gradient(json_path: Path | None) -> None:
    from bench_vs_higher import WORKLOADS, make_model, make_tasks

    from fmaml import meta_loss

    workload = WORKLOADS["omniglot5w5s"]
    model = make_model(workload, "cpu", 0)
    tasks = make_tasks(workload, 8, "cpu", 0)

    def meta_gradient(memory: str, autocast: bool) -> torch.Tensor:
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value, _ = meta_loss(
                params,
                {},
                tasks,
                model=model,
                loss="cross_entropy",
                steps=1,
                lr=0.4,
                strategy="loop",
                memory=memory,
            )
        value.backward()
        return torch.cat([p.grad.flatten() for p in params.values()])

    results = {}
    for memory in ("store", "recompute"):
        reference, low = meta_gradient(memory, False), meta_gradient(memory, True)
        error = ((low - reference).norm() / reference.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(low, reference, 0).item()
        results[memory] = {"relative_error": error, "cosine": cosine}
        print(
            f"loop, {memory}: bf16-mixed vs float32 meta-gradient relative error {error:.3g}, cosine {cosine:.4f}"
        )
    if json_path:
        json_path.write_text(json.dumps({"loop": results, "torch": torch.__version__}, indent=1) + "\n")


def accuracies(path: Path) -> list[float]:
    with open(path) as f:
        return [float(row["accuracy"]) for row in csv.DictReader(f)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    n, mean = len(values), sum(values) / len(values)
    return mean, 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def train(out: Path, steps: int, meta_batch: int, core: int | None) -> None:
    if "FMAML_DATA_ROOT" not in os.environ:
        sys.exit("set FMAML_DATA_ROOT to the folder holding omniglot/ (the two official zips)")
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "--config", "configs/omniglot.yaml", "--model.strategy=loop", f"--trainer.max_steps={steps}",
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
        test += [f"--model.per_task_csv={out / (name + '_test.csv')}"]
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
    grad.add_argument("--json", type=Path, help="write the relative error and cosine per memory mode here")
    training = sub.add_parser("train")
    training.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mixed_precision")
    training.add_argument("--steps", type=int, default=300)
    training.add_argument("--meta-batch", type=int, default=8)
    training.add_argument("--core", type=int, help="run both on this core, one after the other")
    args = parser.parse_args()
    if args.command == "gradient":
        gradient(args.json)
    else:
        train(args.out, args.steps, args.meta_batch, args.core)


if __name__ == "__main__":
    main()
