"""depthprune: remove whole transformer layers from causal LMs (Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers"), then heal and evaluate the smaller model."""

from .api import DataOptions, analyze, measure, prune
from .data import load_texts
from .errors import DepthpruneError

# `depthprune.evaluate` is the function, not the subpackage of the same name: this import loads the
# subpackage (binding the name to it), then rebinds the name to the function, so `from depthprune import
# evaluate` gives the function while `from depthprune.evaluate.mmlu import ...` still finds the modules.
from .evaluate.suite import evaluate
from .heal import HealOptions, heal
from .models import EMBEDDED_MODELS, count_parameters, decoder_layout, load_model, num_layers
from .select import Selection, choose_block, explicit_selection, parse_layers
from .similarity import AngularDistances, compute_distances, load_distances, measure_distances
from .surgery import read_record, remove_layers, save_pruned

__version__ = "0.1.0"

__all__ = [
    "AngularDistances",
    "DataOptions",
    "DepthpruneError",
    "EMBEDDED_MODELS",
    "HealOptions",
    "Selection",
    "analyze",
    "choose_block",
    "compute_distances",
    "count_parameters",
    "evaluate",
    "decoder_layout",
    "explicit_selection",
    "heal",
    "load_distances",
    "load_model",
    "load_texts",
    "measure",
    "measure_distances",
    "num_layers",
    "parse_layers",
    "prune",
    "read_record",
    "remove_layers",
    "save_pruned",
]
