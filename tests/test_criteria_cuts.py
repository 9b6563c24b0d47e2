"""Every criterion from the CLI and the API: non-contiguous cuts stay KV-cache-exact and save/load-exact,
``depthprune.json`` carries the criterion and its own scores, and bad input is a one-line error."""

from __future__ import annotations

import pytest
import torch
from badinput import assert_clean_failure
from conftest import VOCAB, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import depthprune
from depthprune.cli.app import main
from depthprune.config import DataOptions
from depthprune.errors import DepthpruneError
from depthprune.model.record import read_record
from depthprune.model.surgery import layers_removed, remove_layers
from depthprune.select import CRITERIA

SPREAD = [0, 2, 5]  # first, inner and last layer: nothing contiguous about it

SCORES = {"similarity": "distance_by_start", "block-influence": "block_influence",
          "iterative-similarity": "distance_when_removed", "perplexity-greedy": "loss_after_step",
          "perplexity-oneshot": "loss_without_layer", "taylor": "importance", "taylor-plus": "protected"}


def _input(length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_non_contiguous_cut_is_kv_cache_exact(arch):
    model = remove_layers(tiny_model(arch), SPREAD)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, min_new_tokens=10)
    assert torch.equal(model.generate(_input(6), use_cache=True, **kwargs),
                       model.generate(_input(6), use_cache=False, **kwargs))


@torch.no_grad()
def test_non_contiguous_cut_is_save_load_exact(arch, tmp_path):
    model = tiny_model(arch)
    with layers_removed(model, SPREAD) as cut:
        expected = cut(_input(), use_cache=False).logits
        cut.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(reloaded(_input(), use_cache=False).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("criterion", [c for c in CRITERIA.names() if c != "deepest"])
def test_every_criterion_prunes_from_the_cli(criterion, tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "cut"
    code = main(["prune", str(tiny_checkpoint), "--n", "3", "--criterion", criterion, "--data", str(tiny_corpus),
                 "--samples", "6", "--seq-len", "16", "--batch-size", "4", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    record = read_record(out)
    assert record["criterion"] == criterion and len(record["removed_layers"]) == 3
    assert SCORES[criterion] in record["criterion_scores"]
    assert depthprune.select.format_layers(record["removed_layers"]) in stdout
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, min_new_tokens=6)
        assert torch.equal(reloaded.generate(_input(5), use_cache=True, **kwargs),
                           reloaded.generate(_input(5), use_cache=False, **kwargs))


@pytest.mark.parametrize("criterion", ["perplexity-greedy", "taylor"])
def test_every_criterion_prunes_from_the_api(criterion, tiny_corpus, tmp_path):
    model = tiny_model("gemma3")
    before = model(_input(), use_cache=False).logits
    record = depthprune.prune(model, tmp_path / "cut", n=2, criterion=criterion, tokenizer=tiny_tokenizer(),
                              data=DataOptions(str(tiny_corpus), samples=6, seq_len=16), progress=False)
    assert record["criterion"] == criterion and record["layers_after"] == 4
    torch.testing.assert_close(model(_input(), use_cache=False).logits, before, atol=0, rtol=0)  # restored


def test_api_refuses_a_calibration_criterion_without_data(tmp_path):
    with pytest.raises(DepthpruneError, match="needs calibration text"):
        depthprune.prune(tiny_model("llama"), tmp_path / "cut", n=2, criterion="taylor", tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("argv,message", [
    (["--n", "2", "--criterion", "shortest-path"], "invalid choice: 'shortest-path'"),
    (["--n", "2", "--criterion", "perplexity-greedy"], "needs calibration text: pass --data"),
    (["--n", "2", "--criterion", "taylor"], "needs calibration text: pass --data"),
    (["--n", "2", "--criterion", "block-influence"], "needs --distances DIR"),
    (["--n", "6", "--criterion", "perplexity-oneshot", "--data", "{corpus}", "--seq-len", "16"], "out of range"),
    (["--n", "9", "--criterion", "iterative-similarity", "--data", "{corpus}", "--seq-len", "16"], "out of range"),
])
def test_bad_criterion_input_is_one_line(argv, message, tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    argv = [a.replace("{corpus}", str(tiny_corpus)) for a in argv]
    assert_clean_failure(capsys, ["prune", tiny_checkpoint, *argv, "--out", tmp_path / "cut"], message,
                         watch=[tmp_path])
