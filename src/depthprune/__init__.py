"""depthprune: remove whole transformer layers from causal LMs (Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers"), then heal and evaluate the smaller model.

The names below are loaded on first use (PEP 562), so ``import depthprune`` and ``depthprune --help`` do
not import torch. ``depthprune.heal`` and ``depthprune.evaluate`` are the subpackages; their main
functions are exported as :func:`heal_model` and :func:`evaluate_model`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import DepthpruneError

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "AngularDistances": ("measure.distances", "AngularDistances"),
    "DataOptions": ("config", "DataOptions"),
    "AnalysisOptions": ("config", "AnalysisOptions"),
    "EvalOptions": ("evaluate", "EvalOptions"),
    "EMBEDDED_MODELS": ("model.load", "EMBEDDED_MODELS"),
    "CRITERIA": ("select", "CRITERIA"),
    "EVAL_TASKS": ("evaluate.registry", "EVAL_TASKS"),
    "HealOptions": ("heal", "HealOptions"),
    "Selection": ("select", "Selection"),
    "analyze": ("api", "analyze"),
    "choose": ("select", "choose"),
    "choose_block": ("select", "choose_block"),
    "count_parameters": ("model.load", "count_parameters"),
    "decoder_layout": ("model.load", "decoder_layout"),
    "evaluate_model": ("evaluate.suite", "evaluate"),
    "explicit_selection": ("select", "explicit_selection"),
    "heal_model": ("heal", "heal"),
    "load_distances": ("measure.distances", "load_distances"),
    "load_model": ("model.load", "load_model"),
    "load_texts": ("data", "load_texts"),
    "measure_distances": ("measure.distances", "measure_distances"),
    "num_layers": ("model.load", "num_layers"),
    "parse_layers": ("select", "parse_layers"),
    "prune": ("api", "prune"),
    "read_record": ("model.record", "read_record"),
    "remove_layers": ("model.surgery", "remove_layers"),
    "save_pruned": ("model.surgery", "save_pruned"),
}

__all__ = [
    "DepthpruneError",
    "AngularDistances",
    "AnalysisOptions",
    "CRITERIA",
    "DataOptions",
    "EMBEDDED_MODELS",
    "EVAL_TASKS",
    "EvalOptions",
    "HealOptions",
    "Selection",
    "analyze",
    "choose",
    "choose_block",
    "count_parameters",
    "decoder_layout",
    "evaluate_model",
    "explicit_selection",
    "heal_model",
    "load_distances",
    "load_model",
    "load_texts",
    "measure_distances",
    "num_layers",
    "parse_layers",
    "prune",
    "read_record",
    "remove_layers",
    "save_pruned",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'depthprune' has no attribute '{name}'")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import analyze, prune
    from .config import AnalysisOptions, DataOptions
    from .data import load_texts
    from .evaluate import EvalOptions
    from .evaluate.registry import EVAL_TASKS
    from .evaluate.suite import evaluate as evaluate_model
    from .heal import HealOptions
    from .heal import heal as heal_model
    from .measure.distances import AngularDistances, load_distances, measure_distances
    from .model.load import EMBEDDED_MODELS, count_parameters, decoder_layout, load_model, num_layers
    from .model.record import read_record
    from .model.surgery import remove_layers, save_pruned
    from .select import CRITERIA, Selection, choose, choose_block, explicit_selection, parse_layers
