"""What a cut removes: whole decoder layers, or one kind of sub-layer (the attention or the MLP) of chosen layers.

Light (no torch): the CLI's choices and the selection criteria read it.
"""

from __future__ import annotations

from ..errors import DepthpruneError

SUBLAYER_KINDS = ("attention", "mlp")
GRANULARITIES = ("layer", *SUBLAYER_KINDS)


def check_granularity(granularity: str) -> str:
    """``granularity`` if it is one of :data:`GRANULARITIES`, else a one-line error."""
    if granularity not in GRANULARITIES:
        raise DepthpruneError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    return granularity


def unit_name(granularity: str) -> str:
    """What the cut counts, in words: 'layers', 'attention sub-layers', 'mlp sub-layers'."""
    return "layers" if granularity == "layer" else f"{granularity} sub-layers"
