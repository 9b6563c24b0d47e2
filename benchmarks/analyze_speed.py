"""Analysis throughput and memory, side by side, in one run.

For each model, on the same calibration batches:
  ours   depthprune.measure_distances: backbone only (no LM head), hooks keep the selected token vectors
  plain  one ordinary forward pass with the LM head (what any use of the model costs at least)
  naive  output_hidden_states=True (LM head included, every layer's full hidden states kept) followed by
         a Python loop over every (n, ℓ) pair
and prints samples/s and the ratios ours/plain and ours/naive. Then it measures the peak memory of ours
with N and 10×N samples, each in a fresh process (peak RSS on CPU, max allocated on CUDA), and prints
their ratio: it should stay near 1.

    python benchmarks/analyze_speed.py [--models smollm2-135m,gemma3-270m] [--samples 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from depthprune.data import batches, load_texts, pad_id, tokenize
from depthprune.measure.distances import measure_distances
from depthprune.model.load import decoder_layout, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4" / "validation.jsonl"


def _sequences(tokenizer, samples: int, seq_len: int, data: str) -> list[list[int]]:
    seqs = tokenize(load_texts(data, samples, seed=0), tokenizer, seq_len)
    return sorted(seqs, key=len, reverse=True)  # the same order ours uses


@torch.no_grad()
def plain_forward(model, seqs, batch_size, pad) -> None:
    for batch in batches(seqs, batch_size, pad):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


@torch.no_grad()
def naive_pipeline(model, seqs, batch_size, pad) -> torch.Tensor:
    layers = decoder_layout(model).layers
    L = len(layers)
    last = {}
    handle = layers[-1].register_forward_hook(lambda m, a, o: last.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    try:
        for batch in batches(seqs, batch_size, pad):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True,
                        use_cache=False)
            index = batch.attention_mask.sum(dim=1) - 1
            rows = torch.arange(len(index))
            states = [h[rows, index].double() for h in out.hidden_states[:L]] + [last["x"][rows, index].double()]
            for n in range(1, L + 1):
                for start in range(L - n + 1):
                    cos = torch.nn.functional.cosine_similarity(states[start], states[start + n], dim=-1)
                    total[start, start + n] += (torch.arccos(cos.clamp(-1, 1)) / math.pi).sum()
    finally:
        handle.remove()
    return total


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(alias: str, samples: int, seq_len: int, batch_size: int, data: str, repeats: int) -> dict:
    """Best-of-``repeats`` seconds for each method, the methods interleaved so machine noise hits all alike."""
    model, tokenizer = load_model(alias)
    seqs = _sequences(tokenizer, samples, seq_len, data)
    pad = pad_id(tokenizer)
    methods = {
        "ours": lambda s: measure_distances(model, s, batch_size=batch_size, pad_token_id=pad, progress=False),
        "plain": lambda s: plain_forward(model, s, batch_size, pad),
        "naive": lambda s: naive_pipeline(model, s, batch_size, pad),
    }
    for run in methods.values():
        run(seqs[:batch_size])  # warm-up (allocator, kernels, first-call overheads)
    seconds = {name: _timed(lambda r=run: r(seqs)) for name, run in methods.items()}
    for _ in range(repeats - 1):
        for name, run in methods.items():
            seconds[name] = min(seconds[name], _timed(lambda r=run: r(seqs)))
    return {"model": alias, "samples": len(seqs), "tokens": sum(map(len, seqs)), "seconds": seconds}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_memory_child(alias: str, samples: int, seq_len: int, batch_size: int, data: str) -> None:
    """Run ours once in this (fresh) process; print as JSON how far memory rose above the loaded model."""
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(alias, device="cuda" if cuda else "cpu")
    seqs = _sequences(tokenizer, samples, seq_len, data)
    run = lambda: measure_distances(model, seqs, batch_size=batch_size, pad_token_id=pad_id(tokenizer),  # noqa: E731
                                    progress=False)
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak, kind = torch.cuda.max_memory_allocated(), "CUDA allocated"
    else:
        # Sample the resident set while the analysis runs: the lifetime peak would include model loading.
        base, peak, done = _rss_bytes(), 0, threading.Event()

        def watch():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_bytes())
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            run()
        finally:
            done.set()
            watcher.join()
        kind = "RSS"
    print(json.dumps({"growth_mib": (peak - base) / 2**20, "base_mib": base / 2**20, "kind": kind}))


def peak_memory(alias: str, samples: int, seq_len: int, batch_size: int, data: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", alias, "--samples", str(samples), "--seq-len", str(seq_len),
           "--batch-size", str(batch_size), "--data", data]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method, interleaved; the best counts")
    p.add_argument("--memory-child", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return peak_memory_child(args.memory_child, args.samples, args.seq_len, args.batch_size, args.data)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; {args.samples} samples × ≤{args.seq_len} tokens, "
          f"batch {args.batch_size}, best of {args.repeats}\n")
    header = f"{'model':<14} {'ours s/s':>9} {'plain s/s':>9} {'naive s/s':>9} {'ours/plain':>10} {'ours/naive':>10}"
    print(header)
    for alias in args.models.split(","):
        r = speed(alias, args.samples, args.seq_len, args.batch_size, args.data, args.repeats)
        rate = {k: r["samples"] / v for k, v in r["seconds"].items()}
        print(f"{alias:<14} {rate['ours']:9.2f} {rate['plain']:9.2f} {rate['naive']:9.2f} "
              f"{rate['ours'] / rate['plain']:9.2f}x {rate['ours'] / rate['naive']:9.2f}x", flush=True)
    print(f"\nmemory of ours above the loaded model, {args.samples} vs {10 * args.samples} samples "
          "(peak during the analysis minus before it; a fresh process each)")
    print(f"{'model':<14} {'model MiB':>9} {'N: +MiB':>9} {'10N: +MiB':>9} {'10N/N':>7}")
    for alias in args.models.split(","):
        small = peak_memory(alias, args.samples, args.seq_len, args.batch_size, args.data)
        large = peak_memory(alias, 10 * args.samples, args.seq_len, args.batch_size, args.data)
        print(f"{alias:<14} {small['base_mib']:9.0f} {small['growth_mib']:9.0f} {large['growth_mib']:9.0f} "
              f"{large['growth_mib'] / small['growth_mib']:6.2f}x  ({small['kind']})", flush=True)


if __name__ == "__main__":
    main()
