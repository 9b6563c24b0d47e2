"""Command line: parses arguments and calls the library. ``depthprune --help`` lists the commands."""

from __future__ import annotations

import argparse
import os
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


def _run_heal(args) -> None:
    from .heal import heal

    targets = args.target_modules.split(",") if args.target_modules else None
    options = dict(method=args.method, steps=args.steps, tokens=args.tokens, batch_size=args.batch_size,
                   grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr, rank=args.rank, alpha=args.alpha,
                   dropout=args.dropout, target_modules=targets, warmup=args.warmup, schedule=args.schedule,
                   weight_decay=args.weight_decay, teacher=args.teacher, kd_weight=args.kd_weight,
                   kd_temperature=args.kd_temperature, eval_every=args.eval_every, save_every=args.save_every,
                   val_sequences=args.val_sequences, seed=args.seed, text_field=args.text_field,
                   data_config=args.data_config, data_split=args.data_split,
                   gradient_checkpointing=args.gradient_checkpointing or None)
    result = heal(args.model, args.data, args.out, val_data=args.val_data, preset=args.preset, device=args.device,
                  dtype=args.dtype, save_adapter=args.save_adapter, force=args.force, stop_after=args.stop_after,
                  trust_remote_code=args.trust_remote_code, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # a data-parallel run: rank 0 reports
    if "stopped_at_step" in result:
        print(f"stopped after step {result['stopped_at_step']} of {result['steps']}; rerun the same command to continue")
        return
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"healed with {result['method']}: {result['steps']} steps, {result['tokens']:,} tokens")
    print(f"train loss (last steps) {fmt(result['final_train_loss'])}; validation loss "
          f"{fmt(result['val_loss_before'])} -> {fmt(result['val_loss_after'])}")
    print(f"saved the merged model to {args.out}")


def _add_heal_parser(commands) -> None:
    from .heal import METHODS, PRESETS, SCHEDULES

    p = commands.add_parser("heal", help="fine-tune a pruned model on C4 (QLoRA, LoRA, full, distillation); resumable")
    p.add_argument("model", help="the pruned checkpoint directory (or any model: " + MODEL_HELP + ")")
    p.add_argument("--data", required=True, help="training text: .jsonl/.json/.txt/.parquet file, directory, or "
                                                 "Hugging Face dataset id (e.g. allenai/c4 --data-config en)")
    p.add_argument("--val-data", help="held-out text scored with the C4-loss evaluator (default: the validation "
                                      "split of a Hugging Face --data)")
    p.add_argument("--data-config", help="Hugging Face dataset config (e.g. 'en' for allenai/c4)")
    p.add_argument("--data-split", help="Hugging Face split of --data (default: train)")
    p.add_argument("--text-field", help="field holding the text (default: text)")
    p.add_argument("--out", required=True, help="output directory: checkpoints and log while running, the merged "
                                                "model at the end; rerun the same command to resume")
    p.add_argument("--force", action="store_true", help="discard what --out holds and start over")
    p.add_argument("--preset", choices=list(PRESETS), help="paper: the paper's recipe (default); cpu-small: a run "
                                                           "that finishes in minutes on a CPU. Options below win.")
    p.add_argument("--method", choices=METHODS, help="qlora (4-bit base + LoRA; default), lora, or full")
    p.add_argument("--teacher", help="the unpruned model, for logit distillation (KL to its next-token distribution)")
    p.add_argument("--kd-weight", type=float, help="weight of the distillation loss against the LM loss (default 0.5)")
    p.add_argument("--kd-temperature", type=float, help="softmax temperature of the distillation (default 1)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 5000)")
    length.add_argument("--tokens", type=int, help="training tokens instead of --steps (rounded up to whole steps)")
    p.add_argument("--batch-size", type=int, help="global batch in sequences per step (default 16)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step and process (default 1)")
    p.add_argument("--seq-len", type=int, help="tokens per packed sequence (default 2048)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 64)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: = rank)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument("--target-modules", help="comma-separated module names for LoRA, or all-linear "
                                            "(default: the MLP projections, e.g. gate_proj,up_proj,down_proj)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 100)")
    p.add_argument("--schedule", choices=list(SCHEDULES), help="learning-rate schedule after warm-up (default cosine)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default 500)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 500)")
    p.add_argument("--val-sequences", type=int, help="validation sequences of --seq-len tokens (default 64)")
    p.add_argument("--seed", type=int, help="seed of data order, LoRA init and dropout (default 0)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--stop-after", type=int, help="stop this invocation after N steps, with a checkpoint")
    p.add_argument("--save-adapter", action="store_true", help="also save the LoRA adapter alone in OUT/adapter")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu, cuda (one GPU per process, also under torchrun) or auto (one process over all GPUs)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own Python code")
    p.set_defaults(run=_run_heal)


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

    _add_heal_parser(commands)
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
