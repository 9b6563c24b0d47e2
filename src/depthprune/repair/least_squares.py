"""The least-squares map of a repair, and the two objectives every repair reports.

T = argmin Σ w ‖M T − (L − Y)‖² + λ‖T‖² = (Mᵀ W M + λI)⁻¹ Mᵀ W (L − Y), solved in float64 by a Cholesky
factorisation of the symmetric positive (semi-)definite system. Each token's weight is w = ‖L‖^-p
(``repair_norm_power`` p). ReplaceMe weighs every token alike (p = 0); then the few tokens with massive
activations (attention sinks, whose hidden state can be 100× longer than the others') dominate the sum, and
the map bends every other token towards fitting them. On SmolLM2-135M cut at layers 11-18 (the sinks' massive
activation arises inside that block) p = 0 closes 4 % of the C4-loss gap and p = 1 61 %; p = 1.5 and 2 (every
token's relative error alike, close to the cosine distance) give up the sinks' direction and end worse than
the plain cut (benchmarks/repair_quick.py and its report).

The ridge is given relative to the system's scale: λ = ridge × trace(Mᵀ W M) / d, the mean eigenvalue of
Mᵀ W M, so one value means the same for every model and calibration size. Without a ridge the system must be well-posed: at least d real
tokens, and Mᵀ W M not numerically singular.

Objectives, for any T (T = I is the plain cut, whose kept layer outputs M + Y):
``residual_error`` = Σ w ‖L − (M T + Y)‖² / Σ w ‖L − Y‖² over all calibration tokens, exact from the
accumulated statistics; ``mse_per_token``, the same weighted sum per token; ``cosine_distance`` = mean of
1 − cos(M T + Y, L) over the kept subsample of tokens.
"""

from __future__ import annotations

import torch

from ..errors import DepthpruneError
from . import RepairFit
from .capture import Calibration, TokenSample

# Largest condition number of Mᵀ W M + λI accepted: beyond it the float64 solve keeps too few digits.
CONDITION_LIMIT = 1e12
SUGGESTED_RIDGE = 1e-4
NOTE = ("residual_error: sum over all calibration tokens of w |L - (M T + Y)|^2 as a fraction of w |L - Y|^2, w = "
        "|L|^-norm_power (before: T = I, the plain cut); mse_per_token: that sum per token; cosine_distance: mean "
        "1 - cos(M T + Y, L) over sample_tokens of them. M: the kept layer's MLP output, Y: the residual it is added "
        "to, L: the hidden state after the removed block")


def check_tokens(tokens: int, hidden: int, ridge: float) -> None:
    """Refuse fewer real calibration tokens than the map has rows, unless a ridge makes the system well-posed."""
    if tokens == 0:
        raise DepthpruneError("no calibration tokens to fit the repair on: give calibration text (--data, --samples)")
    if ridge == 0 and tokens < hidden:
        raise DepthpruneError(f"calibration text too short for a well-posed repair: {tokens} real tokens for a "
                              f"{hidden}x{hidden} map, which needs at least {hidden} (better {10 * hidden}): give "
                              f"more or longer --samples, or a ridge (--repair-ridge {SUGGESTED_RIDGE:g})")


def ridge_strength(calibration: Calibration, ridge: float) -> float:
    """λ for a relative ``ridge``: ridge × trace(Mᵀ W M) / d."""
    return ridge * float(torch.trace(calibration.gram)) / calibration.hidden_size


def solve(calibration: Calibration, ridge: float) -> torch.Tensor:
    """The least-squares T (float64, (d, d)); a one-line refusal when the system is not well-posed."""
    hidden = calibration.hidden_size
    check_tokens(calibration.tokens, hidden, ridge)
    system = calibration.gram + ridge_strength(calibration, ridge) * torch.eye(
        hidden, dtype=torch.float64, device=calibration.gram.device)
    eigenvalues = torch.linalg.eigvalsh(system)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    if not (high > 0 and low > high / CONDITION_LIMIT):  # also refuses NaN
        condition = high / low if low > 0 else float("inf")
        raise DepthpruneError(f"the kept layer's MLP outputs over the {calibration.tokens} calibration tokens span too "
                              f"few directions for a well-posed repair (MᵀM is numerically singular, condition number "
                              f"{condition:.1e}): give a ridge (--repair-ridge {SUGGESTED_RIDGE:g}) or more varied "
                              "calibration text (more --samples)")
    factor = torch.linalg.cholesky(system)
    return torch.cholesky_solve(calibration.cross, factor)


def residual_sum(calibration: Calibration, transform: torch.Tensor | None) -> float:
    """Σ‖L − (M T + Y)‖² = Σ‖L − Y‖² − 2 tr(Tᵀ Σ Mᵀ(L − Y)) + tr(Tᵀ Σ MᵀM T); T None: the plain cut (T = I)."""
    if transform is None:
        cross, quadratic = torch.trace(calibration.cross), torch.trace(calibration.gram)
    else:
        t = transform.to(calibration.gram.device, torch.float64)
        cross, quadratic = (calibration.cross * t).sum(), ((calibration.gram @ t) * t).sum()
    return max(0.0, calibration.target_energy - 2 * float(cross) + float(quadratic))


def cosine_distance(sample: TokenSample, transform: torch.Tensor | None) -> float:
    """Mean 1 − cos(M T + Y, L) over the sample's tokens; T None: the plain cut."""
    mlp = sample.mlp if transform is None else sample.mlp @ transform.to(sample.mlp.device, sample.mlp.dtype)
    return float((1 - torch.nn.functional.cosine_similarity(mlp + sample.rest, sample.target, dim=-1)).mean())


def objectives(calibration: Calibration, transform: torch.Tensor | None) -> dict:
    """Both objectives of ``transform`` (None: the plain cut), JSON-ready."""
    error = residual_sum(calibration, transform)
    return {"residual_error": error / calibration.target_energy if calibration.target_energy > 0 else 0.0,
            "mse_per_token": error / calibration.tokens,
            "cosine_distance": cosine_distance(calibration.sample, transform)}


def fit_least_squares(calibration: Calibration, ridge: float) -> RepairFit:
    """The least-squares map and its record: the objectives of the plain cut (before) and the map (after)."""
    transform = solve(calibration, ridge)
    record = {"objective": "least squares", "tokens": calibration.tokens, "sample_tokens": len(calibration.sample),
              "norm_power": calibration.norm_power, "ridge": ridge,
              "ridge_absolute": ridge_strength(calibration, ridge),
              "before": objectives(calibration, None), "after": objectives(calibration, transform), "note": NOTE}
    return RepairFit(transform, record)
