"""`depthprune prune --repair`: the training-free repair from the command line and the API. The numerics of the
fit and the fold are tested in tests/test_repair.py; here: the record, the checkpoint's layout, and bad input."""

from __future__ import annotations

import json

import torch
from badinput import assert_clean_failure, run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import depthprune


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_prune_repair_writes_a_plain_cut_with_one_tensor_changed(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    common = [str(tiny_checkpoint), "--layers", "2-3", "--data", str(tiny_corpus), "--samples", "16", "--seq-len", "24"]
    status, out, err = run(capsys, "prune", *common, "--out", str(tmp_path / "plain"))
    assert status == 0, err
    status, out, err = run(capsys, "prune", *common, "--repair", "linear", "--repair-ridge", "0.01",
                           "--out", str(tmp_path / "repaired"))
    assert status == 0, err
    assert "repair:     linear folded into model.layers.1.mlp.down_proj" in out
    record = json.loads((tmp_path / "repaired" / "depthprune.json").read_text())["repair"]
    assert record["method"] == "linear" and record["layer"] == 1 and record["options"]["repair_ridge"] == 0.01
    assert record["fit"]["after"]["residual_error"] < record["fit"]["before"]["residual_error"]
    assert record["calibration"]["samples"] == 16 and record["calibration"]["tokens"] > 0
    plain, repaired = _weights(tmp_path / "plain"), _weights(tmp_path / "repaired")
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in repaired.items()}
    changed = [k for k in plain if not torch.equal(plain[k], repaired[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "repaired")  # plain transformers, no remote code
    assert model.config.num_hidden_layers == 4


def test_the_api_repairs_a_copy_of_a_loaded_model(tiny_checkpoint, tiny_corpus, tmp_path):
    model, tokenizer = depthprune.load_model(str(tiny_checkpoint))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = depthprune.prune(model, tmp_path / "r", layers="3-4", tokenizer=tokenizer, repair="linear",
                              data=depthprune.DataOptions(str(tiny_corpus), samples=16, seq_len=24),
                              repair_ridge=0.01, progress=False)
    assert record["repair"]["folded_into"] == "model.layers.2.mlp.down_proj"
    assert depthprune.num_layers(model) == 6  # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_repair_it_cannot_make_is_one_line_and_writes_nothing(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = str(tmp_path / "p")
    data = ["--data", str(tiny_corpus), "--samples", "8", "--seq-len", "24"]
    cases = [
        (["--layers", "2-3", "--repair", "linear"], "fits its map on calibration text: pass --data"),
        (["--n", "2", "--criterion", "perplexity-greedy", "--repair", "linear", *data], "one contiguous block"),
        (["--layers", "0-1", "--repair", "linear", *data], "cannot repair a cut starting at layer 0"),
        (["--layers", "1,3", "--repair", "linear", *data], "one contiguous block of layers"),
        (["--layers", "2-3", "--repair-ridge", "0.1", *data], "a repair option without --repair"),
        (["--layers", "2-3", "--repair", "linear", "--repair-ridge", "-1", *data], "--repair-ridge must be at least 0"),
        (["--layers", "2-3", "--repair", "linear", "--format", "gguf", *data], "`depthprune export` it to GGUF"),
    ]
    for extra, message in cases:
        assert_clean_failure(capsys, ["prune", str(tiny_checkpoint), *extra, "--out", out], message,
                             watch=[tmp_path, tiny_checkpoint])
