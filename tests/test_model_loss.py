"""The held-out loss on packed text (model/loss.py), shared by the C4 evaluator and healing's validation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

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


def test_healing_validates_with_the_c4_evaluators_loss(tiny_corpus):
    from depthprune.evaluate.tasks.c4 import c4_loss
    from depthprune.heal import HEAL_METHODS, resolve_options
    from depthprune.heal.distributed import Processes
    from depthprune.heal.state import Run
    from depthprune.heal.train import validate

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    o = resolve_options(batch_size=4, grad_accum=2, seq_len=16, val_sequences=3, seed=2)
    run = Run(o, HEAL_METHODS.get("lora"), 1, Path("out"), Path("out"), str(tiny_corpus), Processes(), "cpu",
              "float32", None)
    expected = c4_loss(model, tokenizer, str(tiny_corpus), num_sequences=3, seq_len=16, seed=2, batch_size=2,
                       progress=False)["loss"]
    assert validate(run, SimpleNamespace(net=model, tokenizer=tokenizer)) == expected
    assert model.training  # validation hands the model back in training mode
