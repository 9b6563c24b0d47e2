"""Evaluation tasks, one module each: MMLU (``mmlu``), BoolQ (``boolq``), C4 validation loss (``c4``),
lm-evaluation-harness tasks (``lm_eval_bridge``); ``suite.evaluate`` runs any of them on one model.

Note: ``depthprune.evaluate`` (the attribute of the top-level package) is the *function*
:func:`depthprune.evaluate.suite.evaluate`, so ``from depthprune import evaluate`` gives the function.
Import the task modules with ``from``: ``from depthprune.evaluate.mmlu import evaluate_mmlu`` or
``from depthprune.evaluate import mmlu`` (``import depthprune.evaluate.mmlu as m`` does not work).
"""

from .boolq import evaluate_boolq
from .c4 import c4_loss, sequence_losses
from .mmlu import evaluate_mmlu
from .scoring import ChoiceRequest, choice_loglikelihoods, encode_choices
from .suite import evaluate

__all__ = [
    "ChoiceRequest",
    "c4_loss",
    "choice_loglikelihoods",
    "encode_choices",
    "evaluate",
    "evaluate_boolq",
    "evaluate_mmlu",
    "sequence_losses",
]
