"""``perplexity-oneshot``: Shortened LLaMA's PPL criterion (Kim et al. 2024), score each layer by the
calibration loss of the model without that one layer, and remove the n lowest (the lowest layer on ties).

All L scores come from one set of L cuts of the full model, computed once and shared by every n (and with
the first step of ``perplexity-greedy``, which is the same computation).
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext


def select(context: SelectionContext, n: int) -> Selection:
    from ..calibration import oneshot_losses, runner_for

    losses = oneshot_losses(context)
    ranked = sorted(losses, key=lambda layer: (losses[layer], layer))
    return Selection(tuple(sorted(ranked[:n])), "perplexity-oneshot", None,
                     {"loss_without_layer": [round(losses[layer], 8) for layer in sorted(losses)],
                      "full_loss": round(runner_for(context).full_loss, 8), "ranking": ranked})


CRITERION = CRITERIA.register(Criterion(
    name="perplexity-oneshot",
    description="the n layers whose removal alone raises the calibration loss least (Shortened LLaMA's PPL "
                "criterion, Kim et al. 2024)",
    needs="calibration",
    contiguous=False,
    select=select,
    order=60,
))
