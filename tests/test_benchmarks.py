"""The benchmark script runs end to end on a tiny workload and its records are sane."""

import json
import subprocess
import sys
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


def test_bench_vs_higher_smoke(tmp_path):
    out = tmp_path / "bench.json"
    engines = ["higher", "torchfunc_loop", "fmaml_vmap", "fmaml_loop", "fmaml_first_order"]
    arguments = (
        "--workload sinusoid --meta-batch 2 --inner-steps 1 --device cpu --isolate no --repeats 2 --warmup 1"
    )
    command = [sys.executable, str(SCRIPT), *arguments.split(), "--json", str(out), "--engines", *engines]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| sinusoid |" in done.stdout  # the markdown table
    records = json.loads(out.read_text())
    assert [r["engine"] for r in records] == engines
    for record in records:
        assert KEYS <= set(record), record
        assert "error" not in record, record
        assert (record["workload"], record["inner_steps"], record["meta_batch"]) == ("sinusoid", 1, 2)
        assert record["median_s"] > 0 and record["speedup_vs_higher"] > 0
        assert record["max_grad_diff"] < 1e-5, record  # float32, identical weights and tasks


def test_memory_benchmark_smoke(tmp_path):
    """benchmarks/memory.py: each case in its own process, a record per (engine, value), growth >= 0."""
    out = tmp_path / "memory.json"
    script = SCRIPT.parent / "memory.py"
    command = [sys.executable, str(script), "--workload", "sinusoid", "--device", "cpu", "--engines"]
    command += ["loop,vmap+recompute", "--steps-sweep", "1", "--meta-batch", "2", "--batch-sweep", ""]
    command += ["--repeats", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())
    assert [r["engine"] for r in records] == ["loop", "vmap+recompute"]
    for record in records:
        assert record["status"] == "ok" and record["median_ms"] > 0 and record["growth_mb"] >= 0, record


def test_auto_vs_fixed_smoke(tmp_path):
    out = tmp_path / "auto.json"
    script = SCRIPT.parent / "auto_vs_fixed.py"
    command = [sys.executable, str(script), "--workloads", "sinusoid", "--rounds", "1", "--device", "cpu"]
    done = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = json.loads(out.read_text())
    assert record["chosen"] in record["medians_ms"] and record["auto_over_fastest"] >= 1.0
    assert record["measuring_seconds"] > 0
