"""Plot bench_vs_higher.py results: time per meta-step vs meta-batch size and vs inner steps.

    uv run python benchmarks/plot.py benchmarks/results/gpu.json --out benchmarks/results/gpu.png

One row per (workload, device); left: time vs meta-batch at the row's most common number of inner steps;
right: time vs inner steps at its most common meta-batch. One line per engine; failed engines are skipped.
Needs matplotlib, which is in the dev dependency group (installed by `uv run`), not a dependency of fmaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    return [r for path in paths for r in json.loads(path.read_text()) if r.get("median_s") is not None]


def _most_common(values) -> int:
    return Counter(values).most_common(1)[0][0]


def plot(records: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit(
            "benchmarks/plot.py needs matplotlib, which fmaml does not depend on: "
            "run it with `uv run --with matplotlib python benchmarks/plot.py ...`"
        )
    # One color per engine across all panels, so that a line means the same engine everywhere.
    colors = {engine: f"C{i % 10}" for i, engine in enumerate(sorted({r["engine"] for r in records}))}
    rows = defaultdict(list)
    for record in records:
        rows[record["workload"], record["device"]].append(record)
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4 * len(rows)), squeeze=False)
    for (workload, device), (left, right) in zip(sorted(rows), axes, strict=True):
        row = rows[workload, device]
        steps, batch = _most_common(r["inner_steps"] for r in row), _most_common(r["meta_batch"] for r in row)
        panels = [
            (left, "meta_batch", "inner_steps", steps, f"meta-batch size ({steps} inner step(s))"),
            (right, "inner_steps", "meta_batch", batch, f"inner steps (meta-batch {batch})"),
        ]
        for ax, x_key, fixed_key, fixed, xlabel in panels:
            lines = defaultdict(dict)
            for r in row:
                if r[fixed_key] == fixed:
                    lines[r["engine"]][r[x_key]] = r["median_s"] * 1e3
            for engine, points in sorted(lines.items()):
                xs = sorted(points)
                style = "--" if engine.endswith("+compile") else "-"
                ax.plot(xs, [points[x] for x in xs], style, marker="o", label=engine, color=colors[engine])
            ax.set(xlabel=xlabel, ylabel="ms per meta-training step", title=f"{workload} ({device})")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        left.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="JSON files written by bench_vs_higher.py --json"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = load(args.results)
    if not records:
        sys.exit("no successful records to plot in " + ", ".join(map(str, args.results)))
    plot(records, args.out)


if __name__ == "__main__":
    main()
