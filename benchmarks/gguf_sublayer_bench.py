"""llama.cpp cost of attention sub-layer cuts vs whole-layer cuts of SmolLM2-135M, side by side, in one run.

Cuts of the embedded 4-bit GGUF (same bytes, same quantization): attention sub-layers through
``depthprune.gguf.sublayers.cut_sublayers_gguf`` (a llama.cpp ``deci`` file), whole layers through
``depthprune.gguf.surgery.cut_gguf``. An attention sub-layer of SmolLM2 holds a quarter of a layer's
parameters (Q, K, V, O: 2·576² + 2·576·192 = 0.88 M of 3.54 M), so 8 attention sub-layers weigh what 2 whole
layers weigh, and 16 what 4 weigh: the table pairs them at equal parameters removed.

Every speed measurement runs in its own process pinned to one CPU (``sched_setaffinity``) with one llama.cpp
thread and OMP_NUM_THREADS=1; the repeats are interleaved over the cuts so the shared machine's load drifts
over all of them alike; medians. KV-cache sizes are what llama.cpp allocates (its load log) for
``--ctx`` cells, without and with flash attention (without it llama.cpp pads the V cache of layers without
attention to the widest layer), and what it stores per token of a sequence (state size growth).

    OMP_NUM_THREADS=1 python benchmarks/gguf_sublayer_bench.py --out runs/gguf-sublayer

``--cuts-from SWEEP_DIR`` times the cuts a sweep of the embedded SmolLM2 chose instead of the fixed ones (its
unhealed points of one criterion, at every granularity the llama.cpp file can express; e.g. the sweep of
``configs/sublayer-smollm2-135m.yaml``), so the llama.cpp figures sit beside that sweep's quality figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEPTHPRUNE_DATA", REPO.parent / "shared" / "data"))
C4 = DATA / "c4" / "validation.jsonl"

# name -> (what goes, layers): the attention cuts and whole-layer cuts of equal parameter counts.
CUTS = {
    "original": (None, []),
    "attention 10-17 (8)": ("attention", list(range(10, 18))),
    "layers 20-21 (2)": ("layers", [20, 21]),
    "attention 8-23 (16)": ("attention", list(range(8, 24))),
    "layers 20-23 (4)": ("layers", list(range(20, 24))),
}


def sweep_cuts(folder: Path, criterion: str) -> dict[str, tuple[str | None, list[int]]]:
    """The unhealed, unrepaired cuts a sweep's ``criterion`` chose, in the shape of :data:`CUTS` (attention and
    whole-layer cuts; MLP cuts have no llama.cpp form)."""
    from depthprune.sweep.store import load_points

    cuts = {"original": (None, [])}
    for p in load_points(folder):
        granularity = p.get("granularity", "layer")
        if p["n"] == 0 or p["heal"] != "none" or p.get("repair", "none") != "none" or p["criterion"] != criterion \
                or granularity not in ("layer", "attention"):
            continue
        kind = "attention" if granularity == "attention" else "layers"
        layers = sorted(p["removed_layers"])
        cuts[f"{kind} {','.join(map(str, layers))} ({p['n']})"] = (kind, layers)
    if len(cuts) == 1:
        raise SystemExit(f"no unhealed '{criterion}' cut of layers or attention in {folder}")
    return cuts


def worker(args) -> None:
    """One timing in this process: prefill ``--prefill`` C4 tokens, then decode ``--decode`` one at a time."""
    from depthprune.gguf.runtime import c4_token_stream, load_llama, timed_prefill_decode

    os.sched_setaffinity(0, {args.cpu})
    llm = load_llama(args.worker, n_ctx=args.prefill + args.decode + 16, threads=1, logits_all=False,
                     flash_attn=bool(args.flash_attn))
    tokens = c4_token_stream(llm, C4, args.prefill + args.decode)
    seconds = timed_prefill_decode(llm, tokens, args.prefill)
    print(json.dumps({f"{phase}_{clock}": count / seconds[f"{phase}_{clock}_s"]
                      for phase, count in (("prefill", args.prefill), ("decode", args.decode))
                      for clock in ("wall", "cpu")}))


def timed(path: Path, flash_attn: bool, args) -> dict:
    command = [sys.executable, __file__, "--worker", str(path), "--flash-attn", str(int(flash_attn)),
               "--prefill", str(args.prefill), "--decode", str(args.decode), "--cpu", str(args.cpu)]
    result = subprocess.run(command, stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True)
    if result.returncode != 0:
        raise SystemExit(f"timing worker failed on {path}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_cuts(out: Path, chosen: dict[str, tuple[str | None, list[int]]]) -> dict[str, dict]:
    """Write every cut of ``chosen`` (the original is used in place); name -> {"path", "parameters", "bytes"}."""
    from depthprune.gguf.sublayers import cut_sublayers_gguf
    from depthprune.gguf.surgery import cut_gguf, open_gguf
    from depthprune.model.load import resolve_model_source

    source = Path(resolve_model_source("smollm2-135m").location)
    reader = open_gguf(source)
    cuts = {}
    for name, (kind, layers) in chosen.items():
        path = out / (name.split(" (")[0].replace(" ", "-").replace(",", "_") + ".gguf")
        if kind == "attention":
            record = cut_sublayers_gguf(source, path, layers, reader=reader)
        elif kind == "layers":
            record = cut_gguf(source, layers, path, reader=reader)
        else:
            path, record = source, {"parameters_after": sum(int(t.n_elements) for t in reader.tensors)}
        cuts[name] = {"path": path, "parameters": record["parameters_after"], "bytes": path.stat().st_size}
    return cuts


def memory_and_loss(cut: dict, args) -> None:
    """KV-cache sizes and the C4 loss (``--loss-tokens`` tokens in 512-token pieces), added to ``cut``."""
    from depthprune.gguf.runtime import (
        c4_token_stream,
        kv_bytes_per_token,
        kv_cache_allocated,
        load_llama,
        mean_nll,
        next_token_logits,
    )

    cut["kv_mib"] = kv_cache_allocated(cut["path"], n_ctx=args.ctx)["mib"]
    cut["kv_mib_fa"] = kv_cache_allocated(cut["path"], n_ctx=args.ctx, flash_attn=True)["mib"]
    llm = load_llama(cut["path"], n_ctx=512)
    cut["kv_bytes_per_token"] = kv_bytes_per_token(llm)
    stream = c4_token_stream(llm, C4, args.loss_tokens)
    pieces = [stream[i : i + 512] for i in range(0, len(stream), 512)]
    cut["c4_loss"] = statistics.fmean(mean_nll(next_token_logits(llm, piece), piece) for piece in pieces)


def _ratio(cut: dict, base: dict, key: str, digits: int = 0) -> str:
    return f"{cut[key]:.{digits}f} ({cut[key] / base[key]:.2f}×)"


def table(cuts: dict[str, dict]) -> str:
    """Side by side, with each figure's ratio to the original; speeds are CPU-time tokens/s (wall in results.json)."""
    base = cuts["original"]
    rows = ["| cut | params removed | file MiB | KV MiB (FA off / on) | KV B/token | prefill tok/s CPU (FA off / on) "
            "| decode tok/s CPU (FA off / on) | C4 loss |", "|" + " --- |" * 8]
    for name, cut in cuts.items():
        ratio = functools.partial(_ratio, cut, base)
        removed = (base["parameters"] - cut["parameters"]) / 1e6
        rows.append(f"| {name} | {removed:.2f} M | {cut['bytes'] / 2**20:.1f} ({cut['bytes'] / base['bytes']:.2f}×) "
                    f"| {ratio('kv_mib', 2)} / {ratio('kv_mib_fa', 2)} | {ratio('kv_bytes_per_token')} "
                    f"| {ratio('prefill_cpu_0')} / {ratio('prefill_cpu_1')} "
                    f"| {ratio('decode_cpu_0', 1)} / {ratio('decode_cpu_1', 1)} "
                    f"| {cut['c4_loss']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gguf-sublayer"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=2048, help="KV-cache cells whose allocation is reported")
    parser.add_argument("--loss-tokens", type=int, default=1024)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU every timing process is pinned to")
    parser.add_argument("--cuts-from", type=Path, help="a sweep folder: time the cuts its criterion chose")
    parser.add_argument("--criterion", default="similarity", help="with --cuts-from: whose cuts")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--flash-attn", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    cuts = make_cuts(args.out, sweep_cuts(args.cuts_from, args.criterion) if args.cuts_from else CUTS)
    for cut in cuts.values():
        memory_and_loss(cut, args)
    timings = {(name, fa): [] for name in cuts for fa in (0, 1)}
    for _ in range(args.repeats):
        for name, cut in cuts.items():
            for fa in (0, 1):
                timings[name, fa].append(timed(cut["path"], bool(fa), args))
    for (name, fa), runs in timings.items():
        for key in runs[0]:
            cuts[name][f"{key}_{fa}"] = statistics.median(run[key] for run in runs)
    print(table(cuts))
    summary = {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in cut.items()} for name, cut in cuts.items()}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
