"""`strategy="auto"`, measured: time the strategies on the real meta-batch, keep the fastest that fits.

The engine (fmaml.maml) only runs concrete strategies; this file chooses one, once, outside the hot path:

1. Candidates: "loop", "vmap" and "chunked:N" for a few N below the meta-batch, each with memory "store"
   and "recompute" (or only the memory the caller fixed).
2. Memory, predicted before anything big runs: each candidate runs on a probe of 1 and 2 tasks (for
   "chunked:N", one chunk of N tasks), and the peak growth is extrapolated linearly to the meta-batch
   (the loop and a chunk hold one task's or one chunk's graph at a time, so their probe is their peak).
   Running out of memory can kill the process on the CPU, so a candidate predicted over the budget (a
   share of the device's free memory) is never run at full size.
3. Time: for the loop and the chunks, which run one after another, the probe (which also warms them
   up) predicts the time on the meta-batch. Every candidate that fits and is not predicted 1.5x slower
   than the best so far runs the full meta-batch, forward and backward, timed; those within 1.25x of the
   best run a second round, interleaved, the faster of their two timings counting (one timing is too
   noisy to decide a close call); the fastest wins. Every prediction and timing is logged, with the seconds the
   measuring took.
4. Cache: the choice and its measurements are stored per device, model, shapes and cost-changing
   settings (a JSON file under $FMAML_CACHE_DIR, default ~/.cache/fmaml), with the time they were
   written, so later runs of the same setting skip the measuring. A cached choice is reused only while it
   still holds: every candidate fits (or not) the current budget as it did the measured one, and the
   first real meta-steps take about the time it predicted (`StepCheck`); otherwise it is measured again.

What is measured is what runs: the settings that change a meta-step's cost (`phase`: derivative order,
the multi-step loss) are part of the measurement, and the app (fmaml.module) measures again whenever they
change during a run (MAML++ turns the multi-step loss off, then second order on). `torch.compile` is not
measured (compiling every candidate costs a compile each): the app refuses it with strategy="auto".

Peak memory: on CUDA, `max_memory_allocated` growth. On the CPU (Linux), the kernel's peak resident size
(VmHWM), reset to the current size before each probe by writing 5 to /proc/self/clear_refs; large
tensors are mmap'ed and returned on free, so the growth is the probe's own.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fmaml.maml import Params, Tasks, _learned_rates, meta_loss

CACHE_ENV = "FMAML_CACHE_DIR"
CHUNK_SIZES = (2, 4, 8)
# A candidate whose probe predicts more than this times the best time so far is not run in full.
SLOWER = 1.5
# The candidates timed within this factor of the best get a second, interleaved round (the faster counts).
CLOSE = 1.25
CPU_PEAK_RESETTABLE = os.access("/proc/self/clear_refs", os.W_OK)
# A cached choice is checked against the median time of this many real meta-steps (after a first one,
# which carries one-off costs): a median of 5 shrugs off one or two steps slowed by a neighbour.
CHECK_STEPS = 5
# Observed against predicted beyond this factor, either way, and the cached choice is measured again. A
# real meta-step also runs the optimizer and Lightning's bookkeeping (a few percent), and a timing on a
# shared machine wanders by up to ~1.3x (a loaded run against an idle one); 1.5x is beyond that noise,
# and is also the factor past which `choose` itself rules a candidate out (SLOWER).
DISAGREE = 1.5


@dataclass
class Choice:
    """The chosen (strategy, memory), and what it was chosen from: per candidate the predicted peak
    bytes, the seconds of one meta-gradient (None if not run) and why it was skipped, if it was."""

    strategy: str
    memory: str
    budget_bytes: int
    measuring_seconds: float
    candidates: list[dict] = field(default_factory=list)
    cached: bool = False
    settings: str = ""  # the cost-changing settings measured under (`describe_phase`)
    written: str | None = None  # when the measurement was cached (UTC); None: before fmaml said
    note: str = ""  # why a cached choice was not reused, if it was not

    @property
    def chosen(self) -> dict:
        """The chosen candidate's row: its "seconds" are what a real meta-step should take."""
        return next(
            c for c in self.candidates if (c["strategy"], c["memory"]) == (self.strategy, self.memory)
        )

    def summary(self) -> str:
        rows = [
            f"  {c['strategy']:>10} {c['memory']:>9}: predicted {c['predicted_bytes'] / 2**20:8.1f} MB, "
            + (f"{c['seconds'] * 1e3:8.1f} ms" if c["seconds"] is not None else c["skipped"])
            for c in self.candidates
        ]
        source = (
            f"cached, measured {self.written or 'at an unknown time'}"
            if self.cached
            else f"measured in {self.measuring_seconds:.1f} s"
        )
        return (
            (f"strategy=auto: {self.note}\n" if self.note else "")
            + f"strategy=auto chose {self.strategy}, memory={self.memory} ({source}, under "
            f"{self.settings or 'unrecorded settings'}; budget now {self.budget_bytes / 2**20:.0f} MB):\n"
            + "\n".join(rows)
        )


def check_compile(strategy: str, compile: bool, prefix: str) -> None:
    """Refuse compile with strategy="auto" at start-up. Auto times the eager meta-loss, so its choice
    would describe another program than the compiled one that runs; measuring what runs would cost a
    compile per candidate (tens of seconds to minutes each, where a compile hangs for minutes on CPU conv
    nets): a fixed strategy is the honest and cheap way to compile."""
    if compile and strategy == "auto":
        raise ValueError(
            f"{prefix}compile=true with {prefix}strategy=auto: auto measures the strategies uncompiled, so "
            "its choice would not describe the compiled meta-loss that runs. Give a fixed strategy with "
            f"compile, e.g. --{prefix}strategy=vmap (chunked:N or loop), or drop --{prefix}compile"
        )


def candidates(num_tasks: int, memories: tuple[str, ...]) -> list[tuple[str, str]]:
    strategies = ["loop", "vmap", *(f"chunked:{n}" for n in CHUNK_SIZES if 1 < n < num_tasks)]
    return [(s, m) for m in memories for s in strategies]


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


class PeakMemory:
    """Peak memory growth of a block: `with PeakMemory(device) as peak: ...; peak.bytes`."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif CPU_PEAK_RESETTABLE:
            # Hand freed heap back first: otherwise this probe could reuse what an earlier one freed, and
            # its growth would read as zero.
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif CPU_PEAK_RESETTABLE:
            self.bytes = _status_bytes("VmHWM") - self.start
        else:  # no resettable peak here (not Linux): nothing is predicted, every candidate runs
            self.bytes = 0


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _subset(tasks: Tasks, n: int) -> Tasks:
    return {split: (x[:n], y[:n]) for split, (x, y) in tasks.items()}


def _meta_gradient(params: Params, buffers: Params, tasks: Tasks, strategy: str, memory: str, config: dict):
    """One meta-gradient, as training computes it (into fresh leaves: the model's .grad is untouched)."""
    leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in params.items()}
    learned, with_rates = _learned_rates(config["lr"])
    if learned:  # learned inner rates: fresh leaves too
        config = config | {"lr": with_rates([rate.detach().requires_grad_() for rate in learned])}
    value, _ = meta_loss(
        leaves, buffers, tasks, strategy=strategy, memory=memory, metrics_before=False, **config
    )
    value.backward()
    return value


def _full_run(params, buffers, tasks, strategy, memory, config) -> Callable[[], Tensor]:
    return lambda: _meta_gradient(params, buffers, tasks, strategy, memory, config)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Tensor], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def probe(params, buffers, tasks, strategy, memory, config, device) -> tuple[int, float]:
    """(peak bytes, seconds) of one meta-gradient on the whole meta-batch, predicted from probes of 1 and
    2 tasks (for "chunked:N", one chunk of N tasks): the loop and a chunk hold one task's (chunk's) graph
    at a time, so their probe's peak is their peak; vmap's grows linearly with the tasks. The time (0 for
    vmap: not predicted) is the probe's, run again warm, times the number of probes in the meta-batch."""
    num_tasks = tasks["support"][0].shape[0]
    if strategy.startswith("chunked:"):
        sizes = [min(int(strategy.removeprefix("chunked:")), num_tasks)]
    else:
        sizes = [1, 2] if strategy == "vmap" and num_tasks > 1 else [1]
    peaks = []
    for size in sizes:
        with PeakMemory(device) as peak:
            _meta_gradient(params, buffers, _subset(tasks, size), strategy, memory, config)
        peaks.append(peak.bytes)
    if len(sizes) == 1:  # the loop and the chunks run one after another: time linear in the tasks
        # Timed again warm: a first call carries one-off costs (the allocator's) that are not the step's.
        subset = _subset(tasks, sizes[0])
        seconds = _timed(lambda: _meta_gradient(params, buffers, subset, strategy, memory, config), device)
        return peaks[0], seconds * num_tasks / sizes[0]
    # vmap: memory grows linearly with the tasks, time far less (that is vmap's point, and tiny probes'
    # timings are too noisy to extrapolate): it is always timed in full when it fits.
    return peaks[0] + max(peaks[1] - peaks[0], 0) * (num_tasks - 1), 0.0


def choose(
    params: Params,
    buffers: Params,
    tasks: Tasks,
    *,
    model: nn.Module,
    memories: tuple[str, ...] = ("store", "recompute"),
    memory_share: float = 0.5,
    cache: bool = True,
    refresh: bool = False,
    **config,
) -> Choice:
    """Measure the candidates on this meta-batch (see the module docstring) and return the fastest that
    fits `memory_share` of the device's free memory. `config`: meta_loss's inner-loop arguments.
    `refresh`: measure even where the cache holds a choice (which is then overwritten). Mixed precision
    (`config`'s compute_dtype) is measured as it runs, and is part of the cache key."""
    device = tasks["support"][0].device
    key = _cache_key(params, tasks, model, memories, config, device)
    budget = int(memory_share * free_memory_bytes(device))
    note = ""
    if cache and not refresh and (cached := _read_cache(key)) is not None:
        if not (note := _budget_change(cached, budget)):
            cached.budget_bytes = budget  # it holds under the current budget: say that one
            return cached
    start = time.perf_counter()
    rows = _measure(params, buffers, tasks, dict(config, model=model), memories, budget)
    fitting = [r for r in rows if r["seconds"] is not None]
    if not fitting:
        smallest = min(rows, key=lambda r: r["predicted_bytes"])
        raise MemoryError(
            f"strategy=auto: no strategy fits the memory budget of {budget / 2**20:.0f} MB "
            f"({memory_share:.0%} of free memory); the smallest, {smallest['strategy']} with "
            f"memory={smallest['memory']}, needs about {smallest['predicted_bytes'] / 2**20:.0f} MB. Lower "
            "data.meta_batch_size or raise model.execution.auto_memory_share"
        )
    best = min(fitting, key=lambda r: r["seconds"])
    choice = Choice(
        best["strategy"],
        best["memory"],
        budget,
        time.perf_counter() - start,
        rows,
        settings=describe_phase(phase(config)),
        written=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        note=note,
    )
    if cache:
        _write_cache(key, choice)
    return choice


def _measure(params, buffers, tasks, config, memories, budget) -> list[dict]:
    """Every candidate's row: predicted peak bytes, and the seconds of a full meta-gradient (None where it
    was not run: predicted over `budget`, or predicted too slow to win)."""
    device = tasks["support"][0].device
    rows, best = [], float("inf")
    for strategy, memory in candidates(tasks["support"][0].shape[0], memories):
        row = {"strategy": strategy, "memory": memory, "seconds": None, "skipped": ""}
        row["predicted_bytes"], estimate = probe(params, buffers, tasks, strategy, memory, config, device)
        if row["predicted_bytes"] > budget:
            row["skipped"] = "skipped: predicted over the budget"
        elif estimate > SLOWER * best:
            # The probe (which also warmed it up) says it cannot win: not worth a full meta-batch.
            row["skipped"] = f"skipped: the probe predicts {estimate * 1e3:.0f} ms"
        else:
            row["seconds"] = _timed(_full_run(params, buffers, tasks, strategy, memory, config), device)
            best = min(best, row["seconds"])
        rows.append(row)
    # Close calls get a second round, interleaved, the faster of the two counting: a single timing, taken
    # at its own moment, is too noisy (and drifts with the machine's state) to decide them.
    close = [r for r in rows if r["seconds"] is not None and r["seconds"] < CLOSE * best]
    if len(close) > 1:
        for row in close:
            run = _full_run(params, buffers, tasks, row["strategy"], row["memory"], config)
            row["seconds"] = min(row["seconds"], _timed(run, device))
    return rows


def _budget_change(cached: Choice, budget: int) -> str:
    """Why a cached choice does not hold under the current `budget` ("" if it does): every candidate must
    fit it, or not, as it fitted the budget it was measured under. A lower budget may exclude the choice
    (after running out of memory, a lower model.execution.auto_memory_share must take effect); a higher one may admit
    a faster candidate."""
    for row in cached.candidates:
        fits_now = row["predicted_bytes"] <= budget
        if fits_now != (row["predicted_bytes"] <= cached.budget_bytes):
            return (
                f"the cached choice (measured {cached.written or 'at an unknown time'}) was made under a budget "
                f"of {cached.budget_bytes / 2**20:.0f} MB; under today's, {budget / 2**20:.0f} MB, "
                f"{row['strategy']} with memory={row['memory']} (predicted {row['predicted_bytes'] / 2**20:.0f} MB) "
                f"{'fits' if fits_now else 'no longer fits'}: measuring again"
            )
    return ""


def phase(inner: dict) -> dict[str, bool | str]:
    """The inner-loop settings besides the shapes that change a meta-gradient's cost, time and memory
    alike (second order: about 6x the memory of first order on the MAML++ ConvNet): a run whose settings
    change them (MAML++: the multi-step loss off, then second order on) measures again. iMAML and Reptile
    (a `meta_gradient`) are neither order: their name stands in for it."""
    if (meta_gradient := inner.get("meta_gradient")) is not None:
        return {"meta_gradient": meta_gradient.name, "multi_step_loss": False}
    return {
        "second_order": not inner.get("first_order", False),
        "multi_step_loss": inner.get("step_weights") is not None,
    }


def describe_phase(settings: dict[str, bool | str]) -> str:
    if "meta_gradient" in settings:
        return f"{settings['meta_gradient']}'s meta-gradient"
    order = "second order" if settings["second_order"] else "first order"
    return order + (", multi-step loss" if settings["multi_step_loss"] else ", last step's loss")


class StepCheck:
    """A cached choice against the run: `start()` and `stop()` around each of the first real meta-steps;
    `stop()` returns None while it collects, then why to measure again ("" when the median of CHECK_STEPS
    steps, after a first one that carries one-off costs, agrees with the cached prediction)."""

    def __init__(self, predicted_seconds: float, device: torch.device):
        self.predicted, self.device = predicted_seconds, device
        self.observed: list[float] = []

    def start(self) -> None:
        _synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> str | None:
        _synchronize(self.device)
        self.observed.append(time.perf_counter() - self.started)
        if len(self.observed) <= CHECK_STEPS:
            return None
        observed = statistics.median(self.observed[1:])
        ratio = observed / max(self.predicted, 1e-9)
        if 1 / DISAGREE <= ratio <= DISAGREE:
            return ""
        return (
            f"the first meta-steps took {observed * 1e3:.1f} ms (median of {CHECK_STEPS}), where the cached "
            f"measurement predicted {self.predicted * 1e3:.1f} ms ({ratio:.2f}x, beyond the {DISAGREE}x of "
            "timing noise): measuring again"
        )


def device_name(device: torch.device) -> str:
    """The device a choice was measured on, as a checkpoint records it: its type, and the model on CUDA."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def restored_problem(saved: dict, *, memories, device, precision: str | None, memory_share: float) -> str:
    """Why a choice restored from a checkpoint does not apply to this run ("" if it does): a memory mode
    the run's settings exclude, another device or precision (or a checkpoint that does not say), or a
    predicted peak over today's budget."""
    if saved.get("memory") not in memories:
        return (
            f"it runs memory={saved.get('memory')}, which this run's model.execution.memory and model.inner_loop.adapt_only "
            f"exclude (allowed: {', '.join(memories)})"
        )
    if "device" not in saved or "precision" not in saved:
        return "the checkpoint does not record the device and precision it was measured on (an older fmaml)"
    if saved["device"] != device_name(device):
        return f"it was measured on {saved['device']}, this run is on {device_name(device)}"
    if saved["precision"] != precision:
        return f"it was measured at precision {saved['precision']}, this run is at {precision}"
    budget = int(memory_share * free_memory_bytes(device))
    if saved.get("predicted_bytes", 0) > budget:
        return (
            f"its predicted peak, {saved['predicted_bytes'] / 2**20:.0f} MB, is over today's budget of "
            f"{budget / 2**20:.0f} MB ({memory_share:.0%} of free memory)"
        )
    return ""


def _cache_key(params, tasks, model, memories, config, device) -> str:
    described = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "model": repr(model),
        "params": {n: [list(p.shape), str(p.dtype), p.requires_grad] for n, p in params.items()},
        "tasks": {s: [list(x.shape), str(x.dtype), list(y.shape)] for s, (x, y) in tasks.items()},
        "memories": list(memories),
        "config": {k: _described(v) for k, v in config.items()},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()[:20]


def _described(value):
    """A setting as the cache key sees it. Tensors by shape, and numbers inside lists by position only:
    the learned rates and the multi-step loss's weights change every meta-step, and do not change the
    cost (by value, a run resumed or restarted at another step would never find its measurement)."""
    if isinstance(value, Tensor):
        return [list(value.shape), value.requires_grad]
    if isinstance(value, list | tuple):
        return ["number" if isinstance(v, float) else _described(v) for v in value]
    if isinstance(value, dict):
        return {k: _described(v) for k, v in value.items()}
    return repr(value)


def _cache_file() -> str:
    folder = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fmaml")
    return os.path.join(folder, "auto_strategy.json")


def _read_cache(key: str) -> Choice | None:
    try:
        with open(_cache_file()) as f:
            entry = json.load(f).get(key)
        return None if entry is None else Choice(**(entry | {"cached": True}))
    except (OSError, ValueError, TypeError):  # no cache, or an entry this version cannot read: measure
        return None


def _write_cache(key: str, choice: Choice) -> None:
    path = _cache_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        entries = {}
    entries[key] = asdict(choice) | {"cached": False, "note": ""}  # the note was about the entry it replaced
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, path)  # concurrent runs never leave a half-written cache
