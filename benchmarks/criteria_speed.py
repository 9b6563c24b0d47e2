"""How much the loss-based criteria cost, and how much the fast path saves, in one run.

1. ``perplexity-greedy`` (SLEB) for n = 1 … N on one model, two ways, on the same calibration sequences:
     fast   depthprune's criterion: the greedy order computed once up to N (each n takes its prefix), layer
            inputs kept per step, each candidate run only from the removed layer on, the LM head in chunks,
            candidates stopped once their partial loss exceeds the best complete one
     naive  the straightforward way: every candidate of every step is an explicitly cut model
            (``surgery.layers_removed``) run in full, logits of all positions at once, cross-entropy; the
            greedy order is also computed once up to N
   and checks both choose the same layers for every n.
2. Every criterion's time for n = N, each from a fresh context (nothing shared between criteria), as a
   multiple of one analysis pass (``measure_distances``, which also yields similarity and block-influence).

Wall time and CPU time (``time.process_time``, all threads of the process) are both printed; threads are
pinned with ``--threads`` (torch.set_num_threads), so CPU time is the steadier figure on a shared machine.

    python benchmarks/criteria_speed.py [--model smollm2-135m] [--samples 4] [--seq-len 64] [--max-n 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from depthprune.data import batches, load_texts, pad_id, tokenize
from depthprune.measure.distances import measure_distances
from depthprune.model.load import load_model, num_layers
from depthprune.model.surgery import layers_removed
from depthprune.select import CRITERIA, SelectionContext, choose

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4" / "validation.jsonl"


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.no_grad()
def naive_loss(model, seqs, removed, batch_size, pad) -> float:
    """Mean next-token NLL of the explicitly cut model: full forward, all logits at once, cross-entropy."""
    total, count = 0.0, 0
    with layers_removed(model, sorted(removed)) as cut:
        for batch in batches(seqs, batch_size, pad):
            logits = cut(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False).logits.float()
            mask = batch.attention_mask.bool()
            predicted = mask[:, :-1] & mask[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1][predicted], batch.input_ids[:, 1:][predicted],
                                                    reduction="sum")
            total += float(nll)
            count += int(predicted.sum())
    return total / count


def naive_greedy(model, seqs, max_n, batch_size, pad) -> list[int]:
    order = []
    total = num_layers(model)
    for _ in range(max_n):
        losses = {c: naive_loss(model, seqs, order + [c], batch_size, pad) for c in range(total) if c not in order}
        order.append(min(losses, key=lambda c: (losses[c], c)))
        print(f"  naive step {len(order)}: removes {order[-1]} (loss {losses[order[-1]]:.4f})", flush=True)
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-n", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    pad = pad_id(tokenizer)
    seqs = tokenize(load_texts(args.data, args.samples, seed=0), tokenizer, args.seq_len)
    seqs = sorted(seqs, key=len, reverse=True)
    L = num_layers(model)
    print(f"{args.model}: {L} layers; {len(seqs)} calibration sequences, {sum(map(len, seqs))} tokens; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    with Clock() as analysis:
        distances = measure_distances(model, seqs, batch_size=args.batch_size, pad_token_id=pad, progress=False)
    print(f"one analysis pass: wall {analysis.wall:.1f} s, CPU {analysis.cpu:.1f} s", flush=True)

    def context():
        return SelectionContext(L, distances, model, tokenizer, seqs, batch_size=args.batch_size)

    results = {"model": args.model, "tokens": sum(map(len, seqs)), "threads": args.threads,
               "analysis": {"wall": analysis.wall, "cpu": analysis.cpu}}
    greedy_context = context()
    with Clock() as fast:
        fast_layers = {n: choose("perplexity-greedy", n, greedy_context).layers for n in range(1, args.max_n + 1)}
    print(f"perplexity-greedy n=1..{args.max_n}, fast: wall {fast.wall:.1f} s, CPU {fast.cpu:.1f} s; order "
          f"{greedy_context.cache['greedy']['order']}", flush=True)
    results["greedy_fast"] = {"wall": fast.wall, "cpu": fast.cpu, "order": greedy_context.cache["greedy"]["order"]}
    if not args.skip_naive:
        with Clock() as naive:
            order = naive_greedy(model, seqs, args.max_n, args.batch_size, pad)
        same = all(fast_layers[n] == tuple(sorted(order[:n])) for n in fast_layers)
        print(f"perplexity-greedy n=1..{args.max_n}, naive: wall {naive.wall:.1f} s, CPU {naive.cpu:.1f} s; "
              f"order {order}", flush=True)
        print(f"same selections for every n: {same}; fast is {naive.wall / fast.wall:.2f}x faster (wall), "
              f"{naive.cpu / fast.cpu:.2f}x (CPU)", flush=True)
        results["greedy_naive"] = {"wall": naive.wall, "cpu": naive.cpu, "order": order, "same_selections": same}

    rows = []
    for entry in CRITERIA:  # every registered criterion, plug-ins included
        name = entry.name
        if entry.needs == "distances":  # what they read (distances, block influence) comes from the pass
            rows.append((name, 0.0, 0.0, "in the analysis pass"))
        elif entry.needs == "nothing":
            rows.append((name, 0.0, 0.0, "nothing to measure"))
        elif name == "perplexity-greedy":
            rows.append((name, fast.wall, fast.cpu, f"n=1..{args.max_n}, the order computed once"))
        else:
            with Clock() as clock:
                choose(name, args.max_n, context())
            rows.append((name, clock.wall, clock.cpu, f"n={args.max_n}"))
            print(f"{name}: wall {clock.wall:.1f} s, CPU {clock.cpu:.1f} s", flush=True)
    print(f"\nevery criterion's own work beyond the analysis pass, as a multiple of one pass "
          f"(wall {analysis.wall:.1f} s, CPU {analysis.cpu:.1f} s):")
    print(f"{'criterion':22} {'wall s':>8} {'CPU s':>8} {'x pass (CPU)':>13}  note")
    for name, wall, cpu, note in rows:
        print(f"{name:22} {wall:8.1f} {cpu:8.1f} {cpu / analysis.cpu:12.1f}x  {note}")
    results["criteria"] = {name: {"wall": wall, "cpu": cpu, "x_analysis_cpu": cpu / analysis.cpu, "note": note}
                           for name, wall, cpu, note in rows}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
