"""The evaluation tasks, one module each, in the ``EVAL_TASKS`` registry.

An :class:`EvalTask` says everything the rest of the program needs about a task: its data flag and help
(``--mmlu DIR_OR_ID``), how to read its data cheaply before a model loads (``check``), how to run it
(``run``), its headline metric and whether higher is better, its chance or majority level, how its result
becomes the flat metrics of the results store (``flatten``) and the rows of the printed summary
(``summary``). ``suite.evaluate``, the ``eval`` and ``sweep`` flags, the sweep's checks and the report's
titles all read it. lm-evaluation-harness tasks are not here: they are lm-eval's (``lm_eval_bridge``).

A task may declare ``options``, a dataclass of ``option(...)`` fields of its own (MMLU's ``shots``, C4's
``c4_seq_len``). :func:`eval_options_class` composes the evaluation's options: those every task shares
(:class:`depthprune.config.SharedEvalOptions`), then each registered task's, one flat dataclass whose
instance every task receives (``check``, ``run``, ``lengths``) and reads its own fields from. ``EvalOptions``
read as an attribute of this module (or of ``depthprune.evaluate``) is that class, composed then.

Task modules keep their top level free of torch (``depthprune --help`` imports them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import SharedEvalOptions
from ..options import Checked, compose
from ..registry import AFTER_BUILT_INS, Registry

SummaryRow = tuple[str, str, float, "float | None", "int | None"]  # task, metric, value, baseline, count


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task.

    ``check(source, options)``: read the data as ``run`` will (one-line errors), before any model loads.
    ``run(model, tokenizer, source, options, details=..., progress=...)``: the task's result as a dict.
    ``headline``: the flat metric the report plots (``mmlu_acc``); ``chance``: the level of a model that
    knows nothing when it is fixed (None: the data decide it, e.g. BoolQ's majority class), and
    ``baseline_kind`` says which. ``flatten(result)``: the flat metrics of the store (keeping their names
    stable); ``summary(result)``: rows of the printed table. ``lengths(options)``: (flag, tokens) the
    model must be able to take, e.g. C4's sequence length. ``options``: the dataclass of the task's own
    options. ``order``: its place in the CLI, the sweep's default table and the report (built-ins: 10, 20, ...).
    ``options`` arguments are instances of :func:`eval_options_class`.
    A multiple-choice task gives ``predictions(result)``: each question's predicted choice (an index, the
    choice its headline metric counts; ``agreement_choice`` says which) read from a result run with
    ``details=True``, whose extra keys are ``detail_keys``. ``eval --reference`` compares them.
    """

    name: str
    description: str
    title: str
    flag: str
    metavar: str
    data_help: str
    check: Callable[[str, Any], Any]
    run: Callable[..., dict]
    headline: str
    higher_is_better: bool
    chance: float | None
    flatten: Callable[[dict], dict]
    summary: Callable[[dict], list[SummaryRow]]
    baseline_kind: str = "chance"
    lengths: Callable[[Any], list[tuple[str, int]]] | None = None
    options: type | None = None
    order: int = AFTER_BUILT_INS
    predictions: Callable[[dict], list[int]] | None = None
    detail_keys: tuple[str, ...] = ()
    agreement_choice: str = ""

    @property
    def dest(self) -> str:
        return f"task_source_{self.name}"

    def hint(self) -> str:
        """How to give the data, for messages: '--boolq FILE_OR_ID (a .jsonl file, ...)'."""
        return f"{self.flag} {self.metavar} ({self.data_help})"


EVAL_TASKS: Registry[EvalTask] = Registry("task")


def eval_options_class() -> type:
    """The evaluation's options: the shared ones, then those of every registered task (checked when made)."""
    return compose("EvalOptions", (SharedEvalOptions, *EVAL_TASKS.option_classes()), module=__name__,
                   bases=(Checked,), doc="How the evaluation tasks run: the options every task shares, then each "
                                         "task's own. Each task's data source is its own flag (the task registry).")


def __getattr__(name: str):
    if name == "EvalOptions":
        return eval_options_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_task_data_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, title: str | None = None) -> None:
    """One data flag per registered task (``--mmlu DIR_OR_ID``, ...)."""
    target = parser.add_argument_group(title) if title else parser
    for task in EVAL_TASKS:
        target.add_argument(task.flag, dest=task.dest, metavar=task.metavar, default=None,
                            help=f"{task.description}: {task.data_help}")


def given_sources(args: argparse.Namespace) -> dict[str, str]:
    """The task data the user gave on the command line, by task name."""
    return {task.name: getattr(args, task.dest) for task in EVAL_TASKS if getattr(args, task.dest, None) is not None}


def agreement_rows(name: str, result: dict) -> list[SummaryRow]:
    """The summary row of ``agreement`` (share of questions answered as the reference model does), if measured."""
    if "agreement" not in result:
        return []
    return [(name, "agreement with reference", result["agreement"], None, result["agreement_n"])]


def accuracy_flatten(name: str, chance_key: str = "chance") -> Callable[[dict], dict]:
    """``{name}_acc`` (and ``{name}_acc_norm`` when the result has ``accuracy_norm``) and ``{name}_chance``."""

    def flatten(result: dict) -> dict:
        metrics = {f"{name}_acc": result["accuracy"]}
        if "accuracy_norm" in result:
            metrics[f"{name}_acc_norm"] = result["accuracy_norm"]
        metrics[f"{name}_chance"] = result.get(chance_key)
        if "agreement" in result:
            metrics[f"{name}_agreement"] = result["agreement"]
        return metrics

    return flatten
