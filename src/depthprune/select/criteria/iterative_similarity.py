"""``iterative-similarity``: remove the one layer of smallest angular distance D[1][ℓ], measure again on the cut
model, repeat until n are gone (the one-layer version of Gromov et al. 2024's criterion, re-measured after
every cut).

Each step is one analysis pass of the cut model on the calibration sequences (the token mode of the
analysis: each sample's last token by default). The order is computed once, up to the largest n asked for,
and each n takes its prefix; its scores are the order and the distance of each removed layer when it went.
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext


def removal_order(context: SelectionContext, n: int) -> dict:
    from ...data import pad_id
    from ...measure.distances import measure_distances
    from ...model.surgery import layers_removed

    state = context.cache.setdefault("iterative-similarity", {"order": [], "distances": []})
    token_mode = context.token_mode or (context.distances.token_mode if context.distances is not None else "last")
    pad = pad_id(context.tokenizer) if context.tokenizer is not None else 0
    total = context.num_layers
    while len(state["order"]) < n:
        kept = [i for i in range(total) if i not in state["order"]]
        with layers_removed(context.model, state["order"]) as cut:
            measured = measure_distances(cut, context.sequences, batch_size=context.batch_size, token_mode=token_mode,
                                         pad_token_id=pad, progress=False)
        one = measured.block(1)
        position = min(range(len(kept)), key=lambda p: (float(one[p]), p))
        state["order"].append(kept[position])
        state["distances"].append(float(one[position]))
    return state


def select(context: SelectionContext, n: int) -> Selection:
    state = removal_order(context, n)
    return Selection(tuple(sorted(state["order"][:n])), "iterative-similarity", None,
                     {"removal_order": state["order"][:n],
                      "distance_when_removed": [round(d, 8) for d in state["distances"][:n]]})


CRITERION = CRITERIA.register(Criterion(
    name="iterative-similarity",
    description="remove the layer of smallest angular distance D[1], measure the cut model again, repeat "
                "(Gromov et al. 2024's distance, one layer at a time)",
    needs="calibration",
    contiguous=False,
    select=select,
    order=40,
))
