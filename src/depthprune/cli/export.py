"""``depthprune export``: write a checkpoint as a GGUF file for llama.cpp, or as a mergekit recipe."""

from __future__ import annotations

import argparse

from .parser import add_swa_pattern


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp, or as a mergekit recipe")
    p.add_argument("model", help="checkpoint directory (pruned, healed or merged)")
    p.add_argument("--format", default="gguf", choices=["gguf", "mergekit"],
                   help="gguf (Llama, Gemma 3) or mergekit (passthrough YAML that rebuilds the cut)")
    p.add_argument("--outtype", default="f16", choices=["f16", "bf16", "q8_0"], help="GGUF weight type (default f16)")
    add_swa_pattern(p)
    p.add_argument("--tokenizer-gguf", help="GGUF file to copy the tokenizer from (default: the checkpoint's source)")
    p.add_argument("--out", required=True, help="output .gguf or .yml file")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def run(args) -> None:
    from ..gguf.export import export

    out = export(args.model, args.out, args.format, args.outtype, swa_pattern=args.swa_pattern,
                 tokenizer=args.tokenizer_gguf, force=args.force)
    print(f"wrote {out}")
