"""What a repair request needs before anything loads, for both cuts (``depthprune.prune`` and the GGUF cut):
its options told apart from the criteria's, a known method, calibration text, one block of whole layers."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import DataOptions
from ..errors import DepthpruneError
from ..select import CRITERIA, criterion_options
from . import REPAIRS, repair_options, repair_options_class


def split_options(options: dict, repair: str | None) -> tuple[Any, Any]:
    """(the criteria's options, the repairs' options) among ``options``, each checked: one-line errors."""
    repair_names = {f.name for f in dataclasses.fields(repair_options_class())}
    repair_values = {k: v for k, v in options.items() if k in repair_names}
    if repair_values and repair is None:
        raise DepthpruneError(f"{', '.join(sorted(repair_values))}: a repair option without --repair")
    return (criterion_options(**{k: v for k, v in options.items() if k not in repair_names}),
            repair_options(**repair_values))


def check_repair_request(repair: str | None, layers: str | None, criterion: str, data: DataOptions | None,
                         granularity: str = "layer") -> None:
    """Refuse in one line a repair that cannot run (``repair`` None: no repair, nothing to check)."""
    if repair is None:
        return
    REPAIRS.get(repair)
    if granularity != "layer":
        raise DepthpruneError(f"--repair fits a map across a removed block of whole layers and does not apply to "
                              f"--granularity {granularity}: drop --repair, or cut whole layers")
    if data is None:
        raise DepthpruneError(f"--repair {repair} fits its map on calibration text: pass --data SRC")
    if layers is None and not CRITERIA.get(criterion).contiguous:
        blocks = ", ".join(name for name in CRITERIA.names() if CRITERIA.get(name).contiguous)
        raise DepthpruneError(f"--repair needs one contiguous block of layers, and criterion '{criterion}' may remove "
                              f"layers apart: choose one that removes a block ({blocks}) or list one with --layers")
