"""The same battery for every registered criterion and task, and plug-ins registered at runtime (a new
criterion and a new task declared in this module) showing up in the CLI, the sweep and the report with no
other file touched."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from badinput import assert_clean_failure
from conftest import tiny_model, tiny_tokenizer

from depthprune.cli.app import build_parser, main
from depthprune.data import load_texts, tokenize
from depthprune.errors import DepthpruneError
from depthprune.evaluate import EvalOptions
from depthprune.evaluate.registry import EVAL_TASKS, EvalTask, accuracy_flatten
from depthprune.measure.distances import measure_distances
from depthprune.report.figures import criterion_style
from depthprune.report.html import write_report
from depthprune.report.stats import task_title
from depthprune.select import CRITERIA, NEEDS, Criterion, Selection, SelectionContext, choose
from depthprune.sweep.metrics import flatten_metrics
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import _check_task_data, resolve_config
from depthprune.sweep.store import load_points

# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def context(tiny_corpus) -> SelectionContext:
    """Everything any criterion may ask for, on the 6-layer tiny Llama."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    sequences = tokenize(load_texts(str(tiny_corpus), 8, 0), tokenizer, 24)
    distances = measure_distances(model, sequences, batch_size=4, pad_token_id=0, progress=False)
    return SelectionContext(6, distances, model, tokenizer, sequences)


def _options(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s for action in sub._actions for s in action.option_strings}


def _choices(parser: argparse.ArgumentParser, command: str, flag: str):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return next(a for a in sub._actions if flag in a.option_strings)


def check_criterion(name: str, context: SelectionContext) -> None:
    """A criterion's contract: exactly n distinct sorted layers in range, contiguous when declared, deterministic."""
    entry = CRITERIA.get(name)
    assert entry.needs in NEEDS and entry.description and "\n" not in entry.description
    for n in range(1, context.num_layers):
        selection = choose(name, n, context)
        layers = selection.layers
        assert selection.criterion == name and len(layers) == n and list(layers) == sorted(set(layers))
        assert all(0 <= layer < context.num_layers for layer in layers)
        if entry.contiguous:
            assert layers[-1] - layers[0] + 1 == n
        assert choose(name, n, context) == selection  # deterministic
        json.dumps(selection.scores)  # written into depthprune.json as it is


# ------------------------------------------------------------------------------------------ every criterion


@pytest.mark.parametrize("name", CRITERIA.names())
def test_every_criterion_keeps_the_contract(name, context):
    check_criterion(name, context)


@pytest.mark.parametrize("name", CRITERIA.names())
def test_every_criterion_is_a_prune_choice_and_a_sweep_key(name):
    parser = build_parser()
    assert name in _choices(parser, "prune", "--criterion").choices
    assert name in _choices(parser, "sweep", "--criteria").help
    assert resolve_config(data="x", criteria=name).criteria == [name]


def test_a_criterion_that_needs_distances_refuses_to_run_without():
    needing = [c.name for c in CRITERIA if c.needs == "distances"]
    for name in needing:
        with pytest.raises(DepthpruneError, match=f"criterion '{name}' needs angular distances"):
            choose(name, 2, SelectionContext(6))


def test_criteria_have_distinct_styles():
    styles = [criterion_style(name) for name in CRITERIA.names()]
    assert len(set(styles)) == len(styles) and ("black", "*") not in styles


# ------------------------------------------------------------------------------------------ every task


def _sources(shared_data: Path, corpus: Path) -> dict[str, str]:
    """Small real data of each built-in task; a task added later adds its own line here (its test)."""
    return {"mmlu": str(shared_data / "mmlu"), "boolq": str(shared_data / "boolq" / "dev.jsonl"), "c4": str(corpus),
            "arc_easy": str(shared_data / "arc" / "ARC-Easy-Test.jsonl"),
            "hellaswag": str(shared_data / "hellaswag" / "hellaswag_val_subset1000.jsonl")}


SMALL = EvalOptions(shots=1, subjects=["astronomy"], mmlu_limit=2, limit=2, batch_size=4, c4_sequences=2,
                    c4_seq_len=16)


@pytest.mark.parametrize("name", EVAL_TASKS.names())
def test_every_task_has_its_flags_and_titles(name):
    task = EVAL_TASKS.get(name)
    parser = build_parser()
    assert task.flag in _options(parser, "eval") and task.flag in _options(parser, "sweep")
    assert name in _choices(parser, "sweep", "--tasks").help
    assert task.title and task_title(name) == task.title and task.description and "\n" not in task.description
    assert task.headline.startswith(name + "_")


@pytest.mark.parametrize("name", EVAL_TASKS.names())
def test_every_task_refuses_bad_data_in_one_line(name, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(bytes(range(256)) * 8)
    task = EVAL_TASKS.get(name)
    assert_clean_failure(capsys, ["eval", tiny_checkpoint, "--tasks", name, task.flag, bad, "--c4-seq-len", 16],
                         "bad.jsonl",
                         watch=[tmp_path, tiny_checkpoint])
    with pytest.raises(DepthpruneError, match=f"task '{name}' needs its data: pass {task.flag}"):
        _check_task_data(resolve_config(data="x", tasks=name))  # the sweep's check before any work


@pytest.mark.parametrize("name", EVAL_TASKS.names())
def test_every_task_runs_flattens_and_summarises(name, tiny_checkpoint, tiny_corpus, shared_data):
    from depthprune.evaluate.suite import evaluate, summary_rows

    source = _sources(shared_data, tiny_corpus)[name]
    result = evaluate(str(tiny_checkpoint), [name], options=SMALL, progress=False, **{name: source})
    task = EVAL_TASKS.get(name)
    metrics = flatten_metrics(result, None, None)
    assert isinstance(metrics[task.headline], float)
    if task.chance is not None:
        assert metrics[f"{name}_chance"] == pytest.approx(task.chance)
    assert [row[0] for row in summary_rows(result)] and all(row[0] == name for row in summary_rows(result))


# ------------------------------------------------------------------------------------------ plug-ins


def _block_influence(context: SelectionContext, n: int) -> Selection:
    """Test plug-in in the style of ShortGPT: drop the n layers that change their input least (1 - cosine)."""
    import torch

    batch = torch.tensor([s[:16] for s in context.sequences if len(s) >= 16][:4])
    with torch.no_grad():
        states = context.model(input_ids=batch, output_hidden_states=True).hidden_states
    scores = [float(1 - torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).mean())
              for i in range(context.num_layers)]
    layers = tuple(sorted(sorted(range(context.num_layers), key=lambda i: (scores[i], i))[:n]))
    return Selection(layers, "test_block_influence", None, {"influence_by_layer": [round(s, 6) for s in scores]})


PLUGIN_CRITERION = Criterion(name="test_block_influence", description="layers changing their input least, as "
                             "ShortGPT's block influence (Men et al. 2024); a test plug-in", needs="calibration",
                             contiguous=False, select=_block_influence)


def _load_words(source: str) -> list[str]:
    return load_texts(source, None)


def _run_words(model, tokenizer, source, options, *, details=False, progress=True) -> dict:
    texts = _load_words(source)[: options.limit]
    return {"task": "test_words", "accuracy": sum(len(t.split()) % 2 == 0 for t in texts) / len(texts),
            "chance": 0.5, "num_examples": len(texts)}


PLUGIN_TASK = EvalTask(
    name="test_words", description="even word counts, a test plug-in", title="Word parity (test)",
    flag="--test-words", metavar="FILE", data_help="a .jsonl file of texts",
    check=lambda source, options: _load_words(source), run=_run_words, headline="test_words_acc",
    higher_is_better=True, chance=0.5, flatten=accuracy_flatten("test_words"),
    summary=lambda r: [("test_words", "acc", r["accuracy"], r["chance"], r["num_examples"])])


@pytest.fixture
def plugins(monkeypatch):
    """The plug-ins registered for one test only (the registries are restored afterwards)."""
    monkeypatch.setattr(CRITERIA, "_entries", dict(CRITERIA._entries))
    monkeypatch.setattr(EVAL_TASKS, "_entries", dict(EVAL_TASKS._entries))
    CRITERIA.register(PLUGIN_CRITERION)
    EVAL_TASKS.register(PLUGIN_TASK)


def test_plugins_reach_the_cli_the_sweep_and_the_report(plugins, context, tiny_checkpoint, tiny_corpus, tmp_path,
                                                        capsys):
    check_criterion("test_block_influence", context)
    parser = build_parser()
    assert "test_block_influence" in _choices(parser, "prune", "--criterion").choices
    assert "--test-words" in _options(parser, "eval") and "--test-words" in _options(parser, "sweep")
    assert "test_words" in _choices(parser, "sweep", "--tasks").help

    # prune: a criterion that needs calibration text gets it, and its scores land in depthprune.json
    assert_clean_failure(capsys, ["prune", tiny_checkpoint, "--n", "2", "--criterion", "test_block_influence",
                                  "--out", tmp_path / "p"], "needs calibration text", watch=[tmp_path])
    assert main([str(a) for a in ["prune", tiny_checkpoint, "--n", "2", "--criterion", "test_block_influence",
                                  "--data", tiny_corpus, "--samples", "8", "--seq-len", "24", "--out", tmp_path / "p"]]) == 0
    record = json.loads((tmp_path / "p" / "depthprune.json").read_text())
    assert record["criterion"] == "test_block_influence" and len(record["criterion_scores"]["influence_by_layer"]) == 6

    # eval: the task's flag, its run and its summary rows
    assert main(["eval", str(tiny_checkpoint), "--test-words", str(tiny_corpus), "--limit", "10"]) == 0
    assert "test_words" in capsys.readouterr().out

    # the sweep: validation, a run, the store and the report
    with pytest.raises(DepthpruneError, match="task 'test_words' needs its data: pass --test-words FILE"):
        _check_task_data(resolve_config(data="x", tasks="test_words"))
    config = resolve_config(model=str(tiny_checkpoint), out=str(tmp_path / "s"), data=str(tiny_corpus), samples=8,
                            seq_len=24, n="0,2", criteria="similarity,test_block_influence", tasks="test_words",
                            test_words=str(tiny_corpus), limit=10, cost=False)
    run_sweep(config, log=lambda _: None)
    points = load_points(tmp_path / "s")
    assert {p["criterion"] for p in points} == {"unpruned", "similarity", "test_block_influence"}
    assert all(p["metrics"]["test_words_chance"] == 0.5 for p in points)
    html = write_report(tmp_path / "s").read_text()
    assert "Word parity (test)" in html and "ShortGPT" in html
    assert criterion_style("test_block_influence") not in [criterion_style(c) for c in ("similarity", "deepest")]


def test_a_registry_entry_declares_what_it_needs():
    with pytest.raises(ValueError, match="needs must be one of"):
        dataclasses.replace(PLUGIN_CRITERION, needs="a GPU")
