"""The benchmark script runs end to end on a tiny workload and its records are sane. Each runs in a process
of its own, forked from the zygote (tests/zygote.py: without 10+ s of imports each). memory.py with the
default SGD inner loop (loop and vmap+recompute, each case in its own process) and auto_vs_fixed.py on the
sinusoid run in benchmarks/run_gpu.sh's smoke mode: tests/test_run_gpu_smoke.py asserts their records."""

import json
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_higher.py"
KEYS = {
    "workload",
    "engine",
    "inner_steps",
    "meta_batch",
    "device",
    "median_s",
    "peak_mem_mb",
    "speedup_vs_higher",
    "max_grad_diff",
}


def run_bench(zygote, *arguments: str) -> subprocess.CompletedProcess:
    """benchmarks/bench_vs_higher.py with `arguments`, in a process forked from the zygote; it must succeed."""
    done = subprocess.run(
        [*zygote.run_command(), str(SCRIPT), *arguments], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_bench_vs_higher_smoke(tmp_path, zygote):
    out = tmp_path / "bench.json"
    engines = ["higher", "torchfunc_loop", "fmaml_vmap", "fmaml_loop", "fmaml_first_order"]
    arguments = (
        "--workload sinusoid --meta-batch 2 --inner-steps 1 --device cpu --isolate no --repeats 2 --warmup 1"
    )
    done = run_bench(zygote, *arguments.split(), "--json", str(out), "--engines", *engines)
    assert "| sinusoid |" in done.stdout  # the markdown table
    records = json.loads(out.read_text())
    assert [r["engine"] for r in records] == engines
    for record in records:
        assert KEYS <= set(record), record
        assert "error" not in record, record
        assert (record["workload"], record["inner_steps"], record["meta_batch"]) == ("sinusoid", 1, 2)
        assert (record["inner_optimizer"], record["inner_lr"]) == ("sgd", 0.01)  # the default, as before
        assert record["median_s"] > 0 and record["speedup_vs_higher"] > 0
        assert record["max_grad_diff"] < 1e-5, record  # float32, identical weights and tasks


def test_bench_vs_higher_inner_optimizers_smoke(tmp_path, zygote):
    """--inner-optimizer: higher and fmaml run the same torch.optim rule (2 steps, so momentum and Adam's
    moments matter); the hand-written SGD loop is refused by name; Adam's known difference is recorded."""
    out = tmp_path / "bench.json"
    engines = ["higher", "torchfunc_loop", "fmaml_vmap", "fmaml_loop"]
    arguments = "--workload sinusoid --meta-batch 2 --inner-steps 2 --device cpu --isolate no --repeats 1"
    arguments += " --warmup 0 --inner-optimizer sgd_momentum adam"
    done = run_bench(zygote, *arguments.split(), "--json", str(out), "--engines", *engines)
    assert "| sinusoid | adam | 2 | 2 | cpu | fmaml_vmap |" in done.stdout
    records = {(r["inner_optimizer"], r["engine"]): r for r in json.loads(out.read_text())}
    assert list(records) == [(o, e) for o in ("sgd_momentum", "adam") for e in engines]
    for (optimizer, engine), record in records.items():
        if engine == "torchfunc_loop":
            assert "plain-SGD" in record["error"] and optimizer in record["error"], record
            assert record["median_s"] is None
            continue
        assert "error" not in record and record["median_s"] > 0, record
        assert record["inner_lr"] == 0.01  # the sinusoid's SGD rate, and ADAPTIVE_LR for Adam
        if optimizer == "sgd_momentum":
            assert record["max_grad_rel_diff"] < 1e-5, record  # float32 rounding only
        elif engine != "higher":
            # higher's Adam places eps before the bias correction, torch's (and fmaml's) after it: a real
            # difference, recorded rather than hidden; about 2e-3 on this MLP (order 1 on the ConvNet,
            # whose gradients have many entries near eps: see bench_vs_higher.py's docstring).
            assert 1e-5 < record["max_grad_rel_diff"] < 1e-1, record


def test_bench_vs_higher_compare(tmp_path, zygote):
    """--compare pools each side's timed steps per case (over the runs a file holds) and divides medians."""

    def record(engine, times, workload="sinusoid"):
        return dict(workload=workload, inner_steps=5, meta_batch=25, engine=engine, times_s=times)

    base, head, out = tmp_path / "base.json", tmp_path / "head.json", tmp_path / "ab.json"
    base.write_text(json.dumps([record("fmaml_vmap", [1, 2, 3]), record("fmaml_vmap", [5])]))
    head.write_text(json.dumps([record("fmaml_vmap", [2, 4, 6]), record("fmaml_loop", [1])]))
    run_bench(zygote, "--compare", str(base), str(head), "--json", str(out))
    (row,) = json.loads(out.read_text())  # fmaml_loop is in one file only: left out
    assert (row["engine"], row["inner_optimizer"], row["base_steps"], row["head_steps"]) == (
        "fmaml_vmap",
        "sgd",
        4,
        3,
    )
    assert (row["base_median_ms"], row["head_median_ms"]) == (2500, 4000)
    assert row["head_over_base"] == 1.6


def test_memory_benchmark_adam_smoke(tmp_path, zygote):
    """--inner-optimizer adam reaches every case, higher's and the recompute recursion's over Adam's state."""
    out = tmp_path / "memory.json"
    script = SCRIPT.parent / "memory.py"
    command = [*zygote.run_command(), str(script), "--workload", "sinusoid", "--device", "cpu", "--engines"]
    command += ["higher,loop+recompute", "--steps-sweep", "2", "--meta-batch", "2", "--batch-sweep", ""]
    command += ["--inner-optimizer", "adam", "--repeats", "1", "--json", str(out)]
    # Its cases (a process each) forked from the zygote too: its `sys.executable` is the zygote's.
    env = os.environ | {"ZYGOTE_PYTHON": zygote.python}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| adam | loop+recompute |" in done.stdout
    records = json.loads(out.read_text())
    assert [(r["engine"], r["inner_optimizer"]) for r in records] == [
        ("higher", "adam"),
        ("loop+recompute", "adam"),
    ]
    for record in records:
        assert record["status"] == "ok" and record["median_ms"] > 0 and record["growth_mb"] >= 0, record
