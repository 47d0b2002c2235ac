#!/usr/bin/env bash
# One prepared benchmark run for a lent GPU (an H200): under 8 minutes, JSON files in $OUT, a summary at the end.
#
#   1. step, ImageNet-64 ADM (296M, random weights), bf16 autocast, fused AdamW, batch = largest that fits
#   2. step, SD1.5 UNet (860M, random weights, 64x64 latents, CFG 1.75, R1, checkpointing as in the recipe)
#   3. sampling, ImageNet-64: one-step student vs the teacher's EDM sampler (40 steps = 79 NFE)
#   4. if time is left: A/B runs - ImageNet-64 with channels_last, SD1.5 with the CFG halves as two passes
#
# The machine has torch, accelerate and transformers but not diffusers: it travels as wheels in .whl/ (git-ignored).
# Prepare them here once (the diffusers version installed here; its other requirements are there already, and
# importlib_metadata is only imported on Python < 3.8):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1
# then run it there with .whl carried:  bash benchmarks/gpu.sh      (device tool: carry [".whl"])
# On a CPU, to check the script itself at toy widths:  DEVICE=cpu TINY=1 OUT=/tmp/gpu_out bash benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fdistill_gpu_out}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
BUDGET=${BUDGET:-465}          # seconds for the whole script (the brief: under 8 minutes)
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
: >"$LOG"

say() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# --- environment ---------------------------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing $(ls .whl | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$LOG"
        export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    else
        say "diffusers is missing and no wheels in .whl/ (see the header of this script)"; exit 2
    fi
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import os, torch, diffusers, fdistill
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "load", os.getloadavg())
EOF
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG" || true
fi

# --- runs ----------------------------------------------------------------------------------------------------
# run NAME LIMIT_S SCRIPT ARGS...: at most LIMIT_S, never past the budget; a failure is logged, the rest still runs
run() {
    local name=$1 limit=$2 script=$3; shift 3
    local l; l=$(left)
    if [ "$limit" -gt $(( l - 5 )) ]; then limit=$(( l - 5 )); fi
    if [ "$limit" -lt 20 ]; then say "skip $name: ${l}s left"; return 0; fi
    say "run $name (limit ${limit}s): $script $*"
    local rc=0
    # --deadline-s lets the script end its timed repeats itself and still write a complete JSON
    timeout --kill-after=10 "$limit" "$PY" "benchmarks/$script" "$@" --deadline-s $(( limit - 20 )) \
        --out "$OUT/$name.json" >>"$LOG" 2>&1 || rc=$?
    say "$name: exit $rc$( [ $rc = 124 ] && echo ' (timed out; its JSON holds what was measured)')"
    return 0
}

DEV=(--device "$DEVICE")
if [ "$TINY" = 1 ]; then   # toy widths on a CPU: the same commands, small and quick
    SIZE=(--tiny --threads 1)
    IN_B=(--batch auto --batches 2,4 --simulate-oom-above 2)  # exercises the search and its back-off
    SD_B=(--batch 2)
    SAMPLE_B=(--batch 2 --steps 3)
    REPS=(--warmup 1 --iters 1 --repeats 2)
else
    SIZE=()
    IN_B=(--batch auto --batches 64,128,256,512,1024 --search-seconds 60)
    SD_B=(--batch auto --batches 8,16,32,48,64,96,128 --search-seconds 70)
    SAMPLE_B=(--batch 128)
    REPS=(--warmup 1 --iters 2 --repeats 3)   # ADM: ~1.2 TFLOP per image per generator iteration
fi

run step_imagenet64 200 step.py --config imagenet64 "${SIZE[@]}" "${DEV[@]}" "${IN_B[@]}" "${REPS[@]}" --fused-adamw
run step_sd15 170 step.py --config sd15 "${SIZE[@]}" "${DEV[@]}" "${SD_B[@]}" --warmup 1 --iters 2 --repeats 2 \
    --fused-adamw
run sampling_imagenet64 60 sampling.py --config imagenet64 "${SIZE[@]}" "${DEV[@]}" "${SAMPLE_B[@]}" --repeats 2

# A/B runs at the batches steps 1 and 2 settled on, while time is left (no search, one divergence, no FLOPs):
# channels_last for the ADM; the CFG teacher's two halves as two passes (the package batches them) for SD1.5
batch_of() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['settings']['batch'])" "$1" 2>/dev/null || true; }
B1=$(batch_of "$OUT/step_imagenet64.json")
if [ -n "$B1" ] && [ "$(left)" -gt 80 ]; then
    run step_imagenet64_channels_last 75 step.py --config imagenet64 "${SIZE[@]}" "${DEV[@]}" --batch "$B1" \
        --baseline js --warmup 1 --iters 2 --repeats 2 --fused-adamw --channels-last --no-flops
fi
B2=$(batch_of "$OUT/step_sd15.json")
if [ -n "$B2" ] && [ "$(left)" -gt 90 ]; then
    run step_sd15_cfg_split 85 step.py --config sd15 "${SIZE[@]}" "${DEV[@]}" --batch "$B2" \
        --baseline js --warmup 1 --iters 2 --repeats 2 --fused-adamw --cfg-split --no-flops
fi

# --- summary -------------------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    line = r.get("summary") or f"[{r.get('benchmark')}] {r.get('config')}: incomplete (stage reached: " \
        f"{[k for k in ('batch_search', 'calls_per_iter', 'phases') if k in r]})"
    print(f"{f.stem}: {line}")
    fl, g = r.get("flops_per_iter"), r.get("generator")
    if fl and g and r.get("achieved_tflops"):
        print(f"    FLOPs/iter gen {fl['generator'] / 1e12:.2f} T, critic {fl['critic'] / 1e12:.2f} T; achieved "
              f"{r['achieved_tflops']['generator']:.0f} / {r['achieved_tflops']['critic']:.0f} TFLOP/s"
              + (f"; MFU vs {r['peak_tflops']} peak: {r['mfu']['generator']:.1%} / {r['mfu']['critic']:.1%}"
                 if r.get("mfu") else ""))
    hs = r.get("host_syncs_per_iter") or {}
    for ph, v in hs.items():
        if v:
            print(f"    host syncs per {ph} iteration: {v['count']} at {v['where']}")
EOF
say "done in $(( $(date +%s) - START ))s; files: $(ls "$OUT" | tr '\n' ' ')"
