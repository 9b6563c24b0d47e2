"""iterative-similarity: remove the layer of smallest D[1], re-measure the explicitly cut model, repeat."""

from __future__ import annotations

import pytest
from conftest import tiny_model, tiny_tokenizer
from criteria_reference import sequences

from depthprune.measure.distances import measure_distances
from depthprune.model.surgery import remove_layers
from depthprune.select import SelectionContext, choose


def naive_order(arch: str, seqs, n: int, tokens: str) -> list[int]:
    """Cut a fresh copy of the model for real after every step and analyze it from scratch."""
    order = []
    for _ in range(n):
        model = remove_layers(tiny_model(arch), order)
        kept = [i for i in range(6) if i not in order]
        one = measure_distances(model, seqs, batch_size=2, token_mode=tokens, progress=False).block(1)
        order.append(kept[min(range(len(kept)), key=lambda p: (one[p], p))])
    return order


@pytest.mark.parametrize("tokens", ["last", "all"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_neox"])
def test_equals_cutting_and_measuring_again(arch, tokens):
    seqs = sequences()
    expected = naive_order(arch, seqs, 4, tokens)
    context = SelectionContext(6, None, tiny_model(arch), tiny_tokenizer(), seqs, batch_size=3, token_mode=tokens)
    for n in range(1, 5):
        selection = choose("iterative-similarity", n, context)
        assert selection.layers == tuple(sorted(expected[:n]))
        assert selection.scores["removal_order"] == expected[:n]


def test_differs_from_one_shot_similarity_somewhere():
    """Re-measuring matters: on some tiny model the iterative order is not the one-shot D[1] ranking."""
    differs = []
    for arch in ("llama", "gemma3", "qwen2", "gpt2"):
        model, seqs = tiny_model(arch), sequences()
        one = measure_distances(model, seqs, progress=False).block(1)
        ranked = sorted(range(6), key=lambda p: (one[p], p))
        selection = choose("iterative-similarity", 4, SelectionContext(6, None, model, tiny_tokenizer(), seqs))
        differs.append(selection.scores["removal_order"] != ranked[:4])
    assert any(differs)
