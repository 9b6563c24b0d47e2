"""``depthprune eval``: evaluate a model on the registered tasks (each with its data flag and its own options)
and lm-evaluation-harness tasks; print the summary table, optionally write the results as JSON."""

from __future__ import annotations

import argparse

from ..evaluate.registry import EVAL_TASKS, add_task_data_options, eval_options_class, given_sources
from ..options import add_options, given_options
from .parser import add_model_options, model_kwargs


def add_parser(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("eval", help="evaluate a model: " + ", ".join(t.name for t in EVAL_TASKS)
                                         + ", lm-eval tasks")
    add_model_options(p)
    p.add_argument("--tasks", help=f"comma-separated: {','.join(EVAL_TASKS.names())} (default: the tasks given a "
                                   "data option)")
    add_task_data_options(p, title="task data")
    add_options(p, eval_options_class(), title="evaluation")
    p.add_argument("--details", action="store_true", help="also record each question's scores in --out")
    p.add_argument("--reference", metavar="MODEL", help="also evaluate MODEL (e.g. the unpruned model; same device, "
                   "dtype and task options) first, and report each multiple-choice task's agreement: the share of "
                   "questions where the model picks the reference's choice")
    p.add_argument("--out", help="write the results as JSON to this file")
    return p


def run(args) -> None:
    from ..evaluate.suite import evaluate, summary_rows

    options_class = eval_options_class()
    options = options_class(**given_options(args, options_class))
    result = evaluate(args.model, args.tasks, options=options, details=args.details, out=args.out, reference=args.reference,
                      **model_kwargs(args), **given_sources(args))
    removed = result.get("removed_layers")
    print(f"\n{result['model']}: {result['num_layers']} layers"
          + (f" ({len(removed)} removed from {result['layers_before']})" if removed else ""))
    print(f"{'task':<24} {'metric':<32} {'value':>8} {'baseline':>9} {'n':>8}")
    for task, metric, value, baseline, count in summary_rows(result):
        base = f"{baseline:9.4f}" if baseline is not None else f"{'':>9}"
        print(f"{task:<24} {metric:<32} {value:8.4f} {base} {count if count is not None else '':>8}")
    if args.out:
        print(f"\nwrote {args.out}")
