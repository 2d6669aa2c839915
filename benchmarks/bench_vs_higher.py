"""Time one full MAML meta-training step: fmaml's strategies, eager and compiled, against `higher`.

    uv run python benchmarks/bench_vs_higher.py --workload omniglot5w5s --inner-steps 1 5 \
        --meta-batch 8 32 --device cuda --json benchmarks/results/gpu.json

What is timed: one meta-training step = adapt every task of the meta-batch on its support set, query
loss, outer backward (the exact meta-gradient lands in `.grad`), and an Adam step on the meta-params.
The meta-batch is synthetic (random tensors of the real shapes, built before timing, the same batch
every step), so no dataset is needed. Each engine starts from the same initial weights (same seed).
The number reported is the median over `--repeats` steps after `--warmup` untimed steps; on CUDA every
step ends with `torch.cuda.synchronize()`.

Engines (`--engines`, default all):
    higher              the original project's loop: per task, `higher.innerloop_ctx` with the inner
                        optimizer (SGD by default), copy_initial_weights=False, and
                        `(query_loss / T).backward()` accumulating .grad
    torchfunc_loop      a plain torch.func loop without fmaml: functional_call + grad for the inner
                        steps, one autograd `.backward()` over the whole loop; plain SGD only (with any
                        other --inner-optimizer its record holds an `error` and no timing)
    fmaml_<strategy>    `fmaml.meta_loss(..., strategy=<strategy>)`, e.g. fmaml_vmap, fmaml_loop,
                        fmaml_chunked:8, fmaml_auto (the record's `strategy` says what auto chose)
    fmaml_<strategy>+compile
                        the same with `torch.compile` on the function that computes the meta-loss
                        (`meta_loss`, whose forward computes the per-task meta-gradients); the backward
                        it feeds and Adam run eagerly. `compile_s` = first step minus the median step,
                        a cold compile (the inductor cache is disabled unless TORCHINDUCTOR_FORCE_DISABLE_CACHES
                        is set otherwise). A failure is recorded in `error`, not raised.
                        `--compile-backend` (default inductor; the record's `compile_backend`): `eager`
                        traces with dynamo and runs the graphs eagerly, which checks that the engine still
                        compiles without paying for code generation (run_gpu.sh's CPU smoke mode).
    fmaml_first_order   strategy auto with first_order=True (FOMAML)
    Shorthands: all, eager (everything not compiled), compiled.

Inner optimizers (`--inner-optimizer`, one or more, default sgd; `INNER_OPTIMIZERS`): sgd (the paper's
inner loop), sgd_momentum (torch.optim.SGD, momentum 0.9), adam (torch.optim.Adam), rmsprop, adagrad.
Each is one torch.optim class with its arguments, given to `higher` as its differentiable optimizer and
to fmaml through `fmaml.inner_optimizers.from_config` (as a `class_path: torch.optim.X` config is), at
the same rate: the workload's for SGD, 0.01 for the adaptive ones (see `ADAPTIVE_LR`).

Record keys: workload, inner_optimizer, inner_lr, engine, inner_steps, meta_batch, device, median_s,
peak_mem_mb, speedup_vs_higher (higher's median / this engine's, same invocation and inner optimizer),
max_grad_diff (largest absolute difference between this engine's meta-gradient on its first step and
higher's, from identical weights and tasks; fmaml_first_order is compared against higher with
track_higher_grads=False), max_grad_rel_diff (the same over higher's largest absolute entry), and
extras: times_s, compile_s, graph_breaks, strategy, error.

max_grad_diff with adam is not float noise, and not small: by design, higher's DifferentiableAdam adds
eps to sqrt(v) before the bias correction, today's torch.optim.Adam (and fmaml, which follows it) after
it (see the docstring of fmaml/inner_optimizers.py). At step t higher's update is torch's with eps
replaced by eps / sqrt(1 - beta2^t): 3.2e-7 instead of 1e-8 at the first step. The update m/(sqrt(v)+eps)
is ~sign(g), so its derivative (the second-order term) is ~eps/(|g|+eps)^2: large, and eps-dependent,
for gradient entries near eps. In smoke runs (2 tasks, seed 0): max_grad_rel_diff 2e-3 on the sinusoid
MLP at 2 steps, 0.9 on the Omniglot ConvNet at 1 step, whose gradients have many entries that small;
with fmaml's eps set to 1e-8 / sqrt(1 - 0.999) the ConvNet's 1-step difference fell to 4e-7. sgd,
sgd_momentum, rmsprop and adagrad agree with higher to float rounding.

A/B of two checkouts (`--compare BASE.json HEAD.json`): measures nothing; for each (workload, inner
steps, meta-batch, engine) in both files, the median of all their times_s (pooled over the runs each
file holds) and HEAD's over BASE's. `bash benchmarks/run_cpu.sh seam_ab` uses it.

peak_mem_mb: on CUDA, `torch.cuda.max_memory_allocated()` over the engine's steps (reset before them;
it includes the model, the meta-batch and Adam's state). On CPU, the growth of the process' peak
resident set size (ru_maxrss) over the engine's steps; ru_maxrss never decreases, so each engine runs
in a fresh subprocess (`--isolate`, default: on CPU only) and the number is clean. Without isolation on
CPU it is not measured (null).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # compile_s measures a cold compile

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad  # noqa: E402

from fmaml import MLP, ConvNet, meta_loss, resolve_strategy  # noqa: E402
from fmaml.inner_optimizers import from_config  # noqa: E402
from fmaml.maml import LOSSES  # noqa: E402

META_LR = 1e-3
EAGER_ENGINES = ["higher", "torchfunc_loop", "fmaml_vmap", "fmaml_loop", "fmaml_chunked:8", "fmaml_auto"]
COMPILED_ENGINES = [
    "fmaml_vmap+compile",
    "fmaml_loop+compile",
    "fmaml_chunked:8+compile",
    "fmaml_auto+compile",
]
ALL_ENGINES = EAGER_ENGINES + COMPILED_ENGINES + ["fmaml_first_order"]
ENGINE_SETS = {
    "all": ALL_ENGINES,
    "eager": EAGER_ENGINES + ["fmaml_first_order"],
    "compiled": COMPILED_ENGINES,
}


# ------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    loss: str
    lr: float
    model: Callable[[], nn.Module]
    tasks: Callable[[int, torch.Generator], dict]  # (meta_batch, generator) -> {"support", "query"}


def classification_tasks(ways: int, shots: int, query: int, channels: int, size: int):
    def make(meta_batch: int, g: torch.Generator) -> dict:
        def split(n):
            x = torch.randn(meta_batch, ways * n, channels, size, size, generator=g)
            y = torch.arange(ways).repeat_interleave(n).expand(meta_batch, -1).clone()
            return x, y

        return {"support": split(shots), "query": split(query)}

    return make


def sinusoid_tasks(meta_batch: int, g: torch.Generator, k: int = 10) -> dict:
    amplitude = torch.rand(meta_batch, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(meta_batch, 1, 1, generator=g) * torch.pi
    x = torch.rand(meta_batch, 2 * k, 1, generator=g) * 10 - 5
    y = amplitude * torch.sin(x + phase)
    return {"support": (x[:, :k], y[:, :k]), "query": (x[:, k:], y[:, k:])}


WORKLOADS = {
    w.name: w
    for w in [
        Workload("sinusoid", "MLP 1-40-40-1, K=10 support + 10 query, MSE", "mse", 0.01, MLP, sinusoid_tasks),
        Workload(
            "omniglot5w5s",
            "ConvNet 64 filters stride 2, 1x28x28, 5-way 5-shot, 15 query/class",
            "cross_entropy",
            0.4,
            lambda: ConvNet(5, in_channels=1, filters=64, image_size=28, pooling="stride"),
            classification_tasks(ways=5, shots=5, query=15, channels=1, size=28),
        ),
        Workload(
            "omniglot20w1s",
            "ConvNet 64 filters stride 2, 1x28x28, 20-way 1-shot, 5 query/class (not 15, to keep it light)",
            "cross_entropy",
            0.1,
            lambda: ConvNet(20, in_channels=1, filters=64, image_size=28, pooling="stride"),
            classification_tasks(ways=20, shots=1, query=5, channels=1, size=28),
        ),
        Workload(
            "miniimagenet",
            "ConvNet 32 filters max-pool, 3x84x84, 5-way 5-shot, 15 query/class",
            "cross_entropy",
            0.01,
            lambda: ConvNet(5, in_channels=3, filters=32, image_size=84, pooling="max"),
            classification_tasks(ways=5, shots=5, query=15, channels=3, size=84),
        ),
    ]
}


# ------------------------------------------------------------------------------------ inner optimizers

# Adam, RMSprop and Adagrad divide the gradient by its own running scale, so each step moves every weight
# by about lr whatever the gradient's size: the rate is a step size, not a multiplier of the gradient.
# The SGD rates of the workloads (0.4 on Omniglot 5w5s) would move every conv weight by 0.4 per step, far
# beyond its initial spread; 0.01 (torch's default for RMSprop and Adagrad, the sinusoid's own SGD rate
# and the Adam-inner recipe's in benchmarks/recipes.py) is a sensible step on every workload.
ADAPTIVE_LR = 0.01


@dataclass(frozen=True)
class InnerOptimizerSpec:
    torch_class: type[torch.optim.Optimizer]
    kwargs: dict
    lr: float | None = None  # None: the workload's (SGD) rate


INNER_OPTIMIZERS = {
    "sgd": InnerOptimizerSpec(torch.optim.SGD, {}),
    "sgd_momentum": InnerOptimizerSpec(torch.optim.SGD, {"momentum": 0.9}),
    "adam": InnerOptimizerSpec(torch.optim.Adam, {}, ADAPTIVE_LR),
    "rmsprop": InnerOptimizerSpec(torch.optim.RMSprop, {}, ADAPTIVE_LR),
    "adagrad": InnerOptimizerSpec(torch.optim.Adagrad, {}, ADAPTIVE_LR),
}


def inner_lr(name: str, workload: Workload) -> float:
    spec = INNER_OPTIMIZERS[name]
    return workload.lr if spec.lr is None else spec.lr


def torch_inner_optimizer(name: str, workload: Workload) -> Callable[..., torch.optim.Optimizer]:
    """The inner optimizer as a config's `class_path: torch.optim.X` becomes: params -> optimizer."""
    spec = INNER_OPTIMIZERS[name]
    return functools.partial(spec.torch_class, lr=inner_lr(name, workload), **spec.kwargs)


def fmaml_inner_arguments(name: str, workload: Workload) -> dict:
    """meta_loss's lr= and inner_optimizer= for `name`, built from the same torch.optim call as higher's."""
    optimizer = from_config(torch_inner_optimizer(name, workload), name="--inner-optimizer")
    return {"lr": inner_lr(name, workload), "inner_optimizer": optimizer}


def make_tasks(workload: Workload, meta_batch: int, device: str, seed: int) -> dict:
    tasks = workload.tasks(meta_batch, torch.Generator().manual_seed(seed))
    return {split: (x.to(device), y.to(device)) for split, (x, y) in tasks.items()}


def make_model(workload: Workload, device: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return workload.model().to(device)


# --------------------------------------------------------------------------------------------- engines
# Each engine builds `run(tasks)`, which leaves the meta-gradient of the mean query loss in the .grad
# of model.parameters().


def higher_engine(
    model: nn.Module, workload: Workload, steps: int, first_order: bool = False, inner_optimizer: str = "sgd"
):
    import higher  # only the processes that run it pay for the import

    params = list(model.parameters())
    inner_opt = torch_inner_optimizer(inner_optimizer, workload)(params)
    loss_fn = LOSSES[workload.loss]

    def run(tasks):
        (xs, ys), (xq, yq) = tasks["support"], tasks["query"]
        num_tasks = xs.shape[0]
        for i in range(num_tasks):
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(xs[i]), ys[i]))
                query_loss = loss_fn(fmodel(xq[i]), yq[i]) / num_tasks
                if not first_order:
                    query_loss.backward()
                    continue
                # higher detaches the fast weights: FOMAML's gradient is the query gradient at them.
                for p, g in zip(params, torch.autograd.grad(query_loss, fmodel.parameters()), strict=True):
                    p.grad = g if p.grad is None else p.grad + g

    return run


def torchfunc_loop_engine(model: nn.Module, workload: Workload, steps: int):
    params = dict(model.named_parameters())
    loss_fn = LOSSES[workload.loss]

    def support_loss(p, x, y):
        return loss_fn(functional_call(model, p, (x,)), y)

    def run(tasks):
        (xs, ys), (xq, yq) = tasks["support"], tasks["query"]
        total = 0.0
        for i in range(xs.shape[0]):
            fast = params
            for _ in range(steps):
                g = grad(support_loss)(fast, xs[i], ys[i])
                fast = {name: p - workload.lr * g[name] for name, p in fast.items()}
            total = total + loss_fn(functional_call(model, fast, (xq[i],)), yq[i])
        (total / xs.shape[0]).backward()

    return run


def fmaml_engine(
    model,
    workload,
    steps,
    strategy,
    first_order=False,
    compile=False,
    inner_optimizer="sgd",
    backend="inductor",
):
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    # Like the app's meta-step on a step that writes no logs: no extra "before adaptation" forward pass,
    # which higher's loop does not do either.
    config = dict(
        model=model,
        loss=workload.loss,
        steps=steps,
        first_order=first_order,
        metrics_before=False,
        **fmaml_inner_arguments(inner_optimizer, workload),
    )

    def objective(params, buffers, tasks):
        return meta_loss(params, buffers, tasks, strategy=strategy, **config)[0]

    if compile:
        torch._dynamo.reset()  # a fresh cache: each compiled engine compiles from scratch
        objective = torch.compile(objective, backend=backend)

    def run(tasks):
        objective(params, buffers, tasks).backward()

    return run


def parse_engine(name: str) -> dict:
    """'fmaml_chunked:8+compile' -> {"kind": "fmaml", "strategy": "chunked:8", "compile": True}."""
    base, compiled = name.removesuffix("+compile"), name.endswith("+compile")
    if base in ("higher", "torchfunc_loop") and not compiled:
        return {"kind": base}
    if base == "fmaml_first_order" and not compiled:
        return {"kind": "fmaml", "strategy": "auto", "first_order": True, "compile": False}
    if base.startswith("fmaml_"):
        return {
            "kind": "fmaml",
            "strategy": base.removeprefix("fmaml_"),
            "first_order": False,
            "compile": compiled,
        }
    raise ValueError(f"unknown engine {name!r}: use {', '.join(ALL_ENGINES)}, fmaml_<strategy>[+compile]")


def unsupported(engine: str, inner_optimizer: str) -> str | None:
    """Why `engine` cannot run `inner_optimizer`, or None."""
    if parse_engine(engine)["kind"] == "torchfunc_loop" and inner_optimizer != "sgd":
        return (
            f"torchfunc_loop is a hand-written plain-SGD loop: it runs only --inner-optimizer sgd, "
            f"not {inner_optimizer}"
        )
    return None


def build_engine(
    name: str,
    model: nn.Module,
    workload: Workload,
    steps: int,
    inner_optimizer: str = "sgd",
    backend="inductor",
):
    spec = parse_engine(name)
    if reason := unsupported(name, inner_optimizer):
        raise ValueError(reason)
    if spec["kind"] == "higher":
        return higher_engine(model, workload, steps, inner_optimizer=inner_optimizer)
    if spec["kind"] == "torchfunc_loop":
        return torchfunc_loop_engine(model, workload, steps)
    return fmaml_engine(
        model, workload, steps, spec["strategy"], first_order=spec["first_order"], compile=spec["compile"],
        inner_optimizer=inner_optimizer, backend=backend,
    )  # fmt: skip


def reference_gradients(
    workload, steps, meta_batch, device, seed, first_order, inner_optimizer="sgd"
) -> list[torch.Tensor]:
    """higher's meta-gradient at the initial weights, on the first step's tasks."""
    model, tasks = make_model(workload, device, seed), make_tasks(workload, meta_batch, device, seed)
    higher_engine(model, workload, steps, first_order=first_order, inner_optimizer=inner_optimizer)(tasks)
    return [p.grad.detach().cpu() for p in model.parameters()]


# ----------------------------------------------------------------------------------------- measurement


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def blank_record(job: dict) -> dict:
    keys = ("workload", "inner_optimizer", "engine", "inner_steps", "meta_batch", "device")
    record = {key: job[key] for key in keys}
    record["inner_lr"] = inner_lr(job["inner_optimizer"], WORKLOADS[job["workload"]])
    empty = ("median_s", "peak_mem_mb", "speedup_vs_higher", "max_grad_diff", "max_grad_rel_diff")
    return record | dict.fromkeys(empty)


def gradient_differences(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """The largest absolute difference from higher's meta-gradient, and that over its largest entry."""
    largest = max(max(r.abs().max().item() for r in reference), torch.finfo(reference[0].dtype).tiny)
    diff = max((a - b).abs().max().item() for a, b in zip(grads, reference, strict=True))
    return {"max_grad_diff": diff, "max_grad_rel_diff": diff / largest}


def measure(job: dict, reference: list[torch.Tensor] | None, isolated: bool) -> dict:
    """Run one engine on one configuration; never raises (a failure goes into the record's `error`)."""
    workload, device = WORKLOADS[job["workload"]], job["device"]
    record = blank_record(job)
    try:
        model = make_model(workload, device, job["seed"])
        tasks = make_tasks(workload, job["meta_batch"], device, job["seed"])
        spec = parse_engine(job["engine"])
        if spec["kind"] == "fmaml":
            record["strategy"] = resolve_strategy(spec["strategy"], model, device)
        backend = job.get("compile_backend", "inductor")
        run = build_engine(
            job["engine"], model, workload, job["inner_steps"], job["inner_optimizer"], backend
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
        if spec.get("compile"):
            torch._dynamo.utils.counters.clear()
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        times, first_grads = [], None
        for _ in range(job["warmup"] + job["repeats"]):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            run(tasks)
            if first_grads is None:
                first_grads = [p.grad.detach().cpu() for p in model.parameters()]
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        timed = times[job["warmup"] :]
        record["median_s"] = statistics.median(timed)
        record["times_s"] = timed
        if device.startswith("cuda"):
            record["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        elif isolated:
            record["peak_mem_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        if spec.get("compile"):
            record["compile_backend"] = backend
            record["compile_s"] = times[0] - record["median_s"]
            record["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        if reference is not None:
            record |= gradient_differences(first_grads, reference)
    except Exception as error:  # a failing engine (e.g. torch.compile) is a result, not a crash
        message = str(error).strip().splitlines()
        record["error"] = f"{type(error).__name__}: {message[0] if message else ''}"[:500]
    return record


def measure_in_subprocess(job: dict, reference_file: str | None, timeout: float) -> dict:
    """A fresh interpreter per engine: a clean ru_maxrss, and no state left by the engines before it."""
    command = [sys.executable, __file__, "--worker", json.dumps(job | {"reference_file": reference_file})]
    # Its own session, so that a timeout also ends the compiler processes torch.compile started.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return blank_record(job) | {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RECORD "):
            return json.loads(line.removeprefix("RECORD "))
    return blank_record(job) | {"error": f"worker failed (exit {proc.returncode}): {stderr.strip()[-500:]}"}


def worker(job_json: str) -> None:
    job = json.loads(job_json)
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    reference = torch.load(job["reference_file"]) if job.get("reference_file") else None
    print("RECORD " + json.dumps(measure(job, reference, isolated=True)), flush=True)


def needs_first_order(engine: str) -> bool:
    return parse_engine(engine).get("first_order", False)


def run_configuration(
    args, workload: str, inner_optimizer: str, steps: int, meta_batch: int, isolate: bool
) -> list[dict]:
    base = dict(workload=workload, inner_steps=steps, meta_batch=meta_batch, device=args.device)
    base |= dict(repeats=args.repeats, warmup=args.warmup, seed=args.seed, threads=args.threads)
    base |= dict(inner_optimizer=inner_optimizer, compile_backend=args.compile_backend)
    setting = (WORKLOADS[workload], steps, meta_batch, args.device, args.seed)
    references = {
        order: reference_gradients(*setting, order, inner_optimizer)
        for order in sorted({needs_first_order(e) for e in args.engines})
    }
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for order, grads in references.items():
            files[order] = os.path.join(scratch, f"reference_{int(order)}.pt")
            torch.save(grads, files[order])
        for engine in args.engines:
            job = base | {"engine": engine}
            order = needs_first_order(engine)
            if reason := unsupported(engine, inner_optimizer):  # no process started for nothing
                record = blank_record(job) | {"error": reason}
            elif isolate:
                record = measure_in_subprocess(job, files[order], args.engine_timeout)
            else:
                record = measure(job, references[order], isolated=False)
            records.append(record)
            median = _fmt(record["median_s"], 1e3, ".2f")
            print(f"  {engine:<26} {median} ms  {record.get('error', '')}", flush=True)
    baseline = next((r["median_s"] for r in records if r["engine"] == "higher" and r["median_s"]), None)
    for record in records:
        if baseline and record["median_s"]:
            record["speedup_vs_higher"] = baseline / record["median_s"]
    return records


# ------------------------------------------------------------------------------------------------ output


def _fmt(value, scale: float = 1.0, spec: str = ".3g") -> str:
    return "-" if value is None else format(value * scale, spec)


def markdown_table(records: list[dict]) -> str:
    header = "| workload | inner optimizer | steps | meta-batch | device | engine | median ms | peak MB | vs higher | max grad diff | compile s | error |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in records:
        cells = [
            r["workload"],
            r.get("inner_optimizer", "sgd"),  # records written before --inner-optimizer were all sgd
            r["inner_steps"],
            r["meta_batch"],
            r["device"],
            r["engine"] + (f" ({r['strategy']})" if r["engine"].startswith("fmaml_auto") else ""),
            _fmt(r["median_s"], 1e3, ".2f"),
            _fmt(r["peak_mem_mb"], 1, ".1f"),
            _fmt(r["speedup_vs_higher"], 1, ".2f") + ("x" if r["speedup_vs_higher"] else ""),
            _fmt(r["max_grad_diff"], 1, ".1e"),
            _fmt(r.get("compile_s"), 1, ".1f"),
            (r.get("error") or "").replace("|", "/").replace("\n", " ")[:120],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


CASE_KEYS = ("workload", "inner_optimizer", "inner_steps", "meta_batch", "engine")


def pooled_times(path: Path) -> dict[tuple, list[float]]:
    """Every timed step of a --json file, per case (the values of CASE_KEYS), over all runs it holds."""
    times: dict[tuple, list[float]] = {}
    for record in json.loads(path.read_text()):
        record = {"inner_optimizer": "sgd"} | record  # records written before --inner-optimizer
        times.setdefault(tuple(record[k] for k in CASE_KEYS), []).extend(record.get("times_s") or [])
    return times


def compare(base: Path, head: Path, out: Path | None = None) -> list[dict]:
    """A/B of two checkouts' runs of the same engines (see the module docstring): per case, the median of
    all timed steps of each side, and head's over base's. Cases in only one file are left out."""
    a, b = pooled_times(base), pooled_times(head)
    rows = []
    for key in [k for k in a if a[k] and b.get(k)]:
        base_ms, head_ms = statistics.median(a[key]) * 1e3, statistics.median(b[key]) * 1e3
        rows.append(
            dict(zip(CASE_KEYS, key, strict=True))
            | {"base_median_ms": base_ms, "head_median_ms": head_ms, "head_over_base": head_ms / base_ms}
            | {"base_steps": len(a[key]), "head_steps": len(b[key]), "base": str(base), "head": str(head)}
        )
    print(comparison_table(rows))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
    return rows


def comparison_table(rows: list[dict]) -> str:
    header = "| workload | inner optimizer | steps | meta-batch | engine | base ms | head ms | head / base | timed steps |"
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        cells = [r["workload"], r["inner_optimizer"], r["inner_steps"], r["meta_batch"], r["engine"]]
        cells += [f"{r['base_median_ms']:.2f}"]
        cells += [f"{r['head_median_ms']:.2f}", f"{r['head_over_base']:.3f}x"]
        cells += [f"{r['base_steps']}/{r['head_steps']}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", default=["sinusoid"], choices=[*WORKLOADS, "all"])
    parser.add_argument(
        "--inner-optimizer",
        nargs="+",
        default=["sgd"],
        choices=list(INNER_OPTIMIZERS),
        help="the inner loop's optimizer(s), for higher and fmaml alike (default: sgd)",
    )
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1])
    parser.add_argument("--meta-batch", type=int, nargs="+", default=[4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--engines", nargs="+", default=["all"], help=f"names or sets: {', '.join(ENGINE_SETS)}"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed steps per engine (the median is reported)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (the compile happens here)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads for every engine (default: torch's)"
    )
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    parser.add_argument("--append", action="store_true", help="keep the records already in --json, add these")
    parser.add_argument(
        "--isolate",
        choices=["auto", "yes", "no"],
        default="auto",
        help="one subprocess per engine (auto: on CPU, where peak RSS needs it; on CUDA memory is per engine anyway)",
    )
    parser.add_argument("--engine-timeout", type=float, default=900, help="seconds per isolated engine")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend for the +compile engines; `eager` traces with dynamo only (the CPU smoke "
        "run of run_gpu.sh, where an inductor compile takes minutes)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        nargs=2,
        metavar=("BASE", "HEAD"),
        help="measure nothing: compare the medians of two runs' --json files (an A/B of two checkouts)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and args.compare is None:
        args.workload = list(WORKLOADS) if "all" in args.workload else args.workload
        args.engines = [e for name in args.engines for e in ENGINE_SETS.get(name, [name])]
        for engine in args.engines:
            parse_engine(engine)  # fail on a typo now, not after minutes of measurements
        if args.repeats < 1 or args.warmup < 0:
            parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return []
    if args.compare:
        return compare(*args.compare, out=args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device == "cpu")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, device {args.device}, {threads} threads, isolate={isolate}")
    kept = json.loads(args.json.read_text()) if args.append and args.json and args.json.exists() else []
    records: list[dict] = []
    for workload in args.workload:
        print(f"{workload}: {WORKLOADS[workload].description}")
        for optimizer, steps, meta_batch in itertools.product(
            args.inner_optimizer, args.inner_steps, args.meta_batch
        ):
            setting = f"inner optimizer {optimizer}, {steps} inner step(s), meta-batch {meta_batch}"
            print(f"{workload}, {setting}:", flush=True)
            records += run_configuration(args, workload, optimizer, steps, meta_batch, isolate)
            if args.json:  # after every configuration, so that an interrupted sweep keeps its results
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(kept + records, indent=1))
    print()
    print(markdown_table(records))
    return records


if __name__ == "__main__":
    main()
