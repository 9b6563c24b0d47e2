"""`sweep` and `results` under bad input, kills, a second run and a moved folder: one clean line for every
mistake with nothing written, and after any interruption a rerun that ends with the uninterrupted table."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import yaml
from badinput import assert_clean_failure, run, snapshot

from depthprune.cli.app import main
from depthprune.measure.distances import AngularDistances
from depthprune.outputs import LOCK_SUFFIX, TEMP_MARK, output_lock
from depthprune.sweep import point as point_module
from depthprune.sweep import run as sweep_module
from depthprune.sweep.store import load_points

SRC = Path(__file__).resolve().parents[1] / "src"


def _settings(checkpoint: Path, corpus: Path, **changes) -> dict:
    """A sweep of two points on the 6-layer tiny model that runs in seconds."""
    return {**dict(model=str(checkpoint), data=str(corpus), samples=4, seq_len=16, n=[0, 2], criteria=["deepest"],
                   tasks=["c4"], c4=str(corpus), c4_sequences=2, c4_seq_len=16, batch_size=4, cost=False), **changes}


def _write(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_checkpoint, tiny_corpus) -> tuple[Path, Path]:
    """A finished sweep and its config file: the existing OUT that failed runs must leave untouched."""
    root = tmp_path_factory.mktemp("finished")
    config = _write(root / "sweep-config.yaml", _settings(tiny_checkpoint, tiny_corpus))
    assert main(["sweep", "--config", str(config), "--out", str(root / "sweep")]) == 0
    return root / "sweep", config


@pytest.fixture
def old(finished, tmp_path) -> Path:
    """A copy of the finished sweep, for a test to run into (and maybe damage first)."""
    copy = tmp_path / "old"
    shutil.copytree(finished[0], copy)
    return copy


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name or p.name.endswith((LOCK_SUFFIX, "-journal"))
            or "depthprune-force" in p.name]


# ------------------------------------------------------------------------------------------ bad input


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _wrong_schema(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE points (name TEXT, value REAL)")


def _analysis_of_another_model(old: Path) -> None:
    AngularDistances(np.zeros((4, 4)), 4, "last", {}).save(old / "analysis")  # 3 layers; the model has 6


class Case(NamedTuple):
    name: str
    flags: tuple = ()  # {model}, {corpus}, {corpus_dir}, {binary}, {file}, {old}, {new}, {data} are filled in
    yaml: dict = {}
    message: str = ""
    damage: object = None  # a function of the existing OUT, run before the command


HEALING = ("--heal", "none,lora", "--heal-data", "{corpus}")
CASES = [
    # wrong types in the YAML
    Case("yaml-n-float", yaml={"n": 1.5}, message="'n' must be a list of whole numbers, got 1.5"),
    Case("yaml-samples-text", yaml={"samples": "many"}, message="'samples' must be a whole number, got 'many'"),
    Case("yaml-criteria-number", yaml={"criteria": 3}, message="unknown criterion '3'"),
    Case("yaml-criteria-mapping", yaml={"criteria": {"a": 1}}, message="'criteria' must be a list of strings"),
    Case("yaml-strategies-renamed", yaml={"strategies": ["deepest"]}, message="'strategies' was renamed 'criteria'"),
    Case("yaml-heal-options-list", yaml={"heal_options": [1]}, message="'heal_options' must be a mapping"),
    Case("yaml-model-list", yaml={"model": ["a", "b"]}, message="'model' must be a string"),
    Case("yaml-seq-len-list", yaml={"seq_len": [16, 32]}, message="'seq_len' must be a whole number, got [16, 32]"),
    Case("yaml-cost-text", yaml={"cost": "sometimes"}, message="'cost' must be true or false"),
    Case("yaml-fractions-mapping", yaml={"n": None, "fractions": {"a": 1}}, message="'fractions' must be a list of numbers"),
    Case("yaml-unknown-key", yaml={"fractons": [0.1]}, message="unknown sweep setting(s) fractons"),
    Case("yaml-token-mode", yaml={"token_mode": "middle"}, message="'token_mode': unknown value 'middle'"),
    Case("yaml-tokens-renamed", yaml={"tokens": "all"}, message="'tokens' was renamed 'token_mode'"),
    Case("yaml-heal-lr-text", HEALING, {"heal_options": {"lr": "fast"}}, "'heal_options.lr' must be a number"),
    Case("yaml-heal-lr-negative", HEALING, {"heal_options": {"lr": -1}}, "--lr"),
    Case("yaml-heal-method", HEALING, {"heal_options": {"method": "full"}}, "cannot set 'method'"),
    Case("yaml-heal-unknown-option", HEALING, {"heal_options": {"speed": 2}}, "unknown healing option(s) speed"),
    Case("yaml-task-twice", yaml={"lm_eval": ["c4"]}, message="both a native task and an lm_eval task"),
    # bad flags
    Case("fractions-abc", ("--fractions", "0,abc"), yaml={"n": None}, message="must be a list of numbers, got 'abc'"),
    Case("fractions-backwards", ("--fractions", "1:0:0.1"), yaml={"n": None}, message="bad fractions '1:0:0.1'"),
    Case("fractions-two-parts", ("--fractions", "0:0.5"), yaml={"n": None}, message="start:stop:step"),
    Case("fractions-out-of-range", ("--fractions", "0,1.5"), yaml={"n": None}, message="out of range"),
    Case("n-float", ("--n", "1.5"), message="'n' must be a list of whole numbers, got '1.5'"),
    Case("n-negative", ("--n", "-1"), message="0 or more layers, got -1"),
    Case("n-beyond-the-model", ("--n", "0,6", "--out", "{new}"), message="n=6 out of range: the model has 6 layers"),
    Case("samples-zero", ("--samples", "0"), message="'samples' must be at least 1, got 0"),
    Case("limit-text", ("--limit", "abc"), message="'limit' must be a whole number"),
    Case("unknown-criterion", ("--criteria", "random"), message="unknown criterion 'random'"),
    Case("heal-option-not-key-value", ("--heal-option", "steps"), message="'steps' is not KEY=VALUE"),
    Case("heal-option-unknown", (*HEALING, "--heal-option", "speed=2"), message="unknown healing option(s) speed"),
    Case("heal-option-bad-value", (*HEALING, "--heal-option", "rank=2.5"), message="'heal_options.rank' must be a whole"),
    Case("unknown-task", ("--tasks", "squad"), message="unknown task 'squad'"),
    Case("unknown-heal-method", ("--heal", "magic"), message="unknown healing method 'magic'"),
    Case("unknown-granularity", ("--granularity", "head"), message="unknown granularity 'head'"),
    Case("repair-of-sublayer-cut", ("--granularity", "layer,attention", "--repair", "none,linear"),
         message="repair 'linear' refits a removed block of whole layers"),
    Case("unknown-heal-preset", (*HEALING, "--heal-preset", "turbo"), message="unknown preset 'turbo'"),
    # missing or unreadable inputs
    Case("model-missing", ("{old}-model",), message="not found"),
    Case("model-without-config", ("{corpus_dir}",), message="has no config.json"),
    # (a new OUT: the existing one would refuse other calibration data first)
    Case("calibration-missing", ("--data", "/nonexistent/c4.jsonl", "--out", "{new}"), message="not found"),
    Case("calibration-binary", ("--data", "{binary}", "--out", "{new}"), message="binary.jsonl"),
    Case("task-data-not-given", ("--tasks", "c4,boolq"), message="task 'boolq' needs its data"),
    Case("task-data-missing", ("--tasks", "boolq", "--boolq", "/nonexistent/boolq.jsonl"), message="boolq.jsonl"),
    Case("task-data-binary", ("--tasks", "boolq", "--boolq", "{binary}"), message="binary.jsonl"),
    Case("mmlu-subject-unknown", ("--tasks", "mmlu", "--mmlu", "{data}/mmlu", "--subjects", "cooking"),
         message="unknown MMLU subject"),
    Case("heal-data-not-given", ("--heal", "none,lora"), message="needs training text"),
    Case("heal-data-missing", ("--heal", "lora", "--heal-data", "/nonexistent/train.jsonl"), message="not found"),
    Case("heal-data-binary", ("--heal", "lora", "--heal-data", "{binary}"), message="binary.jsonl"),
    # the output
    Case("out-inside-the-model", ("--out", "{model}/sweep"), message="overlaps the input"),
    Case("out-contains-the-data", ("--out", "{corpus_dir}"), message="overlaps the input"),
    Case("out-is-a-file", ("--out", "{file}"), message="is not a directory"),
    Case("out-inside-a-file", ("--out", "{file}/sweep"), message="which is a file"),
    Case("out-other-settings", ("--samples", "5"), message="other settings (samples)"),
    Case("out-not-a-sweep", damage=lambda old: (old / "sweep.yaml").unlink(), message="does not hold a sweep"),
    Case("sweep-yaml-corrupt", damage=lambda old: (old / "sweep.yaml").write_text("model: [unclosed\n"),
         message="not a readable sweep record"),
    Case("results-random-bytes", damage=lambda old: _random_bytes(old / "results.sqlite"),
         message="results.sqlite' is not a readable depthprune results table"),
    Case("results-wrong-schema", damage=lambda old: _wrong_schema(old / "results.sqlite"),
         message="points table has the columns name, value"),
    Case("analysis-corrupt", damage=lambda old: (old / "analysis" / "distances.json").write_text("{not json"),
         message="or pass --force"),
    Case("analysis-of-another-model", damage=_analysis_of_another_model, message="distances of a 3-layer model"),
]


def _fill(text: str, places: dict) -> str:
    return text.format(**places)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_sweep_input(case, finished, old, tmp_path, tiny_checkpoint, tiny_corpus, shared_data, capsys):
    binary, file = tmp_path / "binary.jsonl", tmp_path / "file.txt"
    _random_bytes(binary)
    file.write_text("not a folder\n")
    if case.damage:
        case.damage(old)
    new = tmp_path / "new"
    places = dict(model=tiny_checkpoint, corpus=tiny_corpus, corpus_dir=tiny_corpus.parent, binary=binary, file=file,
                  old=old, new=new, data=shared_data)
    settings = _settings(tiny_checkpoint, tiny_corpus, **case.yaml)
    config = _write(tmp_path / "config.yaml", {k: v for k, v in settings.items() if v is not None})
    flags = [_fill(f, places) for f in case.flags]
    model = flags.pop(0) if flags and not flags[0].startswith("--") else []
    argv = ["sweep", *([model] if model else []), "--config", config, "--out", old, *flags]
    assert_clean_failure(capsys, argv, case.message, watch=[old, new, tiny_checkpoint, tiny_corpus, binary])
    assert not _leftovers(tmp_path) and not _leftovers(tiny_corpus.parent)


def test_out_equal_to_the_working_directory(finished, old, monkeypatch, capsys):
    monkeypatch.chdir(old)
    assert_clean_failure(capsys, ["sweep", "--config", finished[1], "--out", "."], "current directory", watch=[old])
    assert_clean_failure(capsys, ["sweep", "--config", finished[1], "--out", "./", "--force"], "current directory",
                         watch=[old])


@pytest.mark.parametrize("place,message", [
    ("missing", "no results.sqlite"),
    ("random-bytes", "not a readable depthprune results table"),
    ("wrong-schema", "points table has the columns"),
    ("csv-is-a-directory", "is a directory"),
    ("csv-inside-a-file", "which is a file"),
    ("csv-over-the-results", "overlaps the input"),
])
def test_bad_results_input(place, message, old, tmp_path, capsys):
    argv = ["results", old]
    if place == "missing":
        argv = ["results", tmp_path / "nowhere"]
    elif place == "random-bytes":
        _random_bytes(old / "results.sqlite")
    elif place == "wrong-schema":
        _wrong_schema(old / "results.sqlite")
    elif place == "csv-is-a-directory":
        argv += ["--csv", old / "analysis"]
    elif place == "csv-inside-a-file":
        argv += ["--csv", old / "sweep.yaml" / "table.csv"]
    else:
        argv += ["--csv", old / "results.sqlite"]
    assert_clean_failure(capsys, argv, message, watch=[old])


def test_failed_start_leaves_no_out_and_the_corrected_rerun_works(finished, tmp_path, tiny_corpus, capsys):
    out, binary = tmp_path / "new", tmp_path / "binary.jsonl"
    _random_bytes(binary)
    base = ["sweep", "--config", finished[1], "--out", out]
    for flags, message in [(["--n", "0,6"], "out of range"), (["--tasks", "boolq", "--boolq", binary], "binary.jsonl"),
                           (["--n", "0,x"], "whole numbers")]:
        assert_clean_failure(capsys, [*base, *flags], message, watch=[out, tiny_corpus])
    assert not out.exists() and not _leftovers(tmp_path)
    code, _, err = run(capsys, *base)
    assert code == 0, err
    assert [p["n"] for p in load_points(out)] == [0, 2]


def test_a_second_sweep_into_the_same_out_is_refused(finished, old, capsys):
    with output_lock(old):  # what a running sweep holds
        assert_clean_failure(capsys, ["sweep", "--config", finished[1], "--out", old], "another depthprune run",
                             watch=[old])


# ------------------------------------------------------------------------------------------ resume and --force


def _fail(*args, **kwargs):
    raise AssertionError("recomputed")


def test_moved_sweep_resumes_whatever_the_path_spelling(finished, tmp_path, tiny_corpus, monkeypatch, capsys):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(finished[0], moved)
    before = load_points(moved)
    monkeypatch.setattr(point_module, "_evaluate", _fail)
    monkeypatch.setattr(sweep_module, "measure_texts", _fail)
    monkeypatch.chdir(moved.parent)
    relative_data = os.path.relpath(tiny_corpus, moved.parent)
    for flags in (["--out", "moved"], ["--out", "moved/"], ["--out", "./moved"], ["--out", str(moved)],
                  ["--out", "moved", "--data", relative_data]):
        code, _, err = run(capsys, "sweep", "--config", finished[1], *flags)
        assert code == 0, err
    assert load_points(moved) == before
    assert not _leftovers(tmp_path)


def test_force_replaces_the_old_sweep_only_when_complete(finished, old, tmp_path, monkeypatch, capsys):
    before = snapshot(old)
    real, calls = point_module._evaluate, {"n": 0}

    def dying(*args, **kwargs):  # the forced sweep is interrupted in its second point
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(point_module, "_evaluate", dying)
    forced = ["sweep", "--config", finished[1], "--out", old, "--samples", "5", "--force"]
    assert run(capsys, *forced)[0] == 130
    assert snapshot(old) == before and (tmp_path / ".old.depthprune-force").is_dir()
    assert_clean_failure(capsys, forced[:-1], "other settings (samples)", watch=[old])

    code, _, err = run(capsys, *forced)  # continues the new sweep: only the unfinished point runs
    assert code == 0, err
    assert calls["n"] == 3
    assert yaml.safe_load((old / "sweep.yaml").read_text())["samples"] == 5
    assert [p["n"] for p in load_points(old)] == [0, 2] and not _leftovers(tmp_path)


# ------------------------------------------------------------------------------------------ kills


def _heal_settings(model: Path, corpus: Path) -> dict:
    """Three cuts, the middle one healed (LoRA, 6 steps, a checkpoint every step)."""
    return _settings(model, corpus, n=[0, 2, 4], heal=["none", "lora"], heal_fractions=[0.3], heal_data=str(corpus),
                     heal_options=dict(steps=6, batch_size=2, seq_len=16, rank=2, warmup=1, eval_every=3,
                                       save_every=1, val_sequences=2))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint, tiny_corpus) -> list[dict]:
    root = tmp_path_factory.mktemp("uninterrupted")
    config = _write(root / "config.yaml", _heal_settings(tiny_checkpoint, tiny_corpus))
    assert main(["sweep", "--config", str(config), "--out", str(root / "sweep")]) == 0
    return load_points(root / "sweep")


def _table(points: list[dict]) -> list[tuple]:
    return [(p["n"], p["criterion"], p["heal"], p["removed_layers"], p["distance"],
             {k: v if v is None else pytest.approx(v, rel=1e-5) for k, v in p["metrics"].items()
              if k not in ("wall_s", "cpu_s")}) for p in points]  # timings, not results


def _rows(out: Path) -> int:
    try:
        with sqlite3.connect(f"{(out / 'results.sqlite').as_uri()}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM points").fetchone()[0]
    except sqlite3.Error:
        return 0


def _killed_in_a_subprocess(argv: list, ready, cwd: Path) -> None:
    """Run the CLI in a new process and SIGKILL it once ``ready()`` (nothing of it can clean up)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with (cwd / "log.txt").open("a") as log:  # a file, not a pipe: a full pipe would stall the sweep
        process = subprocess.Popen([sys.executable, "-m", "depthprune.cli", *map(str, argv)], cwd=cwd, env=env,
                                   stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, "the sweep ended before it could be killed:\n" + (cwd / "log.txt").read_text()
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.005)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL


def _terminated_in_this_process(argv: list, ready) -> int:
    """Run the CLI here and send this process SIGTERM once ``ready()``: the real signal through main's handler,
    without the seconds a new Python process takes to import torch."""
    done = threading.Event()

    def watch():
        while not done.is_set():
            if ready():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    late = []  # a SIGTERM arriving after main returned must not end pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code = main([str(a) for a in argv])
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
    assert not late, "the sweep ended before it could be terminated"
    return code


# One sweep interrupted four times, each signal at two moments: the points are recorded in the order
# n=0, n=2 unhealed, n=2 healed, n=4, so each moment below comes after the previous one.
INTERRUPTIONS = [
    (signal.SIGKILL, "analysis", lambda out: (out / "sweep.yaml").is_file()),  # written just before measuring
    (signal.SIGTERM, "first point recorded", lambda out: _rows(out) >= 1),
    (signal.SIGKILL, "healing", lambda out: (out / "points" / "n002-deepest-lora" / "healed" / "checkpoint").is_dir()),
    (signal.SIGTERM, "healed point recorded", lambda out: _rows(out) >= 3),
]


def test_interrupted_sweep_reruns_to_the_uninterrupted_table(uninterrupted, tmp_path, tiny_checkpoint, tiny_corpus):
    out = tmp_path / "sweep"
    config = _write(tmp_path / "config.yaml", _heal_settings(tiny_checkpoint, tiny_corpus))
    argv = ["sweep", "--config", config, "--out", out]
    for sig, _, ready in INTERRUPTIONS:
        if sig == signal.SIGKILL:
            _killed_in_a_subprocess(argv, lambda ready=ready: ready(out), tmp_path)
        else:
            assert _terminated_in_this_process(argv, lambda ready=ready: ready(out)) == 143
            assert not _leftovers(tmp_path), "SIGTERM unwinds: lock and temporaries removed at once"
    assert main([str(a) for a in argv]) == 0
    assert _table(load_points(out)) == _table(uninterrupted)
    assert not _leftovers(tmp_path) and not (out / "points").exists()
