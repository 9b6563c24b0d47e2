"""Cutting a model with a repair: check the cut can be repaired exactly, fit the map on the uncut model, remove
the layers, fold the map. Every check comes before anything changes: a refused repair leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import DepthpruneError
from ..model.load import num_layers
from ..model.surgery import remove_layers
from ..options import check_ranges, check_types
from . import REPAIRS
from .capture import capture
from .least_squares import check_tokens
from .site import check_additive, find_site, fold


def repairable_block(layers_removed: Sequence[int], total: int) -> tuple[int, int]:
    """(first removed layer, first layer after the block) of a cut of one contiguous block; a one-line refusal
    otherwise, or when the block starts at layer 0 (no kept layer before it to fold into)."""
    drop = sorted(set(layers_removed))
    if not drop:
        raise DepthpruneError("--repair needs a cut: no layers are removed")
    if drop[0] < 0 or drop[-1] >= total:
        raise DepthpruneError(f"cannot remove layers {drop}: the model has layers 0..{total - 1}")
    if drop != list(range(drop[0], drop[-1] + 1)):
        raise DepthpruneError(f"--repair needs one contiguous block of layers, not {drop}: choose a criterion that "
                              "removes one block (e.g. similarity), or cut without --repair")
    if drop[0] == 0:
        raise DepthpruneError(f"--repair cannot repair a cut starting at layer 0 (layers {drop[0]}-{drop[-1]}): "
                              "no kept layer before it to fold the map into; cut without --repair")
    return drop[0], drop[-1] + 1


def method_options(method: str, options: Any = None) -> dict:
    """The values of ``method``'s own options in ``options`` (None: its defaults), checked, JSON-ready."""
    entry = REPAIRS.get(method)
    options = entry.options() if options is None else options
    names = [f.name for f in dataclasses.fields(entry.options)]
    missing = [name for name in names if not hasattr(options, name)]
    if missing:
        raise DepthpruneError(f"repair '{method}' needs the option(s) {', '.join(missing)}")
    own = entry.options(**{name: getattr(options, name) for name in names})
    check_types(own)
    check_ranges(own)
    return dataclasses.asdict(own)


def repair_cut(model: nn.Module, layers_removed: Sequence[int], sequences: list[list[int]], method: str,
               options: Any = None, pad_token_id: int = 0, batch_size: int = 8, progress: bool = True) -> dict:
    """Remove ``layers_removed`` from the uncut ``model`` in place, repaired by ``method``; the record's ``repair``.

    ``sequences``: calibration token id lists (every id a real token); ``options``: an object with the
    method's options as attributes (None: their defaults). Returns ``{"method", "options", "layer",
    "folded_into", "fit"}`` for ``depthprune.json``: ``layer`` is the kept layer (0-based, in the uncut
    model and the cut one alike) whose MLP output projection ``folded_into`` holds the map.
    """
    entry = REPAIRS.get(method)
    values = method_options(method, options)
    start, stop = repairable_block(layers_removed, num_layers(model))
    site = find_site(model, start - 1)
    real_tokens = sum(len(s) for s in sequences)
    check_tokens(real_tokens, site.hidden_size, values["repair_ridge"])
    check_additive(model, site, max(sequences, key=len))
    calibration = capture(model, site.projection, site.layer, stop, sequences, hidden_size=site.hidden_size,
                          pad_token_id=pad_token_id, batch_size=batch_size,
                          sample_tokens=values["repair_tokens"], norm_power=values["repair_norm_power"],
                          progress=progress)
    result = entry.fit(calibration, entry.options(**values))
    remove_layers(model, layers_removed)
    fold(site, result.transform)
    return {"method": method, "options": values, "layer": site.layer, "folded_into": site.name, "fit": result.record}
