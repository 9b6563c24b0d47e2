"""The evaluation tasks, one module each, in the ``EVAL_TASKS`` registry.

An :class:`EvalTask` says everything the rest of the program needs about a task: its data flag and help
(``--mmlu DIR_OR_ID``), how to read its data cheaply before a model loads (``check``), how to run it
(``run``), its headline metric and whether higher is better, its chance or majority level, how its result
becomes the flat metrics of the results store (``flatten``) and the rows of the printed summary
(``summary``). ``suite.evaluate``, the ``eval`` and ``sweep`` flags, the sweep's checks and the report's
titles all read it. lm-evaluation-harness tasks are not here: they are lm-eval's (``lm_eval_bridge``).

Task modules keep their top level free of torch (``depthprune --help`` imports them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    from ..config import EvalOptions

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
    model must be able to take, e.g. C4's sequence length.
    """

    name: str
    description: str
    title: str
    flag: str
    metavar: str
    data_help: str
    check: Callable[[str, EvalOptions], Any]
    run: Callable[..., dict]
    headline: str
    higher_is_better: bool
    chance: float | None
    flatten: Callable[[dict], dict]
    summary: Callable[[dict], list[SummaryRow]]
    baseline_kind: str = "chance"
    lengths: Callable[[EvalOptions], list[tuple[str, int]]] | None = None

    @property
    def dest(self) -> str:
        return f"task_source_{self.name}"

    def hint(self) -> str:
        """How to give the data, for messages: '--boolq FILE_OR_ID (a .jsonl file, ...)'."""
        return f"{self.flag} {self.metavar} ({self.data_help})"


EVAL_TASKS: Registry[EvalTask] = Registry("task")


def add_task_data_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, title: str | None = None) -> None:
    """One data flag per registered task (``--mmlu DIR_OR_ID``, ...)."""
    target = parser.add_argument_group(title) if title else parser
    for task in EVAL_TASKS:
        target.add_argument(task.flag, dest=task.dest, metavar=task.metavar, default=None,
                            help=f"{task.description}: {task.data_help}")


def given_sources(args: argparse.Namespace) -> dict[str, str]:
    """The task data the user gave on the command line, by task name."""
    return {task.name: getattr(args, task.dest) for task in EVAL_TASKS if getattr(args, task.dest, None) is not None}


def accuracy_flatten(name: str, chance_key: str = "chance") -> Callable[[dict], dict]:
    """``{name}_acc`` (and ``{name}_acc_norm`` when the result has ``accuracy_norm``) and ``{name}_chance``."""

    def flatten(result: dict) -> dict:
        metrics = {f"{name}_acc": result["accuracy"]}
        if "accuracy_norm" in result:
            metrics[f"{name}_acc_norm"] = result["accuracy_norm"]
        metrics[f"{name}_chance"] = result.get(chance_key)
        return metrics

    return flatten
