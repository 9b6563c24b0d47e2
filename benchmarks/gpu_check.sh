#!/usr/bin/env bash
# The GPU paths in one short run, each step PASS, FAIL or SKIP (about 5 minutes on one modern GPU):
#   1. torchrun data-parallel healing (DDP, NCCL) on 2 GPUs, or on 1 when only one is visible
#   2. torchrun FSDP healing (--fsdp, full fine-tuning) on 2 GPUs (skipped with one)
#   3. QLoRA healing with bitsandbytes' CUDA kernels (the 4-bit layers on the GPU; skipped without bitsandbytes)
#   4. analysis with device_map=auto (--device auto), bfloat16
#   5. bfloat16 evaluation on one GPU (C4 loss, BoolQ, MMLU), checked against float32 of the same model
#   6. a sweep with one healed point on the GPU, as Ray tasks (skipped without Ray)
# on MODEL (default the embedded smollm2-135m; healing: a cut of it, made first on the CPU) and the offline
# data in ../shared/data (DATA=...). The --ray flag goes after the model: `sweep MODEL --ray`, or `--ray=ADDRESS`.
# Every check holds for random weights too: bf16 is compared with float32 of the same weights (not with a
# loss a trained model reaches), and healing must keep the validation loss (real weights: lower it).
#
#   benchmarks/gpu_check.sh                     # from the repository root, with the venv of `make install`
#   PYTHON=/path/to/python DATA=/path/to/shared/data benchmarks/gpu_check.sh
#   MODEL=random:llama2-7b LAYERS=8 benchmarks/gpu_check.sh   # a random-weight checkpoint, built on the GPU
#
# MODEL=random:SHAPE (smollm2-135m, llama2-7b, llama3-8b; `benchmarks/make_checkpoint.py --help`) first writes
# a random-weight checkpoint of that shape with SmolLM2's tokenizer (vocabulary 49152 for every shape) on the
# GPU, LAYERS=N of them if set, and runs every step on it: no hub and no embedded GGUF needed.
#
# On a machine without the venv, the hub, bitsandbytes or gguf (this project's lent GPU machine: python3 with
# torch, transformers, peft and accelerate; nothing can be downloaded there), carry what it lacks:
#   echo /gpu_carry/ >> .git/info/exclude       # once: an ignored folder, so it travels only when carried
#   benchmarks/gpu_carry.sh gpu_carry           # here: SmolLM2's tokenizer (3 MB), the data the steps read
#                                               # (~9 MB), the bitsandbytes and gguf wheels (~41 MB)
# then on the GPU machine, with `gpu_carry` named in the device tool's `carry` (repo-relative ignored paths,
# 64 MiB in all with the working tree):
#   PYTHON=python3 CARRY=gpu_carry MODEL=random:smollm2-135m STEP_TIMEOUT=240 benchmarks/gpu_check.sh
# CARRY=DIR installs DIR/wheels/*.whl whose package does not import (into $WORK/site, put on PYTHONPATH; the
# machine's own packages are left as they are) and makes DIR/data and DIR/tokenizer the defaults of DATA and
# TOKENIZER (the tokenizer a random checkpoint gets; default: read from the embedded GGUF).
#
# Each step runs at most STEP_TIMEOUT seconds (default 900) in its own process group; one that runs out of
# time is stopped with everything it started (the group, and children that left it, like torchrun's workers
# or Ray's daemons: TERM, then KILL after KILL_GRACE=10 s) and reported FAIL (timeout). What a passed step
# leaves running is stopped the same way, so nothing holds GPU memory into the next step.
#
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 when there is no GPU (at once, before
# anything else) or the input is unusable (no Python, no data, an unknown shape).
# Each step's output goes to $WORK/<step>.log; the last lines of a failed step are shown.
# GPU_CHECK_SELFTEST=1 runs only the step runner on three trivial steps (pass, fail, one that outlives
# STEP_TIMEOUT, default 1 s there) and needs no GPU: tests/test_gpu_check.py uses it.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELFTEST="${GPU_CHECK_SELFTEST:-0}"
STEP_TIMEOUT="${STEP_TIMEOUT:-$([ "$SELFTEST" = 1 ] && echo 1 || echo 900)}"
KILL_GRACE="${KILL_GRACE:-10}"
WORK="${WORK:-}"  # made only once the checks pass: a run that stops at once leaves nothing behind

die() { echo "gpu_check: $*" >&2; exit 2; }

case "$STEP_TIMEOUT$KILL_GRACE" in *[!0-9]*) die "STEP_TIMEOUT and KILL_GRACE must be whole seconds";; esac

# ------------------------------------------------------------------------------------------ the step runner
# timeout(1) cannot run a shell function, so a step runs as a background job of this shell: with job
# control on (set -m) that job is its own process group, which a watchdog kills when time is up.

process_table() {  # "PID PPID PGID" of every process
    if command -v ps >/dev/null 2>&1; then
        ps -e -o pid= -o ppid= -o pgid=
        return
    fi
    local stat line rest
    for stat in /proc/[0-9]*/stat; do
        { read -r line <"$stat"; } 2>/dev/null || continue
        rest="${line##*) }"  # after the command name, which may hold spaces: state ppid pgrp ...
        set -- $rest
        echo "${line%% *} $2 $3"
    done
}

tree_of() {  # tree_of PID: PID, the processes of its group and all their descendants (by parent links)
    local table pid ppid pgid found=" $1 " frontier next
    table="$(process_table)"
    while read -r pid ppid pgid; do
        [ "$pgid" = "$1" ] && [[ "$found" != *" $pid "* ]] && found+="$pid "
    done <<<"$table"
    frontier="$found"
    while [ -n "${frontier// /}" ]; do
        next=""
        while read -r pid ppid pgid; do
            if [[ "$frontier" == *" $ppid "* && "$found" != *" $pid "* ]]; then found+="$pid "; next+=" $pid "; fi
        done <<<"$table"
        frontier="$next"
    done
    echo $found
}

alive() {  # alive PID...: one of them still runs (a zombie does not count: it holds nothing but its entry)
    local pid line rest
    for pid in "$@"; do
        if [ -d /proc ]; then
            { read -r line <"/proc/$pid/stat"; } 2>/dev/null || continue
            rest="${line##*) }"
            [ "${rest%% *}" != Z ] && return 0
        elif kill -0 "$pid" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

kill_tree() {  # kill_tree PID: TERM its group and descendants, KILL what still runs after KILL_GRACE s
    local pids i=0
    pids="$(tree_of "$1")"
    # shellcheck disable=SC2086
    kill -TERM -- "-$1" $pids 2>/dev/null
    while alive $pids && [ "$i" -lt $((KILL_GRACE * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    pids="$pids $(tree_of "$1")"  # and whatever was started meanwhile
    # shellcheck disable=SC2086
    alive $pids && kill -KILL -- "-$1" $pids 2>/dev/null
    return 0
}

CURRENT_JOB="" CURRENT_WATCHDOG=""
on_signal() {  # Ctrl-C reaches only this shell's group: take the running step down with the script
    [ -n "$CURRENT_WATCHDOG" ] && kill -TERM -- "-$CURRENT_WATCHDOG" 2>/dev/null
    [ -n "$CURRENT_JOB" ] && kill_tree "$CURRENT_JOB"
    echo "gpu_check: interrupted" >&2
    exit 130
}
trap on_signal INT TERM HUP

TIMED_OUT=0
run_limited() {  # run_limited LOG COMMAND...: the command's status; TIMED_OUT=1 when the watchdog stopped it
    local log="$1" pid watchdog status
    shift
    rm -f "$log.timeout"
    set -m  # the job and the watchdog each get a process group of their own
    "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    CURRENT_JOB=$pid
    { sleep "$STEP_TIMEOUT"; : >"$log.timeout"; kill_tree "$pid"; } >/dev/null 2>&1 </dev/null &
    watchdog=$!
    CURRENT_WATCHDOG=$watchdog
    set +m
    wait "$pid"
    status=$?
    if [ -e "$log.timeout" ]; then
        wait "$watchdog"  # it is killing the step's tree: let it finish, KILL phase included
        TIMED_OUT=1
        rm -f "$log.timeout"
    else
        kill -TERM -- "-$watchdog" 2>/dev/null
        wait "$watchdog" 2>/dev/null
        TIMED_OUT=0
        kill_tree "$pid"  # what the step left running (its group's strays)
    fi
    CURRENT_JOB="" CURRENT_WATCHDOG=""
    return "$status"
}

PASSED=() FAILED=() SKIPPED=()

step() {  # step NAME COMMAND...: run it time-limited, log it, say PASS or FAIL
    local name="$1" status
    shift
    local log="$WORK/$name.log" start=$SECONDS
    printf '%-26s ' "$name"
    run_limited "$log" "$@"
    status=$?
    if [ "$status" -eq 0 ] && [ "$TIMED_OUT" -eq 0 ]; then
        echo "PASS ($((SECONDS - start)) s)"
        PASSED+=("$name")
        return 0
    fi
    if [ "$TIMED_OUT" -eq 1 ]; then
        echo "FAIL (timeout: stopped after $STEP_TIMEOUT s with its children; $log)"
    else
        echo "FAIL ($((SECONDS - start)) s, exit $status; $log)"
    fi
    FAILED+=("$name")
    tail -n 15 "$log" | sed 's/^/    | /'
    return 1
}

skip() { printf '%-26s SKIP (%s)\n' "$1" "$2"; SKIPPED+=("$1"); }

finish() {
    echo "gpu_check: ${#PASSED[@]} passed, ${#FAILED[@]} failed, ${#SKIPPED[@]} skipped${FAILED[*]:+ (failed: ${FAILED[*]})}"
    [ "${#FAILED[@]}" -eq 0 ] && exit 0
    exit 1
}

if [ "$SELFTEST" = 1 ]; then
    WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/depthprune-gpu-check.XXXXXX")}"
    mkdir -p "$WORK"
    echo "gpu_check: self-test of the step runner (STEP_TIMEOUT $STEP_TIMEOUT s); logs in $WORK"
    selftest_pass() { echo "passing"; }
    selftest_fail() { echo "failing on purpose" >&2; return 3; }
    selftest_sleep() {  # children in the step's group and, where setsid exists, one that left it
        sleep 300 &
        echo $! >"$WORK/selftest-children.pid"
        if command -v setsid >/dev/null 2>&1; then
            setsid sleep 300 &
            echo $! >>"$WORK/selftest-children.pid"
        fi
        wait
    }
    step selftest-pass selftest_pass
    step selftest-fail selftest_fail
    step selftest-timeout selftest_sleep
    finish
fi

# ---------------------------------------------------------------- is there a GPU? (at once, before anything)
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this script checks the GPU paths and needs an NVIDIA GPU"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
PYTHON_FOUND="$(command -v "$PYTHON" 2>/dev/null)" && [ -x "$PYTHON_FOUND" ] \
    || die "no Python at '$PYTHON': run 'make install' first, or set PYTHON=/path/to/python (PYTHON=python3: the one on PATH)"
PYTHON="$PYTHON_FOUND"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)" \
    || die "'$PYTHON' cannot import torch"
[ "${GPUS:-0}" -ge 1 ] || die "torch sees no CUDA GPU (a CPU build of torch, or CUDA_VISIBLE_DEVICES empty): install the CUDA wheel of torch"

# ------------------------------------------------------------------------------------------------ the input
CARRY="${CARRY:-}"
if [ -n "$CARRY" ]; then
    [ -d "$CARRY" ] || die "CARRY=$CARRY is not a directory: make it with benchmarks/gpu_carry.sh DIR"
    CARRY="$(cd "$CARRY" && pwd)"
fi
DATA="${DATA:-$([ -n "$CARRY" ] && [ -d "$CARRY/data" ] && echo "$CARRY/data" || echo "$ROOT/../shared/data")}"
TOKENIZER="${TOKENIZER:-$([ -n "$CARRY" ] && [ -d "$CARRY/tokenizer" ] && echo "$CARRY/tokenizer")}"
MODEL="${MODEL:-smollm2-135m}"
LAYERS="${LAYERS:-}"
[ -f "$DATA/c4/validation.jsonl" ] || die "no data at '$DATA' (c4/validation.jsonl): set DATA=/path/to/shared/data"
[ -z "$LAYERS" ] || [[ "$LAYERS" =~ ^[1-9][0-9]*$ ]] || die "LAYERS=$LAYERS: a whole number of layers, at least 1"
SHAPE=""
RANDOM_WEIGHTS=0
if [[ "$MODEL" == random:* ]]; then
    SHAPE="${MODEL#random:}"
    RANDOM_WEIGHTS=1
    SHAPES="$("$PYTHON" "$ROOT/benchmarks/make_checkpoint.py" --list-shapes)" || die "cannot run benchmarks/make_checkpoint.py"
    grep -qx -- "$SHAPE" <<<"$SHAPES" || die "unknown shape '$SHAPE' in MODEL=$MODEL: choose one of $(echo $SHAPES | sed 's/ /, /g')"
    [ -z "$TOKENIZER" ] || [ -f "$TOKENIZER/tokenizer_config.json" ] || die "TOKENIZER=$TOKENIZER holds no tokenizer_config.json"
fi

WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/depthprune-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

install_carried_wheels() {  # the carried wheels whose package this Python lacks, into $WORK/site
    local wheel module missing=()
    for wheel in "$CARRY"/wheels/*.whl; do
        [ -f "$wheel" ] || continue
        module="$(basename "$wheel")"
        module="${module%%-*}"
        "$PYTHON" -c "import $module" >/dev/null 2>&1 || missing+=("$wheel")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    if "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$WORK/site" "${missing[@]}" \
            >"$WORK/0-install-wheels.log" 2>&1; then
        export PYTHONPATH="$ROOT/src:$WORK/site${PYTHONPATH#"$ROOT/src"}"
        echo "gpu_check: installed from $CARRY/wheels into $WORK/site: $(for w in "${missing[@]}"; do basename "$w"; done | tr '\n' ' ')"
    else
        echo "gpu_check: could not install the carried wheels (see $WORK/0-install-wheels.log); going on without them" >&2
    fi
}
[ -z "$CARRY" ] || install_carried_wheels

NPROC=$(( GPUS >= 2 ? 2 : 1 ))
echo "gpu_check: $GPUS GPU(s) visible, $NPROC used for torchrun; model $MODEL${LAYERS:+ ($LAYERS layers)}; logs in $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/  /'

TRAIN="$DATA/c4/train_sample.jsonl"
VAL="$DATA/c4/validation.jsonl"
HEAL=(--data "$TRAIN" --val-data "$VAL" --steps 4 --batch-size 4 --seq-len 128 --warmup 1 --save-every 2
      --eval-every 2 --val-sequences 4)
HEAL_TOKENS=$((4 * 4 * 128))  # steps x batch x seq-len above: what the record must count
EVAL_RTOL="${EVAL_RTOL:-0.02}"  # bf16 C4 loss against float32's (measured on the CPU: 0.05 % for SmolLM2)

# ------------------------------------------------------------------------------------------------ the steps
random_checkpoint() {
    local args=(--shape "$SHAPE" --out "$WORK/model" --device cuda --dtype bfloat16 --force)
    [ -z "$LAYERS" ] || args+=(--layers "$LAYERS")
    [ -z "$TOKENIZER" ] || args+=(--tokenizer "$TOKENIZER")
    "$PYTHON" "$ROOT/benchmarks/make_checkpoint.py" "${args[@]}"
}

cut() {  # the healing steps heal a cut: a quarter of the layers, the deepest (bf16: half the disk of float32)
    "$PYTHON" -m depthprune.cli prune "$MODEL" --fraction 0.25 --criterion deepest --dtype bfloat16 --out "$WORK/cut"
}

healed_on_gpu() {  # healed_on_gpu OUT PROCESSES: the healing record is right and the run did not hurt
    "$PYTHON" - "$1" "$2" "$HEAL_TOKENS" "$RANDOM_WEIGHTS" <<'EOF'
import json, math, sys

out, processes, tokens, random_weights = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
record = json.load(open(f"{out}/depthprune.json"))["healing"]
assert record["processes"] == processes, f"processes {record['processes']}, expected {processes}"
assert record["dtype"] == "bfloat16", f"dtype {record['dtype']}: on a GPU healing defaults to bfloat16"
assert record["steps"] == 4 and record["tokens"] == tokens, (record["steps"], record["tokens"])
losses = {k: record[k] for k in ("final_train_loss", "val_loss_before", "val_loss_after")}
assert all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), f"losses not finite: {losses}"
before, after = record["val_loss_before"], record["val_loss_after"]
if random_weights:
    # Random weights predict nearly uniformly (loss about log(vocab)); four small steps need not lower
    # that measurably, but they must not raise it: a broken step (wrong gradients, lost updates) does.
    assert after <= before + 0.02, f"validation loss rose from {before:.4f} to {after:.4f}"
else:
    # A trained model's cut recovers fast: four steps lower its validation loss.
    assert after < before, f"validation loss did not fall: {before:.4f} -> {after:.4f}"
print("healing record:", {k: record[k] for k in ("method", "processes", "dtype", "tokens")}, losses)
EOF
}

ddp() {
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m depthprune.cli heal "$WORK/cut" \
        "${HEAL[@]}" --method lora --device cuda --out "$WORK/ddp" && healed_on_gpu "$WORK/ddp" "$NPROC"
}

fsdp() {
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m depthprune.cli heal "$WORK/cut" \
        "${HEAL[@]}" --method full --fsdp --lr 1e-4 --device cuda --out "$WORK/fsdp" && healed_on_gpu "$WORK/fsdp" 2
}

qlora_cuda() {
    "$PYTHON" - "$MODEL" <<'EOF' || return 1
import sys

import bitsandbytes as bnb
import torch

import depthprune

model, _ = depthprune.load_model(sys.argv[1], device="cuda", dtype="bfloat16", quantize="nf4")
layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
assert layers and all(m.weight.device.type == "cuda" for m in layers), "4-bit layers not on the GPU"
x = torch.randn(2, layers[0].in_features, device="cuda", dtype=torch.bfloat16)
assert torch.isfinite(layers[0](x)).all()
print(f"{len(layers)} NF4 layers on {torch.cuda.get_device_name()}, bitsandbytes {bnb.__version__}")
EOF
    "$PYTHON" -m depthprune.cli heal "$WORK/cut" "${HEAL[@]}" --method qlora --rank 8 --device cuda \
        --out "$WORK/qlora" && healed_on_gpu "$WORK/qlora" 1
}

analysis_auto() {
    "$PYTHON" -m depthprune.cli analyze "$MODEL" --data "$VAL" --samples 32 --seq-len 256 --device auto \
        --dtype bfloat16 --out "$WORK/analysis" && test -f "$WORK/analysis/distances.json"
}

eval_bf16() {  # bf16 against float32 of the same weights: holds for random weights as for trained ones
    "$PYTHON" -m depthprune.cli eval "$MODEL" --device cuda --dtype float32 --c4 "$VAL" --c4-sequences 16 \
        --out "$WORK/eval-float32.json" || return 1
    "$PYTHON" -m depthprune.cli eval "$MODEL" --device cuda --dtype bfloat16 --c4 "$VAL" --c4-sequences 16 \
        --boolq "$DATA/boolq/dev.jsonl" --limit 50 --mmlu "$DATA/mmlu" --subjects astronomy --mmlu-limit 20 \
        --out "$WORK/eval.json" || return 1
    "$PYTHON" - "$WORK/eval-float32.json" "$WORK/eval.json" "$EVAL_RTOL" "$VAL" "$MODEL" <<'EOF'
import json, math, sys

import torch

import depthprune

full, half = (json.load(open(path))["tasks"] for path in sys.argv[1:3])
rtol, val, spec = float(sys.argv[3]), sys.argv[4], sys.argv[5]
l32, l16 = full["c4"]["loss"], half["c4"]["loss"]
assert full["c4"]["num_tokens_scored"] == half["c4"]["num_tokens_scored"], "not the same C4 sequences"
assert math.isfinite(l16) and abs(l16 - l32) <= rtol * l32, \
    f"C4 loss {l16:.4f} in bfloat16 against {l32:.4f} in float32: more than {rtol:.0%} apart"
for name in ("boolq", "mmlu"):
    accuracy = half[name]["accuracy"]
    assert math.isfinite(accuracy) and 0 <= accuracy <= 1, f"{name} accuracy {accuracy}"
# Random weights predict nearly uniformly, so the loss alone would pass a model that outputs nothing: the
# logits themselves (softmax-invariant, centred per position) must agree too (CPU: 1-2 % apart).
model, tokenizer = depthprune.load_model(spec, device="cuda", dtype="float32")
texts = [json.loads(line)["text"] for line, _ in zip(open(val, encoding="utf-8"), range(4))]
ids = [tokenizer(t).input_ids[:256] for t in texts]
x = torch.tensor([i[: min(map(len, ids))] for i in ids], device="cuda")
with torch.no_grad():
    centred = []
    for dtype in (torch.float32, torch.bfloat16):
        logits = model.to(dtype)(x).logits.float()
        centred.append(logits - logits.mean(-1, keepdim=True))
rel = ((centred[1] - centred[0]).norm() / centred[0].norm()).item()
top1 = (centred[1].argmax(-1) == centred[0].argmax(-1)).float().mean().item()
assert math.isfinite(rel) and rel < 0.1, f"bfloat16 logits {rel:.1%} away from float32's"
print(f"C4 loss float32 {l32:.4f}, bfloat16 {l16:.4f} ({abs(l16 - l32) / l32:.2%} apart); logits {rel:.2%} apart, "
      f"top-1 agreement {top1:.1%};", {n: half[n]["accuracy"] for n in ("boolq", "mmlu")})
EOF
}

ray_sweep() {
    "$PYTHON" -m depthprune.cli sweep "$MODEL" --ray --device cuda --dtype bfloat16 --data "$VAL" --samples 16 \
        --seq-len 128 --n 0,6 --criteria deepest --heal none,lora --tasks c4 --c4 "$VAL" --c4-sequences 8 \
        --heal-data "$TRAIN" --heal-option steps=4 --heal-option batch_size=4 --heal-option seq_len=128 \
        --ray-eval-gpus 0.5 --no-cost --out "$WORK/sweep" --quiet
}

if [ -n "$SHAPE" ]; then
    step 0-random-checkpoint random_checkpoint || finish  # nothing else can run without the model
    MODEL="$WORK/model"
fi
if step 0-cut-for-healing cut; then CUT_OK=1; else CUT_OK=0; fi
heal_step() {  # heal_step NAME FUNCTION: healing needs the cut
    if [ "$CUT_OK" = 1 ]; then step "$1" "$2"; else skip "$1" "no cut to heal: 0-cut-for-healing failed"; fi
}

heal_step 1-heal-torchrun-ddp ddp
if [ "$GPUS" -ge 2 ]; then heal_step 2-heal-torchrun-fsdp fsdp; else skip 2-heal-torchrun-fsdp "needs 2 GPUs"; fi
if "$PYTHON" -c 'import bitsandbytes' >/dev/null 2>&1; then heal_step 3-qlora-cuda-kernels qlora_cuda
else skip 3-qlora-cuda-kernels "bitsandbytes not installed: pip install 'depthprune[qlora]', or carry its wheel (CARRY=)"; fi
step 4-analysis-device-auto analysis_auto
step 5-eval-bfloat16 eval_bf16
if "$PYTHON" -c 'import ray' >/dev/null 2>&1; then step 6-sweep-on-ray-gpu ray_sweep
else skip 6-sweep-on-ray-gpu "Ray not installed: pip install 'depthprune[ray]'"; fi

finish
