"""``block-influence``: ShortGPT's criterion (Men et al. 2024), remove the n layers that change their input least.

BI(ℓ) = 1 − the mean over all real tokens of cos(x⁽ˡ⁾, x⁽ˡ⁺¹⁾), the input and output of layer ℓ at the same
token. It is measured in the analysis pass beside the angular distances (``distances.json`` holds it), so
choosing needs no pass of its own. The n layers of lowest BI go, wherever they are (the lowest layer first
on ties); its scores are every layer's BI.
"""

from __future__ import annotations

from ...errors import DepthpruneError
from .. import CRITERIA, Criterion, Selection, SelectionContext, block_distance


def check_distances(distances) -> None:
    if distances.block_influence is None:
        raise DepthpruneError("criterion 'block-influence' needs the block influence, which these distances predate "
                              "(written by an older depthprune): run `depthprune analyze` again, or prune with --data SRC")


def select(context: SelectionContext, n: int) -> Selection:
    check_distances(context.distances)
    influence = context.distances.block_influence
    ranked = sorted(range(len(influence)), key=lambda layer: (float(influence[layer]), layer))
    layers = tuple(sorted(ranked[:n]))
    return Selection(layers, "block-influence", block_distance(context.distances, layers),
                     {"block_influence": [round(float(v), 8) for v in influence], "ranking": ranked})


CRITERION = CRITERIA.register(Criterion(
    name="block-influence",
    description="the n layers of lowest block influence, 1 - mean cos(input, output) over all tokens, wherever "
                "they are (ShortGPT, Men et al. 2024)",
    needs="distances",
    contiguous=False,
    select=select,
    order=30,
    check_distances=check_distances,
))
