"""benchmarks/run_gpu.sh cannot rot unseen: its smoke mode runs every part at tiny sizes on the CPU, a failing
or hanging part is recorded while the others still run, and the summary file is always written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
PARTS = ["eager", "compiled", "plot", "memory", "auto_vs_fixed", "time_to_accuracy", "bf16"]
EAGER_ENGINES = {
    "higher",
    "torchfunc_loop",
    "fmaml_vmap",
    "fmaml_loop",
    "fmaml_chunked:8",
    "fmaml_auto",
    "fmaml_first_order",
}


def run_gpu_script(out_dir: Path, timeout: float, python: str = sys.executable, **env: str):
    # `python` for every part (no `uv run` per part), results in the test's folder: never in
    # benchmarks/results.
    env = os.environ | {"OUT_DIR": str(out_dir), "PY": python} | env
    command = ["bash", str(SCRIPT), "--smoke"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "gpu_summary.json").read_text())


def outputs(part: dict) -> dict[str, Path]:
    return {Path(path).name: Path(path) for path in part["outputs"]}


@pytest.mark.slow
def test_smoke_mode_runs_every_part(tmp_path, zygote):
    # Every part's Python through the zygote (tests/zygote.py): the same command lines, each in a process of
    # its own, without 10+ s of imports per process; memory.py's cases too (its `sys.executable` is the
    # zygote's, ZYGOTE_PYTHON: each case still in a process of its own, forked before any case ran).
    # So the parts' CPU seconds are the zygote client's only: measured below on a part run by real
    # interpreters.
    zygote_python = {"python": " ".join(zygote.run_command()), "ZYGOTE_PYTHON": zygote.python}
    done = run_gpu_script(tmp_path, timeout=900, **zygote_python)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = summary(tmp_path)
    assert (result["mode"], result["device"], result["failed"]) == ("smoke", "cpu", [])
    parts = {part["name"]: part for part in result["parts"]}
    assert list(parts) == PARTS
    for part in parts.values():
        assert (part["status"], part["rc"], part["record_errors"]) == ("ok", 0, 0), part
        assert 0 < part["seconds"] < part["limit_s"] and part["cpu_seconds"] >= 0, part
        for path in part["outputs"]:
            assert Path(path).is_file(), (part["name"], path)
        assert Path(part["log"]).is_file()

    eager = json.loads(outputs(parts["eager"])["gpu.json"].read_text())
    for workload in ("omniglot5w5s", "omniglot20w1s", "sinusoid"):
        records = [r for r in eager if r["workload"] == workload]
        assert {r["engine"] for r in records} == EAGER_ENGINES, workload
        assert all(r["device"] == "cpu" and r["median_s"] > 0 for r in records)
    compiled = json.loads(outputs(parts["compiled"])["gpu_compiled.json"].read_text())
    traced = [r for r in compiled if r["engine"] == "fmaml_vmap+compile"]
    assert len(traced) == 2 and all(r["compile_backend"] == "eager" and r["median_s"] > 0 for r in traced)
    assert outputs(parts["plot"])["gpu.png"].read_bytes()[:4] == b"\x89PNG"
    # memory.py: each case in its own process, a record per (engine, value), growth >= 0.
    memory = json.loads(outputs(parts["memory"])["memory_gpu.json"].read_text())
    assert [r["engine"] for r in memory] == ["loop", "vmap+recompute"]
    for record in memory:
        assert record["status"] == "ok" and record["median_ms"] > 0 and record["growth_mb"] >= 0, record
    (auto,) = json.loads(outputs(parts["auto_vs_fixed"])["auto_vs_fixed_gpu.json"].read_text())
    assert auto["workload"] == "sinusoid" and auto["chosen"] in auto["medians_ms"]
    assert auto["auto_over_fastest"] >= 1.0 and auto["measuring_seconds"] > 0
    accuracy = json.loads(outputs(parts["time_to_accuracy"])["time_to_accuracy_gpu.json"].read_text())
    assert (accuracy["target"], accuracy["reached"], accuracy["device"]) == (0.2, True, "cpu")
    assert accuracy["steps"] == accuracy["curve"][-1]["step"] >= 2  # the validation that reached it
    assert accuracy["seconds"] > 0 and accuracy["best_accuracy"] >= 0.2
    bf16 = json.loads(outputs(parts["bf16"])["mixed_precision_gpu.json"].read_text())
    rows = {(row["strategy"], row["precision"]) for row in bf16["rows"]}
    assert ("vmap", "bf16") in rows, rows

    # A part run by real interpreters (the plot, from the results above) counts its processes' CPU time.
    done = run_gpu_script(tmp_path, timeout=300, PARTS="plot")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (plot,) = summary(tmp_path)["parts"]
    assert (plot["name"], plot["status"], plot["rc"]) == ("plot", "ok", 0), plot
    assert 0 < plot["seconds"] < plot["limit_s"] and plot["cpu_seconds"] > 0, plot
    assert outputs(plot)["gpu.png"].read_bytes()[:4] == b"\x89PNG"


def test_a_failing_or_hanging_part_is_recorded_and_the_summary_still_written(tmp_path):
    # FAIL_PART replaces the parts' commands (no benchmark runs): eager exits 3, compiled hangs past 1 s.
    done = run_gpu_script(tmp_path, timeout=60, PARTS="eager compiled", FAIL_PART="eager compiled:hang")
    assert done.returncode == 1, done.stdout + done.stderr
    result = summary(tmp_path)
    assert result["failed"] == ["eager", "compiled"]
    eager, compiled = result["parts"]
    assert (eager["name"], eager["status"], eager["rc"]) == ("eager", "failed", 3)
    assert (compiled["name"], compiled["status"], compiled["rc"]) == ("compiled", "timed out", 124)
    assert compiled["limit_s"] == 1 and compiled["seconds"] < 10
    assert "FAIL_PART: eager fails on purpose" in Path(eager["log"]).read_text()


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    done = run_gpu_script(tmp_path, timeout=60, PARTS="eager plots")
    assert done.returncode == 2
    assert "PARTS='eager plots': unknown part 'plots'" in done.stderr
    assert "eager compiled plot memory" in done.stderr
    assert not (tmp_path / "gpu_summary.json").exists()


def test_an_unknown_argument_is_refused(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--smok"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown argument '--smok': give --smoke or nothing" in done.stderr
