"""A point's cut of the sweep's one loaded model, repaired or not, in memory and undone after.

A plain cut removes the layers for the duration (``model.surgery.layers_removed``: nothing copied); a sub-layer
cut replaces the attention or MLP of the chosen layers by stand-ins that compute nothing
(``model.sublayers.sublayers_removed``), as a loaded sub-layer checkpoint has them. A repaired
cut fits its map on the uncut model with the sweep's calibration text, removes the layers and folds the map
into the kept layer's MLP output projection (``repair.apply.repair_cut``, the path of ``prune --repair``),
and afterwards puts back the layers and that one projection's weights, so the next point meets the model
unchanged: one weight matrix is copied, not the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from ..errors import DepthpruneError
from ..model.load import count_parameters, decoder_layout, num_layers
from ..model.surgery import layers_removed
from .config import SweepConfig
from .plan import Point
from .settings import _data_options, repair_settings


def calibration_sequences(c: SweepConfig, tokenizer, texts: list[str] | None = None) -> list[list[int]]:
    """The sweep's calibration text (``texts``, or read now from ``data``) as token ids: what a repair fits on,
    the same sequences ``prune --repair`` fits on with the same ``--data`` options."""
    from ..data import tokenize
    from ..measure.analysis import load_calibration

    data = _data_options(c)
    return tokenize(texts if texts is not None else load_calibration(data), tokenizer, data.seq_len)


def plain_cut(model, point: Point, layers: Sequence[int]):
    """The cut of ``point`` without its repair, as a context manager: the layers removed, or at a sub-layer
    granularity their attention or MLP."""
    from ..measure.cost import removed

    return removed(model, layers if point.granularity == "layer" else {point.granularity: layers})


def parameters_removed(model, point: Point, layers: Sequence[int]) -> float:
    """The fraction of ``model``'s parameters that ``point``'s cut removes (a repair or a healing changes no
    count; a removed sub-layer's stand-in holds none, as in ``depthprune.json``'s ``parameters_after``)."""
    full = count_parameters(model)
    with plain_cut(model, point, layers) as cut:
        return 1.0 - count_parameters(cut) / full


@contextlib.contextmanager
def point_cut(model, tokenizer, c: SweepConfig, point: Point, layers: Sequence[int],
              sequences: list[list[int]] | None, progress: bool = False,
              fit_on: str | None = None) -> Iterator[tuple[object, dict | None]]:
    """(the cut model, its ``repair`` record or None) while inside; ``model`` comes back as it was.

    ``sequences``: the calibration token ids a repaired point fits on (:func:`calibration_sequences`);
    ``fit_on``: the device the map is fitted on when it is not where the model is (a healed point's base waits
    on the CPU: its repair runs on the GPU all the same, and the model goes back, cut, before it heals)."""
    if not point.repaired:
        with plain_cut(model, point, layers) as cut:
            yield cut, None
        return
    if not sequences:
        raise DepthpruneError(f"{point.key}: a repaired point needs the sweep's calibration text")
    from ..data import pad_id
    from ..repair.apply import repairable_block
    from ..repair.site import find_site

    start, _ = repairable_block(layers, num_layers(model))
    projection = find_site(model, start - 1).projection
    saved = {name: tensor.detach().clone() for name, tensor in projection.named_parameters(recurse=False)}
    # layers_removed of no layers remembers the layers and config and restores them on leaving, whatever the
    # repair removes in between.
    every_layer = decoder_layout(model).layers
    home = next(model.parameters()).device
    with layers_removed(model, ()):
        try:
            if fit_on is not None:
                model.to(fit_on)
            record = _repair(model, tokenizer, c, point, layers, sequences, pad_id(tokenizer), progress)
            if fit_on is not None:  # the removed layers too: they are no longer the model's modules
                model.to(home)
                every_layer.to(home)
            yield model, record
        finally:
            _restore(projection, saved)


def _repair(model, tokenizer, c: SweepConfig, point: Point, layers: Sequence[int], sequences, pad: int,
            progress: bool) -> dict:
    from ..repair.apply import repair_cut

    record = repair_cut(model, layers, sequences, point.repair, repair_settings(c), pad_token_id=pad,
                        batch_size=c.batch_size, progress=progress)
    data = _data_options(c)
    record["calibration"] = {"data": data.source, "samples": data.samples, "seq_len": data.seq_len,
                             "seed": data.seed, "tokens": sum(map(len, sequences))}
    return record


def _restore(projection, saved: dict) -> None:
    import torch

    with torch.no_grad():
        for name, tensor in projection.named_parameters(recurse=False):
            tensor.copy_(saved[name])


def check_repairable(c: SweepConfig, points: list[Point], selections: dict[str, object], model, sequences) -> None:
    """Refuse, before any point runs, a repaired point whose cut cannot be repaired: a block starting at layer 0,
    an architecture whose MLP output is not added to the residual stream unchanged, too little calibration
    text. ``selections``: key -> the point's selection."""
    from ..repair.apply import method_options, repairable_block
    from ..repair.least_squares import check_tokens
    from ..repair.site import check_additive, find_site

    repaired = [p for p in points if p.repaired]
    if not repaired:
        return
    if not sequences:
        raise DepthpruneError("a repaired sweep fits its maps on the calibration text, and it holds no sequence")
    tokens, total = sum(map(len, sequences)), num_layers(model)
    checked_sites = set()
    for point in repaired:
        start, _ = repairable_block(selections[point.key].layers, total)
        site = find_site(model, start - 1)
        check_tokens(tokens, site.hidden_size, method_options(point.repair, repair_settings(c))["repair_ridge"])
        if site.layer not in checked_sites:
            check_additive(model, site, max(sequences, key=len))
            checked_sites.add(site.layer)
