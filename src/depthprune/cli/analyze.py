"""``depthprune analyze``: measure the angular distances between layers; write them and their heatmap."""

from __future__ import annotations

import argparse

from .parser import (
    add_data_options,
    add_model_options,
    analysis_kwargs,
    data_options,
    memory_kwargs,
    model_kwargs,
)


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("analyze", help="measure angular distances between layers; write distances and heatmap")
    add_model_options(p)
    add_data_options(p, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def run(args) -> None:
    from ..api import analyze

    result = analyze(args.model, data_options(args), args.out, force=args.force, **analysis_kwargs(args),
                     **memory_kwargs(args), **model_kwargs(args))
    print(f"\n{result.meta['model']}: {result.num_layers} layers, {result.num_samples} samples, "
          f"{result.token_mode} token(s)")
    print(f"{'n':>4}  {'best block':>12}  {'distance':>8}")
    for n in range(1, result.num_layers + 1):
        start, distance = result.best(n)
        print(f"{n:>4}  {f'{start}-{start + n - 1}':>12}  {distance:8.4f}")
    print(f"\nwrote {args.out}/distances.json, distances.csv, heatmap.png "
          "(blocks are 0-based, inclusive layer ranges)")
