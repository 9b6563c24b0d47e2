"""``perplexity-greedy`` at attention or MLP granularity: the calibration-loss greedy one sub-layer at a time (the
SLEB / BlockPruner idea, one sub-layer wide), on the fast path of :mod:`.calibration`.

Removing the attention or the MLP of layer c changes nothing before layer c, so each candidate runs from layer c
on, from the layer inputs of the current cut (computed once per step), with the removed sub-layers switched off
by :func:`~depthprune.model.sublayers.sublayers_removed` (stand-ins that add nothing, as in the saved cut).
Candidates are tried in the order of the previous step's losses and stop as soon as their partial loss (first
its vocabulary-subset lower bound) exceeds the best complete one, as for whole layers: the choice is the one
every candidate's full loss gives. A candidate whose cut could not be saved (the attention of every layer of
layer 0's type gone: :func:`~depthprune.model.sublayers.check_sublayer_cut`) is not tried.

Import this module only inside a criterion's ``select``: it imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import DepthpruneError
from ..model.sublayers import check_sublayer_cut, sublayers_removed
from .calibration import STATE_BUDGET_BYTES, LayerRunner, best_of, runner_for


def _savable(config, kind: str, layers: list[int]) -> bool:
    try:
        check_sublayer_cut(config, {kind: layers})
    except DepthpruneError:
        return False
    return True


def sublayer_greedy_order(context, n: int) -> dict:
    """The greedy removal order of ``context.granularity`` sub-layers, extended to ``n`` (cached in the context:
    each n takes a prefix). Returns ``{"order": [...], "losses": [loss after each removal], "full_loss": ...}``."""
    kind = context.granularity
    runner = runner_for(context)
    state = context.cache.setdefault(f"greedy-{kind}", {"order": [], "losses": [], "full_loss": runner.full_loss})
    total = len(runner.layers)
    while len(state["order"]) < n:
        removed = list(state["order"])
        candidates = [c for c in range(total) if c not in removed and _savable(runner.model.config, kind, removed + [c])]
        if not candidates:
            raise DepthpruneError(f"no further {kind} sub-layer can be removed from this cut and still be saved: "
                                  "ask for fewer")
        losses = _step_losses(runner, kind, removed, candidates, state.get("hint"))
        best = best_of(losses)
        state["order"].append(best)
        state["losses"].append(losses[best])
        state["hint"] = losses
    return state


@torch.no_grad()
def _step_losses(runner: LayerRunner, kind: str, removed: list[int], candidates: Sequence[int],
                 hint: dict | None) -> dict[int, float | None]:
    """Each candidate's calibration loss with its ``kind`` sub-layer removed besides ``removed`` (None: it cannot
    beat the best)."""
    model, every = runner.model, range(len(runner.layers))
    batches = range(len(runner.batches))
    if runner.state_bytes * (len(runner.layers) + 1) > STATE_BUDGET_BYTES:  # batch by batch, every candidate whole
        sums = dict.fromkeys(candidates, 0.0)
        for b in batches:
            with sublayers_removed(model, {kind: removed}):
                states = runner.states(every, b)
            for c in candidates:
                with sublayers_removed(model, {kind: [*removed, c]}):
                    sums[c] += runner.nll_sum(runner.run(every, c, states[c], b), b)
        return {c: total / runner.num_predicted for c, total in sums.items()}
    with sublayers_removed(model, {kind: removed}):
        states = [runner.states(every, b) for b in batches]
    order = _likely_best_first(runner, kind, removed, candidates, states[0], hint)
    subsets = runner.vocabulary_subsets([s[-1] for s in states]) if runner.can_bound() else None
    losses: dict[int, float | None] = {}
    best = math.inf
    for c in order:
        with sublayers_removed(model, {kind: [*removed, c]}):
            outputs = (runner.run(every, c, states[b][c], b) for b in batches)
            total = runner._candidate_sum(outputs, best, subsets)
        losses[c] = None if total is None else total / runner.num_predicted
        if total is not None:
            best = min(best, total)
    return losses


def _likely_best_first(runner: LayerRunner, kind: str, removed: list[int], candidates: Sequence[int],
                       states: list[torch.Tensor], hint: dict | None) -> list[int]:
    """Candidates in the order to try them: by ``hint`` (the previous step's losses) when given, else by how
    little removing each changes its layer's output on the first batch (1 - cos), so the bound is tight early."""
    if hint:
        return sorted(candidates, key=lambda c: (math.inf if hint.get(c) is None else hint[c], c))
    mask = runner.batches[0].attention_mask.bool()
    change = {}
    for c in candidates:
        with sublayers_removed(runner.model, {kind: [*removed, c]}):
            without = runner.call(c, states[c], 0)
        change[c] = 1 - float(torch.nn.functional.cosine_similarity(
            without[mask].float(), states[c + 1][mask].float(), dim=-1).mean())
    return sorted(candidates, key=lambda c: (change[c], c))
