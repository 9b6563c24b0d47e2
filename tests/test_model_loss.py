"""The held-out loss on packed text (model/loss.py), shared by the C4 evaluator and healing's validation."""

from __future__ import annotations

import pytest
from conftest import tiny_model, tiny_tokenizer

from depthprune.errors import DepthpruneError
from depthprune.model.loss import sample_sequences, sequence_losses


def test_the_sample_is_seeded_and_packed(tiny_corpus):
    tokenizer = tiny_tokenizer()
    sequences = sample_sequences(tokenizer, str(tiny_corpus), 4, 16, seed=0)
    assert len(sequences) == 4 and {len(s) for s in sequences} == {16}
    assert sample_sequences(tokenizer, str(tiny_corpus), 4, 16, seed=0) == sequences
    assert sample_sequences(tokenizer, str(tiny_corpus), 4, 16, seed=1) != sequences
    with pytest.raises(DepthpruneError, match="holds only"):
        sample_sequences(tokenizer, str(tiny_corpus), 10_000, 16, seed=0)


def test_losses_sum_over_every_prediction_whatever_the_batch(tiny_corpus):
    model = tiny_model("llama")
    sequences = sample_sequences(tiny_tokenizer(), str(tiny_corpus), 5, 16, seed=0)
    total, count = sequence_losses(model, sequences, batch_size=2, progress=False)
    assert count == 5 * 15
    assert sequence_losses(model, sequences, batch_size=5, progress=False)[0] == pytest.approx(total, rel=1e-6)
    with pytest.raises(DepthpruneError, match="no sequences"):
        sequence_losses(model, [], progress=False)

