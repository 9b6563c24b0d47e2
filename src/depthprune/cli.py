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


def _run_eval(args) -> None:
    from .evaluate.suite import evaluate, summary_rows

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    result = evaluate(args.model, args.tasks, mmlu=args.mmlu, boolq=args.boolq, c4=args.c4, shots=args.shots,
                      subjects=subjects, limit=args.limit, boolq_limit=args.boolq_limit, batch_size=args.batch_size,
                      max_length=args.max_length, c4_sequences=args.c4_sequences, c4_seq_len=args.c4_seq_len,
                      c4_config=args.c4_config, seed=args.seed, lm_eval=args.lm_eval,
                      lm_eval_include=args.lm_eval_include, lm_eval_data=args.lm_eval_data,
                      lm_eval_fewshot=args.lm_eval_fewshot, details=args.details, out=args.out, device=args.device,
                      dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    removed = result.get("removed_layers")
    print(f"\n{result['model']}: {result['num_layers']} layers"
          + (f" ({len(removed)} removed from {result['layers_before']})" if removed else ""))
    print(f"{'task':<24} {'metric':<32} {'value':>8} {'baseline':>9} {'n':>8}")
    for task, metric, value, baseline, count in summary_rows(result):
        base = f"{baseline:9.4f}" if baseline is not None else f"{'':>9}"
        print(f"{task:<24} {metric:<32} {value:8.4f} {base} {count if count is not None else '':>8}")
    if args.out:
        print(f"\nwrote {args.out}")


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

    p = commands.add_parser("eval", help="evaluate a model: MMLU (k-shot), BoolQ (0-shot), C4 loss, lm-eval tasks")
    _add_model_options(p)
    p.add_argument("--tasks", help="comma-separated: mmlu,boolq,c4 (default: the tasks given a data option)")
    p.add_argument("--mmlu", help="MMLU: directory with dev/ and test/ CSVs, or a Hugging Face id (cais/mmlu)")
    p.add_argument("--boolq", help="BoolQ: .jsonl file, or a Hugging Face id (google/boolq, super_glue/boolq)")
    p.add_argument("--c4", help="C4: .jsonl file or directory of documents, or a Hugging Face id (allenai/c4)")
    p.add_argument("--shots", type=int, default=5, help="MMLU examples in the prompt (default: 5)")
    p.add_argument("--subjects", help="comma-separated MMLU subjects (default: all)")
    p.add_argument("--limit", type=int, help="first N questions per MMLU subject, BoolQ examples, lm-eval examples")
    p.add_argument("--boolq-limit", type=int, help="first N BoolQ examples (default: --limit, else all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--c4-sequences", type=int, default=64, help="C4: packed sequences to score (default: 64)")
    p.add_argument("--c4-seq-len", type=int, default=512, help="C4: tokens per sequence (default: 512)")
    p.add_argument("--c4-config", help="C4: Hugging Face dataset config (default: 'en' for allenai/c4)")
    p.add_argument("--seed", type=int, default=0, help="C4: seed of the document sample (default: 0)")
    p.add_argument("--lm-eval", help="comma-separated lm-evaluation-harness tasks to run too (e.g. hellaswag,arc_easy;"
                                     " arc_easy_local reads a local copy)")
    p.add_argument("--lm-eval-include", help="directory of your own lm-eval task YAMLs")
    p.add_argument("--lm-eval-data", help="data directory for the bundled local lm-eval tasks "
                                          "(default: $DEPTHPRUNE_DATA)")
    p.add_argument("--lm-eval-fewshot", type=int, help="override the lm-eval tasks' number of shots")
    p.add_argument("--details", action="store_true", help="also record each question's scores in --out")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.set_defaults(run=_run_eval)
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
