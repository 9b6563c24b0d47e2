"""Evaluation tasks, one module each, registered in ``EVAL_TASKS`` (``registry.py``): MMLU (``mmlu``), BoolQ
(``boolq``), C4 validation loss (``c4``), ARC-Easy (``arc``), HellaSwag (``hellaswag``); lm-evaluation-harness
tasks through ``lm_eval_bridge``. ``suite.evaluate`` (exported as ``depthprune.evaluate_model``) runs any of
them on one model.

Importing this package registers the built-in tasks without importing torch; the functions below load on
first use.
"""

from __future__ import annotations

import importlib

from .registry import EVAL_TASKS, EvalTask

# The built-in tasks, in the order of the CLI, the sweep's default table and the report.
BUILT_IN = ("mmlu", "boolq", "c4", "arc", "hellaswag")
for _module in BUILT_IN:
    importlib.import_module(f".tasks.{_module}", __name__)

_LAZY = {
    "evaluate": ("suite", "evaluate"),
    "summary_rows": ("suite", "summary_rows"),
    "evaluate_mmlu": ("tasks.mmlu", "evaluate_mmlu"),
    "evaluate_boolq": ("tasks.boolq", "evaluate_boolq"),
    "c4_loss": ("tasks.c4", "c4_loss"),
    "sequence_losses": ("tasks.c4", "sequence_losses"),
    "ChoiceRequest": ("scoring", "ChoiceRequest"),
    "choice_loglikelihoods": ("scoring", "choice_loglikelihoods"),
    "encode_choices": ("scoring", "encode_choices"),
}

__all__ = ["EVAL_TASKS", "EvalTask", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'depthprune.evaluate' has no attribute '{name}'")
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attribute)
