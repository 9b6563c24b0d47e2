"""Which layers to remove: by angular distance, by the paper's deepest-layers heuristic, or as listed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import DepthpruneError
from .similarity import AngularDistances

STRATEGIES = ("similarity", "deepest")


@dataclass(frozen=True)
class Selection:
    """Layers to remove (0-based, sorted) and why."""

    layers: tuple[int, ...]
    strategy: str  # 'similarity', 'deepest' or 'explicit'
    distance: float | None = None  # D[n][ℓ] of the removed block, when it is one contiguous measured block

    def describe(self) -> str:
        text = f"remove {len(self.layers)} layer(s) {format_layers(self.layers)} ({self.strategy}"
        return text + (f", angular distance {self.distance:.4f})" if self.distance is not None else ")")


def format_layers(layers) -> str:
    """'20-27' or '3,7,9-10': compact, 0-based, inclusive ranges."""
    layers = sorted(layers)
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)


def layer_ranges(spec: str) -> list[tuple[int, int]]:
    """The inclusive ranges of a spec ('20-27', '3,7,9', '0,5-7'), checked for syntax only, nothing expanded."""
    if not isinstance(spec, str):
        raise DepthpruneError(f"bad layer spec {spec!r}: give a string such as '20-27' or '3,7,9'")
    ranges = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise DepthpruneError(f"bad layer spec '{spec}': use 0-based indices and inclusive ranges, e.g. '20-27' or '3,7,9'")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if first > last:
            raise DepthpruneError(f"bad layer range '{part.strip()}' in '{spec}': the first index must not exceed the last")
        ranges.append((first, last))
    return ranges


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """Parse '20-27', '3,7,9' or a mix ('0,5-7') into sorted 0-based layer indices; ranges are inclusive."""
    ranges = layer_ranges(spec)
    top = max(last for _, last in ranges)
    if top >= num_layers:  # checked before expanding: '0-3000000000' must not fill the memory first
        raise DepthpruneError(f"layer {top} out of range: the model has layers 0..{num_layers - 1}")
    layers = {layer for first, last in ranges for layer in range(first, last + 1)}
    if len(layers) >= num_layers:
        raise DepthpruneError(f"layer spec '{spec}' removes all {num_layers} layers: keep at least one")
    return tuple(sorted(layers))


def _check_layer_count(distances: AngularDistances | None, num_layers: int) -> None:
    if distances is not None and distances.num_layers != num_layers:
        raise DepthpruneError(
            f"the distances were measured on a {distances.num_layers}-layer model but this one has {num_layers}: "
            "analyze this model"
        )


def check_block_request(n: int | None = None, fraction: float | None = None) -> None:
    """What can be checked of a block size without the model: exactly one of a whole ``n`` >= 1 or a fraction in (0, 1)."""
    if (n is None) == (fraction is None):
        raise DepthpruneError("give exactly one of a layer count n or a fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction < 1):
        raise DepthpruneError(f"fraction {fraction} out of range: it must be between 0 and 1 (exclusive)")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise DepthpruneError(f"n={n!r} is not a whole number of layers")
    if n is not None and n < 1:
        raise DepthpruneError(f"n={n} out of range: remove at least 1 layer")


def block_size(num_layers: int, n: int | None = None, fraction: float | None = None) -> int:
    """The number of layers to remove, from a count ``n`` or a ``fraction`` of the L layers (rounded)."""
    check_block_request(n, fraction)
    if fraction is not None:
        n = round(fraction * num_layers)
        if n == 0:
            raise DepthpruneError(f"fraction {fraction} of {num_layers} layers rounds to 0 layers: use a larger fraction")
    if not 1 <= n < num_layers:
        raise DepthpruneError(f"n={n} out of range: remove between 1 and {num_layers - 1} of the {num_layers} layers")
    return n


def choose_block(
    strategy: str, n: int, num_layers: int, distances: AngularDistances | None = None
) -> Selection:
    """The contiguous block of ``n`` layers to remove.

    ``similarity``: start at ℓ*(n) = argmin_ℓ D[n][ℓ] (needs ``distances``). ``deepest``: the paper's
    heuristic, the n layers just before the final layer (layers L-1-n … L-2), which keeps the last layer.
    """
    n = block_size(num_layers, n=n)
    _check_layer_count(distances, num_layers)
    if strategy == "similarity":
        if distances is None:
            raise DepthpruneError("strategy 'similarity' needs angular distances: pass --distances DIR or --data SRC")
        start, distance = distances.best(n)
    elif strategy == "deepest":
        start = num_layers - 1 - n
        distance = float(distances.block(n)[start]) if distances is not None else None
    else:
        raise DepthpruneError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    return Selection(tuple(range(start, start + n)), strategy, distance)


def explicit_selection(spec: str, num_layers: int, distances: AngularDistances | None = None) -> Selection:
    """A user-listed set of layers; its distance is known when it is one contiguous block."""
    layers = parse_layers(spec, num_layers)
    _check_layer_count(distances, num_layers)
    contiguous = layers[-1] - layers[0] + 1 == len(layers)
    distance = float(distances.block(len(layers))[layers[0]]) if distances is not None and contiguous else None
    return Selection(layers, "explicit", distance)
