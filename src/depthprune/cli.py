"""Command line: parses arguments and calls the library. ``depthprune --help`` lists the commands."""

from __future__ import annotations

import argparse
import sys

from .errors import DepthpruneError

MODEL_HELP = (
    "Hugging Face id, checkpoint directory, .gguf file, or embedded alias (smollm2-135m, gemma3-270m)"
)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu, cuda (one GPU) or auto (spread over all GPUs with accelerate)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own Python code")


def _add_data_options(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--data", required=required,
                   help="text source: .jsonl/.json/.txt/.parquet file, a directory of them, or a Hugging Face dataset id")
    g.add_argument("--data-config", default=None, help="Hugging Face dataset config (e.g. 'en' for allenai/c4)")
    g.add_argument("--data-split", default="train", help="Hugging Face dataset split (default: train)")
    g.add_argument("--text-field", default="text", help="field holding the text (default: text)")
    g.add_argument("--samples", type=int, default=128, help="number of documents (default: 128)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per document, truncated (default: 512)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--tokens", default="last", choices=["last", "all"],
                   help="compare the last real token (paper default) or the mean over all tokens")
    g.add_argument("--seed", type=int, default=0, help="seed of the document sample (default: 0)")


def _data_options(args):
    from .api import DataOptions

    if args.data is None:
        return None
    if args.samples < 1:
        raise DepthpruneError(f"--samples must be at least 1, got {args.samples}")
    return DataOptions(args.data, args.samples, args.seq_len, args.seed, args.text_field, args.data_config,
                       args.data_split)


def _run_analyze(args) -> None:
    from .api import analyze

    result = analyze(args.model, _data_options(args), args.out, batch_size=args.batch_size, tokens=args.tokens,
                     device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                     force=args.force)
    print(f"\n{result.meta['model']}: {result.num_layers} layers, {result.num_samples} samples, "
          f"{result.tokens} token(s)")
    print(f"{'n':>4}  {'best block':>12}  {'distance':>8}")
    for n in range(1, result.num_layers + 1):
        start, distance = result.best(n)
        print(f"{n:>4}  {f'{start}-{start + n - 1}':>12}  {distance:8.4f}")
    print(f"\nwrote {args.out}/distances.json, distances.csv, heatmap.png "
          "(blocks are 0-based, inclusive layer ranges)")


def _run_prune(args) -> None:
    from .api import prune

    record = prune(args.model, args.out, n=args.n, fraction=args.fraction, layers=args.layers,
                   strategy=args.strategy, distances=args.distances, data=_data_options(args),
                   batch_size=args.batch_size, tokens=args.tokens, device=args.device, dtype=args.dtype,
                   trust_remote_code=args.trust_remote_code, force=args.force)
    from .select import format_layers

    distance = record["angular_distance"]
    print(f"removed layers {format_layers(record['removed_layers'])} (0-based, inclusive) by {record['criterion']}"
          + (f", angular distance {distance:.4f}" if distance is not None else ""))
    print(f"layers:     {record['layers_before']:>12,} -> {record['layers_after']:,}")
    print(f"parameters: {record['parameters_before']:>12,} -> {record['parameters_after']:,} "
          f"({100 * (1 - record['parameters_after'] / record['parameters_before']):.1f}% fewer)")
    print(f"saved the pruned model to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthprune",
        description="Remove whole transformer layers by angular distance (Gromov et al. 2024).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("analyze", help="measure angular distances between layers; write distances and heatmap")
    _add_model_options(p)
    _add_data_options(p, required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(run=_run_analyze)

    p = commands.add_parser("prune", help="remove a block of layers and save the smaller model")
    _add_model_options(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--n", type=int, help="number of layers to remove")
    how.add_argument("--fraction", type=float, help="fraction of the layers to remove, e.g. 0.25")
    how.add_argument("--layers", help="explicit 0-based layers, inclusive ranges: '20-27' or '3,7,9'")
    p.add_argument("--strategy", default="similarity", choices=["similarity", "deepest"],
                   help="similarity: the block with the smallest angular distance; deepest: the n layers "
                        "before the final one (default: similarity)")
    p.add_argument("--distances", help="directory written by `depthprune analyze` (else measured from --data)")
    _add_data_options(p, required=False)
    p.add_argument("--out", required=True, help="output directory for the pruned checkpoint")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(run=_run_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DepthpruneError as exc:
        print(f"depthprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
