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
#
# Other suites, by name (each about the minutes given, on this 2-core VM, idle):
#   bash benchmarks/run_cpu.sh inner_optimizers   # issue 20: inner optimizers against higher's (~12 min)
#   bash benchmarks/run_cpu.sh seam_ab            # plain SGD before and after the optimizer seam (~7 min)
# inner_optimizers -> benchmarks/results/inner_optimizers_cpu.json: higher, fmaml vmap/loop/chunked:8 with
#   OPTIMIZERS (default "sgd sgd_momentum adam"; sgd is the same run's baseline) on the sinusoid (meta-batch
#   25, 5 steps) and Omniglot 5w5s (meta-batch 32, 1 step: the rows of cpu.json; and meta-batch 8, 5 steps,
#   where momentum and Adam's moments act: at one step momentum is plain SGD), REPEATS default 5;
#   -> benchmarks/results/memory_cpu_adam_steps.json: memory.py with an Adam inner loop, Omniglot 5w5s,
#   meta-batch 8, 1/5/10/20 inner steps (the target: recompute at 20 steps <= 2x its 1-step peak), MEM_REPEATS
#   default 3.
# seam_ab -> benchmarks/results/seam_ab_cpu.json (+ _base/_head.json, every timed step): commit BASE (default
#   8b48f2c, before the seam) in a temporary git worktree with its own venv, and this checkout, run the same
#   fmaml engines with plain SGD, alternating base/head then head/base for ROUNDS (default 3) rounds;
#   bench_vs_higher.py --compare pools each side's steps per case and divides the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
WARMUP=${WARMUP:-1}
bench() { uv run python benchmarks/bench_vs_higher.py --device cpu --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT" "$@"; }

inner_optimizers() {
    OUT=benchmarks/results/inner_optimizers_cpu.json
    REPEATS=${REPEATS:-5}
    local optimizers=${OPTIMIZERS:-sgd sgd_momentum adam} engines="higher fmaml_vmap fmaml_loop fmaml_chunked:8"
    rm -f "$OUT"
    bench --workload sinusoid --inner-steps 5 --meta-batch 25 --inner-optimizer $optimizers --engines $engines
    bench --append --workload omniglot5w5s --inner-steps 1 --meta-batch 32 --inner-optimizer $optimizers --engines $engines
    bench --append --workload omniglot5w5s --inner-steps 5 --meta-batch 8 --inner-optimizer $optimizers --engines $engines
    # vmap (store) is left out: 7 GB at 20 steps with SGD, more with Adam's state; recompute is the subject.
    uv run python benchmarks/memory.py --device cpu --workload omniglot5w5s --inner-optimizer adam \
        --engines higher,loop,loop+recompute,vmap+recompute --steps-sweep 1,5,10,20 --meta-batch 8 \
        --batch-sweep '' --repeats "${MEM_REPEATS:-3}" --json benchmarks/results/memory_cpu_adam_steps.json
}

seam_ab() {
    local base=${BASE:-8b48f2c} rounds=${ROUNDS:-3} scratch worktree side round
    scratch=$(mktemp -d)
    worktree="$scratch/base"
    git worktree add --detach "$worktree" "$base"
    # Expanded now: the trap runs at exit, after this function's locals are gone.
    trap "git worktree remove --force '$worktree'; rm -rf '$scratch'" EXIT
    (cd "$worktree" && uv run python -c "import fmaml, higher")  # its venv, built before any timing
    # Each side runs its own checkout's script (the seam changed none of it before --inner-optimizer).
    run_side() {
        local dir=$1 OUT=$2
        (
            cd "$dir"
            REPEATS=20 bench --append --workload sinusoid --inner-steps 5 --meta-batch 25 \
                --engines fmaml_vmap fmaml_loop fmaml_chunked:8
            REPEATS=5 bench --append --workload omniglot5w5s --inner-steps 1 --meta-batch 32 \
                --engines fmaml_loop fmaml_chunked:8
        )
    }
    for round in $(seq "$rounds"); do
        for side in $( ((round % 2)) && echo "base head" || echo "head base"); do
            echo "round $round: $side"
            if [ "$side" = base ]; then run_side "$worktree" "$scratch/base.json"; else run_side . "$scratch/head.json"; fi
        done
    done
    cp "$scratch/base.json" benchmarks/results/seam_ab_cpu_base.json
    cp "$scratch/head.json" benchmarks/results/seam_ab_cpu_head.json
    uv run python benchmarks/bench_vs_higher.py --compare benchmarks/results/seam_ab_cpu_{base,head}.json \
        --json benchmarks/results/seam_ab_cpu.json
}

case "${1:-}" in
    inner_optimizers) inner_optimizers; exit ;;
    seam_ab) seam_ab; exit ;;
    "") ;;
    *) echo "unknown suite '$1': use no argument (the README's CPU table), inner_optimizers or seam_ab" >&2; exit 2 ;;
esac

OUT=benchmarks/results/cpu.json
REPEATS=${REPEATS:-3}
EAGER="higher torchfunc_loop fmaml_vmap fmaml_loop fmaml_chunked:8 fmaml_auto fmaml_first_order"
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
