"""The report compares criteria: non-contiguous cuts written as '3,7,9-10' in every table, the layers each
criterion removes at each n, their Jaccard overlap, and the heatmap overlay of every removed layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from depthprune.measure.distances import AngularDistances
from depthprune.report import html as report
from depthprune.report import stats
from depthprune.report.html import write_report
from depthprune.report.stats import jaccard, overlap, selections
from depthprune.report.tables import main_table, selection_table
from depthprune.sweep.store import connect, load_points, save_point

L = 12
CUTS = {"similarity": {2: [8, 9], 4: [6, 7, 8, 9]},
        "block-influence": {2: [3, 9], 4: [3, 7, 9, 10]},
        "perplexity-greedy": {2: [8, 10], 4: [3, 8, 9, 10]}}


def criteria_sweep(tmp_path):
    pairwise = np.abs(np.subtract.outer(np.arange(L + 1), np.arange(L + 1))) / (2 * L)
    (tmp_path / "analysis").mkdir()
    AngularDistances(pairwise, 4, "last", {"model": "fake"}, block_influence=np.linspace(0.1, 0.5, L)).save(
        tmp_path / "analysis")
    db = connect(tmp_path)
    evaluation = {"model": "fake", "tasks": {"arc_easy": {"num_examples": 100}, "c4": {"vocab_size": 1000}}}
    save_point(db, n=0, fraction=0, criterion="unpruned", heal="none", removed_layers=[], distance=None,
               metrics={"arc_easy_acc": 0.6, "arc_easy_chance": 0.25, "c4_loss": 3.0, "c4_loss_norm": 0.43},
               details={"evaluation": evaluation})
    for criterion, by_n in CUTS.items():
        for n, layers in by_n.items():
            for heal in ("none", "lora") if n == 4 else ("none",):
                loss = 3 + 0.1 * n + 0.05 * len(criterion) - (0.2 if heal == "lora" else 0)
                save_point(db, n=n, fraction=n / L, criterion=criterion, heal=heal, removed_layers=layers,
                           distance=None, metrics={"arc_easy_acc": 0.6 - 0.02 * n, "arc_easy_chance": 0.25,
                                                   "c4_loss": loss, "c4_loss_norm": loss / 6.9},
                           details={"evaluation": evaluation})
    db.close()
    return tmp_path


def test_jaccard():
    assert jaccard([3, 7], [3, 7]) == 1 and jaccard([1], [2]) == 0 and jaccard([1, 2, 3], [2, 3, 4]) == 0.5


def test_selections_tables_and_overlap(tmp_path):
    points = load_points(criteria_sweep(tmp_path))
    assert selections(points) == CUTS
    header, rows = selection_table(points)
    assert header == ["n", "similarity", "block-influence", "perplexity-greedy"]
    assert rows == [["2", "8-9", "3,9", "8,10"], ["4", "6-9", "3,7,9-10", "3,8-10"]]
    pairs = {tuple(p["criteria"]): p["by_n"] for p in overlap(points)}
    assert pairs[("similarity", "block-influence")] == {2: pytest.approx(1 / 3, abs=1e-4), 4: pytest.approx(2 / 6, abs=1e-4)}
    assert pairs[("block-influence", "perplexity-greedy")][4] == pytest.approx(3 / 5, abs=1e-4)
    main_header, main_rows = main_table(points)
    cells = [row[1] for row in main_rows]
    assert "4: 3,7,9-10" in cells and "4: 6-9" in cells and "2: 3,9" in cells


def test_report_shows_the_comparison(tmp_path, monkeypatch):
    drawn = {}
    original = report.plot_heatmap

    def spy(distances, path, title=None, selections=None):
        drawn.update(selections or {})
        return original(distances, path, title, selections)

    monkeypatch.setattr(report, "plot_heatmap", spy)
    html = write_report(criteria_sweep(tmp_path)).read_text()
    assert drawn == CUTS  # every removed layer of every criterion, on the heatmap
    assert "<table id='selection-table'>" in html and "<table id='overlap-table'>" in html
    assert "<td>3,7,9-10</td>" in html and "block-influence / perplexity-greedy" in html
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["selections"]["block-influence"]["4"] == [3, 7, 9, 10]
    assert summary["overlap_jaccard"][0]["criteria"] == ["similarity", "block-influence"]
    assert (tmp_path / "report" / "selections.png").stat().st_size > 5_000
    # one curve per criterion, unhealed and healed, for the C4 loss and for accuracy
    curves = stats.curves(load_points(tmp_path), "c4_loss_norm")
    assert set(curves) == {(c, h) for c in CUTS for h in ("none", "lora")}
