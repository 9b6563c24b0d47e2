"""Native ARC and HellaSwag: prompts as lm-eval builds them, scores equal to a naive implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluate import _llama, naive_loglikelihoods, tokenizer  # noqa: F401  (the session tokenizer fixture)

from depthprune.errors import DepthpruneError
from depthprune.evaluate.multiple_choice import multiple_choice_accuracy
from depthprune.evaluate.registry import EVAL_TASKS
from depthprune.evaluate.tasks.arc_easy import build_prompt, evaluate_arc_easy, load_arc
from depthprune.evaluate.tasks.hellaswag import evaluate_hellaswag, load_hellaswag


def test_hellaswag_docs_equal_lm_evals(shared_data):
    datasets = pytest.importorskip("datasets")
    utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    path = shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl"
    rows = [json.loads(line) for line in path.open()]
    theirs = utils.process_docs(datasets.Dataset.from_list(rows))
    ours = load_hellaswag(str(path))
    assert [(d["query"], d["choices"], d["gold"]) for d in theirs] == [(p, e, y) for p, e, y in ours]


def test_arc_prompt_is_exact(shared_data):
    question, choices, answer = load_arc(str(shared_data / "arc" / "ARC-Easy-Test.jsonl"))[0]
    assert build_prompt(question) == ("Question: Which statement best explains why photosynthesis is the "
                                      "foundation of most food webs?\nAnswer:")
    assert choices[0] == "Sunlight is the source of energy for nearly all ecosystems." and answer == 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_equal_naive_and_norm_uses_characters(tokenizer, shared_data, batch_size):  # noqa: F811
    model = _llama(tokenizer)
    examples = load_hellaswag(str(shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl"))[:5]
    r = multiple_choice_accuracy(model, tokenizer, [p for p, _, _ in examples], [e for _, e, _ in examples],
                                 [y for *_, y in examples], batch_size=batch_size, progress=False)
    for (prompt, endings, _), scores in zip(examples, r["scores"], strict=True):
        np.testing.assert_allclose(scores, naive_loglikelihoods(model, tokenizer, prompt, [" " + e for e in endings]),
                                   atol=1e-4)
    expected_norm = [int(np.argmax(np.array(s) / [len(e) for e in endings]))
                     for s, (_, endings, _) in zip(r["scores"], examples, strict=True)]
    assert r["predictions_norm"] == expected_norm and r["chance"] == 0.25


def test_arc_matches_lm_eval(tokenizer, shared_data):  # noqa: F811
    pytest.importorskip("lm_eval")
    from depthprune.evaluate.lm_eval_bridge import lm_eval_summary, run_lm_eval

    model = _llama(tokenizer)
    theirs = lm_eval_summary(run_lm_eval(model, tokenizer, ["arc_easy_local"], data_dir=shared_data, limit=10,
                                         batch_size=4))["arc_easy_local"]
    ours = evaluate_arc_easy(model, tokenizer, str(shared_data / "arc" / "ARC-Easy-Test.jsonl"), limit=10, progress=False)
    assert ours["accuracy"] == pytest.approx(theirs["acc"]) and ours["accuracy_norm"] == pytest.approx(theirs["acc_norm"])


def test_hellaswag_accuracy_by_hand(tokenizer, shared_data):  # noqa: F811
    """Both accuracies equal those counted from naive scores: acc_norm by score per character, acc by score."""
    model, path = _llama(tokenizer), shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl"
    r = evaluate_hellaswag(model, tokenizer, str(path), limit=4, progress=False)
    correct, correct_norm = 0, 0
    for prompt, endings, label in load_hellaswag(str(path))[:4]:
        scores = naive_loglikelihoods(model, tokenizer, prompt, [" " + e for e in endings])
        correct += int(np.argmax(scores)) == label
        correct_norm += int(np.argmax(np.array(scores) / [len(e) for e in endings])) == label
    assert r["accuracy_norm"] == correct_norm / 4 and r["accuracy"] == correct / 4
    assert r["num_examples"] == 4 and r["chance"] == 0.25


def test_results_name_each_measure_as_the_store_does(tokenizer, shared_data):  # noqa: F811
    """ARC-Easy's result is the task arc_easy; both results call acc 'accuracy' and acc_norm 'accuracy_norm',
    and flatten to the store's columns {task}_acc and {task}_acc_norm."""
    model = _llama(tokenizer)
    arc = evaluate_arc_easy(model, tokenizer, str(shared_data / "arc" / "ARC-Easy-Test.jsonl"), limit=2,
                            progress=False)
    hellaswag = evaluate_hellaswag(model, tokenizer, str(shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl"),
                                   limit=2, progress=False)
    assert arc["task"] == "arc_easy" == EVAL_TASKS.get("arc_easy").name
    for r in (arc, hellaswag):
        assert {"accuracy", "accuracy_norm", "chance", "num_examples"} <= set(r) and "accuracy_unnormalized" not in r
        assert EVAL_TASKS.get(r["task"]).flatten(r) == {f"{r['task']}_acc": r["accuracy"],
                                                       f"{r['task']}_acc_norm": r["accuracy_norm"],
                                                       f"{r['task']}_chance": 0.25}
    assert EVAL_TASKS.get("hellaswag").headline == "hellaswag_acc_norm"


def test_bad_data(tmp_path):
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps({"question": {"stem": "q", "choices": [{"text": "a", "label": "A"},
                                                                    {"text": "b", "label": "B"}]}, "answerKey": "E"}) + "\n")
    with pytest.raises(DepthpruneError, match="arc.jsonl:1: answer 'E'"):
        load_arc(str(bad))
    bad.write_text('{"question": 3}\n')
    with pytest.raises(DepthpruneError, match="arc.jsonl:1: not an ARC record"):
        load_arc(str(bad))
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["e1", "e2"], "label": 5}) + "\n")
    with pytest.raises(DepthpruneError, match="hs.jsonl:1: label 5 out of range"):
        load_hellaswag(str(hs))
    with pytest.raises(DepthpruneError, match="not found"):
        load_hellaswag(str(tmp_path / "missing.jsonl"))
