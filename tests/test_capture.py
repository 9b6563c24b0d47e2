"""The one layer-capture mechanism: what each decoder layer is called with, replayed exactly, hooks removed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from depthprune.model.capture import LayerCall, accepts, layer_output, split_call, watch_layers
from depthprune.model.load import decoder_layout


def _run(model, ids: torch.Tensor):
    with torch.no_grad():
        return model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_replayed_calls_give_every_layer_output(arch):
    """Each layer called again on its captured input with its captured arguments gives what it gave in the pass."""
    model = tiny_model(arch)
    layers = decoder_layout(model).layers
    ids = torch.tensor([[3, 5, 7, 11, 13, 17, 19]])
    inputs, calls, outputs = {}, {}, {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, layer_output(out)))
             for i, layer in enumerate(layers)]

    def on_input(index, hidden, call):
        inputs[index], calls[index] = hidden, call

    last = []
    with watch_layers(layers, on_input, last.append):
        _run(model, ids)
    for hook in hooks:
        hook.remove()
    assert sorted(calls) == list(range(len(layers))) and len(last) == 1
    assert torch.equal(last[0], outputs[len(layers) - 1])
    with torch.no_grad():
        for i, layer in enumerate(layers):
            assert torch.equal(calls[i].replay(layer, inputs[i]), outputs[i]), i
            if i > 0:
                assert torch.equal(inputs[i], outputs[i - 1])


def test_stop_after_last_skips_the_rest_of_the_forward():
    model = tiny_model("llama")
    layout = decoder_layout(model)
    normed = []
    handle = layout.final_norm.register_forward_hook(lambda *a: normed.append(1))
    seen, returned = [], []
    with watch_layers(layout.layers, lambda i, h, c: seen.append(i), stop_after_last=True):
        returned.append(_run(model, torch.tensor([[3, 5, 7]])))
    handle.remove()
    assert seen == list(range(len(layout.layers))) and not normed and not returned


def test_hooks_are_removed_even_when_the_pass_fails():
    model = tiny_model("llama")
    layers = decoder_layout(model).layers
    with pytest.raises(RuntimeError, match="boom"), watch_layers(layers, lambda *a: None):
        raise RuntimeError("boom")
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)


def test_split_call_positional_and_keyword():
    hidden, mask = torch.zeros(1, 2, 4), torch.ones(1, 2)
    assert split_call((hidden, mask), {"use_cache": False}) == (hidden, LayerCall((mask,), {"use_cache": False}, False))
    found, call = split_call((), {"hidden_states": hidden, "attention_mask": mask})
    assert found is hidden and call == LayerCall((), {"attention_mask": mask}, True)

    class Layer(nn.Module):
        def forward(self, hidden_states, attention_mask=None):
            return hidden_states * 2 + attention_mask.sum(), None

    assert torch.equal(call.replay(Layer(), torch.ones(1, 2, 4)), torch.full((1, 2, 4), 4.0))
    assert accepts(Layer(), "attention_mask") and not accepts(Layer(), "position_ids")
