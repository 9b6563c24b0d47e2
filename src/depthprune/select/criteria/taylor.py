"""``taylor``: Shortened LLaMA's Taylor criterion (Kim et al. 2024), a layer's importance is the sum over its
weights of |weight × ∂L/∂weight|, L the calibration loss; remove the n least important.

One forward and backward pass over the calibration sequences (gradients only for the decoder layers; the LM
head in chunks, so no full-vocabulary logits of all positions exist at once). The paper's Taylor+ also keeps
its first and last few blocks out of the candidates: that is ``taylor-plus``; this criterion may remove
them. Its scores are every layer's importance.
"""

from __future__ import annotations

from .. import CRITERIA, Criterion, Selection, SelectionContext


def importance(context: SelectionContext) -> list[float]:
    """Σ |w · ∂L/∂w| over each layer's weights, L the mean next-token NLL over the calibration sequences."""
    import torch

    from ..calibration import HEAD_CHUNK, runner_for

    cached = context.cache.get("taylor")
    if cached is not None:
        return cached
    runner = runner_for(context)
    model = runner.model
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    layer_params = {id(p) for layer in runner.layers for p in layer.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in layer_params)
        p.grad = None
    model.eval()
    try:
        with torch.enable_grad():
            for b in range(len(runner.batches)):
                hidden = runner.run(range(len(runner.layers)), 0, runner.embeddings[b], b)
                detached = hidden.detach().requires_grad_(True)
                rows, cols, targets = runner.targets[b]
                for s in range(0, len(rows), HEAD_CHUNK):
                    logits = runner._logits(detached[rows[s : s + HEAD_CHUNK], cols[s : s + HEAD_CHUNK]])
                    picked = logits.gather(1, targets[s : s + HEAD_CHUNK, None])[:, 0]
                    ((torch.logsumexp(logits, dim=-1) - picked).sum() / runner.num_predicted).backward()
                hidden.backward(detached.grad)
        scores = [float(sum((p.detach().double() * p.grad.double()).abs().sum() for p in layer.parameters()
                            if p.grad is not None)) for layer in runner.layers]
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    context.cache["taylor"] = scores
    return scores


def least_important(context: SelectionContext, n: int, criterion: str, last: frozenset = frozenset()) -> Selection:
    """The ``n`` layers of least importance; the layers in ``last`` are ranked after all others."""
    scores = importance(context)
    ranked = sorted(range(len(scores)), key=lambda layer: (layer in last, scores[layer], layer))
    extra = {"protected": sorted(last)} if last else {}
    return Selection(tuple(sorted(ranked[:n])), criterion, None,
                     {"importance": [float(f"{v:.8g}") for v in scores], "ranking": ranked, **extra})


def select(context: SelectionContext, n: int) -> Selection:
    return least_important(context, n, "taylor")


CRITERION = CRITERIA.register(Criterion(
    name="taylor",
    description="the n layers of least first-order importance, the sum of |weight x gradient of the "
                "calibration loss| (Shortened LLaMA's Taylor criterion, Kim et al. 2024)",
    needs="calibration",
    contiguous=False,
    select=select,
    order=70,
))
