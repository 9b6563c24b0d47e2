"""Naive references of the selection criteria, built from full forward passes of explicitly cut models and
from autograd on the whole model, one unpadded sequence at a time: what the fast paths must equal."""

from __future__ import annotations

import torch
from conftest import VOCAB

from depthprune.model.load import decoder_layout
from depthprune.model.surgery import layers_removed


def sequences(count: int = 6, seed: int = 1, low: int = 6, high: int = 15) -> list[list[int]]:
    """Token lists of mixed lengths (so batches are padded), longer than the tiny Gemmas' 4-token windows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [[1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def cut_loss(model, seqs, removed=()) -> float:
    """Mean next-token NLL over every predicted token, from the explicitly cut model's own logits."""
    total, count = 0.0, 0
    with layers_removed(model, sorted(removed)) as cut:
        for seq in seqs:
            ids = torch.tensor([seq])
            logits = cut(input_ids=ids, use_cache=False).logits[0].double()
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += len(seq) - 1
    return total / count


def greedy(model, seqs, n: int) -> tuple[list[int], list[float]]:
    order, losses = [], []
    total = len(decoder_layout(model).layers)
    for _ in range(n):
        scores = {c: cut_loss(model, seqs, order + [c]) for c in range(total) if c not in order}
        best = min(scores, key=lambda c: (scores[c], c))
        order.append(best)
        losses.append(scores[best])
    return order, losses


def oneshot(model, seqs) -> list[float]:
    return [cut_loss(model, seqs, [c]) for c in range(len(decoder_layout(model).layers))]


def taylor(model, seqs) -> list[float]:
    """Σ |w · ∂L/∂w| per layer, L the mean NLL over all predicted tokens, by autograd on the whole model."""
    model.zero_grad()
    count = sum(len(s) - 1 for s in seqs)
    for seq in seqs:
        ids = torch.tensor([seq])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        (torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum") / count).backward()
    scores = [sum((p * p.grad).abs().sum().item() for p in layer.parameters() if p.grad is not None)
              for layer in decoder_layout(model).layers]
    model.zero_grad()
    return scores


@torch.no_grad()
def block_influence(model, seqs) -> list[float]:
    """1 - mean over all real tokens of cos(x_l, x_{l+1}), from output_hidden_states (the last layer's raw
    output from a hook: the last hidden state HF returns is after the final norm)."""
    layout = decoder_layout(model)
    L = len(layout.layers)
    captured = {}
    handle = layout.layers[-1].register_forward_hook(
        lambda m, a, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    sums, tokens = torch.zeros(L, dtype=torch.float64), 0
    try:
        for seq in seqs:
            out = model(torch.tensor([seq]), output_hidden_states=True, use_cache=False)
            states = [h[0].double() for h in out.hidden_states[:L]] + [captured["last"][0].double()]
            for layer in range(L):
                sums[layer] += torch.nn.functional.cosine_similarity(states[layer], states[layer + 1], dim=-1).sum()
            tokens += len(seq)
    finally:
        handle.remove()
    return (1 - sums / tokens).tolist()
