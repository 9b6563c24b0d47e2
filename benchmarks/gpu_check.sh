#!/usr/bin/env bash
# The GPU paths in one short run, each step PASS or FAIL (about 5 minutes on one modern GPU):
#   1. torchrun data-parallel healing (DDP, NCCL) on 2 GPUs, or on 1 when only one is visible
#   2. torchrun FSDP healing (--fsdp, full fine-tuning) on 2 GPUs (skipped with one)
#   3. QLoRA healing with bitsandbytes' CUDA kernels (the 4-bit layers on the GPU)
#   4. analysis with device_map=auto (--device auto), bfloat16
#   5. bfloat16 evaluation on one GPU (C4 loss, BoolQ, MMLU)
#   6. a sweep with one healed point on the GPU, as Ray tasks (skipped without Ray)
# on the embedded model smollm2-135m (healing: a cut of it, made first on the CPU) and the offline data in
# ../shared/data (DATA=...). The --ray flag goes after the model: `sweep MODEL --ray`, or `--ray=ADDRESS`.
#
#   benchmarks/gpu_check.sh                     # from the repository root, with the venv of `make install`
#   PYTHON=/path/to/python DATA=/path/to/shared/data benchmarks/gpu_check.sh
#
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 when there is no GPU (at once).
# Each step's output goes to $WORK/<step>.log; the last lines of a failed step are shown.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DATA="${DATA:-$ROOT/../shared/data}"
MODEL="${MODEL:-smollm2-135m}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/depthprune-gpu-check.XXXXXX")}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "gpu_check: $*" >&2; exit 2; }

[ -x "$PYTHON" ] || die "no Python at '$PYTHON': run 'make install' first, or set PYTHON=/path/to/python"
[ -f "$DATA/c4/validation.jsonl" ] || die "no data at '$DATA' (c4/validation.jsonl): set DATA=/path/to/shared/data"
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this script checks the GPU paths and needs an NVIDIA GPU"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)" \
    || die "'$PYTHON' cannot import torch"
[ "${GPUS:-0}" -ge 1 ] || die "torch sees no CUDA GPU (a CPU build of torch, or CUDA_VISIBLE_DEVICES empty): install the CUDA wheel of torch"
NPROC=$(( GPUS >= 2 ? 2 : 1 ))
mkdir -p "$WORK"
echo "gpu_check: $GPUS GPU(s) visible, $NPROC used for torchrun; model $MODEL; logs in $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/  /'

TRAIN="$DATA/c4/train_sample.jsonl"
VAL="$DATA/c4/validation.jsonl"
HEAL=(--data "$TRAIN" --val-data "$VAL" --steps 4 --batch-size 4 --seq-len 128 --warmup 1 --save-every 2
      --eval-every 2 --val-sequences 4)
PASSED=() FAILED=() SKIPPED=()

step() {  # step NAME COMMAND...: run it with a timeout, log it, say PASS or FAIL
    local name="$1"; shift
    local log="$WORK/$name.log" start=$SECONDS
    printf '%-26s ' "$name"
    if timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1; then
        echo "PASS ($((SECONDS - start)) s)"; PASSED+=("$name")
    else
        echo "FAIL ($((SECONDS - start)) s, exit $?; $log)"; FAILED+=("$name")
        tail -n 15 "$log" | sed 's/^/    | /'
    fi
}

skip() { printf '%-26s SKIP (%s)\n' "$1" "$2"; SKIPPED+=("$1"); }

healed_on_gpu() {  # healed_on_gpu OUT PROCESSES: the healing record says it ran on that many processes
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
record = json.load(open(f"{sys.argv[1]}/depthprune.json"))["healing"]
assert record["processes"] == int(sys.argv[2]), record["processes"]
assert record["val_loss_after"] is not None and record["val_loss_after"] < record["val_loss_before"], record
print("healing record:", {k: record[k] for k in ("method", "processes", "dtype", "val_loss_before", "val_loss_after")})
EOF
}

ddp() {
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m depthprune.cli heal "$CUT" \
        "${HEAL[@]}" --method lora --device cuda --out "$WORK/ddp" && healed_on_gpu "$WORK/ddp" "$NPROC"
}

fsdp() {
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m depthprune.cli heal "$CUT" \
        "${HEAL[@]}" --method full --fsdp --lr 1e-4 --device cuda --out "$WORK/fsdp" && healed_on_gpu "$WORK/fsdp" 2
}

qlora_cuda() {
    "$PYTHON" - "$MODEL" <<'EOF' || return 1
import sys
import bitsandbytes as bnb
import torch
from depthprune.model.load import load_model

model, _ = load_model(sys.argv[1], device="cuda", dtype="bfloat16", quantize="nf4")
layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
assert layers and all(m.weight.device.type == "cuda" for m in layers), "4-bit layers not on the GPU"
x = torch.randn(2, layers[0].in_features, device="cuda", dtype=torch.bfloat16)
assert torch.isfinite(layers[0](x)).all()
print(f"{len(layers)} NF4 layers on {torch.cuda.get_device_name()}, bitsandbytes {bnb.__version__}")
EOF
    "$PYTHON" -m depthprune.cli heal "$CUT" "${HEAL[@]}" --method qlora --rank 8 --device cuda \
        --out "$WORK/qlora" && healed_on_gpu "$WORK/qlora" 1
}

analysis_auto() {
    "$PYTHON" -m depthprune.cli analyze "$MODEL" --data "$VAL" --samples 32 --seq-len 256 --device auto \
        --dtype bfloat16 --out "$WORK/analysis" && test -f "$WORK/analysis/distances.json"
}

eval_bf16() {
    "$PYTHON" -m depthprune.cli eval "$MODEL" --device cuda --dtype bfloat16 --c4 "$VAL" --c4-sequences 16 \
        --boolq "$DATA/boolq/dev.jsonl" --limit 50 --mmlu "$DATA/mmlu" --subjects astronomy --mmlu-limit 20 \
        --out "$WORK/eval.json" && "$PYTHON" - "$WORK/eval.json" <<'EOF'
import json, math, sys
tasks = json.load(open(sys.argv[1]))["tasks"]
loss = tasks["c4"]["loss"]
assert math.isfinite(loss) and loss < 6, f"C4 loss {loss}: bfloat16 evaluation broke the model"
print({name: {k: v for k, v in r.items() if k in ("loss", "accuracy")} for name, r in tasks.items()})
EOF
}

ray_sweep() {
    "$PYTHON" -m depthprune.cli sweep "$MODEL" --ray --device cuda --dtype bfloat16 --data "$VAL" --samples 16 \
        --seq-len 128 --n 0,6 --criteria deepest --heal none,lora --tasks c4 --c4 "$VAL" --c4-sequences 8 \
        --heal-data "$TRAIN" --heal-option steps=4 --heal-option batch_size=4 --heal-option seq_len=128 \
        --ray-eval-gpus 0.5 --no-cost --out "$WORK/sweep" --quiet
}

# The healing steps heal a cut (a quarter of the layers, the deepest): its validation loss must fall.
"$PYTHON" -m depthprune.cli prune "$MODEL" --fraction 0.25 --criterion deepest --out "$WORK/cut" >"$WORK/0-prune.log" 2>&1 \
    || { tail -n 15 "$WORK/0-prune.log" >&2; die "could not prune $MODEL on the CPU (see $WORK/0-prune.log)"; }
CUT="$WORK/cut"

step 1-heal-torchrun-ddp ddp
if [ "$GPUS" -ge 2 ]; then step 2-heal-torchrun-fsdp fsdp; else skip 2-heal-torchrun-fsdp "needs 2 GPUs"; fi
step 3-qlora-cuda-kernels qlora_cuda
step 4-analysis-device-auto analysis_auto
step 5-eval-bfloat16 eval_bf16
if "$PYTHON" -c 'import ray' >/dev/null 2>&1; then step 6-sweep-on-ray-gpu ray_sweep
else skip 6-sweep-on-ray-gpu "Ray not installed: pip install 'depthprune[ray]'"; fi

echo "gpu_check: ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped${FAILED[*]:+ (failed: ${FAILED[*]})}"
[ "${#FAILED[@]}" -eq 0 ]
