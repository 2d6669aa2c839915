#!/usr/bin/env bash
# The CPU suite for the README: fmaml (eager, and compiled where it compiles in reasonable time) against higher.
#
#   bash benchmarks/run_cpu.sh          # -> benchmarks/results/cpu.json (+ cpu.png if matplotlib is installed)
#
# Designed for about 10 minutes on 2 cores; run it on an otherwise idle machine. Every engine runs in a
# fresh subprocess (the default on CPU) so that its peak-RSS growth is its own; that costs a few seconds
# of interpreter start per engine, outside the timings.
#   sinusoid       meta-batch 25, 5 inner steps   eager engines + vmap+compile (auto = vmap on an MLP)
#   omniglot5w5s   meta-batch 32, 1 inner step    eager engines
#   omniglot20w1s  meta-batch 16, 1 inner step    eager engines (5 query/class)
#   miniimagenet   meta-batch 4,  1 inner step    eager engines
#   sinusoid sweep meta-batch 5/25/50 and 1/5/10 inner steps, for the plot
# The ConvNet workloads are not compiled here: one cold inductor compile of the ConvNet meta-gradient
# takes minutes on 2 cores (see the report of benchmarks/bench_vs_higher.py on compile).
# Environment: REPEATS (timed steps, default 3), WARMUP (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/cpu.json
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-1}
EAGER="higher torchfunc_loop fmaml_vmap fmaml_loop fmaml_chunked:8 fmaml_auto fmaml_first_order"
bench() { uv run python benchmarks/bench_vs_higher.py --device cpu --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT" "$@"; }

rm -f "$OUT"
bench --workload sinusoid --inner-steps 5 --meta-batch 25 --engines $EAGER fmaml_vmap+compile --warmup 2
bench --append --workload omniglot5w5s --inner-steps 1 --meta-batch 32 --engines $EAGER
bench --append --workload omniglot20w1s --inner-steps 1 --meta-batch 16 --engines $EAGER
bench --append --workload miniimagenet --inner-steps 1 --meta-batch 4 --engines $EAGER
# Sweeps for the plot (eager; the sinusoid is cheap): meta-batch 5 and 50 at 5 steps, 1 and 10 steps at mb 25.
SWEEP="higher torchfunc_loop fmaml_vmap fmaml_loop fmaml_chunked:8 fmaml_first_order"
bench --append --workload sinusoid --inner-steps 5 --meta-batch 5 50 --engines $SWEEP
bench --append --workload sinusoid --inner-steps 1 10 --meta-batch 25 --engines $SWEEP
uv run python benchmarks/plot.py "$OUT" --out benchmarks/results/cpu.png \
    || echo "no plot: matplotlib is not installed (uv run --with matplotlib python benchmarks/plot.py $OUT --out ...)"
