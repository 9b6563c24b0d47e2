"""``depthprune prune``: remove layers (by a criterion, with its own options, or listed) and save the smaller model,
as a checkpoint or a cut GGUF file."""

from __future__ import annotations

import argparse

from ..model.granularity import GRANULARITIES
from ..options import add_options, given_options
from ..repair import REPAIRS, repair_choices, repair_options_class
from ..select import CRITERIA, criterion_options_class
from .parser import (
    add_data_options,
    add_model_options,
    add_swa_pattern,
    analysis_kwargs,
    data_options,
    memory_kwargs,
    model_kwargs,
)


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("prune", help="remove a block of layers and save the smaller model")
    add_model_options(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--n", type=int, help="number of layers (or, with --granularity, sub-layers) to remove")
    how.add_argument("--fraction", type=float, help="fraction of the layers (or sub-layers) to remove, e.g. 0.25")
    how.add_argument("--layers", help="explicit 0-based layers, inclusive ranges: '20-27' or '3,7,9' (with "
                                      "--granularity: the layers whose sub-layer goes)")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                   help="what goes: whole layers (default), or only the attention or the MLP of the chosen layers "
                        "(the checkpoint stays standard: those sub-layers' weights become zeros)")
    p.add_argument("--criterion", default="similarity", choices=CRITERIA.names(),
                   help="which layers to remove (default: similarity). " + CRITERIA.help())
    add_options(p, criterion_options_class(), title="criterion options")
    p.add_argument("--repair", default="none", choices=repair_choices(),
                   help="repair the cut without training: fit a linear map on --data's calibration text and fold it "
                        "into the last kept layer (default: none). " + REPAIRS.help())
    add_options(p, repair_options_class(), title="repair options")
    p.add_argument("--distances", help="directory written by `depthprune analyze` (else measured from --data)")
    add_data_options(p, required=False)
    p.add_argument("--out", required=True, help="output directory for the pruned checkpoint, or a .gguf file")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--format", choices=["checkpoint", "gguf"],
                   help="gguf: cut the GGUF file itself, keeping its quantization (default when --out ends in .gguf)")
    add_swa_pattern(p)
    return p


def run(args) -> None:
    from ..api import prune

    common = dict(n=args.n, fraction=args.fraction, layers=args.layers, criterion=args.criterion,
                  distances=args.distances, data=data_options(args), force=args.force, **analysis_kwargs(args),
                  **given_options(args, criterion_options_class()))
    if (args.format or ("gguf" if args.out.lower().endswith(".gguf") else "checkpoint")) == "gguf":
        from ..gguf.prune import prune_gguf

        record = prune_gguf(args.model, args.out, swa_pattern=args.swa_pattern, repair=args.repair,
                            granularity=args.granularity, **common, **given_options(args, repair_options_class()))
    else:
        record = prune(args.model, args.out, repair=args.repair, granularity=args.granularity, **common,
                       **given_options(args, repair_options_class()), **memory_kwargs(args), **model_kwargs(args))
    _print_record(record, args.out)


def _print_record(record: dict, out: str) -> None:
    from ..select import format_layers

    distance = record["angular_distance"]
    granularity = record.get("granularity", "layer")
    removed = record["removed_layers"] if granularity == "layer" else record["removed_sublayers"][granularity]
    what = "layers" if granularity == "layer" else f"the {granularity} of layers"
    print(f"removed {what} {format_layers(removed)} (0-based, inclusive) by {record['criterion']}"
          + (f", angular distance {distance:.4f}" if distance is not None else ""))
    print(f"layers:     {record['layers_before']:>12,} -> {record['layers_after']:,}")
    print(f"parameters: {record['parameters_before']:>12,} -> {record['parameters_after']:,} "
          f"({100 * (1 - record['parameters_after'] / record['parameters_before']):.1f}% fewer)")
    if "bytes_after" in record:
        print(f"file size:  {record['bytes_before']:>12,} -> {record['bytes_after']:,} bytes (quantization kept)")
    if "repair" in record:
        fit = record["repair"]["fit"]
        print(f"repair:     {record['repair']['method']} folded into {record['repair']['folded_into']}; residual error "
              f"{fit['before']['residual_error']:.4g} -> {fit['after']['residual_error']:.4g} (plain cut -> repaired)")
        for name, tensor in record["repair"].get("gguf_tensors", {}).items():
            print(f"            {name} re-quantized {tensor['source_type']} -> {tensor['written_type']} (relative "
                  f"error {tensor['requantization_error']:.2g})")
    print(f"saved the pruned model to {out}")
