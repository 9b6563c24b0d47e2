"""``depthprune sweep``: the paper's experiment. Its flags are the keys of ``SweepConfig`` (every stage's options
and every registered criterion's and task's), one per key, plus each task's data flag and ``--heal-option``."""

from __future__ import annotations

import argparse

from ..evaluate.registry import add_task_data_options, given_sources
from ..options import add_options, given_options
from ..sweep.config import sweep_config_class
from .parser import MODEL_HELP


def add_parser(commands) -> argparse.ArgumentParser:
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
    add_options(p, sweep_config_class(), exclude={"model"}, title="settings (each also a key of --config)")
    add_task_data_options(p, title="task data (YAML: the task's name, e.g. `mmlu: DIR`)")
    p.add_argument("--heal-option", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="an option of `depthprune heal` for every healed point (repeatable; YAML: heal_options), "
                        "e.g. --heal-option steps=20 --heal-option rank=8")
    return p


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE (e.g. steps=20)")
    return key.strip().replace("-", "_"), value.strip()


def run(args) -> None:
    from ..report.html import write_report
    from ..sweep.run import run_sweep
    from ..sweep.settings import resolve_config

    overrides = {**given_options(args, sweep_config_class()), "model": args.model, **given_sources(args)}
    if args.heal_option:
        overrides["heal_options"] = dict(args.heal_option)
    config = resolve_config(args.config, **overrides)
    out = run_sweep(config, force=args.force, quiet=args.quiet, ray=args.ray)
    print(f"report: {write_report(out)}")
