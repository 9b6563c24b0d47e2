"""``deepest``: the paper's heuristic, remove the n layers just before the final one (Gromov et al. 2024, §4).

Layers L-1-n … L-2: the last layer is kept. It needs nothing measured; when distances are known anyway,
the removed block's distance is recorded. At attention or MLP granularity the same layers lose that sub-layer.
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext, block_distance


def select(context: SelectionContext, n: int) -> Selection:
    start = context.num_layers - 1 - n
    layers = tuple(range(start, start + n))
    if context.granularity != "layer":
        return Selection(layers, "deepest", granularity=context.granularity)
    return Selection(layers, "deepest", block_distance(context.distances, layers))


CRITERION = CRITERIA.register(Criterion(
    name="deepest",
    description="the n layers just before the final one, the paper's simple heuristic (Gromov et al. 2024)",
    needs="nothing",
    contiguous=True,
    select=select,
    order=20,
    granularities=("layer", "attention", "mlp"),
))
