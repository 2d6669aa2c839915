"""Sweeps: one `python -m fmaml` run per combination of parameter values, and a summary table at the end.

    python -m fmaml.sweep [fit|validate|test] --grid model.inner_steps=1,5,10 [--grid model.inner_lr=0.01,0.1] \\
        --config configs/sinusoid.yaml [any other python -m fmaml arguments ...]

- ``--grid KEY=V1,V2,...`` (repeatable): the values of one parameter, KEY as on fmaml's command line
  without the dashes. The sweep runs the Cartesian product of all grids. Commas inside brackets do not
  split (``model.network.init_args.hidden=[40,40],[64,64]`` is two values).
- Every other argument goes unchanged to each run; the subcommand is ``fit`` unless given first.
- Each run logs to ``<save-dir>/sweeps/<name>/<combination>``, e.g. ``logs/sweeps/20250101-120000/
  inner_steps=5``: its own TensorBoard version under a logger name of its own, so sweeps never mix with
  normal runs (``logs/fmaml``). Its console output is in ``output.log`` there. The runs need the CLI's
  default TensorBoard logger (the sweep sets its save_dir, name and version).
- Runs go one after the other (``--parallel N`` for N at a time). A run that fails is reported and the
  sweep goes on; the exit code is 1 if any run failed.
- At the end: a table, one row per run, of the grid values, the last value of each metric matching
  ``--metrics`` (default ``val/*`` and ``test/*``, read from the run's TensorBoard event files), the wall
  time, the status and the log dir; also written as ``summary.csv`` in the sweep's folder.
- ``--dry-run`` prints the commands and runs nothing.

Compare the runs with ``tensorboard --logdir logs/sweeps/<name>`` or ``python -m fmaml.curves``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import itertools
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fmaml.curves import read_scalars

SUBCOMMANDS = ("fit", "validate", "test")
KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
UNSAFE = re.compile(r"[^\w.+-]")  # characters kept out of the values in version folder names
Grid = list[tuple[str, list[str]]]  # (parameter, its values), in command-line order


def split_values(text: str) -> list[str]:
    """'1,[2,3],4' -> ['1', '[2,3]', '4']: split on commas outside brackets and braces."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [*values, text[start:]]


def parse_grid(specs: list[str]) -> Grid:
    """['model.inner_steps=1,5'] -> [('model.inner_steps', ['1', '5'])]; ValueError on bad syntax."""
    grid: Grid = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().removeprefix("--")
        example = "--grid model.inner_steps=1,5,10"
        if not sep or not KEY.match(key):
            raise ValueError(
                f"--grid {spec!r}: expected KEY=V1,V2,... with a dotted parameter name, e.g. {example}"
            )
        values = [v.strip() for v in split_values(text)]
        if not text.strip() or any(v == "" for v in values):
            raise ValueError(
                f"--grid {spec!r}: empty value in {text!r}; give comma-separated values, e.g. {example}"
            )
        if len(set(values)) < len(values):
            raise ValueError(f"--grid {spec!r}: a value is repeated; give each value once")
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2,...")
        grid.append((key, values))
    return grid


def combinations(grid: Grid) -> list[dict[str, str]]:
    """The Cartesian product of the grid, first parameter slowest: [{key: value, ...}, ...]."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in grid))]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last component (model.inner_steps -> inner_steps), or the whole key where those clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def version_names(combos: list[dict[str, str]], names: dict[str, str]) -> list[str]:
    """One folder name per combination, e.g. 'inner_steps=5,inner_lr=0.1'; unique, file-system safe."""
    versions: list[str] = []
    for combo in combos:
        # [40,40] -> 40_40: commas separate the parameters, slashes would make subfolders.
        name = ",".join(f"{names[k]}={UNSAFE.sub('_', v.strip('[](){}'))}" for k, v in combo.items())
        versions.append(name if name not in versions else f"{name}-{len(versions)}")
    return versions


def command(
    subcommand: str, passthrough: list[str], combo: dict[str, str], logger: dict[str, str]
) -> list[str]:
    """The `python -m fmaml` command of one run; the sweep's settings come last, so they win."""
    return [
        sys.executable,
        "-m",
        "fmaml",
        subcommand,
        *passthrough,
        *(f"--trainer.logger.init_args.{k}={v}" for k, v in logger.items()),
        *(f"--{k}={v}" for k, v in combo.items()),
    ]


def last_metrics(log_dir: str, patterns: list[str]) -> dict[str, float]:
    """The last logged value of each scalar matching `patterns`; {} if the run wrote no event file."""
    try:
        curves = read_scalars(log_dir)
    except FileNotFoundError:
        return {}
    return {
        tag: points[-1][1]
        for tag, points in sorted(curves.items())
        if points and any(fnmatch.fnmatch(tag, p) for p in patterns)
    }


def run_one(cmd: list[str], log_dir: str, patterns: list[str]) -> dict:
    """Run one command, its output to <log_dir>/output.log; returns its metrics, wall time and status."""
    os.makedirs(log_dir, exist_ok=True)
    output = os.path.join(log_dir, "output.log")
    start = time.perf_counter()
    with open(output, "w") as f:
        f.write(shlex.join(cmd) + "\n\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    status = "ok" if code == 0 else f"failed (exit {code})"
    return {"metrics": last_metrics(log_dir, patterns), "wall_s": wall, "status": status, "output": output}


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def table(rows: list[dict[str, object]]) -> str:
    """Rows of equal keys -> an aligned text table (floats to 4 significant digits)."""
    columns = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def summary_rows(
    combos: list[dict[str, str]], names: dict[str, str], results: list[dict], log_dirs: list[str]
) -> list[dict[str, object]]:
    """One row per run: grid values, metrics (union over runs, blank where absent), wall time, status, dir."""
    tags = sorted({tag for r in results for tag in r["metrics"]})
    return [
        {
            **{names[k]: v for k, v in combo.items()},
            **{tag: result["metrics"].get(tag, "") for tag in tags},
            "wall_s": round(result["wall_s"], 1),
            "status": result["status"],
            "log_dir": log_dir,
        }
        for combo, result, log_dir in zip(combos, results, log_dirs, strict=True)
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fmaml.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # never take a prefix of a fmaml argument for one of ours
    )
    p.add_argument(
        "--grid", action="append", required=True, metavar="KEY=V1,V2", help="values of one parameter"
    )
    p.add_argument("--name", help="the sweep's folder under <save-dir>/sweeps (default: date-time)")
    p.add_argument("--save-dir", default="logs", help="TensorBoard save_dir of every run (default: logs)")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at a time (default: 1)")
    p.add_argument(
        "--metrics",
        action="append",
        metavar="PATTERN",
        help="scalar tags (shell patterns) for the summary; repeatable (default: 'val/*' and 'test/*')",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    subcommand = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "fit"
    p = parser()
    args, passthrough = p.parse_known_args(argv)
    try:
        grid = parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))
    if args.parallel < 1:
        p.error(f"--parallel {args.parallel}: must be 1 or more")
    name = args.name or time.strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[\w-]+", name):
        p.error(f"--name {name!r}: use letters, digits, '_' and '-' (it becomes a folder name)")
    sweep_dir = os.path.join(args.save_dir, "sweeps", name)
    if os.path.exists(sweep_dir) and not args.dry_run:
        p.error(f"{sweep_dir} exists: give the sweep another --name, so that runs of two sweeps never mix")

    combos = combinations(grid)
    names = short_names([k for k, _ in grid])
    versions = version_names(combos, names)
    logger = {"save_dir": args.save_dir, "name": f"sweeps/{name}"}
    cmds = [
        command(subcommand, passthrough, c, {**logger, "version": v})
        for c, v in zip(combos, versions, strict=True)
    ]
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in cmds))
        return 0

    print(f"sweep {name}: {len(cmds)} {subcommand} runs -> {sweep_dir}", flush=True)
    log_dirs = [os.path.join(sweep_dir, v) for v in versions]
    patterns = args.metrics or ["val/*", "test/*"]
    lock = threading.Lock()

    def run(i: int) -> dict:
        with lock:
            print(
                f"[{i + 1}/{len(cmds)}] {versions[i]}: running, output in {log_dirs[i]}/output.log",
                flush=True,
            )
        result = run_one(cmds[i], log_dirs[i], patterns)
        with lock:
            print(
                f"[{i + 1}/{len(cmds)}] {versions[i]}: {result['status']} in {result['wall_s']:.1f} s",
                flush=True,
            )
            if result["status"] != "ok":
                print(f"    last lines of {result['output']}:\n{tail(result['output'])}", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(run, range(len(cmds))))

    rows = summary_rows(combos, names, results, log_dirs)
    csv_path = os.path.join(sweep_dir, "summary.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(r["status"] != "ok" for r in results)
    print(f"\n{table(rows)}\n\n{len(cmds) - failed} ok, {failed} failed; summary in {csv_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
