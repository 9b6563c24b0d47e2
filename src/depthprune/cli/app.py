"""Command line: parses arguments and calls the library. ``depthprune --help`` lists the commands."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys

from ..errors import DepthpruneError

MODEL_HELP = (
    "Hugging Face id, checkpoint directory, .gguf file, or embedded alias (smollm2-135m, gemma3-270m)"
)

# The flags of analyze, prune, eval and sweep come from the stage options (depthprune.config) and the
# registries (criteria, tasks): this module declares only what belongs to one command. It imports
# nothing heavy at the top, so `depthprune --help` answers at once.


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from ..config import ModelOptions
    from ..options import add_options

    p.add_argument("model", help=MODEL_HELP)
    add_options(p, ModelOptions, title="model")


def _model_kwargs(args) -> dict:
    from ..config import ModelOptions
    from ..options import given_options

    return dataclasses.asdict(ModelOptions(**given_options(args, ModelOptions)))


def _add_data_options(p: argparse.ArgumentParser, required: bool) -> None:
    from ..config import AnalysisOptions, DataOptions, MemoryOptions
    from ..options import add_options

    add_options(p, DataOptions, title="calibration data", required=["source"] if required else ())
    add_options(p, AnalysisOptions, title="analysis")
    add_options(p, MemoryOptions, title="memory")


def _data_options(args):
    from ..config import DataOptions
    from ..options import given_options

    if args.source is None:
        return None
    return DataOptions(**given_options(args, DataOptions))


def _analysis_kwargs(args) -> dict:
    from ..config import AnalysisOptions
    from ..options import given_options

    return dataclasses.asdict(AnalysisOptions(**given_options(args, AnalysisOptions)))


def _memory_kwargs(args) -> dict:
    from ..config import MemoryOptions
    from ..options import given_options

    return dataclasses.asdict(MemoryOptions(**given_options(args, MemoryOptions)))


def _run_analyze(args) -> None:
    from ..api import analyze

    result = analyze(args.model, _data_options(args), args.out, force=args.force, **_analysis_kwargs(args),
                     **_memory_kwargs(args), **_model_kwargs(args))
    print(f"\n{result.meta['model']}: {result.num_layers} layers, {result.num_samples} samples, "
          f"{result.tokens} token(s)")
    print(f"{'n':>4}  {'best block':>12}  {'distance':>8}")
    for n in range(1, result.num_layers + 1):
        start, distance = result.best(n)
        print(f"{n:>4}  {f'{start}-{start + n - 1}':>12}  {distance:8.4f}")
    print(f"\nwrote {args.out}/distances.json, distances.csv, heatmap.png "
          "(blocks are 0-based, inclusive layer ranges)")


def _run_prune(args) -> None:
    from ..api import prune

    common = dict(n=args.n, fraction=args.fraction, layers=args.layers, criterion=args.criterion,
                  distances=args.distances, data=_data_options(args), force=args.force, **_analysis_kwargs(args))
    if (args.format or ("gguf" if args.out.lower().endswith(".gguf") else "checkpoint")) == "gguf":
        from ..gguf.prune import prune_gguf

        record = prune_gguf(args.model, args.out, swa_pattern=args.swa_pattern, **common)
    else:
        record = prune(args.model, args.out, **common, **_memory_kwargs(args), **_model_kwargs(args))
    from ..select import format_layers

    distance = record["angular_distance"]
    print(f"removed layers {format_layers(record['removed_layers'])} (0-based, inclusive) by {record['criterion']}"
          + (f", angular distance {distance:.4f}" if distance is not None else ""))
    print(f"layers:     {record['layers_before']:>12,} -> {record['layers_after']:,}")
    print(f"parameters: {record['parameters_before']:>12,} -> {record['parameters_after']:,} "
          f"({100 * (1 - record['parameters_after'] / record['parameters_before']):.1f}% fewer)")
    if "bytes_after" in record:
        print(f"file size:  {record['bytes_before']:>12,} -> {record['bytes_after']:,} bytes (quantization kept)")
    print(f"saved the pruned model to {args.out}")


def _run_export(args) -> None:
    from ..gguf.export import export

    out = export(args.model, args.out, args.format, args.outtype, swa_pattern=args.swa_pattern,
                 tokenizer=args.tokenizer_gguf, force=args.force)
    print(f"wrote {out}")


def _run_eval(args) -> None:
    from ..config import EvalOptions
    from ..evaluate.registry import given_sources
    from ..evaluate.suite import evaluate, summary_rows
    from ..options import given_options

    options = EvalOptions(**given_options(args, EvalOptions))
    result = evaluate(args.model, args.tasks, options=options, details=args.details, out=args.out,
                      **_model_kwargs(args), **given_sources(args))
    removed = result.get("removed_layers")
    print(f"\n{result['model']}: {result['num_layers']} layers"
          + (f" ({len(removed)} removed from {result['layers_before']})" if removed else ""))
    print(f"{'task':<24} {'metric':<32} {'value':>8} {'baseline':>9} {'n':>8}")
    for task, metric, value, baseline, count in summary_rows(result):
        base = f"{baseline:9.4f}" if baseline is not None else f"{'':>9}"
        print(f"{task:<24} {metric:<32} {value:8.4f} {base} {count if count is not None else '':>8}")
    if args.out:
        print(f"\nwrote {args.out}")

def _run_heal(args) -> None:
    from ..heal import HealOptions, heal
    from ..options import given_options

    options = given_options(args, HealOptions)
    result = heal(args.model, args.data, args.out, val_data=args.val_data, preset=args.preset, device=args.device,
                  dtype=args.dtype, save_adapter=args.save_adapter, force=args.force, restart=args.restart,
                  stop_after=args.stop_after, trust_remote_code=args.trust_remote_code, **options)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # a data-parallel run: rank 0 reports
    if "stopped_at_step" in result:
        print(f"stopped after step {result['stopped_at_step']} of {result['steps']}; rerun the same command to continue")
        return
    if result.get("already_healed"):
        print(f"{args.out} already holds the healed model of this command ({result['method']}, {result['steps']} "
              "steps); pass --force to heal again and replace it")
        return
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"healed with {result['method']}: {result['steps']} steps, {result['tokens']:,} tokens")
    print(f"train loss (last steps) {fmt(result['final_train_loss'])}; validation loss "
          f"{fmt(result['val_loss_before'])} -> {fmt(result['val_loss_after'])}")
    print(f"saved the merged model to {args.out}")


def _add_heal_parser(commands) -> None:
    from ..heal import HEAL_METHODS, PRESETS, HealOptions
    from ..options import add_options

    p = commands.add_parser("heal", help="fine-tune a pruned model on C4 (" + ", ".join(HEAL_METHODS.names())
                            + ", distillation); resumable")
    p.add_argument("model", help="the pruned checkpoint directory (or any model: " + MODEL_HELP + ")")
    p.add_argument("--data", required=True, help="training text: .jsonl/.json/.txt/.parquet file, directory, or "
                                                 "Hugging Face dataset id (e.g. allenai/c4 --data-config en)")
    p.add_argument("--val-data", help="held-out text scored with the C4-loss evaluator (default: the validation "
                                      "split of a Hugging Face --data)")
    p.add_argument("--out", required=True, help="output directory: checkpoints and log while running, the merged "
                                                "model at the end; rerun the same command to resume")
    p.add_argument("--force", action="store_true", help="replace what --out holds (an older result, other files) "
                                                        "once the new model is complete; meanwhile the run works "
                                                        "in OUT.unfinished")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run in --out (its checkpoint and "
                                                          "log) and start over")
    p.add_argument("--preset", choices=list(PRESETS), help="paper: the paper's recipe (default); cpu-small: a run "
                                                           "that finishes in minutes on a CPU. Options below win.")
    p.add_argument("--method", choices=HEAL_METHODS.names(), help=HEAL_METHODS.help() + " (default: qlora)")
    p.add_argument("--stop-after", type=int, help="stop this invocation after N steps, with a checkpoint")
    p.add_argument("--save-adapter", action="store_true", help="also save the LoRA adapter alone in OUT/adapter")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="cpu, cuda (one GPU per process, also under torchrun) or auto (one process over all GPUs)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own Python code")
    add_options(p, HealOptions, exclude=["method"], title="healing options (--steps or --train-tokens)")
    p.set_defaults(run=_run_heal)


def _run_sweep(args) -> None:
    from ..config import SweepConfig
    from ..evaluate.registry import given_sources
    from ..options import given_options
    from ..report.html import write_report
    from ..sweep.run import run_sweep
    from ..sweep.settings import resolve_config

    overrides = {**given_options(args, SweepConfig), "model": args.model, **given_sources(args)}
    if args.heal_option:
        overrides["heal_options"] = dict(args.heal_option)
    config = resolve_config(args.config, **overrides)
    out = run_sweep(config, force=args.force, quiet=args.quiet, ray=args.ray)
    print(f"report: {write_report(out)}")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE (e.g. steps=20)")
    return key.strip().replace("-", "_"), value.strip()


def _run_results(args) -> None:
    from ..outputs import atomic_write_text, check_output_file
    from ..report.terminal import results_lines
    from ..sweep.store import DB_NAME, load_failed, load_points, to_csv

    if args.csv not in (None, "-"):  # before reading anything: a bad path fails alone
        check_output_file(args.csv, inputs=[os.path.join(args.directory, DB_NAME)], what="CSV file")
    points = load_points(args.directory)
    print("\n".join(results_lines(args.directory, points, load_failed(args.directory), every_column=args.all)))
    if args.csv == "-":
        print(to_csv(points), end="")
    elif args.csv:
        atomic_write_text(args.csv, to_csv(points))
        print(f"wrote {args.csv}")


def _run_report(args) -> None:
    from ..report.html import write_report

    print(f"wrote {write_report(args.directory, args.sigmas)}")

class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, no usage block, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"depthprune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="depthprune",
        description="Remove whole transformer layers by angular distance (Gromov et al. 2024).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from ..config import EvalOptions, SweepConfig
    from ..evaluate.registry import EVAL_TASKS, add_task_data_options
    from ..options import add_options
    from ..select import CRITERIA

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
    p.add_argument("--criterion", default="similarity", choices=CRITERIA.names(),
                   help="which layers to remove (default: similarity). " + CRITERIA.help())
    p.add_argument("--distances", help="directory written by `depthprune analyze` (else measured from --data)")
    _add_data_options(p, required=False)
    p.add_argument("--out", required=True, help="output directory for the pruned checkpoint, or a .gguf file")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--format", choices=["checkpoint", "gguf"],
                   help="gguf: cut the GGUF file itself, keeping its quantization (default when --out ends in .gguf)")
    p.add_argument("--swa-pattern", default="period", choices=["period", "array"],
                   help="GGUF sliding-window models: period refuses a cut that changes a layer's attention type "
                        "under llama.cpp's fixed period; array writes a per-layer pattern (newer llama.cpp only)")
    p.set_defaults(run=_run_prune)

    p = commands.add_parser("export", help="write a checkpoint as a GGUF file for llama.cpp, or as a mergekit recipe")
    p.add_argument("model", help="checkpoint directory (pruned, healed or merged)")
    p.add_argument("--format", default="gguf", choices=["gguf", "mergekit"],
                   help="gguf (Llama, Gemma 3) or mergekit (passthrough YAML that rebuilds the cut)")
    p.add_argument("--outtype", default="f16", choices=["f16", "bf16", "q8_0"], help="GGUF weight type (default f16)")
    p.add_argument("--swa-pattern", default="period", choices=["period", "array"], help="as for prune")
    p.add_argument("--tokenizer-gguf", help="GGUF file to copy the tokenizer from (default: the checkpoint's source)")
    p.add_argument("--out", required=True, help="output .gguf or .yml file")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(run=_run_export)

    _add_heal_parser(commands)

    p = commands.add_parser("eval", help="evaluate a model: " + ", ".join(t.name for t in EVAL_TASKS)
                                         + ", lm-eval tasks")
    _add_model_options(p)
    p.add_argument("--tasks", help=f"comma-separated: {','.join(EVAL_TASKS.names())} (default: the tasks given a "
                                   "data option)")
    add_task_data_options(p, title="task data")
    add_options(p, EvalOptions, title="evaluation")
    p.add_argument("--details", action="store_true", help="also record each question's scores in --out")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.set_defaults(run=_run_eval)

    p = commands.add_parser("sweep", help="the paper's experiment: evaluate cuts of growing size, healed or not")
    p.add_argument("model", nargs="?", help=MODEL_HELP + " (or `model:` in --config)")
    p.add_argument("--config", help="YAML file of sweep settings: the options below, with underscores "
                                    "(flags win over the file)")
    p.add_argument("--force", action="store_true",
                   help="start over: the new sweep runs in a hidden folder beside --out (.OUT.depthprune-force) "
                        "that replaces --out only once complete, so the old sweep stays intact until then; "
                        "after an interruption, rerun with --force to continue the new sweep")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars: one line per stage (and one a minute while a long stage runs), for logs")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the points as Ray tasks: alone, on a local Ray instance; 'auto', on the cluster this "
                        "machine joined (`ray start`); HOST:PORT or ray://HOST:PORT, on that cluster (needs "
                        "depthprune[ray]; see the README's 'Past one machine')")
    add_options(p, SweepConfig, exclude={"model"}, title="settings (each also a key of --config)")
    add_task_data_options(p, title="task data (YAML: the task's name, e.g. `mmlu: DIR`)")
    p.add_argument("--heal-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="an option of `depthprune heal` for every healed point (repeatable; YAML: heal_options), "
                        "e.g. --heal-option steps=20 --heal-option rank=8")
    p.set_defaults(run=_run_sweep)

    p = commands.add_parser("results", help="print the results table of a sweep directory",
                            description="Print the compared columns of a sweep's points in 160 characters (a "
                                        "footer names any left out); exit status 2 with one line when the directory "
                                        "has no finished point yet.")
    p.add_argument("directory")
    p.add_argument("--all", action="store_true", help="every column of the store, however wide")
    p.add_argument("--csv", metavar="FILE", help="also export every column as CSV ('-' for standard output)")
    p.set_defaults(run=_run_results)

    p = commands.add_parser("report", help="draw the figures of a sweep and write one self-contained HTML file")
    p.add_argument("directory")
    p.add_argument("--sigmas", type=float, default=2.0,
                   help="noise threshold of a collapse, in standard errors of the accuracy: a curve collapses where it "
                        "comes within this many SE of chance or drops this many combined SE below the full model "
                        "(default 2; the report states the rule)")
    p.set_defaults(run=_run_report)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so every ``finally`` and temporary-file clean-up runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


DISK_FULL = "no space left on the disk: free some space and rerun (nothing half-written was kept)"


def _is_disk_full(exc: BaseException) -> bool:
    # Writers in Rust or C (safetensors, sqlite) report ENOSPC in their own exception types: look at the
    # whole chain and at the text, not only at OSError.errno.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _os_error_message(exc: OSError) -> str:
    where = f" '{exc.filename}'" if exc.filename else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a path you can write, or fix its permissions"
    return f"{exc.strerror or exc}{where}: check the path and rerun"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        args.run(args)
    except DepthpruneError as exc:
        print(f"depthprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthprune: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("depthprune: terminated", file=sys.stderr)
        return 143
    except Exception as exc:
        if args.debug:
            raise
        if _is_disk_full(exc):
            print(f"depthprune: error: {DISK_FULL}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            print(f"depthprune: error: {_os_error_message(exc)}", file=sys.stderr)
            return 2
        # The safety net: a failure without its own message is a bug to report, hence exit status 1.
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"depthprune: error: internal error ({type(exc).__name__}: {first}); rerun with --debug for the "
              "traceback and report it", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

