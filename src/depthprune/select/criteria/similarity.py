"""``similarity``: remove the block whose input and output are most alike (Gromov et al. 2024, eq. 7).

ℓ*(n) = argmin_ℓ D[n][ℓ], the shallowest start on ties; D comes from the analysis pass. Its scores are
D[n][ℓ] for every start ℓ, so ``depthprune.json`` shows how clear the choice was.

At attention or MLP granularity the same measure is one sub-layer wide: the n sub-layers of that kind whose
input and residual output are most alike (the smallest sub-layer distances of the analysis pass, the shallowest on
ties), wherever they are; its scores are every layer's distance.
"""

from __future__ import annotations

import numpy as np

from .. import CRITERIA, Criterion, Selection, SelectionContext


def _select_sublayers(context: SelectionContext, n: int) -> Selection:
    kind = context.granularity
    values = context.distances.sublayer_distances[kind]  # present: choose checked it
    chosen = np.argsort(values, kind="stable")[:n]
    return Selection(tuple(sorted(int(i) for i in chosen)), "similarity", None,
                     {f"{kind}_distance_by_layer": [round(float(d), 6) for d in values]}, granularity=kind)


def select(context: SelectionContext, n: int) -> Selection:
    if context.granularity != "layer":
        return _select_sublayers(context, n)
    start, distance = context.distances.best(n)
    by_start = [round(float(d), 6) for d in context.distances.block(n)]
    return Selection(tuple(range(start, start + n)), "similarity", distance, {"distance_by_start": by_start})


CRITERION = CRITERIA.register(Criterion(
    name="similarity",
    description="the block of n layers with the smallest angular distance between its input and output, "
                "l*(n) (Gromov et al. 2024); at attention/mlp granularity the n such sub-layers",
    needs="distances",
    contiguous=True,
    select=select,
    order=10,
    granularities=("layer", "attention", "mlp"),
))
