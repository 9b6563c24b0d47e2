"""A cut model is an ordinary Hugging Face model: same outputs as skipping layers, KV cache, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from depthprune.errors import DepthpruneError
from depthprune.model.load import decoder_layout, num_layers
from depthprune.model.surgery import remove_layers

REMOVED = [2, 3]  # an inner block: renumbering, per-layer configs and the cache all matter


def _input(length: int = 12) -> torch.Tensor:
    # Longer than the tiny Gemma sliding window (4), so mixing up layer types changes the result.
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _logits_skipping(model, skipped) -> torch.Tensor:
    """The uncut model's logits with ``skipped`` layers turned into identities by hooks."""
    layers = decoder_layout(model).layers

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]
    try:
        return model(_input(), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_cut_equals_skipping_layers_by_hand(arch):
    model = tiny_model(arch)
    expected = _logits_skipping(model, REMOVED)
    remove_layers(model, REMOVED)
    assert num_layers(model) == 4 and len(decoder_layout(model).layers) == 4
    torch.testing.assert_close(model(_input(), use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_removing_nothing_changes_nothing(arch):
    model = tiny_model(arch)
    before = model(_input(), use_cache=False).logits
    remove_layers(model, [])
    assert num_layers(model) == 6
    torch.testing.assert_close(model(_input(), use_cache=False).logits, before, atol=0, rtol=0)


@torch.no_grad()
def test_generation_with_cache_equals_without(arch):
    model = remove_layers(tiny_model(arch), REMOVED)
    prompt = _input(6)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, min_new_tokens=10)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 16
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_save_load_round_trip(arch, tmp_path):
    model = remove_layers(tiny_model(arch), REMOVED)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert num_layers(reloaded) == 4
    torch.testing.assert_close(reloaded(_input(), use_cache=False).logits, model(_input(), use_cache=False).logits,
                               atol=0, rtol=0)


def test_per_layer_config_lists_follow_the_cut():
    model = tiny_model("gemma3")
    before = list(model.config.layer_types)
    remove_layers(model, [1, 5])
    assert model.config.layer_types == [before[i] for i in (0, 2, 3, 4)]
    idx = [layer.self_attn.layer_idx for layer in decoder_layout(model).layers]
    assert idx == [0, 1, 2, 3]


@pytest.mark.parametrize("layers", [[6], [-1], [0, 1, 2, 3, 4, 5]])
def test_bad_layers(layers):
    with pytest.raises(DepthpruneError):
        remove_layers(tiny_model("llama"), layers)


@torch.no_grad()
def test_temporary_cut_restores_the_model():
    from depthprune.model.surgery import layers_removed

    model = tiny_model("gemma3")
    before = model(_input(), use_cache=False).logits
    types = list(model.config.layer_types)
    expected = _logits_skipping(model, REMOVED)
    with layers_removed(model, REMOVED) as cut:
        assert num_layers(cut) == 4
        torch.testing.assert_close(cut(_input(), use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    assert num_layers(model) == 6 and model.config.layer_types == types
    assert [layer.self_attn.layer_idx for layer in decoder_layout(model).layers] == list(range(6))
    torch.testing.assert_close(model(_input(), use_cache=False).logits, before, atol=0, rtol=0)
    prompt = _input(6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, min_new_tokens=8)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))
