"""``agreement``: the share of multiple-choice questions where a model picks a reference model's choice (issue 19)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from badinput import assert_clean_failure
from conftest import VOCAB, tiny_model, tiny_tokenizer

from depthprune.evaluate.registry import EVAL_TASKS
from depthprune.evaluate.suite import evaluate, predictions

MC_TASKS = ["boolq", "arc_easy", "hellaswag"]


def _words(rng, n):
    return " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small files of the three tasks in words the tiny tokenizer knows (choices of several lengths)."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("mc")
    boolq = [{"passage": _words(rng, 12), "question": _words(rng, 4), "label": i % 2 == 0} for i in range(6)]
    arc = [{"id": str(i), "question": {"stem": _words(rng, 6), "choices": [
        {"text": _words(rng, rng.randint(1, 4)), "label": label} for label in "ABCD"]}, "answerKey": "ABCD"[i % 4]}
        for i in range(12)]
    hella = [{"activity_label": "w5", "ctx_a": _words(rng, 6), "ctx_b": _words(rng, 3),
              "endings": [_words(rng, rng.randint(1, 5)) for _ in range(4)], "label": i % 4} for i in range(12)]
    files = {}
    for name, rows in (("boolq", boolq), ("arc_easy", arc), ("hellaswag", hella)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second tiny Llama with other random weights, with the same tokenizer."""
    path = tmp_path_factory.mktemp("other-llama")
    model = tiny_model("llama")
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_model_agrees_with_itself(tiny_checkpoint, data):
    r = evaluate(str(tiny_checkpoint), MC_TASKS, reference=str(tiny_checkpoint), progress=False, **data)
    for task in MC_TASKS:
        t = r["tasks"][task]
        assert (t["agreement"], t["agreement_n"]) == (1.0, t["num_examples"])
        assert "examples" not in t  # details only when asked for
        assert EVAL_TASKS.get(task).flatten(t)[f"{task}_agreement"] == 1.0
    assert r["reference"] == {"model": str(tiny_checkpoint), "tasks": MC_TASKS}
    plain = evaluate(str(tiny_checkpoint), MC_TASKS, progress=False, **data)
    for task in MC_TASKS:  # every other key as without a reference
        kept = {k: v for k, v in r["tasks"][task].items() if not k.startswith("agreement") and k != "seconds"}
        assert kept == {k: v for k, v in plain["tasks"][task].items() if k != "seconds"}


def test_agreement_equals_the_share_computed_by_hand(tiny_checkpoint, other_checkpoint, data):
    mine = predictions(evaluate(str(tiny_checkpoint), MC_TASKS, details=True, progress=False, **data))
    theirs = predictions(evaluate(str(other_checkpoint), MC_TASKS, details=True, progress=False, **data))
    # The choices the headline metrics count: acc for ARC, acc_norm for HellaSwag.
    detailed = evaluate(str(other_checkpoint), ["hellaswag", "arc_easy"], details=True, progress=False, **data)
    assert theirs["hellaswag"] == [e["prediction_norm"] for e in detailed["tasks"]["hellaswag"]["examples"]]
    assert theirs["arc_easy"] == [e["prediction"] for e in detailed["tasks"]["arc_easy"]["examples"]]
    r = evaluate(str(tiny_checkpoint), MC_TASKS, reference=str(other_checkpoint), progress=False, **data)
    shares = []
    for task in MC_TASKS:
        share = sum(a == b for a, b in zip(mine[task], theirs[task], strict=True)) / len(mine[task])
        assert r["tasks"][task]["agreement"] == pytest.approx(share)
        assert r["tasks"][task]["agreement_n"] == len(mine[task])
        shares.append(share)
    assert min(shares[1:]) < 1.0  # the two models do differ somewhere
    # Precomputed predictions (e.g. a sweep's full model) and a loaded reference model give the same.
    again = evaluate(str(tiny_checkpoint), MC_TASKS, reference=theirs, progress=False, **data)
    from depthprune.model.load import load_model

    loaded, tokenizer = load_model(str(other_checkpoint))
    model, _ = load_model(str(tiny_checkpoint))
    third = evaluate(model, MC_TASKS, tokenizer=tokenizer, reference=loaded, progress=False, **data)
    for task in MC_TASKS:
        assert again["tasks"][task]["agreement"] == third["tasks"][task]["agreement"] == r["tasks"][task]["agreement"]


def test_cli_prints_agreement(tiny_checkpoint, other_checkpoint, data, tmp_path, capsys):
    from depthprune.cli.app import main

    out = tmp_path / "r.json"
    code = main(["eval", str(tiny_checkpoint), "--reference", str(other_checkpoint), "--arc-easy", data["arc_easy"],
                 "--hellaswag", data["hellaswag"], "--limit", "5", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("agreement with reference") == 2
    result = json.loads(out.read_text())
    assert result["tasks"]["hellaswag"]["agreement_n"] == 5
    assert "acc_norm" in result["tasks"]["hellaswag"]["agreement_choice"]


def test_bad_reference(tiny_checkpoint, data, tmp_path, capsys):
    other = tmp_path / "bigvocab"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert_clean_failure(capsys, ["eval", tiny_checkpoint, "--reference", other, "--boolq", data["boolq"]],
                         "the reference model's vocabulary has 104 tokens, the model's 96", watch=[tmp_path])
    c4 = tmp_path / "c4.jsonl"
    c4.write_text(json.dumps({"text": "w1 w2 w3"}) + "\n")
    assert_clean_failure(capsys, ["eval", tiny_checkpoint, "--reference", tiny_checkpoint, "--c4", c4,
                                   "--c4-seq-len", "16"],
                         "--reference compares multiple-choice answers, but no chosen task has them", watch=[tmp_path])


def test_bad_precomputed_reference(tiny_checkpoint, data):
    from depthprune.errors import DepthpruneError

    with pytest.raises(DepthpruneError, match="the reference predictions have no task arc_easy"):
        evaluate(str(tiny_checkpoint), ["arc_easy"], reference={"boolq": [0, 1]}, progress=False, **data)
    with pytest.raises(DepthpruneError, match="arc_easy: the reference has 2 predictions, the model 12 questions"):
        evaluate(str(tiny_checkpoint), ["arc_easy"], reference={"arc_easy": [0, 1]}, progress=False, **data)
