"""A repaired GGUF cut against the plain one: file sizes, C4 loss in llama.cpp and transformers, top-1 agreement.

Measures the similarity distances once on ``--docs`` C4 training documents, then cuts the embedded GGUF
twice with ``prune_gguf`` (the same block): plainly, and with ``--repair`` fitted on the same documents (one
tensor re-quantized). Every file then runs in llama.cpp on ``--sequences`` × ``--seq-len`` tokens of C4
validation (seeded document order, llama.cpp's tokenizer); transformers runs the same token ids on each file
de-quantized, and on the float repaired model (the checkpoint path: no re-quantization) for reference.

    OMP_NUM_THREADS=1 python benchmarks/gguf_repair.py --out /tmp/gguf-repair      # a few minutes on a CPU

The de-quantized copies of the files go to ``--out``/cache unless ``DEPTHPRUNE_CACHE`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from depthprune import DataOptions, analyze, load_model, prune
from depthprune.gguf.prune import prune_gguf
from depthprune.gguf.runtime import c4_token_stream, load_llama, mean_nll, next_token_logits
from depthprune.select import format_layers

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEPTHPRUNE_DATA", REPO.parent / "shared" / "data"))


def hf_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]


def llama_logits(path: Path, sequences: list[list[int]], n_ctx: int) -> list[np.ndarray]:
    llm = load_llama(path, n_ctx=n_ctx)
    logits = [next_token_logits(llm, ids) for ids in sequences]
    del llm
    return logits


def loss(logits: list[np.ndarray], sequences: list[list[int]]) -> float:
    return float(np.mean([mean_nll(lg, ids) for lg, ids in zip(logits, sequences, strict=True)]))


def top1(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([x.argmax(1) == y.argmax(1) for x, y in zip(a, b, strict=True)])))


def cut_files(args, source_gguf: Path) -> dict:
    """The plain and the repaired cut files (the same block), with their records and seconds."""
    data = DataOptions(str(DATA / "c4" / "train_sample.jsonl"), samples=args.docs, seq_len=args.calib_len)
    distances = analyze(args.model, data, progress=False)
    files = {}
    for name, repair in (("plain", None), ("repaired", args.repair)):
        wall, cpu = time.perf_counter(), time.process_time()
        record = prune_gguf(args.model, args.out / f"{name}.gguf", n=args.n, distances=distances, data=data,
                            repair=repair, force=True, progress=False)
        files[name] = {"record": record, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    layers = format_layers(files["plain"]["record"]["removed_layers"])
    prune(args.model, args.out / "float-repaired", layers=layers, data=data, repair=args.repair, force=True,
          progress=False)  # the same map, folded into float32 weights: the reference without re-quantization
    return files | {"data": data, "source": source_gguf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=8, help="layers to remove (by similarity)")
    parser.add_argument("--repair", default="linear")
    parser.add_argument("--docs", type=int, default=64, help="C4 training documents (distances and the fit)")
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=4, help="C4 validation sequences scored")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The de-quantized copies of the cut files (hundreds of MB each) go under --out, not the user's cache.
    os.environ.setdefault("DEPTHPRUNE_CACHE", str(args.out / "cache"))

    from depthprune.model.load import resolve_model_source

    source = Path(resolve_model_source(args.model).location)
    files = cut_files(args, source)
    probe = load_llama(source, n_ctx=args.seq_len, logits_all=False)
    stream = c4_token_stream(probe, DATA / "c4" / "validation.jsonl", args.sequences * args.seq_len)
    del probe
    sequences = [stream[i * args.seq_len:(i + 1) * args.seq_len] for i in range(args.sequences)]
    paths = {"full": source, "plain": args.out / "plain.gguf", "repaired": args.out / "repaired.gguf"}
    rows = {}
    for name, path in paths.items():
        llama = llama_logits(path, sequences, args.seq_len)
        hf = hf_logits(load_model(str(path))[0], sequences)
        rows[name] = {"MiB": path.stat().st_size / 2**20, "llama.cpp loss": loss(llama, sequences),
                      "HF loss": loss(hf, sequences), "top-1 llama.cpp vs HF": top1(llama, hf)}
        if name == "repaired":
            float_hf = hf_logits(load_model(str(args.out / "float-repaired"))[0], sequences)
            rows["float repaired (checkpoint)"] = {"HF loss": loss(float_hf, sequences),
                                                   "top-1 llama.cpp vs HF": top1(llama, float_hf)}
    record = files["repaired"]["record"]
    print(f"removed layers {format_layers(record['removed_layers'])}; {args.sequences} x {args.seq_len} C4 "
          f"validation tokens; cut seconds (wall / CPU): plain {files['plain']['wall_s']:.1f} / "
          f"{files['plain']['cpu_s']:.1f}, repaired {files['repaired']['wall_s']:.1f} / {files['repaired']['cpu_s']:.1f}")
    print(f"re-quantized: {json.dumps(record['repair']['gguf_tensors'])}")
    fit = record["repair"]["fit"]
    print(f"fit residual error {fit['before']['residual_error']:.4f} -> {fit['after']['residual_error']:.4f}")
    columns = ["MiB", "llama.cpp loss", "HF loss", "top-1 llama.cpp vs HF"]
    print("| file | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.4f}" if c in row else "" for c in columns) + " |")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "repair": record["repair"]}, indent=1))


if __name__ == "__main__":
    main()
