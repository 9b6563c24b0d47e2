"""``depthprune.json``: the record a pruned (and healed) checkpoint carries, and its one reader and writer.

The record says where the checkpoint came from and what was done to it: the source model, the removed
layers and why (:func:`pruning_record`), and after healing a ``healing`` record. A sub-layer cut also records
its ``granularity`` ('attention' or 'mlp'; 'layer' for whole layers) and ``removed_sublayers``
({"attention": [...], "mlp": [...]}, 0-based layer indices; :func:`removed_sublayers` reads it), which loading
turns back into stand-ins that cost nothing (:mod:`.sublayers`). Every stage reads it
through :func:`read_record`, so a damaged file is refused everywhere with the same message.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data import read_json
from ..errors import DepthpruneError
from .granularity import GRANULARITIES, SUBLAYER_KINDS
from .layout import count_parameters, num_layers
from .sublayers import removed_sublayers_of

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
    _check_sublayers(record, path, remedy)
    return record


def _is_index_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _check_sublayers(record: dict, path: Path, remedy: str) -> None:
    granularity = record.get("granularity", "layer")
    if granularity not in GRANULARITIES:
        raise DepthpruneError(f"'{path}' is damaged: granularity is {granularity!r}, expected one of "
                              f"{', '.join(GRANULARITIES)}; {remedy}")
    sublayers = record.get("removed_sublayers")
    if sublayers is None:
        return
    if not (isinstance(sublayers, dict) and set(sublayers) <= set(SUBLAYER_KINDS)
            and all(map(_is_index_list, sublayers.values()))):
        raise DepthpruneError(f"'{path}' is damaged: removed_sublayers is {sublayers!r}, expected "
                              '{"attention": [layer numbers], "mlp": [layer numbers]}; ' + remedy)


def removed_sublayers(record: dict | None) -> dict[str, list[int]]:
    """The sub-layers a (read, checked) record says are removed: {kind: sorted layer indices}, kinds with none
    left out; {} for a whole-layer cut, an old record or none."""
    found = (record or {}).get("removed_sublayers") or {}
    return {kind: sorted(found[kind]) for kind in SUBLAYER_KINDS if found.get(kind)}


def write_record(folder: Path, record: dict) -> None:
    """Write ``record`` as ``folder``'s ``depthprune.json`` (into a folder not yet in place: not atomic)."""
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def pruning_record(source: str, layers_before: int, params_before: int, model, selection) -> dict:
    """What ``depthprune.json`` says about a cut: source, granularity, removed layers or sub-layers and why (the
    criterion and its own scores), sizes before and after.

    ``model`` is the cut model: its :class:`~.sublayers.RemovedSublayer` stand-ins (this cut's, and a sub-layer cut
    it was loaded from) are its ``removed_sublayers``; their weights do not count in ``parameters_after``.
    """
    granularity = selection.granularity
    record = {
        "source_model": source,
        "granularity": granularity,
        "removed_layers": list(selection.layers) if granularity == "layer" else [],
        "removed_layers_note": "0-based indices into the source model's layers, inclusive",
        "criterion": selection.criterion,
        "angular_distance": selection.distance,
        "layers_before": layers_before,
        "layers_after": num_layers(model),
        "parameters_before": params_before,
        "parameters_after": count_parameters(model),
    }
    sublayers = removed_sublayers_of(model)
    if sublayers:
        record["removed_sublayers"] = {kind: sublayers.get(kind, []) for kind in SUBLAYER_KINDS}
        record["removed_sublayers_note"] = ("0-based layer indices whose attention or MLP was removed: its weights are "
                                            "zeros, so it adds nothing to the residual stream")
    if selection.scores:
        record["criterion_scores"] = selection.scores
    return record
