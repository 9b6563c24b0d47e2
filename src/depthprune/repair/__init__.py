"""Repairing a cut without training: the repair methods, one module each, in the ``REPAIRS`` registry.

When one contiguous block of layers ℓ..ℓ+n−1 is removed, a repair estimates one linear map T (hidden ×
hidden) on calibration activations of the uncut model, so that the last kept layer's MLP output M,
mapped by T and added to the residual stream, matches the hidden state after the removed block (ReplaceMe,
Shopkhoev et al. 2025, arXiv 2505.02819), and folds T into that MLP's output projection. The repaired
model is a plain checkpoint with the plain cut's tensor names and shapes.

An entry names its options (a dataclass of ``option(...)`` fields) and its ``fit``: from the calibration
statistics (:class:`depthprune.repair.capture.Calibration`) and its options to a :class:`RepairFit`.
Built in: ``linear`` (least squares, closed form) and ``linear-cosine`` (the cosine distance, refined from
the least-squares map). "No repair" is not an entry: it is the absence of one. :func:`repair_cut` in
``repair/apply.py`` checks a cut, fits, cuts and folds.

This package's top level stays light (no torch): the CLI reads the registry to build its flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..options import Checked, compose, plugin_options
from ..registry import Registry


@dataclass
class RepairFit:
    """A fitted map and what the fit measured.

    ``transform``: T, a (hidden, hidden) float64 tensor applied on the right of the MLP output (M T).
    ``record``: JSON-ready objectives before and after (``depthprune.json``'s ``repair.fit``).
    """

    transform: Any
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RepairMethod:
    """A repair: ``fit(calibration, options) -> RepairFit``; ``options``: the dataclass of its own options.

    Every repair's options include :class:`depthprune.repair.linear.LinearRepairOptions` (by inheritance):
    the calibration reads ``repair_tokens`` (the sample kept in memory), ``repair_norm_power`` (the tokens'
    weights) and ``repair_ridge`` (whether fewer tokens than the hidden size can do).
    """

    name: str
    description: str
    fit: Callable[[Any, Any], RepairFit]
    options: type


REPAIRS: Registry[RepairMethod] = Registry("repair")



def repair_options_class() -> type:
    """The options of every registered repair, as one dataclass (checked when made): their flags and keys."""
    return compose("RepairOptions", REPAIRS.option_classes(), module=__name__, bases=(Checked,),
                   doc="The options of the registered repairs, one field each (flags and YAML keys).")


def repair_options(**values) -> Any:
    """The repairs' options from keyword values (the rest at their defaults), checked: one-line errors."""
    return plugin_options(repair_options_class(), values, "repair", "repairs")


def repair_choices() -> tuple[str, ...]:
    """'none' (cut without repair, the default) and every registered repair."""
    return ("none", *REPAIRS.names())


from . import linear, linear_cosine  # noqa: E402,F401,I001  (registration order = the order of the choices)
