#!/usr/bin/env bash
# The GPU suite, on one CUDA device: fmaml (eager and torch.compile) against higher, memory, the measured
# strategy="auto", time to accuracy, and bf16 under every strategy. Its smoke mode runs every part at tiny
# sizes on the CPU, in the test suite (tests/test_run_gpu_smoke.py), so that the script cannot rot unseen.
#
#   bash benchmarks/run_gpu.sh               # -> benchmarks/results/ (FMAML_DATA_ROOT: see time_to_accuracy)
#   bash benchmarks/run_gpu.sh --smoke       # or SMOKE=1: tiny sizes, --device cpu, into a new temporary folder
#   PARTS="eager memory" bash benchmarks/run_gpu.sh                         # only these parts, in this order
#
# Parts, each in its own process under `timeout` (its limit in seconds, a plan for one H200, not a measured
# figure: no GPU has run this script yet). The limits add up to 465 s, plus 2 s of grace each before SIGKILL:
# at most 479 s, so the whole script ends within 8 minutes whatever happens. A part past its limit keeps
# what it already wrote (each benchmark writes its JSON as it goes) and is recorded as timed out.
#   eager            60  bench_vs_higher.py, three invocations, the engines in-process: Omniglot 5w5s at 1 and
#                        5 inner steps x meta-batch 8 and 32; Omniglot 20w1s (5 query/class) mb 16; sinusoid
#                        mb 25, 5 steps                                                        -> gpu.json
#   compiled        150  vmap+compile (what auto picks on CUDA) against higher, each engine in its own
#                        subprocess with ENGINE_TIMEOUT (default 50 s): Omniglot 5w5s mb 32, 1 step; sinusoid
#                        mb 25, 5 steps. loop+compile is left out: dynamo unrolls the task loop (meta-batch
#                        x inner steps copies of the graph)                                  -> gpu_compiled.json
#   plot             15  gpu.json and gpu_compiled.json (skipped, not failed, without matplotlib) -> gpu.png
#   memory           80  memory.py: peak growth and time per step at 1, 5 and 20 inner steps, mb 8, for
#                        loop and vmap with memory store and recompute, each case in a fresh process
#                        (case limit 30 s)                                       -> memory_gpu.{json,png}
#   auto_vs_fixed    30  the measured strategy="auto" against every fixed strategy   -> auto_vs_fixed_gpu.json
#   time_to_accuracy 100 time_to_accuracy.py: configs/omniglot.yaml (Omniglot 5w5s) until val/accuracy >= 0.97,
#                        validating every 100 steps; gives up 30 s before the limit and still writes its JSON
#                        ("reached": false, the best accuracy). The data: FMAML_DATA_ROOT (the folder holding
#                        omniglot/), else the two official zips in FMAML_OMNIGLOT_ZIPS or ../shared/data/omniglot
#                        (where .ci/run finds them; a lent machine gets shared/ with the working tree),
#                        linked into a temporary root              -> time_to_accuracy_gpu.json
#   bf16             30  mixed_precision.py gradient: the meta-gradient with bf16 and fp16 casts against float32,
#                        and its time, under vmap, chunked:8 and loop, mb 32   -> mixed_precision_gpu.json
# A part's limit can be changed with LIMIT_<part> (e.g. LIMIT_time_to_accuracy=1800 for a longer attempt).
# timeout signals the part's whole process group, except bench_vs_higher.py's isolated engines, which run
# in their own session (so that a compile is killed whole): a killed `compiled` part can leave one engine
# running on until it ends.
#
# Results: OUT_DIR (default benchmarks/results; in smoke mode a new temporary folder, printed). Every part's
# output goes to OUT_DIR/gpu_logs/<part>.log as well as to the terminal. After every part, and at the end,
# OUT_DIR/gpu_summary.json is (re)written: mode, device, and per part its name, status ("ok", "failed" or
# "timed out"), rc, seconds (wall), cpu_seconds (user + system of its processes), limit_s, outputs (its result files), record_errors (records in its JSON files
# with an error: an engine that failed inside a part that did not) and log. The exit status is 0 when every
# part is ok, 1 when any failed or timed out (every other part still runs), 2 for a bad PARTS.
#
# Smoke mode (SMOKE=1 or --smoke): --device cpu, 1 warm-up and 1 timed step, meta-batches of 1 or 2, 1 inner
# step, torch.compile with the `eager` backend (dynamo traces, no code generation: an inductor compile takes
# minutes on a CPU) and no engine subprocesses, memory.py with two cases (loop and vmap+recompute),
# auto_vs_fixed on the sinusoid, time to accuracy on the tiny Omniglot of tests/fixtures.py (written into
# OUT_DIR/smoke_data) with target 0.2, bf16 under vmap only; every limit is SMOKE_LIMIT (default 300 s).
# Environment: PY (default "uv run python"; PY=python where fmaml is installed), REPEATS (timed steps, default
# 5), WARMUP (default 2), ENGINE_TIMEOUT, OUT_DIR, PARTS, LIMIT_<part>, SMOKE, SMOKE_LIMIT; for the suite's
# test only, FAIL_PART="<part>[:hang] ...": those parts fail (exit 3) or hang past a 1 s limit instead of running.
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")  # each part reruns it: --run-part
cd "$(dirname "$0")/.."
ALL_PARTS="eager compiled plot memory auto_vs_fixed time_to_accuracy bf16"
declare -A PLANNED_LIMIT=([eager]=60 [compiled]=150 [plot]=15 [memory]=80 [auto_vs_fixed]=30
    [time_to_accuracy]=100 [bf16]=30)
GRACE=2  # seconds between timeout's SIGTERM and its SIGKILL

if [ "${1:-}" = --smoke ]; then
    export SMOKE=1
    shift
fi
if [ $# -gt 0 ] && [ "$1" != --run-part ]; then
    echo "run_gpu.sh: unknown argument '$1': give --smoke or nothing (the environment chooses the rest)" >&2
    exit 2
fi
export SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    export OUT_DIR=${OUT_DIR:-$(mktemp -d -t fmaml_gpu_smoke.XXXXXX)}
    export DEVICE=cpu REPEATS=1 WARMUP=1 COMPILE_BACKEND=eager ENGINE_TIMEOUT=${ENGINE_TIMEOUT:-200}
else
    export OUT_DIR=${OUT_DIR:-benchmarks/results}
    export DEVICE=cuda REPEATS=${REPEATS:-5} WARMUP=${WARMUP:-2} COMPILE_BACKEND=inductor
    export ENGINE_TIMEOUT=${ENGINE_TIMEOUT:-50}
fi
export PY=${PY:-"uv run python"}

pick() {  # pick GPU_VALUE SMOKE_VALUE: the size of this mode
    if [ "$SMOKE" = 1 ]; then echo "$2"; else echo "$1"; fi
}

bench() {
    $PY benchmarks/bench_vs_higher.py --device "$DEVICE" --repeats "$REPEATS" --warmup "$WARMUP" "$@"
}

# ------------------------------------------------------------------------------------------------- parts
# Each runs in its own `bash run_gpu.sh --run-part NAME` process under timeout; `set -e` there ends a part
# at its first failing command.

part_eager() {
    local out=$OUT_DIR/gpu.json engines="higher torchfunc_loop fmaml_vmap fmaml_loop fmaml_chunked:8 fmaml_auto fmaml_first_order"
    bench --isolate no --json "$out" --workload omniglot5w5s --inner-steps $(pick "1 5" 1) \
        --meta-batch $(pick "8 32" 1) --engines $engines
    bench --isolate no --json "$out" --append --workload omniglot20w1s --inner-steps 1 \
        --meta-batch $(pick 16 1) --engines $engines
    bench --isolate no --json "$out" --append --workload sinusoid --inner-steps $(pick 5 1) \
        --meta-batch $(pick 25 2) --engines $engines
}

part_compiled() {
    # higher again, so that speedup_vs_higher compares within one invocation. Not isolated in smoke mode:
    # a process per engine would double the smoke run for nothing the CPU can measure.
    local out=$OUT_DIR/gpu_compiled.json isolate
    isolate=(--isolate "$(pick yes no)" --engine-timeout "$ENGINE_TIMEOUT" --compile-backend "$COMPILE_BACKEND")
    bench "${isolate[@]}" --json "$out" --workload omniglot5w5s --inner-steps 1 --meta-batch $(pick 32 1) \
        --engines higher fmaml_vmap+compile
    bench "${isolate[@]}" --json "$out" --append --workload sinusoid --inner-steps $(pick 5 1) \
        --meta-batch $(pick 25 2) --engines higher fmaml_vmap+compile
}

part_plot() {
    # matplotlib is not an fmaml dependency: without it the plot is skipped, and that is no failure.
    if ! $PY -c "import matplotlib" 2>/dev/null; then
        echo "no plot: matplotlib is not installed (uv run --with matplotlib python benchmarks/plot.py ...)"
        return 0
    fi
    $PY benchmarks/plot.py "$OUT_DIR/gpu.json" "$OUT_DIR/gpu_compiled.json" --out "$OUT_DIR/gpu.png"
}

part_memory() {
    $PY benchmarks/memory.py --device "$DEVICE" \
        --engines $(pick loop,loop+recompute,vmap,vmap+recompute loop,vmap+recompute) \
        --steps-sweep $(pick 1,5,20 1) --meta-batch $(pick 8 1) --batch-sweep '' --case-timeout $(pick 30 "$1") \
        --repeats $(pick 3 1) --warmup 1 --json "$OUT_DIR/memory_gpu.json" --plot "$OUT_DIR/memory_gpu.png"
}

part_auto_vs_fixed() {
    $PY benchmarks/auto_vs_fixed.py --device "$DEVICE" --rounds $(pick 7 1) \
        --workloads $(pick sinusoid,omniglot5w5s,omniglot20w1s,miniimagenet sinusoid) \
        --json "$OUT_DIR/auto_vs_fixed_gpu.json"
}

omniglot_root() {
    # FMAML_DATA_ROOT, else a temporary root linking the zips of FMAML_OMNIGLOT_ZIPS or ../shared/data/omniglot
    # (where .ci/run finds them): that folder may be read-only, and fmaml prepares its files beside the zips.
    local zips=${FMAML_OMNIGLOT_ZIPS:-../shared/data/omniglot} root
    if [ -n "${FMAML_DATA_ROOT:-}" ]; then
        echo "$FMAML_DATA_ROOT"
    elif [ -f "$zips/images_background.zip" ] && [ -f "$zips/images_evaluation.zip" ]; then
        root=$(mktemp -d -t fmaml_omniglot.XXXXXX)
        mkdir "$root/omniglot"
        ln -s "$(cd "$zips" && pwd)"/images_{background,evaluation}.zip "$root/omniglot/"
        echo "$root"
    fi
}

part_time_to_accuracy() {
    local budget_s=$(($1 - 30)) target=0.97 every=100 fmaml_args=()
    if [ "$SMOKE" = 1 ]; then
        export FMAML_DATA_ROOT=$OUT_DIR/smoke_data
        $PY -c "import sys; sys.path.insert(0, 'tests'); import fixtures; fixtures.write_omniglot_zips(sys.argv[1])" \
            "$FMAML_DATA_ROOT/omniglot"
        target=0.2 every=2
        fmaml_args=(-- --trainer.accelerator=cpu --trainer.max_steps=6 --trainer.enable_model_summary=false
            --model.network.filters=8 --data.meta_batch_size=2 --data.evaluation.num_val_tasks=4)
    else
        FMAML_DATA_ROOT=$(omniglot_root)
        if [ ! -d "$FMAML_DATA_ROOT/omniglot" ]; then
            echo "time_to_accuracy: no Omniglot: set FMAML_DATA_ROOT to the folder holding omniglot/ (or" \
                "FMAML_OMNIGLOT_ZIPS to the folder holding images_background.zip and images_evaluation.zip)" >&2
            return 2
        fi
        export FMAML_DATA_ROOT
    fi
    ((budget_s > 0)) || budget_s=$1
    $PY benchmarks/time_to_accuracy.py --target "$target" --val-every "$every" \
        --budget-minutes "$(awk "BEGIN { print $budget_s / 60 }")" --json "$OUT_DIR/time_to_accuracy_gpu.json" \
        "${fmaml_args[@]}"
}

part_bf16() {
    $PY benchmarks/mixed_precision.py gradient --device "$DEVICE" --strategies $(pick "vmap chunked:8 loop" vmap) --steps 1 \
        --precisions $(pick "bf16 fp16" bf16) --meta-batch $(pick 32 1) --repeats $(pick 5 1) \
        --json "$OUT_DIR/mixed_precision_gpu.json"
}

declare -A OUTPUTS=(
    [eager]=gpu.json [compiled]=gpu_compiled.json [plot]=gpu.png [memory]="memory_gpu.json memory_gpu.png"
    [auto_vs_fixed]=auto_vs_fixed_gpu.json [time_to_accuracy]=time_to_accuracy_gpu.json
    [bf16]=mixed_precision_gpu.json
)

# The hidden entry point of one part (under timeout); its limit is given to it, for a part that stops itself.
if [ "${1:-}" = --run-part ]; then
    set -e
    "part_$2" "$3"
    exit
fi

# ---------------------------------------------------------------------------------------------- summary

json_string() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

json_outputs() {  # the part's result files, as a JSON list
    local name=$1 file sep=""
    printf '['
    for file in ${OUTPUTS[$name]}; do
        printf '%s%s' "$sep" "$(json_string "$OUT_DIR/$file")"
        sep=", "
    done
    printf ']'
}

record_errors() {  # records with an error in the part's JSON files: bench's "error", memory.py's status
    local name=$1 file count=0
    for file in ${OUTPUTS[$name]}; do
        if [[ $file == *.json && -f $OUT_DIR/$file ]]; then
            count=$((count + $(grep -cE '"error": "|"status": "error"' "$OUT_DIR/$file")))
        fi
    done
    echo "$count"
}

write_summary() {
    local i sep="" file=$OUT_DIR/gpu_summary.json
    {
        printf '{\n "mode": "%s",\n "device": "%s",\n "out_dir": %s,\n "parts": [' \
            "$([ "$SMOKE" = 1 ] && echo smoke || echo gpu)" "$DEVICE" "$(json_string "$OUT_DIR")"
        for i in "${!DONE_NAMES[@]}"; do
            printf '%s\n  {"name": "%s", "status": "%s", "rc": %s, "seconds": %s, "cpu_seconds": %s, "limit_s": %s, ' \
                "$sep" "${DONE_NAMES[$i]}" "${DONE_STATUS[$i]}" "${DONE_RC[$i]}" "${DONE_SECONDS[$i]}" \
                "${DONE_CPU[$i]}" "${DONE_LIMIT[$i]}"
            printf '"outputs": %s, ' "$(json_outputs "${DONE_NAMES[$i]}")"
            printf '"record_errors": %s, "log": %s}' "$(record_errors "${DONE_NAMES[$i]}")" \
                "$(json_string "$OUT_DIR/gpu_logs/${DONE_NAMES[$i]}.log")"
            sep=","
        done
        printf '\n ],\n "failed": ['
        sep=""
        for i in "${!DONE_NAMES[@]}"; do
            if [ "${DONE_STATUS[$i]}" != ok ]; then
                printf '%s"%s"' "$sep" "${DONE_NAMES[$i]}"
                sep=", "
            fi
        done
        printf ']\n}\n'
    } >"$file.tmp" && mv "$file.tmp" "$file"
}

# ------------------------------------------------------------------------------------------------- runner

limit_of() {
    local name=$1 override="LIMIT_$1"
    if [ -n "${!override:-}" ]; then
        echo "${!override}"
    elif [ "$SMOKE" = 1 ]; then
        echo "${SMOKE_LIMIT:-300}"
    else
        echo "${PLANNED_LIMIT[$name]}"
    fi
}

injected_failure() {  # FAIL_PART's entry for this part ("fail", "hang") or nothing
    local entry
    for entry in ${FAIL_PART:-}; do
        if [ "${entry%%:*}" = "$1" ]; then
            [[ $entry == *:hang ]] && echo hang || echo fail
        fi
    done
}

children_cpu_seconds() {  # user + system seconds of every process this shell has waited for
    # `times` in this shell, not in a $(...) subshell, whose children are not this shell's.
    local file=$OUT_DIR/gpu_logs/.times user system
    times >"$file"
    { read -r _ _ && read -r user system; } <"$file"
    rm -f "$file"
    awk -v u="$user" -v k="$system" 'BEGIN { split(u, a, /[ms]/); split(k, b, /[ms]/); print 60 * (a[1] + b[1]) + a[2] + b[2] }'
}

run_part() {
    local name=$1 limit start rc status seconds cpu
    limit=$(limit_of "$name")
    local command=(bash "$SCRIPT" --run-part "$name" "$limit")
    case $(injected_failure "$name") in
        fail) command=(bash -c 'echo "FAIL_PART: $0 fails on purpose" >&2; exit 3' "$name") ;;
        hang) command=(sleep 60) limit=1 ;;
    esac
    echo "=== $name (limit ${limit} s) ==="
    start=$(date +%s%N)
    children_cpu_seconds >"$OUT_DIR/gpu_logs/.cpu"
    timeout -k "$GRACE" "$limit" "${command[@]}" 2>&1 | tee "$OUT_DIR/gpu_logs/$name.log"
    rc=${PIPESTATUS[0]}
    seconds=$(awk "BEGIN { printf \"%.1f\", ($(date +%s%N) - $start) / 1e9 }")
    children_cpu_seconds >>"$OUT_DIR/gpu_logs/.cpu"  # in this shell: a $(...) subshell has no children yet
    cpu=$(awk 'NR == 1 { before = $1 } NR == 2 { printf "%.1f", $1 - before }' "$OUT_DIR/gpu_logs/.cpu")
    rm -f "$OUT_DIR/gpu_logs/.cpu"
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status=failed ;;
    esac
    echo "=== $name: $status (exit $rc) in $seconds s ==="
    DONE_NAMES+=("$name") DONE_STATUS+=("$status") DONE_RC+=("$rc") DONE_SECONDS+=("$seconds")
    DONE_LIMIT+=("$limit") DONE_CPU+=("$cpu")
    write_summary
}

main() {
    PARTS=${PARTS:-$ALL_PARTS}
    for name in $PARTS; do
        if [ -z "${PLANNED_LIMIT[$name]:-}" ]; then
            echo "PARTS='$PARTS': unknown part '$name'; the parts are: $ALL_PARTS" >&2
            exit 2
        fi
    done
    mkdir -p "$OUT_DIR/gpu_logs"
    for name in $PARTS; do  # stale results of an earlier run would read as this run's
        for file in ${OUTPUTS[$name]}; do rm -f "$OUT_DIR/$file"; done
    done
    echo "run_gpu.sh: mode $([ "$SMOKE" = 1 ] && echo smoke || echo gpu), device $DEVICE, results in $OUT_DIR"
    DONE_NAMES=() DONE_STATUS=() DONE_RC=() DONE_SECONDS=() DONE_LIMIT=() DONE_CPU=()
    write_summary
    for name in $PARTS; do
        run_part "$name"
    done
    echo "summary: $OUT_DIR/gpu_summary.json"
    cat "$OUT_DIR/gpu_summary.json"
    for status in "${DONE_STATUS[@]}"; do
        [ "$status" = ok ] || exit 1
    done
}

# In a function, which bash reads whole before running it: editing this file (a `git pull`) while it runs
# cannot derail the run.
main "$@"; exit
