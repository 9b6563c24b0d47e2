"""``depthprune.json``: the record a pruned (and healed) checkpoint carries, and its one reader and writer.

The record says where the checkpoint came from and what was done to it: the source model, the removed
layers and why (:func:`pruning_record`), and after healing a ``healing`` record. Every stage reads it
through :func:`read_record`, so a damaged file is refused everywhere with the same message.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import read_json
from ..errors import DepthpruneError
from .load import count_parameters, num_layers

RECORD_FILE = "depthprune.json"
PRUNE_AGAIN = "delete it or prune the model again"


def read_record(model_dir: str | Path, remedy: str = PRUNE_AGAIN) -> dict | None:
    """The ``depthprune.json`` of a checkpoint folder, or None for an ordinary checkpoint; a damaged one is an
    error that ends in ``remedy`` (what to do about it)."""
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    record = read_json(path)  # not JSON: an error naming the file, line and column
    if not isinstance(record, dict):
        raise DepthpruneError(f"'{path}' is damaged: expected a JSON object, found a {type(record).__name__}; "
                              f"{remedy}")
    removed = record.get("removed_layers")
    if removed is not None and not (isinstance(removed, list)
                                    and all(isinstance(i, int) and not isinstance(i, bool) for i in removed)):
        raise DepthpruneError(f"'{path}' is damaged: removed_layers is {removed!r}, expected a list of layer numbers; "
                              f"{remedy}")
    return record


def write_record(folder: Path, record: dict) -> None:
    """Write ``record`` as ``folder``'s ``depthprune.json`` (into a folder not yet in place: not atomic)."""
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def pruning_record(source: str, layers_before: int, params_before: int, model, selection) -> dict:
    """What ``depthprune.json`` says about a cut: source, removed layers and why (the criterion and its own
    scores), sizes before and after."""
    record = {
        "source_model": source,
        "removed_layers": list(selection.layers),
        "removed_layers_note": "0-based indices into the source model's layers, inclusive",
        "criterion": selection.criterion,
        "angular_distance": selection.distance,
        "layers_before": layers_before,
        "layers_after": num_layers(model),
        "parameters_before": params_before,
        "parameters_after": count_parameters(model),
    }
    if selection.scores:
        record["criterion_scores"] = selection.scores
    return record
