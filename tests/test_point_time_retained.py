"""Each point's wall and CPU seconds (``wall_s``, ``cpu_s``) as the sweep stores them, and the report's "% of the
full model retained": its definition computed by hand, its table column, figure and summary entry; and two
healings of one cut drawn apart."""

from __future__ import annotations

import json
import time

import pytest

from depthprune.report.figures import plot_retained
from depthprune.report.html import write_report
from depthprune.report.stats import retained, with_retained
from depthprune.report.tables import main_table
from depthprune.report.terminal import results_lines
from depthprune.sweep import point as point_module
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config
from depthprune.sweep.store import connect, load_points, save_point

BUSY_S, ASLEEP_S = 0.4, 0.6


def _busy_then_asleep(*args, **kwargs) -> dict:
    """An evaluation that spends BUSY_S of CPU, then sleeps ASLEEP_S (wall time without CPU time)."""
    until = time.process_time() + BUSY_S
    while time.process_time() < until:
        pass
    time.sleep(ASLEEP_S)
    return {"model": "fake", "tasks": {}}


def test_a_point_stores_its_wall_and_cpu_seconds(tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(point_module, "_evaluate", _busy_then_asleep)
    c = resolve_config(model=str(tiny_checkpoint), out=str(tmp_path / "s"), data=str(tiny_corpus), samples=4,
                       seq_len=16, n="0,2", criteria="deepest", tasks="c4", c4=str(tiny_corpus), cost=False)
    run_sweep(c, log=lambda _: None)
    points = load_points(tmp_path / "s")
    assert len(points) == 2
    for p in points:
        wall, cpu = p["metrics"]["wall_s"], p["metrics"]["cpu_s"]
        # The sleep counts in the wall time only; the busy loop in both.
        assert wall >= BUSY_S + ASLEEP_S - 0.05 and BUSY_S - 0.05 <= cpu <= wall - ASLEEP_S + 0.2
        assert p["details"]["seconds"] == wall


def _point(n: int, heal: str = "none", **metrics) -> dict:
    return {"key": f"n={n}/similarity/{heal}", "n": n, "fraction": n / 10, "criterion": "similarity" if n else
            "unpruned", "heal": heal, "repair": "none", "removed_layers": list(range(3, 3 + n)),
            "distance": None, "metrics": metrics, "details": {"evaluation": {"tasks": {}}}}


def test_retained_is_the_mean_of_the_accuracy_ratios():
    full = _point(0, arc_easy_acc=0.50, boolq_acc=0.80, c4_loss=3.0)
    cut = _point(2, arc_easy_acc=0.25, boolq_acc=0.80, c4_loss=4.0)
    tasks = {"arc_easy": "arc_easy_acc", "boolq": "boolq_acc"}
    assert retained(cut, full, tasks) == pytest.approx((0.25 / 0.50 + 0.80 / 0.80) / 2)  # 0.75, not 1.05 / 1.30
    assert retained(_point(2, arc_easy_acc=0.40), full, tasks) == pytest.approx(0.8)  # only the tasks measured
    assert retained(cut, None, tasks) is None and retained(_point(2, c4_loss=4.0), full, tasks) is None
    shares = [p["metrics"].get("retained") for p in with_retained([full, cut])]
    assert shares == [pytest.approx(1.0), pytest.approx(0.75)] and "retained" not in cut["metrics"]


def _store(folder) -> None:
    db = connect(folder)
    for n, heal, arc, boolq in [(0, "none", 0.5, 0.8), (2, "none", 0.25, 0.8), (2, "lora", 0.5, 0.6)]:
        evaluation = {"model": "fake", "tasks": {"arc_easy": {"num_questions": 100}, "boolq": {"num_examples": 100},
                                                 "c4": {"vocab_size": 1000}}}
        metrics = {"arc_easy_acc": arc, "arc_easy_chance": 0.25, "boolq_acc": boolq, "boolq_chance": 0.62,
                   "c4_loss": 3 + n, "c4_loss_norm": 0.3 + 0.1 * n, "wall_s": 12.34 + n, "cpu_s": 20.6 + n}
        save_point(db, n=n, fraction=n / 10, criterion="similarity" if n else "unpruned", heal=heal,
                   removed_layers=list(range(3, 3 + n)), distance=None if n == 0 else 0.2, metrics=metrics,
                   details={"evaluation": evaluation})
    db.close()


def test_the_report_shows_retained_wall_and_cpu(tmp_path):
    _store(tmp_path)
    points = load_points(tmp_path)
    header, rows = main_table(points)
    by_point = {(p["n"], p["heal"]): dict(zip(header, row, strict=True)) for p, row in zip(points, rows, strict=True)}
    assert [by_point[k]["retained (%)"] for k in [(0, "none"), (2, "none"), (2, "lora")]] == ["100.0", "75.0", "87.5"]
    assert [(r["wall (s)"], r["CPU (s)"]) for r in by_point.values()] == [("12", "21")] + [("14", "23")] * 2
    assert plot_retained(points, tmp_path / "retained.png").stat().st_size > 5_000
    page = write_report(tmp_path).read_text()
    assert "% of the full model retained: the mean, over the accuracy tasks" in page
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["retained_percent"] == {"n=0/unpruned/none": 100.0, "n=2/similarity/none": 75.0,
                                           "n=2/similarity/lora": 87.5}
    assert (tmp_path / "report" / "retained.png").is_file()
    lines = results_lines(tmp_path, points, {})
    assert {"wall_s", "cpu_s"} <= set(lines[0].split()) and max(map(len, lines)) <= 160


def test_without_an_accuracy_task_there_is_no_retained_figure(tmp_path):
    points = [_point(0, c4_loss=3.0), _point(2, c4_loss=4.0)]
    assert plot_retained(points, tmp_path / "retained.png") is None
    assert "retained (%)" not in main_table(points)[0]


def test_two_healings_of_one_cut_are_drawn_apart():
    from depthprune.report.figures import curve_style

    lora, last = curve_style("similarity", "lora"), curve_style("similarity", "last-layers")
    assert lora["color"] == last["color"] and lora["linestyle"] == "-" and last["linestyle"] != lora["linestyle"]
    assert curve_style("similarity", "none")["linestyle"] not in (lora["linestyle"], last["linestyle"])
