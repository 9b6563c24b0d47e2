"""Plug-ins declare their own options: a criterion, a task and a healing method registered at runtime, each
with an option of its own, get their flags (``prune``/``eval``/``heal`` and ``sweep``), their YAML keys and
API keywords checked with the usual one-line messages, and the value reaches the plug-in. Nothing else is
edited; each plug-in is unregistered afterwards."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import pytest
from badinput import assert_clean_failure

import depthprune
from depthprune.cli.app import build_parser, main
from depthprune.errors import DepthpruneError
from depthprune.evaluate.registry import EVAL_TASKS, EvalTask, accuracy_flatten, eval_options_class
from depthprune.heal import HEAL_METHODS, HealMethod, heal_options_class, resolve_options
from depthprune.options import fields_with, option
from depthprune.select import CRITERIA, Criterion, Selection, SelectionContext, choose
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s for action in sub._actions for s in action.option_strings}


def _help(command: str) -> str:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command].format_help()


# ------------------------------------------------------------------------------------------ a criterion


@dataclass
class WindowOptions:
    window: int = option(3, minimum=1, help="test-window: the size of the window the test criterion records")


SEEN: list[int] = []  # the windows the criterion was asked with


def _select_window(context: SelectionContext, n: int) -> Selection:
    SEEN.append(context.options.window)
    start = context.num_layers - 1 - n
    return Selection(tuple(range(start, start + n)), "test-window", None, {"window": context.options.window})


WINDOW = Criterion(name="test-window", description="the deepest block, recording its option; a test plug-in",
                   needs="nothing", contiguous=True, select=_select_window, options=WindowOptions)


@pytest.fixture
def window():
    CRITERIA.register(WINDOW)
    SEEN.clear()
    yield
    CRITERIA.unregister("test-window")


def test_a_criterion_option_is_a_flag_of_prune_and_sweep(window):
    assert "--window" in _flags("prune") and "--window" in _flags("sweep")
    assert "the size of the window" in _help("prune") and "(default: 3)" in _help("sweep")


def test_a_criterion_option_is_a_sweep_key_checked_like_the_others(window, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("data: x\ncriteria: [test-window]\nwindow: 5\n")
    assert resolve_config(config).window == 5
    assert resolve_config(config, window=7).window == 7  # a flag wins over the file
    config.write_text("data: x\ncriteria: [test-window]\nwindow: 0\n")
    with pytest.raises(DepthpruneError, match=r"^sweep setting 'window' must be at least 1, got 0$"):
        resolve_config(config)


def test_the_option_reaches_the_criterion(window, tiny_checkpoint, tmp_path, capsys):
    assert choose("test-window", 2, SelectionContext(6)).scores == {"window": 3}  # the default
    assert main([str(a) for a in ["prune", tiny_checkpoint, "--n", "2", "--criterion", "test-window",
                                  "--window", "4", "--out", tmp_path / "cli"]]) == 0
    assert json.loads((tmp_path / "cli" / "depthprune.json").read_text())["criterion_scores"] == {"window": 4}
    record = depthprune.prune(str(tiny_checkpoint), tmp_path / "api", n=2, criterion="test-window", window=6,
                              progress=False)
    assert record["criterion_scores"] == {"window": 6} and SEEN == [3, 4, 6]


def test_the_sweep_gives_the_criterion_its_option(window, tiny_checkpoint, tiny_corpus, tmp_path):
    config = resolve_config(model=str(tiny_checkpoint), out=str(tmp_path / "s"), data=str(tiny_corpus), samples=8,
                            seq_len=24, n="0,2", criteria="test-window", tasks="c4", c4=str(tiny_corpus),
                            c4_sequences=2, c4_seq_len=16, cost=False, window=5)
    run_sweep(config, log=lambda _: None)
    assert SEEN and set(SEEN) == {5}


def test_bad_criterion_options_are_one_line_errors(window, tiny_checkpoint, tmp_path, capsys):
    assert_clean_failure(capsys, ["prune", tiny_checkpoint, "--n", "2", "--criterion", "test-window", "--window", "0",
                                  "--out", tmp_path / "p"], "--window must be at least 1, got 0", watch=[tmp_path])
    with pytest.raises(DepthpruneError, match="--window must be a whole number, got 'wide'"):
        depthprune.prune(str(tiny_checkpoint), tmp_path / "p", n=2, criterion="test-window", window="wide")
    with pytest.raises(DepthpruneError, match="unknown criterion option.s. windw: the registered criteria declare "
                                              "window"):
        depthprune.prune(str(tiny_checkpoint), tmp_path / "p", n=2, criterion="test-window", windw=2)
    assert not (tmp_path / "p").exists()


@dataclass
class OtherWindowOptions:
    window: int = option(2, help="another criterion's window: the same name, declared again")


def test_an_option_name_is_declared_once_per_registry(window):
    other = dataclasses.replace(WINDOW, name="test-other", options=OtherWindowOptions)
    with pytest.raises(ValueError, match="option 'window' is already an option of criterion 'test-window'"):
        CRITERIA.register(other)
    assert "test-other" not in CRITERIA


def test_an_unregistered_criterion_takes_its_flag_along():
    CRITERIA.register(WINDOW)
    CRITERIA.unregister("test-window")
    assert "--window" not in _flags("prune") and "test-window" not in CRITERIA


# ------------------------------------------------------------------------------------------ a task


@dataclass
class WordsOptions:
    words_minimum: int = option(1, minimum=0, help="test-words: the fewest words a counted text has")


def _run_words(model, tokenizer, source, options, *, details=False, progress=True) -> dict:
    texts = [t for t in depthprune.load_texts(source, None) if len(t.split()) >= options.words_minimum]
    return {"task": "test_words", "accuracy": len(texts) / 40, "chance": 0.5, "num_examples": len(texts),
            "words_minimum": options.words_minimum}


WORDS = EvalTask(name="test_words", description="texts long enough, a test plug-in", title="Words (test)",
                 flag="--test-words", metavar="FILE", data_help="a .jsonl file of texts",
                 check=lambda source, options: None, run=_run_words, headline="test_words_acc",
                 higher_is_better=True, chance=0.5, flatten=accuracy_flatten("test_words"),
                 summary=lambda r: [("test_words", "acc", r["accuracy"], r["chance"], r["num_examples"])],
                 options=WordsOptions)


@pytest.fixture
def words():
    EVAL_TASKS.register(WORDS)
    yield
    EVAL_TASKS.unregister("test_words")


def test_a_task_option_is_a_flag_a_key_and_reaches_the_task(words, tiny_checkpoint, tiny_corpus, tmp_path):
    assert "--words-minimum" in _flags("eval") and "--words-minimum" in _flags("sweep")
    assert eval_options_class()(words_minimum=4).words_minimum == 4
    assert resolve_config(data="x", tasks="test_words", words_minimum=2).words_minimum == 2
    with pytest.raises(DepthpruneError, match="sweep setting 'words_minimum' must be at least 0, got -1"):
        resolve_config(data="x", tasks="test_words", words_minimum=-1)
    result = depthprune.evaluate_model(str(tiny_checkpoint), ["test_words"], test_words=str(tiny_corpus),
                                       words_minimum=30, progress=False)
    assert result["tasks"]["test_words"]["words_minimum"] == 30
    assert main(["eval", str(tiny_checkpoint), "--test-words", str(tiny_corpus), "--words-minimum", "20",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["test_words"]["words_minimum"] == 20


# ------------------------------------------------------------------------------------------ a healing method


@dataclass
class FreezeOptions:
    freeze_embeddings: bool = option(False, resumable=True, help="test-freeze: keep the embeddings as they are")


FREEZE = HealMethod("test-freeze", "full fine-tuning, optionally without the embeddings; a test plug-in", False,
                    prepare=lambda model, options: model, merge=lambda model, options: model, options=FreezeOptions)


@pytest.fixture
def freeze():
    HEAL_METHODS.register(FREEZE)
    yield
    HEAL_METHODS.unregister("test-freeze")


def test_a_healing_method_option_is_a_flag_a_key_and_reaches_the_method(freeze):
    assert "--freeze-embeddings" in _flags("heal") and "--no-freeze-embeddings" in _flags("heal")
    assert resolve_options(method="test-freeze", freeze_embeddings=True).freeze_embeddings is True
    assert "freeze_embeddings" in fields_with(heal_options_class(), "resumable")
    with pytest.raises(DepthpruneError, match="--freeze-embeddings must be true or false, got 'yes'"):
        resolve_options(method="test-freeze", freeze_embeddings="yes")
    config = resolve_config(data="x", heal="test-freeze", heal_data="x", heal_options={"freeze_embeddings": "true"})
    assert config.heal_options == {"freeze_embeddings": True}
    with pytest.raises(DepthpruneError, match="'heal_options.freeze_embeddings' must be true or false"):
        resolve_config(data="x", heal="test-freeze", heal_data="x", heal_options={"freeze_embeddings": "maybe"})
