"""``linear-cosine``: ReplaceMe's cosine repair, T minimising the mean cosine distance between M T + Y and L.

A short optimisation (Adam, full batch) on the kept random sample of calibration tokens (``repair_tokens``
of them, held in memory), started from the least-squares map. The best T seen is kept, so the cosine
distance on the sample is never worse than least squares'. The record gives both objectives for the plain
cut (``before``), the least-squares start (``least_squares``) and the result (``after``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from . import REPAIRS, RepairFit, RepairMethod
from .linear import LinearRepairOptions


@dataclass
class CosineRepairOptions(LinearRepairOptions):
    """The least-squares options (the start), and the optimisation's own."""

    repair_steps: int = option(300, minimum=1, help="linear-cosine: Adam steps on the sampled tokens")
    repair_lr: float = option(1e-4, above=0, help="linear-cosine: Adam learning rate")


def refine(sample, start, steps: int, lr: float):
    """T minimising mean 1 − cos(M T + Y, L) over ``sample`` (a TokenSample), from ``start``: the best T seen."""
    import torch

    from .least_squares import cosine_distance

    transform = start.to(sample.mlp.device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([transform], lr=lr)
    best, best_loss = start.clone(), float("inf")
    with torch.enable_grad():
        for _ in range(steps):
            predicted = sample.mlp @ transform + sample.rest
            loss = (1 - torch.nn.functional.cosine_similarity(predicted, sample.target, dim=-1)).mean()
            if float(loss.detach()) < best_loss:  # the loss of T before this step's update
                best, best_loss = transform.detach().to(start.dtype).clone(), float(loss.detach())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if cosine_distance(sample, transform.detach()) < best_loss:
        best = transform.detach().to(start.dtype).clone()
    return best


def fit(calibration, options: CosineRepairOptions) -> RepairFit:
    """The least-squares map of ``calibration``, refined for the cosine distance."""
    from .least_squares import fit_least_squares, objectives

    start = fit_least_squares(calibration, options.repair_ridge)
    transform = refine(calibration.sample, start.transform, options.repair_steps, options.repair_lr)
    record = {**start.record, "objective": "cosine distance", "least_squares": start.record["after"],
              "after": objectives(calibration, transform), "steps": options.repair_steps, "lr": options.repair_lr}
    return RepairFit(transform, record)


REPAIRS.register(RepairMethod("linear-cosine", "linear map minimising the cosine distance, from the least-squares "
                              "one (ReplaceMe)", fit=fit, options=CosineRepairOptions))
