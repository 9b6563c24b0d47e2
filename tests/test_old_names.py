"""What was written under the names of before issue 18 still reads, under today's names.

The unpruned point was the criterion 'full' (key 'n=0/full/none'); a distances file said its token mode as
'tokens'; HellaSwag's result held acc_norm as 'accuracy' and acc as 'accuracy_unnormalized'. Reading changes
nothing on disk; a sweep that opens an old table to write renames it in one transaction, and resumes it
without running its finished points again.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from depthprune.config import TOKEN_MODES
from depthprune.evaluate.registry import EVAL_TASKS
from depthprune.measure.distances import AngularDistances, load_distances
from depthprune.sweep import point as point_module
from depthprune.sweep.metrics import flatten_metrics
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config
from depthprune.sweep.store import (
    DB_NAME,
    UNREPAIRED_COLUMNS,
    connect,
    load_failed,
    load_points,
    point_seconds,
    read_finished,
    save_failure,
    save_point,
)

BEFORE_ISSUE_19 = """CREATE TABLE points (key TEXT PRIMARY KEY, n INTEGER NOT NULL, fraction REAL NOT NULL,
    criterion TEXT NOT NULL, heal TEXT NOT NULL, removed_layers TEXT NOT NULL, distance REAL, metrics TEXT NOT NULL,
    details TEXT NOT NULL, finished TEXT NOT NULL)"""
EXAMPLES = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "examples").glob("*/results.sqlite"))


def _make_old(directory: Path, *, strategy_column: bool) -> None:
    """Turn a results table of today into one of before issue 18 (and, with ``strategy_column``, of issue 9)."""
    db = sqlite3.connect(directory / DB_NAME)
    with db:
        # the points table without the columns of issue 19 (repair) and issue 20 (granularity)
        db.execute("ALTER TABLE points RENAME TO today")
        db.execute(BEFORE_ISSUE_19)
        db.execute(f"INSERT INTO points SELECT {', '.join(UNREPAIRED_COLUMNS)} FROM today")
        db.execute("DROP TABLE today")
        for table in ("points", "failed"):
            db.execute(f"UPDATE {table} SET criterion = 'full', key = 'n=0/full/' || heal WHERE n = 0")
        if strategy_column:
            db.execute("ALTER TABLE points RENAME COLUMN criterion TO strategy")
    db.close()


def _raw(directory: Path, query: str) -> list[tuple]:
    db = sqlite3.connect(directory / DB_NAME)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def _store(directory: Path) -> None:
    db = connect(directory)
    for n, criterion in ((0, "unpruned"), (2, "deepest")):
        save_point(db, n=n, fraction=n / 6, criterion=criterion, heal="none", removed_layers=list(range(n)),
                   distance=None, metrics={"c4_loss": 3.0 + n}, details={"seconds": 5.0 + n})
    save_failure(db, n=0, criterion="unpruned", heal="none", error="worker died")
    db.close()


@pytest.mark.parametrize("strategy_column", [False, True], ids=["criterion-full", "strategy-full"])
def test_an_old_table_reads_under_todays_names_and_is_renamed_once_written(tmp_path, strategy_column):
    _store(tmp_path)
    _make_old(tmp_path, strategy_column=strategy_column)
    before = (tmp_path / DB_NAME).read_bytes()

    points = load_points(tmp_path)
    assert [(p["key"], p["criterion"]) for p in points] == [("n=0/unpruned/none", "unpruned"),
                                                            ("n=2/deepest/none", "deepest")]
    assert read_finished(tmp_path) == {"n=0/unpruned/none", "n=2/deepest/none"}
    assert list(load_failed(tmp_path)) == ["n=0/unpruned/none"]
    assert load_failed(tmp_path)["n=0/unpruned/none"]["criterion"] == "unpruned"
    assert (tmp_path / DB_NAME).read_bytes() == before  # reading writes nothing

    db = connect(tmp_path)  # what a sweep does before it writes
    try:
        assert point_seconds(db) == {"n=0/unpruned/none": 5.0, "n=2/deepest/none": 7.0}
    finally:
        db.close()
    assert _raw(tmp_path, "SELECT key, criterion FROM points ORDER BY n") == [("n=0/unpruned/none", "unpruned"),
                                                                              ("n=2/deepest/none", "deepest")]
    assert _raw(tmp_path, "SELECT key, criterion FROM failed") == [("n=0/unpruned/none", "unpruned")]
    assert load_points(tmp_path) == points


def test_a_row_written_again_under_the_old_name_gives_way_to_todays(tmp_path):
    """An older version that resumed a migrated table ran its n = 0 point again as 'full': today's row stays."""
    _store(tmp_path)
    db = sqlite3.connect(tmp_path / DB_NAME)
    with db:
        db.execute("INSERT INTO points (key, n, fraction, criterion, heal, removed_layers, distance, metrics, details, "
                   "finished) SELECT 'n=0/full/none', n, fraction, 'full', heal, removed_layers, distance, "
                   "'{\"c4_loss\": 9.0}', details, finished FROM points WHERE n = 0")
    db.close()
    connect(tmp_path).close()
    assert _raw(tmp_path, "SELECT key, metrics FROM points WHERE n = 0") == [("n=0/unpruned/none",
                                                                             '{"c4_loss": 3.0}')]


def _config(tiny_checkpoint, tiny_corpus, out: Path):
    return resolve_config(model=str(tiny_checkpoint), out=str(out), data=str(tiny_corpus), samples=8, seq_len=16,
                          n="0,2", criteria="deepest", tasks="c4", c4=str(tiny_corpus), c4_sequences=2,
                          c4_seq_len=16, cost=False)


def test_a_resumed_old_sweep_does_not_run_its_unpruned_point_again(tiny_checkpoint, tiny_corpus, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "sweep"
    run_sweep(_config(tiny_checkpoint, tiny_corpus, out), log=lambda _: None)
    finished = load_points(out)
    _make_old(out, strategy_column=True)

    evaluated = []
    real = point_module._evaluate
    monkeypatch.setattr(point_module, "_evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    lines = []
    run_sweep(_config(tiny_checkpoint, tiny_corpus, out), log=lines.append)
    assert evaluated == []  # both points were finished, the unpruned one under its old name
    assert _raw(out, "SELECT key, criterion FROM points ORDER BY n") == [("n=0/unpruned/none", "unpruned"),
                                                                         ("n=2/deepest/none", "deepest")]
    assert load_points(out) == finished


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_the_committed_examples_read_under_todays_names(example, tmp_path):
    points = load_points(example)
    unpruned = [p for p in points if p["n"] == 0]
    assert [(p["key"], p["criterion"]) for p in unpruned] == [("n=0/unpruned/none", "unpruned")]
    assert "full" not in {p["criterion"] for p in points}
    assert load_distances(example / "analysis").token_mode in TOKEN_MODES
    shutil.copy(example / DB_NAME, tmp_path / DB_NAME)  # opened to write: a copy, renamed in place
    connect(tmp_path).close()
    assert load_points(tmp_path) == points


def test_a_distances_file_that_says_tokens_still_loads(tmp_path):
    pairwise = [[0.0, 0.2, 0.3], [0.2, 0.0, 0.1], [0.3, 0.1, 0.0]]
    AngularDistances(np.array(pairwise), 4, "all", {"model": "tiny"}).save(tmp_path)
    raw = json.loads((tmp_path / "distances.json").read_text())
    assert raw["token_mode"] == "all" and "tokens" not in raw
    raw["tokens"] = raw.pop("token_mode")  # as written before issue 18
    (tmp_path / "distances.json").write_text(json.dumps(raw))
    old = load_distances(tmp_path)
    assert old.token_mode == "all" and "tokens" not in old.meta and old.meta["model"] == "tiny"


def test_an_old_hellaswag_result_flattens_to_the_same_columns():
    """The cost phase flattens every stored point again: an old record must give today's columns."""
    old = {"task": "hellaswag", "accuracy": 0.4, "accuracy_unnormalized": 0.35, "chance": 0.25, "num_examples": 60,
           "accuracy_note": "'accuracy' is lm-eval's acc_norm (per-character), 'accuracy_unnormalized' its acc"}
    new = {"task": "hellaswag", "accuracy": 0.35, "accuracy_norm": 0.4, "chance": 0.25, "num_examples": 60}
    expected = {"hellaswag_acc": 0.35, "hellaswag_acc_norm": 0.4, "hellaswag_chance": 0.25}
    assert EVAL_TASKS.get("hellaswag").flatten(old) == EVAL_TASKS.get("hellaswag").flatten(new) == expected
    assert flatten_metrics({"tasks": {"hellaswag": old}}, None, None) == expected
