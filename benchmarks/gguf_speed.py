"""llama.cpp speed of GGUF cuts: prefill and decode tokens/s, peak memory, file size and C4 loss, 0-50 % removed.

Each cut removes the similarity block ℓ*(n) of the model's analysis (``examples/<model>/analysis``) with
n = round(fraction × L), cut straight from the embedded GGUF (same 4-bit weights). Every measurement runs
in its own process (peak memory is that process's peak RSS, VmHWM), with a fixed thread count and
CPU affinity; repeats are interleaved over the cuts so the shared machine's load drifts over all of them
alike. Wall and CPU time are both reported; medians over the repeats.

    python benchmarks/gguf_speed.py --out runs/gguf-speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEPTHPRUNE_DATA", REPO.parent / "shared" / "data"))


def peak_rss_bytes() -> int:
    """This process's peak resident memory since its exec (VmHWM; ru_maxrss would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def worker(args) -> None:
    """One measurement in this process: prefill ``--prefill`` tokens, then decode ``--decode`` one at a time."""
    from depthprune.gguf.runtime import c4_token_stream, load_llama, timed_prefill_decode

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    llm = load_llama(args.worker, n_ctx=args.prefill + args.decode + 16, threads=args.threads, logits_all=False)
    tokens = c4_token_stream(llm, DATA / "c4" / "validation.jsonl", args.prefill + args.decode)
    print(json.dumps({**timed_prefill_decode(llm, tokens, args.prefill), "peak_rss_bytes": peak_rss_bytes()}))

def measure(path: Path, args) -> dict:
    """Run one worker process on ``path``."""
    command = [sys.executable, __file__, "--worker", str(path), "--threads", str(args.threads),
               "--prefill", str(args.prefill), "--decode", str(args.decode)]
    if args.cpu is not None:
        command += ["--cpu", str(args.cpu)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, stdout=subprocess.PIPE, env=env, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker failed on {path}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def c4_loss(path: Path, sequences: int, seq_len: int) -> float:
    """Mean next-token loss in llama.cpp over packed C4 sequences (the cut's own tokenizer = the source's)."""
    from depthprune.gguf.runtime import c4_token_stream, load_llama, mean_nll, next_token_logits

    llm = load_llama(path, n_ctx=seq_len, threads=2)
    stream = c4_token_stream(llm, DATA / "c4" / "validation.jsonl", sequences * seq_len)
    pieces = [stream[i * seq_len : (i + 1) * seq_len] for i in range(sequences)]
    return float(np.mean([mean_nll(next_token_logits(llm, piece), piece) for piece in pieces]))


def make_cuts(model: str, fractions: list[float], out: Path, reuse: bool) -> list[dict]:
    """The similarity cut of each fraction as a GGUF file (the source itself for 0); ``reuse``: keep existing files."""
    from depthprune.errors import DepthpruneError
    from depthprune.gguf.surgery import cut_gguf, field_value, gguf_architecture, gguf_block_count, open_gguf
    from depthprune.measure.distances import load_distances
    from depthprune.model.load import resolve_model_source

    source = Path(resolve_model_source(model).location)
    reader = open_gguf(source)
    total, arch = gguf_block_count(reader), gguf_architecture(reader)
    distances = load_distances(REPO / "examples" / model / "analysis")
    cuts = []
    for fraction in fractions:
        n = round(fraction * total)
        if any(cut["n"] == n for cut in cuts):
            continue  # two fractions rounding to the same cut (Gemma 3: 0.2 and 0.25 of 18 layers are 4)
        if n == 0:
            cuts.append({"model": model, "fraction": fraction, "n": 0, "layers": [], "path": source,
                         "swa_pattern": "-"})
            continue
        start, _ = distances.best(n)
        layers = list(range(start, start + n))
        path = out / f"{model}-cut{n}.gguf"
        if reuse and path.is_file():
            mode = "array" if field_value(open_gguf(path), f"{arch}.attention.sliding_window_pattern") else "period"
            cuts.append({"model": model, "fraction": fraction, "n": n, "layers": layers, "path": path,
                         "swa_pattern": mode})
            continue
        try:
            cut_gguf(source, layers, path, criterion="similarity", reader=reader)
            mode = "period"
        except DepthpruneError:  # this runtime reads a per-layer pattern; the benchmark measures speed
            cut_gguf(source, layers, path, criterion="similarity", swa_pattern="array", reader=reader)
            mode = "array"
        cuts.append({"model": model, "fraction": fraction, "n": n, "layers": layers, "path": path,
                     "swa_pattern": mode})
    for cut in cuts:
        cut["layers_total"] = total
    return cuts


def fit(cuts: list[dict], key: str) -> dict:
    """Least-squares line of ms/token against layers removed; the saving per layer against one layer's share."""
    n = np.array([c["n"] for c in cuts], dtype=float)
    ms = np.array([c[key] for c in cuts])
    slope, intercept = np.polyfit(n, ms, 1)
    full = ms[n == 0][0]
    share = full / cuts[0]["layers_total"]
    return {"saving_ms_per_layer": -slope, "one_layer_share_ms": share, "ratio": -slope / share,
            "fixed_ms": intercept - cuts[0]["layers_total"] * -slope}


def summarize(cuts: list[dict], runs: dict) -> None:
    for cut in cuts:
        measured = runs[str(cut["path"])]
        for phase, tokens in (("prefill", cut["prefill_tokens"]), ("decode", cut["decode_tokens"])):
            for clock in ("wall", "cpu"):
                cut[f"{phase}_{clock}_ms"] = 1000 * float(np.median([m[f"{phase}_{clock}_s"] for m in measured])) / tokens
        cut["peak_rss_mib"] = float(np.median([m["peak_rss_bytes"] for m in measured])) / 2**20
        cut["file_mib"] = Path(cut["path"]).stat().st_size / 2**20


def table(cuts: list[dict]) -> str:
    full = cuts[0]
    lines = ["| removed | layers | file MiB | peak RSS MiB | prefill tok/s (wall / CPU) | decode tok/s (wall / CPU) "
             "| decode CPU faster | C4 loss |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cuts:
        removed = f"{c['n']}/{c['layers_total']} ({100 * c['n'] / c['layers_total']:.0f} %)"
        layers = f"{c['layers'][0]}-{c['layers'][-1]}" if c["layers"] else "-"
        faster = 100 * (full["decode_cpu_ms"] / c["decode_cpu_ms"] - 1)
        lines.append(f"| {removed} | {layers} | {c['file_mib']:.1f} | {c['peak_rss_mib']:.0f} | "
                     f"{1000 / c['prefill_wall_ms']:.0f} / {1000 / c['prefill_cpu_ms']:.0f} | "
                     f"{1000 / c['decode_wall_ms']:.1f} / {1000 / c['decode_cpu_ms']:.1f} | {faster:+.1f} % | "
                     f"{c['c4_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--fractions", default="0,0.1,0.2,0.25,0.3,0.4,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (prefill and decode)")
    parser.add_argument("--cpu", type=int, default=0, help="pin every measurement to this CPU (-1: no pinning)")
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--loss-sequences", type=int, default=4, help="C4 sequences of 256 tokens for the loss")
    parser.add_argument("--out", type=Path, default=Path("runs/gguf-speed"))
    parser.add_argument("--reuse-cuts", action="store_true", help="keep cut files already in --out")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cpu = None if args.cpu == -1 else args.cpu
    if args.worker:
        return worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",")]
    cuts = [cut for model in args.models.split(",") for cut in make_cuts(model, fractions, args.out, args.reuse_cuts)]
    runs: dict[str, list[dict]] = {str(c["path"]): [] for c in cuts}
    for repeat in range(args.repeats):
        order = cuts[repeat % len(cuts):] + cuts[: repeat % len(cuts)]  # rotate: no cut always first
        for cut in order:
            runs[str(cut["path"])].append(measure(Path(cut["path"]), args))
            print(f"repeat {repeat + 1}/{args.repeats}: {Path(cut['path']).name} done", file=sys.stderr)
    report = {"command": " ".join(sys.argv), "settings": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for model in args.models.split(","):
        mine = [c for c in cuts if c["model"] == model]
        for cut in mine:
            cut.update(prefill_tokens=args.prefill, decode_tokens=args.decode,
                       c4_loss=c4_loss(Path(cut["path"]), args.loss_sequences, 256))
        summarize(mine, runs)
        report["models"][model] = {"cuts": [{**c, "path": str(c["path"])} for c in mine],
                                   "decode_fit_cpu": fit(mine, "decode_cpu_ms"),
                                   "prefill_fit_cpu": fit(mine, "prefill_cpu_ms"),
                                   "runs": {str(c["path"]): runs[str(c["path"])] for c in mine}}
        print(f"\n### {model}\n\n{table(mine)}\n")
        for phase in ("decode", "prefill"):
            f = report["models"][model][f"{phase}_fit_cpu"]
            print(f"{phase} (CPU time): {f['saving_ms_per_layer']:.3f} ms/token saved per layer removed, one layer's "
                  f"share {f['one_layer_share_ms']:.3f} ms/token (ratio {f['ratio']:.2f}); fixed part "
                  f"{f['fixed_ms']:.3f} ms/token")
    (args.out / "gguf_speed.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
