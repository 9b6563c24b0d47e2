"""``perplexity-greedy``: SLEB (Song et al. 2024), repeatedly remove the one layer whose removal gives the
lowest calibration loss, until n are gone.

The calibration loss is the mean next-token NLL over every predicted token of the calibration sequences.
The greedy order is computed once, up to the largest n asked for (a sweep extends it as n grows), and each n
takes its prefix. The fast path (``select/calibration.py``) runs each candidate only from the removed layer
on and stops a candidate once its partial loss exceeds the best complete one; the result is the same as
evaluating every candidate cut in full. Its scores: the order, the loss after each removal, the full
model's loss. At attention or MLP granularity the same greedy removes one sub-layer of that kind per step
(``select/sublayer_calibration.py``).
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext


def select(context: SelectionContext, n: int) -> Selection:
    if context.granularity == "layer":
        from ..calibration import greedy_order

        state = greedy_order(context, n)
    else:
        from ..sublayer_calibration import sublayer_greedy_order

        state = sublayer_greedy_order(context, n)
    return Selection(tuple(sorted(state["order"][:n])), "perplexity-greedy", None,
                     {"removal_order": state["order"][:n], "loss_after_step": [round(v, 8) for v in state["losses"][:n]],
                      "full_loss": round(state["full_loss"], 8)}, granularity=context.granularity)


CRITERION = CRITERIA.register(Criterion(
    name="perplexity-greedy",
    description="remove the layer whose removal gives the lowest calibration loss, again and again "
                "(SLEB, Song et al. 2024)",
    needs="calibration",
    contiguous=False,
    select=select,
    order=50,
    granularities=("layer", "attention", "mlp"),
))
