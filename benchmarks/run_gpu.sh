#!/usr/bin/env bash
# The GPU suite: fmaml (eager and torch.compile) against higher, on one CUDA device.
#
#   bash benchmarks/run_gpu.sh          # -> benchmarks/results/gpu.json (+ gpu.png if matplotlib is installed)
#
# Designed for < 6 minutes on one H100 (estimate: not yet timed on the card). Three parts:
#   1. eager sweep, in one process (CUDA peak memory is reset per engine): Omniglot 5-way 5-shot at 1 and
#      5 inner steps x meta-batch 8, 32, 64; Omniglot 20-way 1-shot (5 query/class) mb 16; sinusoid mb 25.
#   2. compiled engines, each in its own subprocess with a time limit (ENGINE_TIMEOUT, s), so a compile
#      that hangs or blows up costs one record, not the suite: vmap+compile (what auto picks on CUDA) and
#      chunked:8+compile, against higher in the same invocation. loop+compile is left out: dynamo unrolls
#      the task loop (meta-batch x inner steps copies of the graph) and its compile time grows with it.
#   3. the plot.
#   4. memory: benchmarks/memory.py (peak growth and time per step, each case in a fresh process; higher is
#      skipped where it is not installed) and benchmarks/auto_vs_fixed.py (the measured strategy="auto"
#      against every fixed strategy). Both run with a plain `python` when uv is not there (PY=python).
# Environment: REPEATS (timed steps, default 5), WARMUP (default 2), ENGINE_TIMEOUT (default 150).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-"uv run python"}
OUT=benchmarks/results/gpu.json
REPEATS=${REPEATS:-5}
WARMUP=${WARMUP:-2}
ENGINE_TIMEOUT=${ENGINE_TIMEOUT:-150}
EAGER="higher torchfunc_loop fmaml_vmap fmaml_loop fmaml_chunked:8 fmaml_auto fmaml_first_order"
bench() { uv run python benchmarks/bench_vs_higher.py --device cuda --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT" "$@"; }

rm -f "$OUT"
# 1. eager
bench --workload omniglot5w5s --inner-steps 1 5 --meta-batch 8 32 64 --engines $EAGER
bench --append --workload omniglot20w1s --inner-steps 1 5 --meta-batch 16 --engines $EAGER
bench --append --workload sinusoid --inner-steps 1 5 --meta-batch 25 --engines $EAGER
# 2. compiled (higher again, so that speedup_vs_higher compares within one invocation)
COMPILED="higher fmaml_vmap+compile fmaml_chunked:8+compile"
bench --append --isolate yes --engine-timeout "$ENGINE_TIMEOUT" --workload omniglot5w5s --inner-steps 1 5 \
    --meta-batch 32 --engines $COMPILED
bench --append --isolate yes --engine-timeout "$ENGINE_TIMEOUT" --workload sinusoid --inner-steps 5 \
    --meta-batch 25 --engines $COMPILED
# 3. plot (matplotlib is not an fmaml dependency; without it this step says so and the suite still succeeds)
uv run python benchmarks/plot.py "$OUT" --out benchmarks/results/gpu.png \
    || echo "no plot: matplotlib is not installed (uv run --with matplotlib python benchmarks/plot.py $OUT --out ...)"
# 4. memory and the measured auto (plain python works: PY=python bash benchmarks/run_gpu.sh)
$PY benchmarks/memory.py --device cuda --steps-sweep 1,5,10,20 --meta-batch 8 --batch-sweep 1,2,4,8,16,32,64 \
    --steps 1 --json benchmarks/results/memory_gpu.json --plot benchmarks/results/memory_gpu.png
$PY benchmarks/auto_vs_fixed.py --device cuda --rounds 7 --json benchmarks/results/auto_vs_fixed_gpu.json
