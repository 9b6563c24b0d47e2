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


def test_taylor_plus_protects_the_first_four_and_last_two_layers():
    """Kim et al.'s rule on a 10-layer model: the n least important of layers 4-7 for n <= 4; beyond that the
    protected layers follow, least important first. The importance is the one taylor computes, computed once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    seqs = sequences()
    reference = taylor(model, seqs)
    context = SelectionContext(10, None, model, tiny_tokenizer(), seqs, batch_size=4)
    unprotected = sorted(range(4, 8), key=lambda layer: (reference[layer], layer))
    protected = sorted([0, 1, 2, 3, 8, 9], key=lambda layer: (reference[layer], layer))
    for n in range(1, 10):
        selection = choose("taylor-plus", n, context)
        assert selection.layers == tuple(sorted((unprotected + protected)[:n]))
    assert selection.scores["protected"] == [0, 1, 2, 3, 8, 9]
    assert selection.scores["importance"] == pytest.approx(reference, rel=1e-4)
    assert choose("taylor", 4, context).scores["importance"] == selection.scores["importance"]  # shared, once
    plain = sorted(range(10), key=lambda layer: (reference[layer], layer))[:4]
    assert set(plain) - set(range(4, 8)), "the random model should make taylor pick a protected layer"
