"""The real embedded models through the CLI: analyze, prune, reload the checkpoint and generate."""

from __future__ import annotations

import json

import pytest
import torch

from depthprune.cli.app import main
from depthprune.model.load import load_model
from depthprune.model.record import read_record


@pytest.mark.slow
@pytest.mark.parametrize("alias,layers,n", [("smollm2-135m", 30, 6), ("gemma3-270m", 18, 4)])
def test_analyze_prune_reload_generate(alias, layers, n, shared_data, tmp_path):
    data = shared_data / "c4" / "validation.jsonl"
    analysis, pruned = tmp_path / "analysis", tmp_path / "pruned"
    assert main(["analyze", alias, "--data", str(data), "--samples", "6", "--seq-len", "48",
                 "--out", str(analysis)]) == 0
    distances = json.loads((analysis / "distances.json").read_text())
    assert distances["num_layers"] == layers and len(distances["by_block_size"]["1"]) == layers
    assert (analysis / "heatmap.png").stat().st_size > 10_000

    assert main(["prune", alias, "--n", str(n), "--distances", str(analysis), "--out", str(pruned)]) == 0
    record = read_record(pruned)
    best = distances["best"][n - 1]
    assert record["removed_layers"] == list(range(best["start"], best["end"] + 1))
    assert record["source_model"] == alias and record["layers_after"] == layers - n

    model, tokenizer = load_model(str(pruned))
    assert model.config.num_hidden_layers == layers - n
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(cached[0], skip_special_tokens=True).startswith("The capital of France is")


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_loss_based_criteria_on_the_embedded_models(alias, shared_data, tmp_path, monkeypatch):
    """On the real vocabularies (49k and 262k) the vocabulary-subset bound chooses what the full losses choose;
    and a loss-based criterion prunes from the CLI."""
    from depthprune.data import load_texts, tokenize
    from depthprune.select import SelectionContext, choose
    from depthprune.select.calibration import LayerRunner

    c4 = shared_data / "c4" / "validation.jsonl"
    model, tokenizer = load_model(alias)
    sequences = tokenize(load_texts(str(c4), 4, seed=0), tokenizer, 24)
    layers = model.config.num_hidden_layers

    def greedy():
        return choose("perplexity-greedy", 2, SelectionContext(layers, None, model, tokenizer, sequences, batch_size=2))

    bounded = greedy()
    monkeypatch.setattr(LayerRunner, "can_bound", lambda self: False)
    full = greedy()
    assert bounded.layers == full.layers
    assert bounded.scores["removal_order"] == full.scores["removal_order"]
    assert bounded.scores["loss_after_step"] == pytest.approx(full.scores["loss_after_step"], rel=1e-6)

    out = tmp_path / "cut"
    assert main(["prune", alias, "--criterion", "taylor-plus", "--n", "2", "--data", str(c4), "--samples", "2",
                 "--seq-len", "16", "--out", str(out)]) == 0
    record = read_record(out)
    assert record["criterion"] == "taylor-plus" and len(record["removed_layers"]) == 2
    assert not set(record["removed_layers"]) & {0, 1, 2, 3, layers - 2, layers - 1}
