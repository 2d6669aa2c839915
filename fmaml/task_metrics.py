"""Evaluation's per-task metrics: gathered over DDP processes in task order, summarised as the paper's mean
± 95% CI, and written to a CSV to compare two models task by task.

Means are taken from every process's tasks, gathered, so they are the same on all, and not by Lightning's
`sync_dist`, which divides by the processes' mean task count as an integer, truncated (5 tasks on 2
processes: 2, not 2.5).
"""

from __future__ import annotations

import csv
import math
import os

import torch
from torch import Tensor


def concatenated(batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """An epoch's per-task metrics, batch by batch -> one tensor [tasks] per metric."""
    return {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}


def gathered(module, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every process's per-task values, in task order.

    Process r holds tasks r, r + W, r + 2W, ... (fmaml.data's sharding), and the shares may differ in
    length by one while all_gather needs equal shapes: pad to the longest, then interleave."""
    if module.trainer.world_size == 1:
        return metrics
    any_values = next(iter(metrics.values()))
    counts = module.all_gather(torch.tensor(any_values.numel(), device=any_values.device)).reshape(-1)
    world, longest = len(counts), int(counts.max())
    tasks = torch.arange(longest * world)
    owner = tasks.remainder(world)  # task t lives on process t % W, at t // W
    present = tasks < int(counts.sum())
    ordered = {}
    for name, values in metrics.items():
        padded = values.new_zeros(longest)
        padded[: values.numel()] = values
        shares = module.all_gather(padded).reshape(world, longest)
        ordered[name] = shares[owner, tasks // world][present]
    return ordered


def ci95_half_width(values: Tensor) -> float:
    """Half-width of the normal 95% confidence interval of the mean (NaN for a single value)."""
    n = values.numel()
    return 1.96 * values.double().std().item() / math.sqrt(n) if n > 1 else float("nan")


def summary(per_task: dict[str, Tensor]) -> tuple[str, float, float, str]:
    """(the main metric's name, its mean, its 95% CI half-width, both as printed): accuracy in percent,
    a loss of any scale (the sinusoid's MSE is ~0.1) to three significant digits."""
    main = "accuracy" if "accuracy" in per_task else "loss"
    values = per_task[main].double()
    mean, ci95 = values.mean().item(), ci95_half_width(values)
    shown = f"{mean * 100:.2f}% ± {ci95 * 100:.2f}%" if main == "accuracy" else f"{mean:.3g} ± {ci95:.3g}"
    return main, mean, ci95, shown


def write_csv(path: str, per_task: dict[str, Tensor]) -> None:
    """One row per task, in task order, the values as Python writes them (exact)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = list(per_task)
    columns = [per_task[name].double().cpu().tolist() for name in names]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", *names])
        for task, row in enumerate(zip(*columns, strict=True)):
            writer.writerow([task, *(repr(v) for v in row)])
