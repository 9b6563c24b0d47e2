"""Sweep settings: YAML + flags, and a clear error for every bad value."""

from __future__ import annotations

import re

import pytest

from depthprune.errors import DepthpruneError
from depthprune.sweep.metrics import flatten_metrics
from depthprune.sweep.plan import block_sizes
from depthprune.sweep.settings import resolve_config, settings_record


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("model: gemma3-270m\ndata: c4.jsonl\nfractions: 0:0.3:0.1\ncriteria: [deepest]\nlimit: 5\n")
    c = resolve_config(path, limit=7, heal=None)
    assert c.model == "gemma3-270m" and c.fractions == [0.0, 0.1, 0.2, 0.3] and c.criteria == ["deepest"]
    assert c.limit == 7 and c.heal == ["none"]
    assert block_sizes(c, 18) == [0, 2, 4, 5]
    assert block_sizes(resolve_config(data="x", n="0,4,2,4"), 18) == [0, 2, 4]


@pytest.mark.parametrize("settings,message", [
    ({"data": "x", "fractions": "0,1.2"}, "out of range"),
    ({"data": "x", "fractions": "0:0.5"}, "start:stop:step"),
    ({"data": "x", "heal_fractions": "-0.1"}, "out of range"),
    ({"data": "x", "criteria": "similarity,random"}, "unknown criterion 'random'"),
    ({"data": "x", "heal": "qlora"}, "needs training text"),
    ({"data": "x", "tasks": "mmlu,squad"}, "unknown task 'squad'"),
    ({}, "needs calibration data"),
])
def test_bad_settings(settings, message):
    with pytest.raises(DepthpruneError, match=message):
        resolve_config(**settings)


@pytest.mark.parametrize("old,new", [("strategies", "criteria"), ("tokens", "token_mode")])
def test_renamed_keys_say_their_new_name(tmp_path, old, new):
    path = tmp_path / "old.yaml"
    path.write_text(f"data: x\n{old}: [deepest]\n")
    with pytest.raises(DepthpruneError, match=f"^sweep setting '{old}' was renamed '{new}'"):
        resolve_config(path)


def test_task_data_keys_come_from_the_registry(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: x\ntasks: [boolq]\nboolq: b.jsonl\nmmlu: m\n")
    c = resolve_config(path, mmlu="m2")
    assert c.task_data == {"boolq": "b.jsonl", "mmlu": "m2"}
    record = settings_record(c)
    assert record["boolq"] == "b.jsonl" and record["c4"] is None and "task_data" not in record


def test_heal_options_merge_file_and_flags(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: x\nheal_options: {rank: 2, steps: 4}\n")
    assert resolve_config(path, heal_options={"steps": "6"}).heal_options == {"rank": 2, "steps": 6}


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: x\nfractons: [0.1]\n")
    with pytest.raises(DepthpruneError, match="unknown sweep setting.*fractons"):
        resolve_config(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(DepthpruneError, match="not valid YAML"):
        resolve_config(path)


def test_n_beyond_the_model():
    with pytest.raises(DepthpruneError, match="out of range"):
        block_sizes(resolve_config(data="x", n="0,30"), 30)


@pytest.mark.parametrize("settings,message", [
    ({"n": [0, 2.5]}, "'n' must be a list of whole numbers, got 2.5"),
    ({"samples": True}, "'samples' must be a whole number, got True"),
    ({"subjects": [["astronomy"]]}, "'subjects' must be a list of strings"),
    ({"heal_options": {"rank": 2.5}}, "'heal_options.rank' must be a whole number, got 2.5"),
    ({"heal_options": "steps=4"}, "'heal_options' must be a mapping"),
    ({"lm_eval": "hellaswag_local", "tasks": "hellaswag", "hellaswag": "h.jsonl"}, "both a native task and an lm_eval"),
    ({"criteria": ""}, "at least one criterion"),
    ({"token_mode": "middle"}, "sweep setting 'token_mode': unknown value 'middle', choose one of last, all"),
    ({"mmlu_limit": 0}, "sweep setting 'mmlu_limit' must be at least 1, got 0"),
    ({"n": "", "fractions": []}, "no points"),
])
def test_wrong_types_and_combinations(settings, message):
    with pytest.raises(DepthpruneError, match=re.escape(message)):
        resolve_config(data="x", **settings)


def test_flags_arrive_as_text():
    c = resolve_config(data="x", n="4", limit="7", samples="16", heal_fractions="0.25")
    assert (c.n, c.limit, c.samples, c.heal_fractions) == ([4], 7, 16, [0.25])


def test_settings_record_resolves_local_paths_and_leaves_out_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "smollm2-135m").mkdir()  # an alias stays an alias even beside a folder of that name
    relative = settings_record(resolve_config(data="docs.jsonl", out="a", mmlu="cais/mmlu"))
    absolute = settings_record(resolve_config(data=str(tmp_path / "docs.jsonl"), out="elsewhere/b",
                                              mmlu="cais/mmlu"))
    assert relative == absolute and "out" not in relative
    assert relative["data"] == str(tmp_path / "docs.jsonl")
    assert (relative["model"], relative["mmlu"]) == ("smollm2-135m", "cais/mmlu")


def test_metric_names_say_which_accuracy():
    evaluation = {
        "tasks": {
            "mmlu": {"accuracy": 0.3, "chance": 0.25},
            "boolq": {"accuracy": 0.6, "majority_baseline": 0.62},
            "arc_easy": {"accuracy": 0.5, "accuracy_norm": 0.45, "chance": 0.25},
            "hellaswag": {"accuracy": 0.35, "accuracy_norm": 0.4, "chance": 0.25},
            "c4": {"loss": 3.0, "loss_over_log_vocab": 0.3, "perplexity": 20.1},
        },
        "lm_eval": {"tasks": {"arc_challenge": {"acc": 0.2, "acc_norm": 0.28, "num_examples": 10},
                              "piqa_local": {"acc": 0.6, "acc_norm": None}}},
    }
    assert flatten_metrics(evaluation, None, None) == {
        "mmlu_acc": 0.3, "mmlu_chance": 0.25, "boolq_acc": 0.6, "boolq_chance": 0.62,
        "arc_easy_acc": 0.5, "arc_easy_acc_norm": 0.45, "arc_easy_chance": 0.25,
        "hellaswag_acc": 0.35, "hellaswag_acc_norm": 0.4, "hellaswag_chance": 0.25,
        "c4_loss": 3.0, "c4_loss_norm": 0.3, "c4_ppl": 20.1,
        "arc_challenge_acc": 0.2, "arc_challenge_acc_norm": 0.28, "arc_challenge_chance": 0.25,
        "piqa_acc": 0.6, "piqa_chance": None,
    }
