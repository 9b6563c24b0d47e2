"""Does removing layers save what it should? Cost against layers removed, in one run.

For n = 0, step, 2·step, ... layers removed (the deepest block, cut in memory), measures prefill and
decode time per token and weight memory with depthprune.measure.cost.measure_cost, the block sizes interleaved
round after round so machine noise hits all alike (the best round counts). Then fits
cost = fixed + per_layer × layers kept and prints R² and the fitted saving per layer divided by the
measured cost of one layer (hooks around each layer of the full model): 1.00 means every removed layer
saves exactly its own cost.

    python benchmarks/cost_linearity.py [--model smollm2-135m] [--step 3] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from depthprune.measure.cost import linear_fit, measure_cost
from depthprune.model.load import load_model, num_layers
from depthprune.model.surgery import layers_removed
from depthprune.select import choose_block

COSTS = [("prefill_ms_per_token", "layer_prefill_ms_per_token", "prefill ms/token"),
         ("decode_ms_per_token", "layer_decode_ms_per_token", "decode ms/token"),
         ("weight_bytes", "layer_weight_bytes", "weight MiB")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--step", type=int, default=3, help="layers removed between measured models")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all models; the best counts")
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    args = p.parse_args()

    model, _ = load_model(args.model)
    total = num_layers(model)
    sizes = list(range(0, total - 1, args.step))
    best: dict[int, dict] = {}
    for _ in range(args.rounds):
        for n in sizes:
            layers = choose_block("deepest", n, total).layers if n else ()
            with layers_removed(model, layers) as cut:
                cost = measure_cost(cut, prefill_len=args.prefill_len, decode_tokens=args.decode_tokens, repeats=1)
            if n not in best:
                best[n] = cost
            else:
                for key in ("prefill_ms_per_token", "decode_ms_per_token", "layer_prefill_ms_per_token",
                            "layer_decode_ms_per_token"):
                    best[n][key] = min(best[n][key], cost[key])
    print(f"{args.model}: {total} layers, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"prefill {args.prefill_len} tokens, decode {args.decode_tokens} tokens, best of {args.rounds} rounds\n")
    print(f"{'removed':>7} {'kept':>5} " + " ".join(f"{label:>16}" for _, _, label in COSTS))
    for n in sizes:
        c = best[n]
        print(f"{n:>7} {total - n:>5} {c['prefill_ms_per_token']:16.4f} {c['decode_ms_per_token']:16.4f} "
              f"{c['weight_bytes'] / 2**20:16.1f}")
    print(f"\n{'cost':<18} {'fixed':>10} {'per layer':>10} {'R²':>7} {'one layer':>10} {'per layer / one layer':>22}")
    for key, layer_key, label in COSTS:
        fit = linear_fit([total - n for n in sizes], [best[n][key] for n in sizes])
        scale = 1 / 2**20 if key.endswith("bytes") else 1.0
        one = best[0][layer_key]
        print(f"{label:<18} {fit['fixed'] * scale:10.4f} {fit['per_unit'] * scale:10.4f} {fit['r2']:7.4f} "
              f"{one * scale:10.4f} {fit['per_unit'] / one:21.3f}x")


if __name__ == "__main__":
    main()
