"""Does a training-free repair close the C4-loss gap of a cut? SmolLM2-135M, one block removed by similarity.

Removes ``--n`` layers (the block the example's analysis gives, examples/smollm2-135m/analysis), fits each
repair on ``--docs`` C4 training documents of ``--seq-len`` tokens, and prints the C4 validation loss of the
full model, the plain cut and each repaired cut, with the share of the gap each repair closes, the fit's
objectives and its wall and CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/repair_quick.py                    # minutes on a CPU
    python benchmarks/repair_quick.py --device cuda --c4-sequences 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from depthprune import (
    choose_block,
    evaluate_model,
    load_distances,
    load_model,
    load_texts,
    num_layers,
    remove_layers,
)
from depthprune.data import pad_id, tokenize
from depthprune.repair.apply import repair_cut
from depthprune.repair.linear import LinearRepairOptions

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEPTHPRUNE_DATA", ROOT.parent / "shared" / "data"))


# (label, repair, options): ReplaceMe's unweighted least squares (p = 0), then the defaults.
VARIANTS = [("linear p=0", "linear", LinearRepairOptions(repair_norm_power=0.0)),
            ("linear", "linear", None),
            ("linear-cosine", "linear-cosine", None)]


def c4_loss(model, tokenizer, args) -> float:
    result = evaluate_model(model, "c4", tokenizer=tokenizer, c4=str(DATA / "c4" / "validation.jsonl"),
                            c4_sequences=args.c4_sequences, progress=False)
    return result["tasks"]["c4"]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=8, help="layers to remove")
    parser.add_argument("--docs", type=int, default=64, help="calibration documents")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration tokens per document (at most)")
    parser.add_argument("--c4-sequences", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    distances = load_distances(ROOT / "examples" / "smollm2-135m" / "analysis")
    selection = choose_block("similarity", args.n, num_layers(model), distances)
    texts = load_texts(str(DATA / "c4" / "train_sample.jsonl"), count=args.docs)
    sequences = tokenize(texts, tokenizer, args.seq_len)
    print(f"{selection.describe()}; calibration: {len(sequences)} docs, {sum(map(len, sequences))} tokens")

    rows = [("full model", c4_loss(model, tokenizer, args), None, None)]
    plain = remove_layers(copy.deepcopy(model), selection.layers)
    rows.append(("plain cut", c4_loss(plain, tokenizer, args), None, None))
    print(f"C4 loss: full model {rows[0][1]:.4f}, plain cut {rows[1][1]:.4f}", flush=True)
    del plain
    for label, method, options in VARIANTS:
        repaired = copy.deepcopy(model)
        wall, cpu = time.perf_counter(), time.process_time()
        record = repair_cut(repaired, selection.layers, sequences, method, options, pad_token_id=pad_id(tokenizer),
                            batch_size=8, progress=False)
        seconds = (time.perf_counter() - wall, time.process_time() - cpu)
        rows.append((label, c4_loss(repaired, tokenizer, args), record, seconds))
        print(f"C4 loss: {label} {rows[-1][1]:.4f} (fit {seconds[0]:.1f} s)", flush=True)
        del repaired

    full, cut = rows[0][1], rows[1][1]
    print(f"\n{'model':<15}{'C4 loss':>9}{'gap closed':>12}{'fit wall s':>12}{'fit CPU s':>11}")
    for name, loss, record, seconds in rows:
        closed = f"{(cut - loss) / (cut - full):.0%}" if record is not None else ""
        times = f"{seconds[0]:>12.1f}{seconds[1]:>11.1f}" if seconds else ""
        print(f"{name:<15}{loss:>9.4f}{closed:>12}{times}")
    for name, _, record, _ in rows:
        if record is not None:
            fit = {k: v for k, v in record["fit"].items() if k != "note"}
            print(f"\n{name} fit: {json.dumps(fit, indent=1)}")


if __name__ == "__main__":
    main()
