"""Peak memory growth and median time of one MAML meta-training step: higher vs fmaml's strategies,
each fmaml strategy with memory="store" (autograd keeps every inner step's graph) and "recompute".

    python benchmarks/memory.py --workload omniglot5w5s --device cuda --json mem.json --plot mem.png

Two sweeps: inner steps (--steps-sweep, default 1,5,10,20) at one meta-batch (--meta-batch, default 8),
and meta-batch (--batch-sweep, default 1,2,...,64) at one number of inner steps (--steps, default 1).
Engines (--engines, comma-separated, default all):
    higher                the per-task baseline of bench_vs_higher.py (higher.innerloop_ctx, one backward
                          per task); skipped with a note where `import higher` fails (e.g. the GPU box)
    loop, vmap, chunked:N fmaml.meta_loss(..., strategy=...), memory="store" (the default)
    <strategy>+recompute  the same with memory="recompute" ("n/a" while meta_loss has no `memory=`)
The workloads, the higher engine and the step being timed are bench_vs_higher.py's (imported from it):
a synthetic meta-batch, fixed before timing; one step = zero_grad, meta-loss, backward, Adam step.
--inner-optimizer (default sgd) is bench_vs_higher.py's too: the same torch.optim class and rate for
higher and fmaml, e.g. adam, whose state (two moments per weight) the recompute recursion carries too:

    python benchmarks/memory.py --device cpu --inner-optimizer adam --engines loop,loop+recompute \
        --steps-sweep 1,5,10,20 --batch-sweep '' --json mem_adam.json

--meta-gradient (default maml) measures the fmaml engines (not higher, not +recompute) with a meta-gradient
not taken through the inner loop, fmaml.meta_gradients': implicit (iMAML, --lam, --cg-steps) or reptile:

    python benchmarks/memory.py --device cpu --meta-gradient implicit --cg-steps 5 --engines loop \
        --steps-sweep 1,5,10,20 --batch-sweep '' --json mem_imaml.json

How memory is measured. Every (engine, setting) runs in a fresh subprocess (this script with --one),
so nothing another case allocated or cached can be reused and hide its cost. In it: --warmup untimed
steps (Adam's state, lazy init, allocator caches), then the growth over the state just before the
--repeats measured steps:
    CUDA: reset_peak_memory_stats(), then max_memory_allocated() - memory_allocated() (live tensors
          only, so the caching allocator's reserve does not count).
    CPU:  malloc_trim(0) hands the warm-up's freed heap back to the kernel (otherwise the measured steps
          could reuse it unseen), writing "5" to /proc/self/clear_refs resets the kernel's peak RSS
          (VmHWM) to the current RSS, VmRSS is read from /proc/self/status, the steps run, and the growth
          is VmHWM - VmRSS_before. Not ru_maxrss: it cannot be reset, and a child can inherit its
          parent's peak across fork/exec. glibc may keep freed memory after a step, so the number is the
          step's peak, not a leak; it includes allocator fragmentation.
Median time: over the --repeats measured steps (CUDA: each ends with synchronize()).

Before running a case, its growth is predicted from the same engine's measured smaller cases in the same
sweep (a line through the two largest, or growth per unit x one point); a case predicted over --budget-mb
(default 70% of MemAvailable, or of free CUDA memory) is skipped, and so is the rest of a sweep after a
case fails (e.g. killed for memory).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # for bench_vs_higher, however this script is started
if importlib.util.find_spec("fmaml") is None:  # no uv, no install (the GPU box): the repo's own copy
    sys.path.insert(0, str(BENCHMARKS.parent))

import torch  # noqa: E402
from bench_vs_higher import (  # noqa: E402
    INNER_OPTIMIZERS,
    META_LR,
    WORKLOADS,
    fmaml_inner_arguments,
    higher_engine,
    make_model,
    make_tasks,
)

from fmaml import meta_loss  # noqa: E402
from fmaml.meta_gradients import Implicit, Reptile  # noqa: E402

ENGINES = [
    "higher",
    "loop",
    "loop+recompute",
    "vmap",
    "vmap+recompute",
    "chunked:8",
    "chunked:8+recompute",
]


def parse_engine(name: str) -> tuple[str, bool]:
    """'chunked:8+recompute' -> ('chunked:8', True); 'higher' -> ('higher', False)."""
    strategy, recompute = name.removesuffix("+recompute"), name.endswith("+recompute")
    if strategy in ("higher", "loop", "vmap") or re.fullmatch(r"chunked:[1-9]\d*", strategy):
        if not (strategy == "higher" and recompute):
            return strategy, recompute
    raise ValueError(
        f"unknown engine {name!r}: use higher, loop, vmap or chunked:N (fmaml ones +recompute too)"
    )


# ---------------------------------------------------------------------------------- one case (--one)


def make_meta_gradient(job: dict) -> dict:
    """meta_loss's meta_gradient= for the job's --meta-gradient; nothing for MAML's (the default)."""
    name = job.get("meta_gradient", "maml")
    if name == "implicit":
        return {"meta_gradient": Implicit(lam=job["lam"], cg_steps=job["cg_steps"])}
    return {"meta_gradient": Reptile()} if name == "reptile" else {}


def fmaml_engine(
    model, workload, steps: int, strategy: str, recompute: bool, inner_optimizer: str = "sgd", **meta_gradient
):
    """bench_vs_higher's fmaml engine, plus memory=: run(tasks) leaves the meta-gradient in .grad."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    # "store" is the default: leaving it out keeps the store cases running on an fmaml without memory=.
    memory = {"memory": "recompute"} if recompute else {}
    config = dict(model=model, loss=workload.loss, steps=steps, metrics_before=False) | meta_gradient
    config |= fmaml_inner_arguments(inner_optimizer, workload)

    def run(tasks):
        loss, _ = meta_loss(params, buffers, tasks, strategy=strategy, **config, **memory)
        loss.backward()

    return run


def proc_status_kb(*keys: str) -> list[int]:
    status = Path("/proc/self/status").read_text()
    return [int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) for key in keys]


def measure(job: dict) -> dict:
    """Run one (engine, steps, meta-batch) case: {median_ms, times_ms, growth_mb, before_mb} or an error."""
    device, workload = job["device"], WORKLOADS[job["workload"]]
    cuda = device.startswith("cuda")
    model = make_model(workload, device, job["seed"])
    tasks = make_tasks(workload, job["meta_batch"], device, job["seed"])
    strategy, recompute = parse_engine(job["engine"])
    if strategy == "higher":
        run = higher_engine(model, workload, job["inner_steps"], inner_optimizer=job["inner_optimizer"])
    else:
        run = fmaml_engine(
            model, workload, job["inner_steps"], strategy, recompute, job["inner_optimizer"],
            **make_meta_gradient(job),
        )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)

    def step() -> float:  # as timed by bench_vs_higher.py
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        run(tasks)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        for _ in range(job["warmup"]):
            step()
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:  # not glibc: the growth may then miss memory reused from the warm-up
                pass
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            (before,) = proc_status_kb("VmRSS")
            before *= 1024
        times = [step() for _ in range(job["repeats"])]
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            (peak,) = proc_status_kb("VmHWM")
            peak *= 1024
    except TypeError as error:
        if "memory" not in str(error):
            raise
        return {"status": "n/a", "note": "fmaml.meta_loss has no memory= yet"}
    except torch.cuda.OutOfMemoryError:
        return {"status": "error", "note": "CUDA out of memory"}
    return {
        "status": "ok",
        "median_ms": statistics.median(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "growth_mb": (peak - before) / 2**20,
        "before_mb": before / 2**20,
    }


# ------------------------------------------------------------------------------- the sweeps (parent)


def run_case(job: dict, timeout: float) -> dict:
    """`measure(job)` in a fresh interpreter; it prints its result as one JSON line after 'RESULT '."""
    command = [sys.executable, __file__, "--one", json.dumps(job)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "error", "note": f"timed out after {timeout:.0f} s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    if proc.returncode == -signal.SIGKILL:
        return {"status": "error", "note": "killed (SIGKILL: out of memory?)"}
    tail = stderr.strip().splitlines()[-1:] or [""]
    return {"status": "error", "note": f"exit {proc.returncode}: {tail[0][:300]}"}


def predict_mb(measured: list[tuple[int, float]], x: int) -> float | None:
    """Growth at x from the same engine's smaller cases [(x, MB)] of this sweep: a line through the two
    largest, or with one point, its growth per unit of x (per task, or per inner step) times x."""
    if not measured:
        return None
    if len(measured) == 1:
        x1, y1 = measured[0]
        return y1 / x1 * x
    (x1, y1), (x2, y2) = sorted(measured)[-2:]
    return y2 + (y2 - y1) / (x2 - x1) * (x - x2)


def default_budget_mb(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return 0.7 * free / 2**20
    (available,) = re.findall(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return 0.7 * int(available) / 1024


def sweep(args, name: str, values: list[int], done: dict) -> list[dict]:
    """One sweep, value by value (ascending), every engine at each; `done` caches cases by setting, since
    the two sweeps share one (e.g. 1 step x meta-batch 8)."""
    records, measured, stopped = [], {e: [] for e in args.engines}, {}
    for x in sorted(values):
        steps, meta_batch = (x, args.meta_batch) if name == "inner_steps" else (args.steps, x)
        for engine in args.engines:
            job = dict(workload=args.workload, device=args.device, engine=engine, seed=args.seed)
            job |= dict(inner_optimizer=args.inner_optimizer)
            job |= dict(inner_steps=steps, meta_batch=meta_batch, repeats=args.repeats, warmup=args.warmup)
            if args.meta_gradient != "maml":  # MAML's records stay as they were before --meta-gradient
                job |= dict(meta_gradient=args.meta_gradient)
                job |= dict(lam=args.lam, cg_steps=args.cg_steps) if args.meta_gradient == "implicit" else {}
            key = (engine, steps, meta_batch)
            predicted = predict_mb(measured[engine], x)
            if engine == "higher" and importlib.util.find_spec("higher") is None:
                result = {"status": "n/a", "note": "higher is not installed"}
            elif engine in stopped:
                result = {"status": "skipped", "note": stopped[engine]}
            elif key in done:
                result = done[key]
            elif predicted is not None and predicted > args.budget_mb:
                result = {
                    "status": "skipped",
                    "note": f"predicted {_mb(predicted)} MB > budget {args.budget_mb:.0f} MB",
                }
            else:
                result = done[key] = run_case(job, args.case_timeout)
            if result["status"] == "ok":
                measured[engine].append((x, result["growth_mb"]))
            elif result["status"] == "error":
                stopped[engine] = f"after an error at {name}={x}"
            record = job | {"sweep": name, "value": x, "predicted_mb": predicted} | result
            records.append(record)
            print(f"  {name}={x:<3} {engine:<20} {_cell(record)}", flush=True)
    return records


# ---------------------------------------------------------------------------------------------- output


def _cell(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']} ({r['note']})"
    return f"{r['median_ms']:.1f} ms, +{_mb(r['growth_mb'])} MB"


def _mb(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown_table(records: list[dict]) -> str:
    header = "| sweep | value | inner optimizer | engine | median ms | peak growth MB | note |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in records:
        fixed = (
            f"meta-batch {r['meta_batch']}" if r["sweep"] == "inner_steps" else f"{r['inner_steps']} step(s)"
        )
        ok = r["status"] == "ok"
        cells = [
            f"{r['sweep']} ({fixed})",
            r["value"],
            r.get("inner_optimizer", "sgd"),  # records written before --inner-optimizer were all sgd
            r["engine"] + _meta_gradient_note(r),
            f"{r['median_ms']:.1f}" if ok else "-",
            _mb(r["growth_mb"]) if ok else "-",
            "" if ok else f"{r['status']}: {r['note']}".replace("|", "/"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _meta_gradient_note(record: dict) -> str:
    """' (implicit, cg 5)' after an engine measured with --meta-gradient; nothing for MAML's."""
    name = record.get("meta_gradient", "maml")
    if name == "maml":
        return ""
    return f" ({name}, cg {record['cg_steps']})" if name == "implicit" else f" ({name})"


def _optimizers_note(optimizers: set[str]) -> str:
    """', inner optimizer adam' for a title; nothing for plain SGD, the default everywhere."""
    return "" if optimizers == {"sgd"} else f", inner optimizer {'/'.join(sorted(optimizers))}"


def plot(records: list[dict], out: Path, title: str) -> None:
    """Two panels, peak growth vs inner steps and vs meta-batch, one line per engine (log-log; cases
    that did not run, or grew by <= 0 MB, are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    engines = list(dict.fromkeys(r["engine"] for r in records))
    for ax, name, label in zip(
        axes, ["inner_steps", "meta_batch"], ["inner steps", "meta-batch"], strict=True
    ):
        ok = [r for r in records if r["sweep"] == name and r["status"] == "ok" and r["growth_mb"] > 0]
        for i, engine in enumerate(engines):
            points = sorted((r["value"], r["growth_mb"]) for r in ok if r["engine"] == engine)
            if points:
                style = "--" if engine.endswith("+recompute") else "-"
                xs, ys = [x for x, _ in points], [y for _, y in points]
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=engine)
        fixed = [r for r in records if r["sweep"] == name][:1]
        if fixed:
            other = "meta-batch" if name == "inner_steps" else "inner steps"
            value = fixed[0]["meta_batch" if name == "inner_steps" else "inner_steps"]
            ax.set_title(f"vs {label} ({other} {value})")
        ax.set_xscale("log", base=2)
        values = sorted({r["value"] for r in records if r["sweep"] == name})
        ax.set_xticks(values, [str(v) for v in values])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("peak growth per meta-step, MB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


# ------------------------------------------------------------------------------------------------ main


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="omniglot5w5s", choices=["omniglot5w5s", "sinusoid"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated; default: %(default)s")
    parser.add_argument(
        "--inner-optimizer",
        default="sgd",
        choices=list(INNER_OPTIMIZERS),
        help="the inner loop's optimizer, for higher and fmaml alike (bench_vs_higher.py's; default: sgd)",
    )
    parser.add_argument(
        "--meta-gradient",
        default="maml",
        choices=["maml", "implicit", "reptile"],
        help="maml (through the inner loop, the default), implicit (iMAML) or reptile: fmaml engines only",
    )
    parser.add_argument("--lam", type=float, default=2.0, help="iMAML's proximal weight λ (implicit)")
    parser.add_argument("--cg-steps", type=int, default=5, help="iMAML's CG iterations (implicit)")
    parser.add_argument("--steps-sweep", type=int_list, default=[1, 5, 10, 20], help="'' to skip")
    parser.add_argument("--meta-batch", type=int, default=8, help="the meta-batch of the steps sweep")
    parser.add_argument("--batch-sweep", type=int_list, default=[1, 2, 4, 8, 16, 32, 64], help="'' to skip")
    parser.add_argument("--steps", type=int, default=1, help="the inner steps of the meta-batch sweep")
    parser.add_argument("--repeats", type=int, default=3, help="measured steps (the median time is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument(
        "--budget-mb", type=float, help="skip cases predicted to grow more (default: 70%% free)"
    )
    parser.add_argument("--case-timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    parser.add_argument("--plot", type=Path, help="write the two-panel figure (PNG) here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="measure nothing: table and plot these runs' records together",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker: run this one case (JSON job)
    args = parser.parse_args(argv)
    if args.one is None:
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        for engine in args.engines:
            parse_engine(engine)  # fail on a typo now, not after minutes of measurements
            if args.meta_gradient != "maml" and (engine == "higher" or engine.endswith("+recompute")):
                parser.error(
                    f"--meta-gradient {args.meta_gradient} is fmaml's, with memory=store: drop {engine}"
                )
        if args.repeats < 1 or args.warmup < 0:
            parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(measure(json.loads(args.one))), flush=True)
        return []
    title = f"{args.workload}: {WORKLOADS[args.workload].description}, {args.device}"
    if args.from_json:
        records = [r for path in args.from_json for r in json.loads(path.read_text())]
        title += _optimizers_note({r.get("inner_optimizer", "sgd") for r in records})
        print(markdown_table(records))
        if args.plot:
            plot(records, args.plot, title)
        return records
    title += _optimizers_note({args.inner_optimizer})
    if args.budget_mb is None:
        args.budget_mb = default_budget_mb(args.device)
    print(f"torch {torch.__version__}, {title}, budget {args.budget_mb:.0f} MB", flush=True)
    records, done = [], {}
    for name, values in [("inner_steps", args.steps_sweep), ("meta_batch", args.batch_sweep)]:
        if values:
            records += sweep(args, name, values, done)
        if args.json:  # after each sweep, so that an interrupted run keeps the first
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(records, indent=1))
    print()
    print(markdown_table(records))
    if args.plot:
        plot(records, args.plot, title)
    return records


if __name__ == "__main__":
    main()
