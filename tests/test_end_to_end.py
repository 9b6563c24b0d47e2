"""The real embedded models through the CLI: analyze, prune, reload the checkpoint and generate."""

from __future__ import annotations

import json

import pytest
import torch

from depthprune.cli import main
from depthprune.models import load_model
from depthprune.surgery import read_record


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
