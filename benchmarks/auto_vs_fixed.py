"""strategy="auto" against every fixed strategy, on the workloads of benchmarks/run_cpu.sh.

For each workload: `fmaml.auto_strategy.choose` measures once (its seconds are reported apart), then the
chosen (strategy, memory) and every candidate that fit its memory budget run the same meta-gradient
(forward + backward, as training runs it), interleaved round by round, `--rounds` times; the medians are
compared. "auto / best" is the chosen candidate's median over the fastest fixed candidate's.

    uv run python benchmarks/auto_vs_fixed.py --rounds 7 --json benchmarks/results/auto_vs_fixed_cpu.json

Run it alone: anything else on the cores skews the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_higher import WORKLOADS, make_model, make_tasks  # noqa: E402

from fmaml import auto_strategy  # noqa: E402

# (workload, inner steps, meta-batch): the first four rows of benchmarks/run_cpu.sh
CASES = [("sinusoid", 5, 25), ("omniglot5w5s", 1, 32), ("omniglot20w1s", 1, 16), ("miniimagenet", 1, 4)]


def run_case(name: str, steps: int, meta_batch: int, rounds: int, device: str) -> dict:
    workload = WORKLOADS[name]
    model = make_model(workload, device, 0)
    tasks = make_tasks(workload, meta_batch, device, 0)
    params = dict(model.named_parameters())
    config = dict(model=model, loss=workload.loss, steps=steps, lr=workload.lr)
    choice = auto_strategy.choose(params, {}, tasks, cache=False, **config)
    print(choice.summary(), flush=True)
    fitting = [
        (c["strategy"], c["memory"]) for c in choice.candidates if "over the budget" not in c["skipped"]
    ]
    times: dict[tuple[str, str], list[float]] = {candidate: [] for candidate in fitting}
    full_config = dict(config, model=model)
    for candidate in fitting:  # warm-up, untimed
        auto_strategy._meta_gradient(params, {}, tasks, *candidate, full_config)
    for _ in range(rounds):
        for candidate in fitting:
            start = time.perf_counter()
            auto_strategy._meta_gradient(params, {}, tasks, *candidate, full_config)
            if device == "cuda":
                torch.cuda.synchronize()
            times[candidate].append(time.perf_counter() - start)
    medians = {f"{s} {m}": statistics.median(t) for (s, m), t in times.items()}
    chosen = f"{choice.strategy} {choice.memory}"
    best = min(medians, key=medians.get)
    record = {
        "workload": name,
        "inner_steps": steps,
        "meta_batch": meta_batch,
        "chosen": chosen,
        "measuring_seconds": choice.measuring_seconds,
        "medians_ms": {k: v * 1e3 for k, v in medians.items()},
        "fastest": best,
        "auto_over_fastest": medians[chosen] / medians[best],
        "candidates": choice.candidates,
    }
    print(
        f"{name}: auto chose {chosen} ({medians[chosen] * 1e3:.1f} ms), fastest {best} "
        f"({medians[best] * 1e3:.1f} ms): auto/fastest {record['auto_over_fastest']:.3f}; measuring took "
        f"{choice.measuring_seconds:.1f} s",
        flush=True,
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default=",".join(name for name, _, _ in CASES))
    parser.add_argument("--json")
    args = parser.parse_args()
    wanted = args.workloads.split(",")
    records = [run_case(*case, args.rounds, args.device) for case in CASES if case[0] in wanted]
    print("\n| workload | auto chose | auto ms | fastest fixed | its ms | auto / fastest | measuring s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        print(
            f"| {r['workload']} | {r['chosen']} | {r['medians_ms'][r['chosen']]:.1f} | {r['fastest']} | "
            f"{r['medians_ms'][r['fastest']]:.1f} | {r['auto_over_fastest']:.3f} | {r['measuring_seconds']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
