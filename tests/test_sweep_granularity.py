"""The sweep's granularity axis (issue 20): points crossed with granularities, a sub-layer point's cut as
``prune --granularity`` makes it, its parameters and KV cache in the cost phase, older stores read and
migrated, and the report's series, tables and the second x-axis (fraction of parameters removed)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import depthprune
from depthprune.errors import DepthpruneError
from depthprune.evaluate.suite import evaluate
from depthprune.sweep.plan import UNPRUNED_POINT, Point, point_dir, sweep_points
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import eval_options, resolve_config
from depthprune.sweep.store import LAYER_ONLY_COLUMNS, load_cost, load_points, point_key

# The points table of a store written before issue 20 (no granularity: every point cut whole layers)
BEFORE_ISSUE_20 = """CREATE TABLE points (key TEXT PRIMARY KEY, n INTEGER NOT NULL, fraction REAL NOT NULL,
    criterion TEXT NOT NULL, heal TEXT NOT NULL, removed_layers TEXT NOT NULL, distance REAL, metrics TEXT NOT NULL,
    details TEXT NOT NULL, finished TEXT NOT NULL, repair TEXT NOT NULL DEFAULT 'none')"""


def _settings(tiny_checkpoint, tiny_corpus, shared_data, out, **changes) -> dict:
    settings = dict(model=str(tiny_checkpoint), out=str(out), data=str(tiny_corpus), samples=8, seq_len=16, n="0,2",
                    criteria="deepest", granularity="layer,attention", tasks="boolq,c4", limit=4,
                    boolq=str(shared_data / "boolq" / "dev.jsonl"), c4=str(tiny_corpus), c4_sequences=2,
                    c4_seq_len=16, cost_prefill_len=8, cost_decode_tokens=2, cost_repeats=1, cost_rounds=1)
    return {**settings, **changes}


def test_points_cross_granularities_and_layer_keys_stay():
    c = resolve_config(data="docs.jsonl", n=[0, 2], criteria=["deepest", "similarity"],
                       granularity=["layer", "attention"], heal=["none", "lora"], heal_data="docs.jsonl",
                       tasks=["c4"], c4="docs.jsonl")
    points = sweep_points(c, 8)
    assert points[0] == UNPRUNED_POINT and len(points) == 1 + 2 * 2 * 2
    assert points[1] == Point(2, "deepest", "none") and points[1].key == "n=2/deepest/none"
    attention = [p for p in points if p.granularity == "attention"]
    assert [p.key for p in attention] == ["n=2@attention/deepest/none", "n=2@attention/deepest/lora",
                                          "n=2@attention/similarity/none", "n=2@attention/similarity/lora"]
    assert point_dir(Path("out"), attention[1]) == Path("out/points/n002-attention-deepest-lora")
    assert point_key(2, "deepest", "none", granularity="mlp") == "n=2@mlp/deepest/none"


@pytest.mark.parametrize("changes, message", [
    (dict(granularity=["head"]), "unknown granularity 'head'"),
    (dict(granularity=[]), "at least one granularity"),
    (dict(granularity=["attention"], criteria=["taylor"]), "criterion 'taylor' cannot choose attention"),
    (dict(granularity=["layer", "attention"], repair=["none", "linear"]), "repair 'linear' refits"),
])
def test_granularities_it_cannot_cut_are_refused_at_config_time(changes, message):
    with pytest.raises(DepthpruneError, match=message):
        resolve_config(data="docs.jsonl", n=[0, 2], tasks=["c4"], c4="docs.jsonl", **changes)


def test_a_sublayer_sweep_cuts_as_prune_does_and_times_each_cut_size(tiny_checkpoint, tiny_corpus, shared_data,
                                                                    tmp_path):
    settings = _settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s")
    c = resolve_config(**settings)
    run_sweep(c, log=lambda _: None)
    points = {p["key"]: p for p in load_points(tmp_path / "s")}
    assert list(points) == ["n=0/unpruned/none", "n=2/deepest/none", "n=2@attention/deepest/none"]
    layer, attention = points["n=2/deepest/none"], points["n=2@attention/deepest/none"]
    assert attention["granularity"] == "attention" and layer["granularity"] == "layer"
    assert attention["removed_layers"] == layer["removed_layers"] == [3, 4]
    # Two layers' attention is a fraction of what two whole layers hold
    assert 0 < attention["metrics"]["params_removed"] < layer["metrics"]["params_removed"] < 0.5
    assert points["n=0/unpruned/none"]["metrics"]["params_removed"] == 0

    # The attention point's quality is that of the checkpoint prune writes for the same cut
    data = depthprune.DataOptions(str(tiny_corpus), samples=8, seq_len=16)
    depthprune.prune(str(tiny_checkpoint), tmp_path / "attn", n=2, criterion="deepest", data=data,
                     granularity="attention", progress=False)
    record = json.loads((tmp_path / "attn" / "depthprune.json").read_text())
    expected = evaluate(str(tmp_path / "attn"), ["c4"], options=eval_options(c), progress=False, c4=settings["c4"])
    assert attention["metrics"]["c4_loss"] == pytest.approx(expected["tasks"]["c4"]["loss"], rel=1e-5)
    assert attention["metrics"]["params_removed"] == pytest.approx(
        1 - record["parameters_after"] / record["parameters_before"], abs=1e-9)

    # One cost record per cut size; an attention cut keeps its layers and drops their KV cache
    costs = load_cost(tmp_path / "s")
    assert set(costs) == {(0, "layer"), (2, "layer"), (2, "attention")}
    full, cut_layers, cut_attention = costs[0, "layer"], costs[2, "layer"], costs[2, "attention"]
    assert cut_attention["num_layers"] == full["num_layers"] == cut_layers["num_layers"] + 2
    assert cut_attention["kv_bytes_per_token"] == cut_layers["kv_bytes_per_token"] == \
        pytest.approx(full["kv_bytes_per_token"] * 4 / 6)
    assert cut_layers["parameters"] < cut_attention["parameters"] < full["parameters"]
    assert attention["metrics"]["kv_bytes_per_token"] == cut_attention["kv_bytes_per_token"]
    _check_report(tmp_path / "s")


def _check_report(folder: Path) -> None:
    """The granularity is a series of its own, a column of the tables, and the figures come against the fraction
    of parameters removed as well."""
    from depthprune.report import stats
    from depthprune.report.html import write_report
    from depthprune.report.tables import cost_table, main_table
    from depthprune.report.terminal import results_lines

    points = load_points(folder)
    assert set(stats.curves(points, "c4_loss_norm")) == {("deepest", "none"), ("deepest@attention", "none")}
    assert stats.curve_label("deepest@attention", "lora") == "deepest, attention, lora-healed"
    assert stats.selections(points) == {"deepest": {2: [3, 4]}, "deepest@attention": {2: [3, 4]}}
    assert stats.overlap(points) == []  # a layer cut and an attention cut do not remove the same thing
    header, rows = main_table(points)
    assert header[:3] == ["removed", "granularity", "layers (0-based)"] and "parameters removed (%)" in header
    assert [row[1] for row in rows] == ["layer", "layer", "attention"]
    cost_header, cost_rows = cost_table(points)
    assert [row[0] for row in cost_rows] == ["0", "2", "2 attention"] and "KV cache (KiB/token)" in cost_header
    lines = results_lines(folder, points, {})
    assert lines[0].split()[:2] == ["n", "granularity"] and "params_removed" in lines[0]
    page = write_report(folder).read_text()
    assert "deepest, attention, not healed" in page and "fraction of parameters removed" in page
    for figure in ("c4_loss_parameters.png", "accuracy_parameters.png", "selections.png"):
        assert (folder / "report" / figure).stat().st_size > 5_000
    csv_header = (folder / "report" / "results.csv").read_text().splitlines()[0].split(",")
    assert csv_header[:2] == ["n", "granularity"]


def test_a_store_from_before_the_axis_is_read_and_gains_the_column(tiny_checkpoint, tiny_corpus, shared_data,
                                                                   tmp_path):
    settings = _settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", granularity="layer",
                         tasks="c4")
    run_sweep(resolve_config(**settings), log=lambda _: None)
    store = tmp_path / "s" / "results.sqlite"
    # What a version before issue 20 wrote: no granularity column, a cost table keyed by n alone
    with sqlite3.connect(store) as db:
        db.execute("ALTER TABLE points RENAME TO today")
        db.execute(BEFORE_ISSUE_20)
        db.execute(f"INSERT INTO points SELECT {', '.join(LAYER_ONLY_COLUMNS)} FROM today")
        db.execute("DROP TABLE today")
        records = db.execute("SELECT n, num_layers, record, measured FROM cost").fetchall()
        db.execute("DROP TABLE cost")
        db.execute("CREATE TABLE cost (n INTEGER PRIMARY KEY, num_layers INTEGER NOT NULL, record TEXT NOT NULL, "
                   "measured TEXT NOT NULL)")
        db.executemany("INSERT INTO cost VALUES (?,?,?,?)", records)
    db.close()
    before = {p["key"]: p["metrics"] for p in load_points(tmp_path / "s")}
    assert {p["granularity"] for p in load_points(tmp_path / "s")} == {"layer"}
    assert set(load_cost(tmp_path / "s")) == {(0, "layer"), (2, "layer")}

    # Growing the sweep by an attention cut keeps the old points (nothing reruns) and adds the new one
    run_sweep(resolve_config(**{**settings, "granularity": "layer,attention"}), log=lambda _: None)
    after = {p["key"]: p for p in load_points(tmp_path / "s")}
    assert set(after) == {*before, "n=2@attention/deepest/none"}
    assert all(after[key]["metrics"]["c4_loss"] == metrics["c4_loss"] for key, metrics in before.items())
    with sqlite3.connect(store) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(points)")]
    db.close()
    assert columns[-1] == "granularity"
    assert set(load_cost(tmp_path / "s")) == {(0, "layer"), (2, "layer"), (2, "attention")}
