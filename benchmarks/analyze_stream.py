"""Peak memory and time of the layer-streamed analysis against the in-memory one, side by side, in one run.

Whole process: `depthprune.analyze(model, data)` against `analyze(..., stream=True)`, as `depthprune analyze
[--stream]` runs them, each in a fresh process that loads nothing beforehand; the figure is the process's peak
resident set (VmHWM: Python, torch, transformers, the tokenizer, the analysis), what an analysis costs a
machine, and the distance matrices of the two are compared.

Above a baseline: for each model and method, a fresh process (so peaks do not mix), one torch thread:
  in-memory  the model loaded whole as load_model loads it (from_pretrained, safetensors, float32), then
             the texts tokenized and depthprune.measure_distances
  streamed   depthprune.measure.stream.compute_distances_streamed: meta skeleton, embedding rows, one layer at a time
Each process first imports everything (transformers, accelerate, the model's modeling code) and loads the calibration texts and the tokenizer (the same for both
methods), then measures the analysis alone: the peak rise of the resident set above that point (sampled every
2 ms), wall and CPU time. The tokenizer's own memory is printed apart (Gemma 3's 262k-token tokenizer
takes ~350 MiB). Rounds alternate the methods; the best time and the lowest peak of the rounds count.
Every process runs one torch thread.
The distance matrices of the two methods are compared too. For the streamed run, the time spent reading
and placing each layer's weights is taken apart from the time spent computing, per layer, with the FLOP
rate achieved (2 x layer parameters x padded tokens): the figures the planning estimate scales.

    python benchmarks/analyze_stream.py [--models smollm2-135m,gemma3-270m] [--samples 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4" / "validation.jsonl"
METHODS = ("in-memory", "streamed")
WHOLE = ("analyze", "analyze-stream")  # the whole-process runs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """The whole process's peak resident set so far (the kernel's high-water mark, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def whole_child(method: str, alias: str, samples: int, seq_len: int, batch_size: int, token_mode: str,
                data: str) -> None:
    """``depthprune.analyze`` in this fresh process, nothing loaded before; print its peak and distances as JSON."""
    import torch

    import depthprune

    torch.set_num_threads(1)
    wall = time.perf_counter()
    result = depthprune.analyze(alias, depthprune.DataOptions(data, samples=samples, seq_len=seq_len),
                                batch_size=batch_size, token_mode=token_mode, stream=method == "analyze-stream",
                                progress=False)
    print(json.dumps({"whole_mib": _peak_rss_bytes() / 2**20, "wall_s": time.perf_counter() - wall,
                      "pairwise": result.pairwise.tolist()}))


def child(method: str, alias: str, samples: int, seq_len: int, batch_size: int, token_mode: str, data: str) -> None:
    """Run one analysis in this fresh process; print its figures as one JSON line."""
    import accelerate  # noqa: F401  (imported by both methods; not the analysis' memory)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from depthprune.data import load_texts, pad_id, tokenize
    from depthprune.measure.checkpoint import local_checkpoint
    from depthprune.measure.distances import measure_distances
    from depthprune.measure.stream import compute_distances_streamed

    torch.set_num_threads(1)
    texts = load_texts(data, samples, seed=0)
    directory = local_checkpoint(alias)  # the converted safetensors cache (converted once, beforehand)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(directory))]  # imports the modeling code
    before_tokenizer = _rss_bytes()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
        result = measure_distances(model, tokenize(texts, tokenizer, seq_len), batch_size=batch_size,
                                   token_mode=token_mode, pad_token_id=pad_id(tokenizer), progress=False)
    else:
        loading = _time_layer_loads()
        result = compute_distances_streamed(alias, texts, tokenizer=tokenizer, seq_len=seq_len,
                                            batch_size=batch_size, token_mode=token_mode, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done.set()
    watcher.join()
    figures = {"peak_mib": (max(peak[0], _rss_bytes()) - base) / 2**20, "wall_s": wall, "cpu_s": cpu,
               "tokenizer_mib": (base - before_tokenizer) / 2**20, "pairwise": result.pairwise.tolist()}
    if method == "streamed":
        figures.update(loading, **_layer_size(directory, tokenizer, texts, seq_len, batch_size))
    print(json.dumps(figures))


def _time_layer_loads() -> dict:
    """Add up the seconds spent reading and placing layer weights (``load_seconds``, ``layers``)."""
    from depthprune.measure import stream as stream

    totals = {"load_s": 0.0, "layers": 0}
    original = stream._Skeleton.load_layer

    def timed(self, index):
        start = time.perf_counter()
        layer = original(self, index)
        totals["load_s"] += time.perf_counter() - start
        totals["layers"] += 1
        return layer

    stream._Skeleton.load_layer = timed
    return totals


def _layer_size(directory, tokenizer, texts, seq_len: int, batch_size: int) -> dict:
    """One decoder layer's parameters and the padded tokens that went through each layer."""
    from depthprune.data import tokenize
    from depthprune.measure.checkpoint import Checkpoint

    checkpoint = Checkpoint(directory)
    names = next(iter(checkpoint.layer_groups().values()))
    lengths = sorted((len(s) for s in tokenize(texts, tokenizer, seq_len)), reverse=True)
    padded = sum(len(lengths[i : i + batch_size]) * lengths[i] for i in range(0, len(lengths), batch_size))
    return {"layer_params": sum(checkpoint.entries[n].numel for n in names), "padded_tokens": padded}


def run_child(method: str, alias: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--models", alias, "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--token-mode", args.token_mode,
           "--data", args.data]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _whole_process(args) -> None:
    """The whole-process peaks of ``analyze`` and ``analyze --stream``, their ratio and the largest ΔD."""
    print(f"whole process (VmHWM)\n{'model':<14} {'analyze MiB':>11} {'--stream MiB':>12} {'stream/in-memory':>16} "
          f"{'max |ΔD|':>9}")
    for alias in args.models.split(","):
        runs = {m: [run_child(m, alias, args) for _ in range(args.rounds)] for m in WHOLE}
        peak = {m: min(r["whole_mib"] for r in rs) for m, rs in runs.items()}
        diff = _max_difference(runs["analyze"][0]["pairwise"], runs["analyze-stream"][0]["pairwise"])
        print(f"{alias:<14} {peak['analyze']:11.0f} {peak['analyze-stream']:12.0f} "
              f"{peak['analyze-stream'] / peak['analyze']:16.0%} {diff:9.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--token-mode", "--tokens", default="last", choices=["last", "all"])  # --tokens: before issue 18
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--rounds", type=int, default=2, help="runs per method, alternating; best time, lowest peak")
    p.add_argument("--child", choices=METHODS + WHOLE, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run = whole_child if args.child in WHOLE else child
        return run(args.child, args.models, args.samples, args.seq_len, args.batch_size, args.token_mode, args.data)

    print(f"{args.samples} C4 documents ≤ {args.seq_len} tokens, batch {args.batch_size}, token_mode={args.token_mode}, "
          f"float32, CPU, 1 thread; a fresh process per run, best of {args.rounds} alternating rounds\n")
    _whole_process(args)
    print(f"\nabove a baseline\n{'model':<14} {'method':<10} {'peak +MiB':>9} {'wall s':>7} {'CPU s':>7}")
    rows = []
    for alias in args.models.split(","):
        runs = {m: [] for m in METHODS}
        for _ in range(args.rounds):
            for method in METHODS:
                runs[method].append(run_child(method, alias, args))
        best = {m: {"peak_mib": min(r["peak_mib"] for r in rs), "wall_s": min(r["wall_s"] for r in rs),
                    "cpu_s": min(r["cpu_s"] for r in rs), "tokenizer_mib": rs[0]["tokenizer_mib"],
                    "pairwise": rs[0]["pairwise"]} for m, rs in runs.items()}
        best["streamed_first"] = runs["streamed"][0]
        for method in METHODS:
            b = best[method]
            print(f"{alias:<14} {method:<10} {b['peak_mib']:9.0f} {b['wall_s']:7.1f} {b['cpu_s']:7.1f}", flush=True)
        rows.append((alias, best))
    print(f"\n{'model':<14} {'peak s/m':>8} {'+tokenizer':>10} {'wall s/m':>8} {'CPU s/m':>8} {'max |ΔD|':>9}")
    for alias, best in rows:
        mem, streamed = best["in-memory"], best["streamed"]
        tok = mem["tokenizer_mib"]
        diff = _max_difference(mem["pairwise"], streamed["pairwise"])
        print(f"{alias:<14} {streamed['peak_mib'] / mem['peak_mib']:7.0%} "
              f"{(tok + streamed['peak_mib']) / (tok + mem['peak_mib']):10.0%} "
              f"{streamed['wall_s'] / mem['wall_s']:7.2f}x {streamed['cpu_s'] / mem['cpu_s']:7.2f}x {diff:9.1e}")
    print(f"\nstreamed, per layer (first round)\n{'model':<14} {'params M':>8} {'MiB':>6} {'load ms':>8} "
          f"{'MiB/s':>6} {'compute ms':>10} {'GFLOP/s':>8}")
    for alias, best in rows:
        s = best["streamed_first"]
        layers, params = s["layers"], s["layer_params"]
        load = s["load_s"] / layers
        compute = (s["wall_s"] - s["load_s"]) / layers  # upper bound: includes the skeleton pass and set-up
        print(f"{alias:<14} {params / 1e6:8.2f} {4 * params / 2**20:6.1f} {1e3 * load:8.1f} "
              f"{4 * params / 2**20 / load:6.0f} {1e3 * compute:10.1f} {2 * params * s['padded_tokens'] / compute / 1e9:8.2f}")


if __name__ == "__main__":
    main()
