"""Evaluation tasks, one module each, registered in ``EVAL_TASKS`` (``registry.py``): MMLU (``mmlu``), BoolQ
(``boolq``), C4 validation loss (``c4``), ARC-Easy (``arc_easy``), HellaSwag (``hellaswag``); lm-evaluation-harness
tasks through ``lm_eval_bridge``. ``suite.evaluate`` (exported as ``depthprune.evaluate_model``) runs any of
them on one model.

Importing this package registers every task of ``tasks/`` (a new task is one new file there) without
importing torch; the functions below load on first use. ``EvalOptions`` is the evaluation's options with
those of the tasks registered when it is read (``registry.eval_options_class``).
"""

from __future__ import annotations

import importlib

from ..registry import import_plugins
from .registry import EVAL_TASKS, EvalTask, eval_options_class

import_plugins(f"{__name__}.tasks")  # each registers itself; its ``order`` places it

_LAZY = {
    "evaluate": ("suite", "evaluate"),
    "summary_rows": ("suite", "summary_rows"),
    "predictions": ("suite", "predictions"),
    "evaluate_mmlu": ("tasks.mmlu", "evaluate_mmlu"),
    "evaluate_boolq": ("tasks.boolq", "evaluate_boolq"),
    "c4_loss": ("tasks.c4", "c4_loss"),
    "ChoiceRequest": ("scoring", "ChoiceRequest"),
    "choice_loglikelihoods": ("scoring", "choice_loglikelihoods"),
    "encode_choices": ("scoring", "encode_choices"),
}

__all__ = ["EVAL_TASKS", "EvalOptions", "EvalTask", "eval_options_class", *sorted(_LAZY)]


def __getattr__(name: str):
    if name == "EvalOptions":
        return eval_options_class()
    if name not in _LAZY:
        raise AttributeError(f"module 'depthprune.evaluate' has no attribute '{name}'")
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attribute)
