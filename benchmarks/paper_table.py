"""The README's table beside the MAML paper: train each row with plain `python -m fmaml fit`, test its
`last.ckpt` with `python -m fmaml test`, and write every figure the table shows to one JSON file.

    OMP_NUM_THREADS=1 uv run python benchmarks/paper_table.py --rows sinusoid_K5,sinusoid_K10,sinusoid_K20
    OMP_NUM_THREADS=1 uv run python benchmarks/paper_table.py --rows omniglot_5w1s_paper --omniglot-steps 1000
    uv run python benchmarks/paper_table.py --report     # the README's rows, from the JSON

Each row trains a fixed number of steps (never a time limit, so the result does not depend on the
machine's load), then each test writes its per-task metrics (`--per_task_csv.path`); the mean and the 95%
confidence interval are computed from that CSV with the same function `fmaml test` prints. The training
wall time is the `fit` process's, start to exit (data loading and validation included), so it is a
property of the machine at the time, recorded beside the thread count and the note.

The JSON (`--out`, default benchmarks/results/paper_table.json) is updated row by row under a file lock,
so two invocations (one per core) can fill the same file; a row already in it is not run again. Logs,
checkpoints and per-task CSVs go under `--work`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fmaml.task_metrics import ci95_half_width  # noqa: E402  (the repository's own CI, as `fmaml test` prints it)

QUIET = ["--trainer.enable_progress_bar=false"]
# The MLP's engine: what `strategy=auto` picks for it on this CPU; fixed so no run spends its first step
# measuring, nor reads another run's cached choice.
SINUSOID = ["--config", "configs/sinusoid.yaml", "--model.execution.strategy=vmap"]
# Omniglot 5-way 1-shot on the paper's split with 1 query example per class, as the paper's code samples;
# the loop engine, as benchmarks/recipes.py fixes it, for the same reason.
OMNIGLOT = [
    "--config",
    "configs/omniglot_5w1s.yaml",
    "--data.dataset.init_args.split=paper",
    "--model.execution.strategy=loop",
]
ROWS: dict[str, dict] = {
    **{
        f"sinusoid_K{k}": {
            # Compiled for training only: over 70,000 steps the compiled step (several times faster than
            # eager in benchmarks/results/cpu.json) repays its compilation; a 600-task test would not.
            "fit": [*SINUSOID, f"--data.shots={k}", "--model.execution.compile=true"],
            "tests": {
                f"steps={steps}": [*SINUSOID, f"--data.shots={k}", f"--model.inner_loop.eval_steps={steps}"]
                for steps in (1, 5, 10)
            },
        }
        for k in (5, 10, 20)
    },
    "omniglot_5w1s_paper": {
        "fit": [
            *OMNIGLOT,
            "--data.query_shots=1",
            "--data.evaluation.num_val_tasks=200",
            "--trainer.val_check_interval=250",
        ],
        "tests": {f"query_shots={q}": [*OMNIGLOT, f"--data.query_shots={q}"] for q in (1, 15)},
    },
    # The main command's own settings (configs/omniglot.yaml, strategy=auto included) on the paper split, so
    # that a new user sees what `python -m fmaml fit --config configs/omniglot.yaml` reaches and how fast.
    # The one row trained for a time, not a step count: the question it answers is "after 30 minutes".
    "omniglot_5w5s_main": {
        "fit": [
            "--config",
            "configs/omniglot.yaml",
            "--data.dataset.init_args.split=paper",
            "--training_time.budget_minutes=30",
        ],
        "tests": {"steps=3": ["--config", "configs/omniglot.yaml", "--data.dataset.init_args.split=paper"]},
    },
}


def _fmaml(subcommand: str, args: list[str], log: Path) -> float:
    """Run `python -m fmaml <subcommand> <args>` from the repository root; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "fmaml", subcommand, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        raise SystemExit(f"`fmaml {subcommand}` failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def _logger(work: Path, name: str) -> list[str]:
    return [f"--trainer.logger.init_args.save_dir={work / 'logs'}", f"--trainer.logger.init_args.name={name}"]


def _mean_ci(per_task_csv: Path) -> dict:
    """The main metric's mean and 95% CI over the test tasks, from the per-task CSV `fmaml test` wrote."""
    with open(per_task_csv) as f:
        rows = list(csv.DictReader(f))
    main = "accuracy" if "accuracy" in rows[0] else "loss"
    values = torch.tensor([float(row[main]) for row in rows], dtype=torch.float64)
    return {
        "metric": main,
        "mean": values.mean().item(),
        "ci95": ci95_half_width(values),
        "num_tasks": len(rows),
    }


def _command(subcommand: str, args: list[str]) -> str:
    return "uv run python -m fmaml " + subcommand + " " + shlex.join(args)


def run_row(name: str, work: Path, extra_fit: list[str]) -> dict:
    row = ROWS[name]
    fit_args = [*row["fit"], *extra_fit, *QUIET, *_logger(work, name)]
    seconds = _fmaml("fit", fit_args, work / f"{name}_fit.log")
    ckpt = sorted((work / "logs" / name).glob("version_*/checkpoints/last.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    steps = int(state["global_step"])
    # Training time without validation, as `--training_time.budget_minutes` counts it.
    train_seconds = next((v["seconds"] for k, v in state["callbacks"].items() if "TrainingTime" in k), None)
    result = {
        "fit_command": _command("fit", fit_args),
        "fit_wall_seconds": round(seconds, 1),
        "steps": steps,
        "train_seconds": train_seconds,
        "checkpoint": str(ckpt),
        "tests": {},
    }
    for label, args in row["tests"].items():
        per_task = work / f"{name}_test_{label.replace('=', '')}.csv"
        test_args = [*args, f"--ckpt_path={ckpt}", f"--per_task_csv.path={per_task}", *QUIET]
        test_args += _logger(work, f"{name}_test")
        test_seconds = _fmaml("test", test_args, work / f"{name}_test_{label.replace('=', '')}.log")
        result["tests"][label] = {
            **_mean_ci(per_task),
            "command": _command("test", test_args),
            "wall_seconds": round(test_seconds, 1),
        }
    return result


def _git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def _update(out: Path, update) -> None:
    """Read-modify-write `out` under an exclusive lock, so that two invocations can share it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(out.read_text()) if out.exists() else {"rows": {}}
        update(data)
        out.write_text(json.dumps(data, indent=2) + "\n")


def _mse(test: dict) -> str:
    return f"{test['mean']:.3f} ± {test['ci95']:.3f}"


def _accuracy(test: dict) -> str:
    return f"{100 * test['mean']:.2f} ± {100 * test['ci95']:.2f} %"


def table(rows: dict) -> str:
    """The README's rows (tests/test_readme_figures.py checks the README against this file)."""
    lines = []
    for k in (10, 5, 20):
        if (row := rows.get(f"sinusoid_K{k}")) and "tests" in row:
            mses = " / ".join(_mse(row["tests"][f"steps={s}"]) for s in (1, 5, 10))
            paper = "0.67 / 0.38 / 0.35" if k == 10 else "–"
            minutes = row["fit_wall_seconds"] / 60
            lines.append(
                f"| sinusoid, K={k}, MSE after 1 / 5 / 10 steps | – | {mses} | {paper} | "
                f"{row['steps']:,} steps, {minutes:.1f} min |"
            )
    if (row := rows.get("omniglot_5w1s_paper")) and "tests" in row:
        split, minutes = "paper (1100/100/423)", row["fit_wall_seconds"] / 60
        lines.append(
            f"| Omniglot 5-way 1-shot, 2nd order, 3 test steps, 1 query/class | {split} | "
            f"{_accuracy(row['tests']['query_shots=1'])} | 98.7 ± 0.4 % (60,000 steps) | "
            f"{row['steps']:,} steps, {minutes:.0f} min |"
        )
        lines.append(
            f"| same checkpoint, 15 query/class | {split} | {_accuracy(row['tests']['query_shots=15'])} | – | (same) |"
        )
    if (row := rows.get("omniglot_5w5s_main")) and "tests" in row:
        minutes = row["train_seconds"] / 60
        per_step = row["train_seconds"] / row["steps"]
        lines.append(
            "| Omniglot 5-way 5-shot, the main command (`configs/omniglot.yaml`), 3 test steps, 15 query/class "
            f"| paper (1100/100/423) | {_accuracy(row['tests']['steps=3'])} | 99.9 ± 0.1 % (60,000 steps) | "
            f"{row['steps']:,} steps in {minutes:.0f} min of training, {per_step:.2f} s/step |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/paper_table.json")
    parser.add_argument("--work", type=Path, default=ROOT / "logs/paper_table")
    parser.add_argument(
        "--omniglot-steps", type=int, default=1000, help="meta-training steps of the Omniglot row"
    )
    parser.add_argument(
        "--note", default="", help="free text kept with each row: what else ran on the machine"
    )
    parser.add_argument("--report", action="store_true", help="only print the README's rows from --out")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    # Paths in the recorded commands relative to the repository, so they read as the README's commands.
    os.chdir(ROOT)
    args.work = Path(os.path.relpath(args.work.resolve(), ROOT))
    names = args.rows.split(",")
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; choose from {list(ROWS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    for name in names:
        done = json.loads(args.out.read_text())["rows"] if args.out.exists() else {}
        if name in done:
            print(f"{name}: already in {args.out}, not run again", flush=True)
            continue
        extra = [f"--trainer.max_steps={args.omniglot_steps}"] if name == "omniglot_5w1s_paper" else []
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        result = run_row(name, args.work, extra)
        result.update(
            started_utc=started,
            git_commit=_git_commit(),
            torch=torch.__version__,
            omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
            note=args.note,
        )
        _update(args.out, lambda data, name=name, result=result: data["rows"].__setitem__(name, result))
        print(f"{name}: {json.dumps(result['tests'])}", flush=True)


if __name__ == "__main__":
    main()
