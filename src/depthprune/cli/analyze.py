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
    if result.sublayer_distances is not None:
        _print_sublayers(result.sublayer_distances)
    print(f"\nwrote {args.out}/distances.json, distances.csv, heatmap.png "
          "(blocks are 0-based, inclusive layer ranges)")


def _print_sublayers(distances: dict) -> None:
    """Each layer's attention and MLP distance, and its rank (1: what --granularity ... similarity removes first)."""
    ranks = {kind: {int(layer): r + 1 for r, layer in enumerate(sorted(range(len(v)), key=lambda i: (v[i], i)))}
             for kind, v in distances.items()}
    print(f"\n{'layer':>5}  {'attention':>9} {'rank':>4}  {'mlp':>9} {'rank':>4}   (sub-layer distances)")
    for layer in range(len(distances["attention"])):
        print(f"{layer:>5}  {distances['attention'][layer]:9.4f} {ranks['attention'][layer]:>4}  "
              f"{distances['mlp'][layer]:9.4f} {ranks['mlp'][layer]:>4}")
