"""The one-pass streaming distances equal a naive reference built on output_hidden_states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_model

from depthprune.errors import DepthpruneError
from depthprune.measure.distances import AngularDistances, load_distances, measure_distances
from depthprune.model.load import decoder_layout


def _sequences(count: int = 7, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 14, (count,), generator=g).tolist()  # mixed lengths, so padding happens
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_distances(model, sequences, tokens: str) -> np.ndarray:
    """One unpadded sequence at a time; every pair (i, j) by its own cosine, in float64."""
    layout = decoder_layout(model)
    L = len(layout.layers)
    captured = {}
    # output_hidden_states' last entry is after the final norm: take the last layer's raw output instead.
    handle = layout.layers[-1].register_forward_hook(
        lambda m, a, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out)
    )
    total = np.zeros((L + 1, L + 1))
    try:
        for seq in sequences:
            out = model(torch.tensor([seq]), output_hidden_states=True, use_cache=False)
            states = [h[0].double() for h in out.hidden_states[:L]] + [captured["last"][0].double()]
            for i in range(L + 1):
                for j in range(L + 1):
                    cos = torch.nn.functional.cosine_similarity(states[i], states[j], dim=-1).clamp(-1, 1)
                    angle = torch.arccos(cos) / math.pi
                    total[i, j] += (angle[-1] if tokens == "last" else angle.mean()).item()
    finally:
        handle.remove()
    return total / len(sequences)


@pytest.mark.parametrize("tokens", ["last", "all"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt", "qwen3"])
def test_streaming_equals_naive(arch, tokens, padding_side):
    model = tiny_model(arch)
    sequences = _sequences()
    fast = measure_distances(model, sequences, batch_size=3, token_mode=tokens, padding_side=padding_side,
                             progress=False)
    reference = naive_distances(model, sequences, tokens)
    np.testing.assert_allclose(fast.pairwise, reference, atol=1e-5)
    assert fast.pairwise.shape == (7, 7) and fast.num_samples == len(sequences)
    # The distances are not trivially zero: the test would notice a wrong layer being captured.
    assert fast.block(1).min() > 1e-3


def test_sdpa_padding_matches_eager():
    sequences = _sequences()
    eager = measure_distances(tiny_model("llama", "eager"), sequences, batch_size=4, padding_side="left",
                              progress=False)
    sdpa = measure_distances(tiny_model("llama", "sdpa"), sequences, batch_size=4, padding_side="left",
                             progress=False)
    np.testing.assert_allclose(sdpa.pairwise, eager.pairwise, atol=1e-5)


def test_block_indexing_and_best():
    pairwise = np.array([[0, .5, .6, .9], [.5, 0, .1, .7], [.6, .1, 0, .2], [.9, .7, .2, 0]], dtype=float)
    d = AngularDistances(pairwise, num_samples=3, token_mode="last")
    assert d.num_layers == 3
    np.testing.assert_allclose(d.block(1), [.5, .1, .2])
    np.testing.assert_allclose(d.block(2), [.6, .7])
    np.testing.assert_allclose(d.block(3), [.9])
    assert d.best(1) == (1, pytest.approx(.1))
    assert d.best(2) == (0, pytest.approx(.6))
    with pytest.raises(DepthpruneError):
        d.block(4)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("llama")
    d = measure_distances(model, _sequences(), batch_size=4, progress=False)
    d.meta.update(model="tiny", data="synthetic")
    d.save(tmp_path)
    back = load_distances(tmp_path)
    np.testing.assert_array_equal(back.pairwise, d.pairwise)
    assert back.meta["model"] == "tiny" and back.token_mode == "last"
    rows = (tmp_path / "distances.csv").read_text().splitlines()
    assert rows[0] == "n,start_layer,end_layer,distance"
    assert len(rows) == 1 + sum(6 - n + 1 for n in range(1, 7))
    n, start, end, dist = rows[-1].split(",")  # the one block of all 6 layers
    assert (n, start, end) == ("6", "0", "5") and float(dist) == pytest.approx(d.pairwise[0, 6], abs=1e-7)


def test_bad_token_mode():
    with pytest.raises(DepthpruneError, match="token mode"):
        measure_distances(tiny_model("llama"), _sequences(), token_mode="first", progress=False)
