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
4. Cache: the choice and its measurements are stored per device, model and shapes (a JSON file under
   $FMAML_CACHE_DIR, default ~/.cache/fmaml), so later runs of the same setting skip the measuring.

Peak memory: on CUDA, `max_memory_allocated` growth. On the CPU (Linux), the kernel's peak resident size
(VmHWM), reset to the current size before each probe by writing 5 to /proc/self/clear_refs; large
tensors are mmap'ed and returned on free, so the growth is the probe's own.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
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

    def summary(self) -> str:
        rows = [
            f"  {c['strategy']:>10} {c['memory']:>9}: predicted {c['predicted_bytes'] / 2**20:8.1f} MB, "
            + (f"{c['seconds'] * 1e3:8.1f} ms" if c["seconds"] is not None else c["skipped"])
            for c in self.candidates
        ]
        source = "cached" if self.cached else f"measured in {self.measuring_seconds:.1f} s"
        return (
            f"strategy=auto chose {self.strategy}, memory={self.memory} ({source}, budget "
            f"{self.budget_bytes / 2**20:.0f} MB):\n" + "\n".join(rows)
        )


def candidates(num_tasks: int, memories: tuple[str, ...], loop_only: bool = False) -> list[tuple[str, str]]:
    strategies = ["loop", "vmap", *(f"chunked:{n}" for n in CHUNK_SIZES if 1 < n < num_tasks)]
    return [(s, m) for m in memories for s in strategies if s == "loop" or not loop_only]


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


def _timed(fn: Callable[[], Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
    loop_only: bool = False,
    **config,
) -> Choice:
    """Measure the candidates on this meta-batch (see the module docstring) and return the fastest that
    fits `memory_share` of the device's free memory. `config`: meta_loss's inner-loop arguments.
    `loop_only`: under mixed precision, where vmap over the inner gradient fails (fmaml.cli)."""
    device = tasks["support"][0].device
    key = _cache_key(params, tasks, model, memories, config | {"loop_only": loop_only}, device)
    if cache and (cached := _read_cache(key)) is not None:
        return cached
    start = time.perf_counter()
    budget = int(memory_share * free_memory_bytes(device))
    config = dict(config, model=model)
    rows, best = [], float("inf")
    for strategy, memory in candidates(tasks["support"][0].shape[0], memories, loop_only):
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
    fitting = [r for r in rows if r["seconds"] is not None]
    if not fitting:
        smallest = min(rows, key=lambda r: r["predicted_bytes"])
        raise MemoryError(
            f"strategy=auto: no strategy fits the memory budget of {budget / 2**20:.0f} MB "
            f"({memory_share:.0%} of free memory); the smallest, {smallest['strategy']} with "
            f"memory={smallest['memory']}, needs about {smallest['predicted_bytes'] / 2**20:.0f} MB. Lower "
            "data.meta_batch_size or raise model.auto_memory_share"
        )
    best = min(fitting, key=lambda r: r["seconds"])
    choice = Choice(best["strategy"], best["memory"], budget, time.perf_counter() - start, rows)
    if cache:
        _write_cache(key, choice)
    return choice


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
        "config": {
            k: repr(v) if not isinstance(v, Tensor) else [list(v.shape), v.requires_grad]
            for k, v in config.items()
        },
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()[:20]


def _cache_file() -> str:
    folder = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "fmaml")
    return os.path.join(folder, "auto_strategy.json")


def _read_cache(key: str) -> Choice | None:
    try:
        with open(_cache_file()) as f:
            entry = json.load(f).get(key)
    except (OSError, ValueError):
        return None
    return None if entry is None else Choice(**(entry | {"cached": True}))


def _write_cache(key: str, choice: Choice) -> None:
    path = _cache_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        entries = {}
    entries[key] = asdict(choice) | {"cached": False}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(tmp, path)  # concurrent runs never leave a half-written cache
