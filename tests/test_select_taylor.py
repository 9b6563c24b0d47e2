"""taylor (Shortened LLaMA): Σ |w · ∂L/∂w| per layer equals autograd on the whole model; the model is left as found."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from criteria_reference import sequences, taylor

from depthprune.select import SelectionContext, choose


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt", "phi3"])
def test_importance_equals_autograd_on_the_whole_model(arch):
    model, seqs = tiny_model(arch), sequences()
    reference = taylor(model, seqs)
    context = SelectionContext(6, None, model, tiny_tokenizer(), seqs, batch_size=4)
    ranked = sorted(range(6), key=lambda layer: (reference[layer], layer))
    for n in (1, 2, 4):
        selection = choose("taylor", n, context)
        assert selection.layers == tuple(sorted(ranked[:n]))
    assert selection.scores["importance"] == pytest.approx(reference, rel=1e-4)


def test_model_left_as_found():
    model, seqs = tiny_model("llama"), sequences()
    model.lm_head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    choose("taylor", 2, SelectionContext(6, None, model, tiny_tokenizer(), seqs))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
