"""Which points a sweep runs: every layer count of its settings, at each granularity, by each criterion, repair and
healing.

A point is one (n layers removed, selection criterion, repair, healing, granularity) and one row of
``results.sqlite``; at granularity 'attention' or 'mlp', n counts the sub-layers of that kind removed (the
attention or MLP of n layers), and fractions are of the layer count for every granularity (n = round(f × L));
n = 0 is the full model, one point whatever the criteria, repairs and healings: its criterion is 'unpruned'.
A repaired point is cut, its map fitted and folded (``depthprune.repair``), then evaluated or healed:
'repair followed by LoRA' is the point (n, criterion, 'linear', 'lora').
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DepthpruneError
from .config import SweepConfig
from .store import LAYER, NO_REPAIR, UNPRUNED, point_key

POINTS_DIR = "points"  # under the sweep's folder: each healed point's own folder (its healing, resumable)


@dataclass(frozen=True)
class Point:
    """One point of the sweep: ``n`` layers (at ``granularity`` 'attention' / 'mlp': that sub-layer of n layers)
    removed, chosen by ``criterion``, repaired by ``repair`` and healed by ``heal`` ('none': not)."""

    n: int
    criterion: str
    heal: str
    repair: str = NO_REPAIR
    granularity: str = LAYER

    @property
    def key(self) -> str:
        """Its key in ``results.sqlite`` (``n=2/deepest/lora``; repaired: ``n=2/deepest+linear/lora``; sub-layers:
        ``n=8@attention/similarity/none``)."""
        return point_key(self.n, self.criterion, self.heal, self.repair, self.granularity)

    @property
    def healed(self) -> bool:
        return self.heal != "none"

    @property
    def repaired(self) -> bool:
        return self.repair != NO_REPAIR


UNPRUNED_POINT = Point(0, UNPRUNED, "none")


def point_dir(work: Path, point: Point) -> Path:
    """Where a healed point keeps its healing (checkpoints, then the merged model) under the sweep's folder."""
    cut = point.criterion if not point.repaired else f"{point.criterion}+{point.repair}"
    size = f"n{point.n:03d}" + ("" if point.granularity == LAYER else f"-{point.granularity}")
    return work / POINTS_DIR / f"{size}-{cut}-{point.heal}"


def block_sizes(c: SweepConfig, total_layers: int) -> list[int]:
    """The distinct n of the sweep, from explicit counts or fractions of the layers (0 = the full model); the same
    for every granularity (a sub-layer cut of n removes one sub-layer of each of n layers)."""
    sizes = c.n if c.n is not None else [round(f * total_layers) for f in c.fractions]
    too_many = [n for n in sizes if n >= total_layers]
    if too_many:
        raise DepthpruneError(f"n={too_many[0]} out of range: the model has {total_layers} layers")
    return sorted(set(sizes))


def sweep_points(c: SweepConfig, total_layers: int) -> list[Point]:
    """Every point of the sweep, in the order they run: the full model first, then by granularity, n, criterion,
    repair and healing (healed only at the sizes of ``heal_fractions`` when given). The settings were checked to
    cross only what can be (:func:`~.settings.resolve_config`: each criterion can choose at each granularity, a
    repair only whole layers)."""
    sizes = block_sizes(c, total_layers)
    healed_sizes = set(sizes) if c.heal_fractions is None else {round(f * total_layers) for f in c.heal_fractions}
    points = [UNPRUNED_POINT] if 0 in sizes else []
    return points + [Point(n, s, h, r, g) for g in c.granularity for n in sizes if n > 0 for s in c.criteria
                     for r in c.repair for h in c.heal if h == "none" or n in healed_sizes]
