"""The collapse detector on synthetic curves, the results store, and the report from synthetic points."""

from __future__ import annotations

import numpy as np
import pytest

from depthprune.report import collapse_point, write_report
from depthprune.similarity import AngularDistances
from depthprune.store import connect, finished_keys, load_points, save_point, to_csv


def test_collapse_point_flat_then_drop():
    fractions = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    scores = [0.60, 0.60, 0.59, 0.58, 0.30, 0.25]
    assert collapse_point(fractions, scores, 0.60, tolerance=0.02) == 0.3
    assert collapse_point(fractions, scores, 0.60, tolerance=0.005) == 0.1
    assert collapse_point(fractions, scores, 0.60, tolerance=0.5) == 0.5


def test_collapse_point_ignores_recovery_after_collapse_and_order():
    # A later point back above the line does not undo an earlier collapse; input order does not matter.
    assert collapse_point([0.3, 0.0, 0.1, 0.2], [0.6, 0.6, 0.2, 0.6], 0.6, tolerance=0.02) == 0.0


def _fake_sweep(tmp_path, with_cost=True):
    L = 10
    rng = np.random.default_rng(0)
    pairwise = np.abs(np.subtract.outer(np.arange(L + 1), np.arange(L + 1))) / (2 * L) + rng.uniform(0, .01, (L + 1,) * 2)
    d = AngularDistances(pairwise, 4, "last", {"model": "fake"})
    (tmp_path / "analysis").mkdir()
    d.save(tmp_path / "analysis")
    db = connect(tmp_path)
    for n in [0, 2, 4, 6]:
        for strategy in (["full"] if n == 0 else ["similarity", "deepest"]):
            kept = L - n
            cost = {"num_layers": kept}
            metrics = {"mmlu_acc": 0.5 - (0.2 if n >= 6 else 0), "mmlu_chance": 0.25, "c4_loss_norm": 0.3 + 0.02 * n}
            if with_cost:
                metrics.update(prefill_ms_per_token=1 + 0.5 * kept, decode_ms_per_token=2 + kept,
                               weight_bytes=1e6 + 1e5 * kept, peak_memory_bytes=2e6 + 1e5 * kept,
                               layer_prefill_ms_per_token=0.5, layer_weight_bytes=1e5)
            save_point(db, n=n, fraction=n / L, strategy=strategy, heal="none", removed_layers=list(range(n)),
                       distance=None if n == 0 else 0.1 * n, metrics=metrics,
                       details={"evaluation": {"model": "fake"}, "cost": cost})
    db.close()
    return tmp_path


def test_store_round_trip(tmp_path):
    _fake_sweep(tmp_path)
    points = load_points(tmp_path)
    assert len(points) == 7 and points[0]["n"] == 0 and points[-1]["removed_layers"] == list(range(6))
    assert "n=4/deepest/none" in finished_keys(connect(tmp_path))
    lines = to_csv(points).splitlines()
    assert lines[0].startswith("n,fraction,strategy,heal,removed_layers,distance,mmlu_acc")
    assert len(lines) == 8


def test_report_has_every_figure_and_the_fits(tmp_path):
    import json

    _fake_sweep(tmp_path)
    html = write_report(tmp_path).read_text()
    for name in ("accuracy.png", "c4_loss.png", "heatmap.png", "best_block.png", "cost.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5_000
    assert html.count("data:image/png;base64,") == 5
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    fit = summary["cost_fits"]["prefill_ms_per_token"]
    assert fit["per_unit"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)
    assert fit["slope_over_measured"] == pytest.approx(1.0)
    collapse = {(c["strategy"]): c["collapse_fraction"] for c in summary["collapse"]}
    assert collapse == {"similarity": 0.4, "deepest": 0.4}
