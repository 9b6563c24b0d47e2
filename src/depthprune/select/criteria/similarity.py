"""``similarity``: remove the block whose input and output are most alike (Gromov et al. 2024, eq. 7).

ℓ*(n) = argmin_ℓ D[n][ℓ], the shallowest start on ties; D comes from the analysis pass. Its scores are
D[n][ℓ] for every start ℓ, so ``depthprune.json`` shows how clear the choice was.
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext


def select(context: SelectionContext, n: int) -> Selection:
    start, distance = context.distances.best(n)
    by_start = [round(float(d), 6) for d in context.distances.block(n)]
    return Selection(tuple(range(start, start + n)), "similarity", distance, {"distance_by_start": by_start})


CRITERION = CRITERIA.register(Criterion(
    name="similarity",
    description="the block of n layers with the smallest angular distance between its input and output, "
                "l*(n) (Gromov et al. 2024)",
    needs="distances",
    contiguous=True,
    select=select,
    order=10,
))
