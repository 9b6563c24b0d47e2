"""``linear``: ReplaceMe's least-squares repair, T = (Mᵀ W M + λI)⁻¹ Mᵀ W (L − Y), closed form over all calibration
tokens (``repair/least_squares.py``), folded into the kept layer's MLP output projection. W weighs each token by
‖L‖^-p: p = 1 by default, p = 0 is ReplaceMe's unweighted fit (see least_squares.py for why and the figures)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from . import REPAIRS, RepairFit, RepairMethod


@dataclass
class LinearRepairOptions:
    """The options of the least-squares repair (and, inherited, of ``linear-cosine``)."""

    repair_ridge: float = option(0.0, minimum=0, help="repair: ridge of the least-squares map, relative to the "
                                                      "mean eigenvalue of the weighted MᵀM (0: none)")
    repair_norm_power: float = option(1.0, minimum=0, maximum=2, help="repair: weigh each calibration token's squared "
                                      "error by |L|^-p, L its target hidden state (0: all alike, as ReplaceMe; 1: "
                                      "tokens with massive activations no longer dominate the fit)")
    repair_tokens: int = option(4096, minimum=1, help="repair: calibration tokens kept in memory (a random sample) to "
                                                      "measure the cosine distance; linear-cosine optimises on them")


def fit(calibration, options: LinearRepairOptions) -> RepairFit:
    """The least-squares map of ``calibration`` (a :class:`depthprune.repair.capture.Calibration`)."""
    from .least_squares import fit_least_squares

    return fit_least_squares(calibration, options.repair_ridge)


REPAIRS.register(RepairMethod("linear", "least-squares linear map folded into the last kept MLP (ReplaceMe)",
                              fit=fit, options=LinearRepairOptions))
