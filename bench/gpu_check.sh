#!/usr/bin/env bash
# The one GPU check (issue 13), run the moment a GPU is lent:
#   1. CUDA correctness: tests/test_cuda_paths.py and test_cuda_formats.py (pytest -m cuda), every CUDA path vs a
#      CPU reference;
#   2. ComfyUI 0.30 on CUDA: bench/gpu_comfyui.py, default flags (DynamicVRAM) then --disable-dynamic-vram;
#   3. the speed table: the bench_*.py scripts at full size, ratios from this one run, misses profiled;
# then bench/gpu_summary.py's table of every check and target, printed last.
#
#   bash bench/gpu_check.sh [--dry-run] [--pack] OUT_DIR
#
# Each step runs under its own time limit (bench/gpu_plan.py, about 9 minutes in all), so a failure
# or an overrun leaves the later steps their time. Everything is written under OUT_DIR: summary.md,
# gpu_check.log (this output), steps.tsv, cuda_tests.xml, one JSON per step, logs/, profiles/.
#   --dry-run  on a CPU: the plan (time per step, what would travel to the GPU machine and whether it
#              fits), then every step's command with tiny shapes and the same outputs
#   --pack     at the end, everything but summary.md and gpu_check.log goes into gpu_check.tar.gz
#              (the device tool brings back at most 8 files)
# Environment: PYTHON (default python3); WHEELS, wheels installed first with pip --no-index (default
# .whl, made by bench/gpu_prepare.sh); COMFYUI_DIR, a ComfyUI checkout or a .tar.xz of one (default:
# the archive in .comfy/; without either, step 2 and the ComfyUI row of step 3 are skipped); CARRY,
# the carried paths the dry run checks (default ".whl .comfy").
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
DRY=0 PACK=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --pack) PACK=1 ;;
        -h|--help) usage 0 ;;
        -*) echo "unknown option $1"; usage 2 ;;
        *) OUT="$1" ;;
    esac
    shift
done
[ -n "$OUT" ] || usage 2
mkdir -p "$OUT/logs" "$OUT/profiles" && OUT=$(cd "$OUT" && pwd) || exit 2
: > "$OUT/steps.tsv"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

PY="${PYTHON:-python3}"
WHEELS="${WHEELS-.whl}"  # set but empty: none
COMFY="${COMFYUI_DIR-$(ls .comfy/*.tar.xz 2>/dev/null | head -n 1)}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qwenimage-gpu-check.XXXXXX")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
FAILED=0
DRYFLAG=$([ "$DRY" = 1 ] && echo --dry-run)

end_servers() {  # a ComfyUI server left behind by a step killed at its limit (its own process group)
    for pidfile in "$WORK"/comfyui_*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill -0 "$pid" 2>/dev/null && { echo "   ending the ComfyUI server $pid left by a stopped step"; kill -- "-$pid" 2>/dev/null; sleep 2; kill -9 -- "-$pid" 2>/dev/null; }
        rm -f "$pidfile"
    done
}
trap 'end_servers; rm -rf "$WORK"' EXIT

run_step() {  # run_step NAME LOG COMMAND...: COMMAND under NAME's limit; a line here, its output in LOG
    local name=$1 log=$2 limit t0 rc took
    shift 2
    limit=$("$PY" bench/gpu_plan.py --limit "$name" $DRYFLAG)
    echo "== $name (limit ${limit} s)"
    t0=$SECONDS
    timeout -k 20 "$limit" "$@" > "$log" 2>&1
    rc=$?
    took=$((SECONDS - t0))
    printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$took" "$rc" >> "$OUT/steps.tsv"
    case $rc in
        0) echo "   ok, ${took} s" ;;
        124|137) echo "   TIMED OUT at ${took} s (log: ${log#"$OUT"/})"; FAILED=1 ;;
        *) echo "   exit $rc after ${took} s: $(tail -n 2 "$log" | tr '\n' ' ' | cut -c1-240)"; FAILED=1 ;;
    esac
    end_servers
}

# -- setup: wheels on the path, ComfyUI unpacked ---------------------------------------------------
echo "GPU check ($([ "$DRY" = 1 ] && echo "DRY RUN on $(uname -m), tiny shapes" || echo full)): $OUT"
t0=$SECONDS
setup_rc=0
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if [ "$DRY" = 1 ]; then
        echo "   would install $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into a temporary folder"
    else
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$WHEELS"/*.whl > "$OUT/logs/setup.log" 2>&1 || setup_rc=$?
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    echo "   no wheels in $WHEELS (bench/gpu_prepare.sh): diffusers / gguf-py / ComfyUI's needs must be installed"
fi
case "$COMFY" in
    *.tar.xz|*.txz)
        mkdir -p "$WORK/comfyui" && timeout 120 tar -xJf "$COMFY" -C "$WORK/comfyui" || setup_rc=$?
        main=$(ls "$WORK"/comfyui/*/main.py 2>/dev/null | head -n 1)
        [ -n "$main" ] || { echo "   $COMFY holds no ComfyUI (no main.py)"; setup_rc=1; }
        COMFY=$([ -n "$main" ] && dirname "$main") ;;
esac
if [ -n "$COMFY" ] && [ -f "$COMFY/main.py" ]; then
    export COMFYUI_DIR="$COMFY" COMFYUI_PYTHON="$(command -v "$PY")"
else
    unset COMFYUI_DIR
    echo "   no ComfyUI: step 2 and the ComfyUI row of step 3 are skipped (COMFYUI_DIR, or bench/gpu_prepare.sh's .comfy/)"
fi
printf 'setup\t%s\t%s\t%s\n' "$("$PY" bench/gpu_plan.py --limit setup $DRYFLAG)" "$((SECONDS - t0))" "$setup_rc" >> "$OUT/steps.tsv"
[ "$setup_rc" = 0 ] || { echo "   setup failed ($setup_rc): see logs/setup.log"; FAILED=1; }
"$PY" -c "import torch; print('   torch', torch.__version__, '| CUDA:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"

if [ "$DRY" = 1 ]; then
    # shellcheck disable=SC2086  # CARRY is a list of paths
    "$PY" bench/gpu_plan.py --check --carry ${CARRY-.whl .comfy} || FAILED=1
    echo
fi

# -- 1. CUDA correctness ---------------------------------------------------------------------------
run_step cuda-tests "$OUT/logs/cuda_tests.log" "$PY" -m pytest tests/test_cuda_paths.py tests/test_cuda_formats.py -m cuda -v -rA \
    -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml"

# -- 2. ComfyUI 0.30 on CUDA -----------------------------------------------------------------------
for mode in dynamic static; do
    run_step "comfyui-$mode" "$OUT/logs/comfyui_$mode.log" "$PY" bench/gpu_comfyui.py --mode "$mode" $DRYFLAG \
        --out "$OUT/comfyui_$mode.json" --work "$WORK/comfyui_$mode" --pid-file "$WORK/comfyui_$mode.pid" \
        --workflow-timeout 30 --start-timeout 45
    [ -f "$WORK/comfyui_$mode/comfyui.log" ] && cp "$WORK/comfyui_$mode/comfyui.log" "$OUT/logs/comfyui_server_$mode.log"
    tail -n 1 "$OUT/logs/comfyui_$mode.log" | sed 's/^/   /'
done

# -- 3. the speed table ----------------------------------------------------------------------------
outputs=(--profile-dir "$OUT/profiles")
e2e_outputs=("${outputs[@]}") e2e_target=1.0
if [ "$DRY" = 1 ]; then
    # Profiling every miss would cost seconds each on a CPU; one (e2e, whose 0 s target always misses) proves the path.
    outputs=() e2e_target=0
    mmdit=(--device cpu --dtype fp32 --layers 1 --heads 2 --head-dim 32 --joint-dim 64 --sizes 64 --batches 1
           --text-tokens 8 --warmup 0 --iters 1)
    small=(--smoke)
else
    mmdit=(--sizes 1328,1024 --batches 1 --warmup 2 --iters 5)
    small=(--warmup 2 --iters 5)
fi
run_step bench-mmdit "$OUT/logs/bench_mmdit.log" "$PY" bench/bench_mmdit_forward.py "${mmdit[@]}" \
    --models ours,comfy,diffusers --comfy-path "${COMFYUI_DIR:-}" --json "$OUT/mmdit.json" "${outputs[@]}"
run_step bench-fp8 "$OUT/logs/bench_fp8.log" "$PY" bench/bench_fp8_forward.py "${small[@]}" --batches 1 \
    --json "$OUT/fp8.json" "${outputs[@]}"
run_step bench-gguf "$OUT/logs/bench_gguf.log" "$PY" bench/bench_gguf_forward.py "${small[@]}" \
    --json "$OUT/gguf.json" "${outputs[@]}"
run_step bench-lora "$OUT/logs/bench_lora.log" "$PY" bench/bench_lora.py "${small[@]}" --json "$OUT/lora.json" "${outputs[@]}"
run_step bench-formats "$OUT/logs/bench_formats.log" "$PY" bench/bench_formats.py "${small[@]}" --json "$OUT/formats.json"
run_step bench-e2e "$OUT/logs/bench_e2e.log" "$PY" bench/bench_e2e.py "${small[@]}" --steps 4 --cfg 1 --cfg-step 4 \
    --target-s "$e2e_target" --json "$OUT/e2e.json" "${e2e_outputs[@]}"

# -- the table, last -------------------------------------------------------------------------------
run_step summary "$OUT/logs/summary.log" "$PY" bench/gpu_summary.py "$OUT" $DRYFLAG
if [ "$PACK" = 1 ]; then
    # written beside, then moved in: tar must not read the archive it writes
    tar -czf "$WORK/gpu_check.tar.gz" -C "$OUT" --exclude=./summary.md --exclude=./gpu_check.log . \
        && find "$OUT" -mindepth 1 -maxdepth 1 ! -name summary.md ! -name gpu_check.log -exec rm -rf {} + \
        && mv "$WORK/gpu_check.tar.gz" "$OUT/" || { echo "packing failed"; FAILED=1; }
    echo "== packed: gpu_check.tar.gz (all logs, JSON, profiles), summary.md, gpu_check.log"
fi
echo
cat "$OUT/summary.md" 2>/dev/null || echo "no summary (see logs/summary.log)"
exit "$FAILED"
