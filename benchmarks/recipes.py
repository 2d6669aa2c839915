"""Which recipe wins at the same budget: MAML, first-order MAML, MAML++, Meta-SGD and ANIL on real Omniglot
5-way 1-shot (the MAML paper's 1200/423 split, 15 query examples per class), each trained for the same
*training* time (validation excluded: `--training_time.budget_minutes`), then tested on the same 600
meta-test tasks, with differences from a paired comparison on those tasks.

    FMAML_DATA_ROOT=<folder with omniglot/> uv run python benchmarks/recipes.py \\
        --out benchmarks/results/recipes_5w1s --budget-minutes 20

Runs go `--parallel` at a time (default 2), each pinned to its own core with one thread, so that every
recipe gets the same machine. `--only maml,fomaml` runs a subset; a recipe whose test CSV exists is not
run again, so an interrupted comparison resumes where it stopped; `--report` only rebuilds the table and
the plot from what is on disk. Outputs in --out: `logs/<recipe>/version_0` (TensorBoard, checkpoints),
`<recipe>_test<k>.csv` (per-task metrics after k evaluation steps), `<recipe>.log`, `results.json`,
`results.md` (the table) and `curves.png` (validation accuracy against training minutes, every recipe).

Each recipe is its config file with only the task and the budget changed; the comments below say where
a setting differs from its paper and why.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASK_5W1S = ["--data.ways=5", "--data.shots=1", "--data.query_shots=15"]
COMMON = [
    "--data.dataset.init_args.split=paper",
    "--data.evaluation.num_val_tasks=100",
    "--trainer.val_check_interval=100",  # the same validation schedule (in steps) for every recipe
    "--trainer.log_every_n_steps=50",
    "--trainer.enable_progress_bar=false",
    # One engine for all: `auto` would spend its first step measuring candidates (a minute on one thread,
    # counted as training time); on this CPU's ConvNets it picks the loop or a chunked vmap within ~10%.
    "--model.execution.strategy=loop",
]
# MAML++'s schedules are lengths in steps (cosine over max_steps, multi-step-loss annealing, first order
# until a step); its paper's 50,000 steps would leave all three at their start in a 20-minute run, so they
# are scaled to the steps this budget reaches, in the paper's proportions (multi-step loss annealed over
# the first 10%, second order from the middle). The old MAML++ row (BatchNorm adapted, no per-step
# BatchNorm) took 2.77 s per step on one thread beside another run (430 steps in 20 minutes); with per-step
# BatchNorm and its running statistics it took 5.09 s (236 of 350 steps); without the statistics' replay of
# each inner trajectory (22-33% of a step, fmaml/per_step_batch_norm.py), about 4 s: 300.
MAMLPP_STEPS = 300
# Reptile's meta-steps in 20 minutes on one thread: a first run sized at 1,300 steps from a pilot beside
# other work took 0.28 s per step and stopped at 1,300 after 6 minutes, so 20 minutes is about 4,200.
REPTILE_STEPS = 4200
RECIPES: dict[str, dict] = {
    "maml": {"args": ["--config", "configs/omniglot_5w1s.yaml"], "label": "MAML"},
    "fomaml": {
        "args": ["--config", "configs/omniglot_5w1s.yaml", "--model.inner_loop.first_order=true"],
        "label": "first-order MAML",
    },
    "mamlpp": {
        "args": [
            "--config",
            "configs/omniglot_mamlpp.yaml",
            *TASK_5W1S,
            f"--trainer.max_steps={MAMLPP_STEPS}",
            f"--model.meta_objective.msl_anneal_steps={MAMLPP_STEPS // 10}",
            f"--model.inner_loop.second_order_from_step={MAMLPP_STEPS // 2}",
        ],
        "label": "MAML++",
    },
    # Meta-SGD: one step with a learned rate per parameter element, initialised to MAML's 0.4 (the paper
    # draws them from [0.005, 0.1]; starting from MAML's working rate keeps the comparison about learning
    # the rates, not about their start).
    "metasgd": {
        "args": [
            "--config",
            "configs/omniglot_5w1s.yaml",
            "--model.inner_loop.optimizer=fmaml.inner_optimizers.SGD",
            "--model.inner_loop.optimizer.lr=0.4",
            "--model.inner_loop.optimizer.learn_lr=per_parameter",
        ],
        "label": "Meta-SGD",
    },
    "anil": {"args": ["--config", "configs/omniglot_anil.yaml", *TASK_5W1S], "label": "ANIL"},
    # MAML with an Adam inner loop (torch.optim.Adam's rule, differentiated through). Adam's first step
    # moves every weight by about lr whatever its gradient (m/sqrt(v) is ~sign(g)), where SGD's 0.4 * g
    # moves a few weights far and most hardly at all. lr 0.001 is 5% of the median |weight| of the 64-filter
    # convolutions (0.02); 0.01, which matches the median of SGD's first step (0.4 x median |g| = 0.0099
    # at initialisation), moves every weight by half its size and reached 56.8% in a first run (beside
    # other work, 194 steps; MAML 84.2% at 214): a pilot, not a tuned rate.
    "maml_adam": {
        "args": [
            "--config",
            "configs/omniglot_5w1s.yaml",
            "--model.inner_loop.optimizer=torch.optim.Adam",
            "--model.inner_loop.optimizer.lr=0.001",
        ],  # fmt: skip
        "label": "MAML, Adam inner loop",
    },
    # iMAML: configs/omniglot_imaml.yaml (its paper's code: 16 inner SGD steps at 0.1, λ = 2, 5 CG steps,
    # meta-batch 32) on this task. Tested after 5 steps (paired with MAML's 5) and after its own 16.
    "imaml": {
        "args": ["--config", "configs/omniglot_imaml.yaml", *TASK_5W1S],
        "label": "iMAML",
        "eval_steps": (5, 16),
    },
    # Reptile: configs/omniglot_reptile.yaml (its paper's: 5 inner Adam steps at 0.001 with β1 = 0,
    # meta-batch 5, SGD at 1.0 on θ - φ annealed linearly to 0). The anneal is scaled to the steps this
    # budget reaches (REPTILE_STEPS), as MAML++'s schedules are. Tested after 5 steps and after its own 50.
    "reptile": {
        "args": [
            "--config",
            "configs/omniglot_reptile.yaml",
            *TASK_5W1S,
            f"--trainer.max_steps={REPTILE_STEPS}",
            f"--model.lr_scheduler.init_args.total_iters={REPTILE_STEPS}",
        ],
        "label": "Reptile",
        "eval_steps": (5, 50),
    },
    # Omniglot 20-way 1-shot, the paper's settings (5 inner steps of 0.1, meta-batch 16), its own budget.
    "maml_20w1s": {"args": ["--config", "configs/omniglot_20w1s.yaml"], "label": "MAML 20-way 1-shot"},
}
# Every recipe is tested after the same numbers of inner steps, paired with MAML's after the same; iMAML
# and Reptile, trained with many more inner steps, also after their own number (`eval_steps`).
EVAL_STEPS = (3, 5)
REFERENCE = "maml"


def fit_command(name: str, out: Path, budget_minutes: float) -> list[str]:
    return [
        sys.executable, "-m", "fmaml", "fit", *RECIPES[name]["args"], *COMMON,
        f"--training_time.budget_minutes={budget_minutes}",
        f"--trainer.logger.init_args.save_dir={out / 'logs'}",
        f"--trainer.logger.init_args.name={name}",
    ]  # fmt: skip


def test_command(name: str, out: Path, eval_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "fmaml", "test", *RECIPES[name]["args"], *COMMON,
        f"--ckpt_path={checkpoint(name, out)}", f"--model.inner_loop.eval_steps={eval_steps}",
        f"--per_task_csv.path={test_csv(name, out, eval_steps)}", "--trainer.logger=false",
    ]  # fmt: skip


def checkpoint(name: str, out: Path) -> Path:
    return out / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"


def eval_steps(name: str) -> tuple[int, int]:
    return RECIPES[name].get("eval_steps", EVAL_STEPS)


def tested(name: str, out: Path) -> bool:
    return all(test_csv(name, out, k).exists() for k in eval_steps(name))


def test_csv(name: str, out: Path, eval_steps: int) -> Path:
    return out / f"{name}_test{eval_steps}.csv"


def run_recipe(name: str, out: Path, budget_minutes: float, core: int) -> subprocess.Popen:
    """Fit, then test after each of its eval steps, in one shell pinned to `core` with one thread."""
    commands = [fit_command(name, out, budget_minutes)] if not checkpoint(name, out).exists() else []
    commands += [test_command(name, out, k) for k in eval_steps(name)]
    script = " && ".join(subprocess.list2cmdline(["taskset", "-c", str(core), *c]) for c in commands)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(out / f"{name}.log", "a")  # noqa: SIM115 (closed with the process, in main)
    log.write(f"$ {script}\n")
    log.flush()
    return subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def read_tasks(path: Path) -> list[float]:
    with open(path) as f:
        return [float(row["accuracy"]) for row in csv.DictReader(f)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation, as fmaml's test prints)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * sd / math.sqrt(n)


def training_record(name: str, out: Path, earlier: dict) -> dict:
    """Steps and training seconds from the run's checkpoint, or, where the logs are gone (they are not kept
    in the repository), from the earlier results.json."""
    if not checkpoint(name, out).exists() and name in earlier:
        return {k: earlier[name][k] for k in ("steps", "train_seconds", "seconds_per_step")}
    state = torch.load(checkpoint(name, out), map_location="cpu", weights_only=False)
    seconds = next(v["seconds"] for k, v in state["callbacks"].items() if "TrainingTime" in k)
    steps = state["global_step"]
    return {"steps": steps, "train_seconds": seconds, "seconds_per_step": seconds / max(steps, 1)}


def report(out: Path, names: list[str]) -> dict:
    """results.json: per recipe, test{k} = (mean, 95% CI) after k eval steps and minus_maml{k} = the paired
    difference from MAML after the same column's steps (3 or 5); results.md, the table; curves.png."""
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    # Recipes not in `names` keep their earlier records: `--only` never drops another recipe's results.
    results: dict[str, dict] = {name: record for name, record in earlier.items() if name not in names}
    for name in names:
        if not tested(name, out):
            continue
        record = training_record(name, out, earlier) | {"label": RECIPES[name]["label"]}
        record["eval_steps"] = list(eval_steps(name))
        for k, reference_k in zip(eval_steps(name), EVAL_STEPS, strict=True):
            tasks = read_tasks(test_csv(name, out, k))
            record[f"test{k}"] = mean_ci(tasks)
            record[f"tasks{k}"] = len(tasks)
            reference = test_csv(REFERENCE, out, reference_k)
            if name != REFERENCE and reference.exists() and name != "maml_20w1s":
                differences = [a - b for a, b in zip(tasks, read_tasks(reference), strict=True)]
                record[f"minus_{REFERENCE}{k}"] = mean_ci(differences)
        results[name] = record
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        "| recipe | test acc., 3 eval steps | 5 eval steps | − MAML (paired, 3 / 5 steps) | meta-steps | s / step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        accuracies, paired = [], []
        for k, column_steps in zip(r.get("eval_steps", EVAL_STEPS), EVAL_STEPS, strict=True):
            own = f" ({k} steps)" if k != column_steps else ""
            accuracies.append(f"{100 * r[f'test{k}'][0]:.2f} ± {100 * r[f'test{k}'][1]:.2f} %{own}")
            if f"minus_{REFERENCE}{k}" in r:
                mean, ci = r[f"minus_{REFERENCE}{k}"]
                paired.append(f"{100 * mean:+.2f} ± {100 * ci:.2f}{own}")
        lines.append(
            f"| {r['label']} | {accuracies[0]} | {accuracies[1]} | {' / '.join(paired)} | {r['steps']:,} | "
            f"{r['seconds_per_step']:.2f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    eligible = [n for n in results if n != "maml_20w1s"]
    runs = [n for n in eligible if checkpoint(n, out).exists()]
    # Curves need the logs, which stay out of git: recipes run later get a plot of their own.
    plot = "curves.png" if runs == eligible else "curves_" + "_".join(runs) + ".png"
    if runs:
        from fmaml import curves

        curves.export(
            [str(checkpoint(n, out).parent.parent) for n in runs], ["val/accuracy"], str(out / plot),
            None, x="training_time", labels=[RECIPES[n]["label"] for n in runs],
        )  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/recipes_5w1s")
    parser.add_argument(
        "--budget-minutes", type=float, default=20.0, help="training minutes per 5-way recipe"
    )
    parser.add_argument("--budget-minutes-20way", type=float, default=30.0)
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated; default: %(default)s")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one core each")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"--only: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if not args.report and "FMAML_DATA_ROOT" not in os.environ:
        parser.error("set FMAML_DATA_ROOT to the folder holding omniglot/ (the two official zips)")
    cores = os.sched_getaffinity(0)
    if args.parallel > len(cores):
        parser.error(f"--parallel={args.parallel}: this machine lets this process use {len(cores)} core(s)")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        pending = [n for n in names if not tested(n, args.out)]
        free, running = sorted(cores)[: args.parallel], {}
        while pending or running:
            while pending and free:
                name, core = pending.pop(0), free.pop(0)
                budget = args.budget_minutes_20way if name == "maml_20w1s" else args.budget_minutes
                running[name] = (run_recipe(name, args.out, budget, core), core, time.time())
                print(f"started {name} on core {core}", flush=True)
            time.sleep(5)
            for name, (process, core, started) in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    free.append(core)
                    status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                    print(f"{name}: {status} after {(time.time() - started) / 60:.1f} min", flush=True)
    report(args.out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
