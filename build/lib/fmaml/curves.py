"""Learning curves from TensorBoard logs: a CSV and a PNG, for one run or several side by side.

    python -m fmaml.curves logs/fmaml/version_3 [more run dirs] --tags val/accuracy train/accuracy \\
        --out curve.png [--csv curve.csv]

A run dir is a TensorBoard version folder (the one holding ``events.out.tfevents.*``). ``--tags`` takes
tag names or shell patterns (``'val/*'``); without it, every scalar but ``epoch`` and ``hp_metric``.
The CSV has one row per point: ``run,tag,step,value``. The PNG has one panel per tag, x = step, one
line per run (named by ``--labels``, else by its folder). ``--x training_time`` puts the PNG's x on training
time (minutes) instead: the ``time/train_seconds`` that fmaml logs (validation excluded), interpolated at each point's
step, so recipes of different speeds compare at the same cost. matplotlib is needed only for the PNG (it is
in the dev dependency group).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import os
import sys

Curves = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)], sorted by step
SKIPPED_TAGS = ("epoch", "hp_metric", "time/train_seconds")  # bookkeeping, not learning curves
TIME_TAG = "time/train_seconds"


def read_scalars(run_dir: str) -> Curves:
    """Every scalar of the TensorBoard event files directly in `run_dir`: {tag: [(step, value), ...]}.

    Several event files (a resumed run) are read in order; raises FileNotFoundError for a missing folder
    or one without event files.
    """
    from tensorboard.backend.event_processing import event_accumulator

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(
            f"run dir {run_dir!r} does not exist; give a folder such as logs/fmaml/version_0"
        )
    if not glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        inside = sorted(glob.glob(os.path.join(run_dir, "*", "events.out.tfevents.*")))
        hint = f" (found some in {os.path.dirname(inside[0])}: give the version folder)" if inside else ""
        raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) in {run_dir!r}{hint}")
    # size_guidance 0 = keep every point (TensorBoard samples scalars down to 10,000 by default).
    accumulator = event_accumulator.EventAccumulator(run_dir, size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {
        tag: sorted((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()[event_accumulator.SCALARS]
    }


def select_tags(curves: Curves, patterns: list[str] | None, run_dir: str) -> list[str]:
    """The tags of `curves` matching `patterns` (names or shell patterns), in the patterns' order.

    No patterns: every tag but SKIPPED_TAGS. Raises ValueError, listing the run's tags, for a pattern
    that matches none.
    """
    if not patterns:
        return sorted(tag for tag in curves if tag not in SKIPPED_TAGS)
    chosen: list[str] = []
    for pattern in patterns:
        matches = sorted(fnmatch.filter(curves, pattern))
        if not matches:
            raise ValueError(
                f"--tags {pattern}: no such scalar in {run_dir!r}; it has: {', '.join(sorted(curves)) or 'none'}"
            )
        chosen += [tag for tag in matches if tag not in chosen]
    return chosen


def write_csv(path: str, rows: list[tuple[str, str, int, float]]) -> None:
    """rows of (run, tag, step, value) -> a CSV with a header line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "tag", "step", "value"])
        writer.writerows(rows)


def on_training_time(curves: Curves, clock: list[tuple[int, float]] | None, run_dir: str) -> Curves:
    """`curves` with each step replaced by the training minutes at that step, from `clock` (the run's
    TIME_TAG points, interpolated linearly). Raises ValueError for a run that did not log TIME_TAG."""
    if not clock:
        raise ValueError(f"--x training_time: {run_dir!r} has no {TIME_TAG} (fmaml's fit logs it)")

    def minutes(step: int) -> float:
        below = [(s, t) for s, t in clock if s <= step] or clock[:1]
        above = [(s, t) for s, t in clock if s >= step] or clock[-1:]
        (s0, t0), (s1, t1) = below[-1], above[0]
        return (t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)) / 60

    return {tag: [(minutes(step), value) for step, value in points] for tag, points in curves.items()}


def plot(path: str, runs: dict[str, Curves], tags: list[str], x_label: str = "step") -> None:
    """One panel per tag (x = step, or what `x_label` says), one line per run that has the tag; written to
    `path` (PNG)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(tags), 1, figsize=(7, 2.6 * len(tags)), sharex=True, squeeze=False)
    for ax, tag in zip(axes[:, 0], tags, strict=True):
        for run, curves in runs.items():
            if tag in curves:
                steps, values = zip(*curves[tag], strict=True)
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=run)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel(x_label)
    if x_label == "step":
        axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "--out needs matplotlib (fmaml's dev dependency group): `uv sync --group dev` or "
            "`pip install matplotlib`; or write only the CSV with --csv"
        ) from e
    return plt


def export(
    run_dirs: list[str],
    tags: list[str] | None,
    out: str | None,
    csv_path: str | None,
    x: str = "step",
    labels: list[str] | None = None,
) -> list[str]:
    """Read the runs, check every tag, then write the CSV and/or the PNG; returns the tags exported."""
    if not out and not csv_path:
        raise ValueError("nothing to write: give --out curve.png, --csv curve.csv, or both")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"--labels: {len(labels)} label(s) for {len(run_dirs)} run dir(s); give one per run")
    if out:
        _pyplot()  # fail on a missing matplotlib before reading anything
    names = labels or [os.path.normpath(d) for d in run_dirs]
    runs = {name: read_scalars(d) for name, d in zip(names, run_dirs, strict=True)}
    chosen = {run: select_tags(curves, tags, run) for run, curves in runs.items()}
    order = list(dict.fromkeys(tag for run_tags in chosen.values() for tag in run_tags))
    if csv_path:
        rows = [
            (run, tag, step, value)
            for run, run_tags in chosen.items()
            for tag in run_tags
            for step, value in runs[run][tag]
        ]
        write_csv(csv_path, rows)
    if out:
        shown = {run: {t: runs[run][t] for t in run_tags} for run, run_tags in chosen.items()}
        if x == "training_time":
            shown = {run: on_training_time(c, runs[run].get(TIME_TAG), run) for run, c in shown.items()}
        plot(out, shown, order, "training minutes (validation excluded)" if x == "training_time" else "step")
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fmaml.curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="TensorBoard version folders")
    parser.add_argument("--tags", nargs="+", help="scalar tags or patterns, e.g. val/accuracy 'train/*'")
    parser.add_argument("--out", help="PNG file to write")
    parser.add_argument("--csv", dest="csv_path", help="CSV file to write (run,tag,step,value)")
    parser.add_argument("--x", choices=["step", "training_time"], default="step", help="the PNG's x axis")
    parser.add_argument("--labels", nargs="+", help="one legend name per run dir (default: the folders)")
    args = parser.parse_args(argv)
    try:
        tags = export(args.run_dirs, args.tags, args.out, args.csv_path, args.x, args.labels)
    except (FileNotFoundError, ValueError, ImportError) as e:
        parser.error(str(e))
    written = " and ".join(p for p in (args.out, args.csv_path) if p)
    print(f"{len(args.run_dirs)} run(s), tags {', '.join(tags)} -> {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
