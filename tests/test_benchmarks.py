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
