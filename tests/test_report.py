"""Uncertainty, collapse rules, cost fits and the report, on synthetic curves and a synthetic sweep store."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest

from depthprune.cli.app import main
from depthprune.measure.distances import AngularDistances
from depthprune.outputs import TEMP_MARK
from depthprune.report import figures as report_figures
from depthprune.report.cost import cost_fits
from depthprune.report.figures import plot_accuracy, plot_cost
from depthprune.report.html import write_report
from depthprune.report.stats import (
    accuracy_tasks,
    collapse_point,
    collapse_points,
    is_informative,
    sample_size,
    standard_error,
    wilson_interval,
)
from depthprune.report.tables import full_table, main_table
from depthprune.sweep.store import connect, finished_keys, load_points, save_point, to_csv

L = 10


def fake_sweep(tmp_path, mmlu=lambda n, criterion, heal: 0.70, boolq=lambda n, criterion, heal: 0.80,
               prefill=lambda kept: 1 + 0.5 * kept, questions=100):
    """A sweep store of a 10-layer model: n = 0, 2, 4, 6 by both criteria, LoRA healing at n = 4 only,
    MMLU against chance 0.25 and BoolQ against a majority class of 0.62, each on ``questions`` questions."""
    rng = np.random.default_rng(0)
    pairwise = np.abs(np.subtract.outer(np.arange(L + 1), np.arange(L + 1))) / (2 * L) + rng.uniform(0, .01, (L + 1,) * 2)
    (tmp_path / "analysis").mkdir()
    AngularDistances(pairwise, 4, "last", {"model": "fake"}).save(tmp_path / "analysis")
    db = connect(tmp_path)
    for n in [0, 2, 4, 6]:
        for criterion in ["unpruned"] if n == 0 else ["similarity", "deepest"]:
            for heal in ["none", "lora"] if n == 4 else ["none"]:
                kept = L - n
                metrics = {"mmlu_acc": mmlu(n, criterion, heal), "mmlu_chance": 0.25, "boolq_acc": boolq(n, criterion, heal),
                           "boolq_chance": 0.62, "c4_loss": 3 + 0.2 * n, "c4_loss_norm": 0.3 + 0.02 * n,
                           "prefill_ms_per_token": prefill(kept), "decode_ms_per_token": 2 + kept,
                           "weight_bytes": 1e6 + 1e5 * kept, "peak_memory_bytes": 2e6 + 1e5 * kept,
                           "layer_prefill_ms_per_token": 0.5, "layer_weight_bytes": 1e5, "parameters": 250_000 + 25_000 * kept}
                evaluation = {"model": "fake", "tasks": {"mmlu": {"num_questions": questions},
                                                         "boolq": {"majority_baseline": 0.62, "num_examples": questions},
                                                         "c4": {"vocab_size": 1000}}}
                save_point(db, n=n, fraction=n / L, criterion=criterion, heal=heal, removed_layers=list(range(n)),
                           distance=None if n == 0 else 0.1 * n, metrics=metrics,
                           details={"evaluation": evaluation, "cost": {"num_layers": kept, "settings": {"repeats": 3}}})
    db.close()
    return tmp_path


# --- uncertainty ----------------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    # 5/10: centre 0.5, half-width 1.96/1.38415·√(0.025 + 0.0096) = 0.2634 (the textbook 0.237–0.763).
    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0/10: from 0 to z²/(n + z²) = 3.8415/13.8415 = 0.2775; the Wald interval would be [0, 0].
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    # 20/60: centre (1/3 + 0.03201)/1.06403 = 0.34336, half 1.84203·√(0.0037037 + 0.00026677) = 0.11607.
    assert wilson_interval(20 / 60, 60) == pytest.approx((0.2273, 0.4594), abs=1e-4)
    assert standard_error(0.5, 100) == pytest.approx(0.05)


# --- collapse rules -------------------------------------------------------------------------------------

FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5]


def test_a_curve_that_never_drops_has_no_collapse():
    assert collapse_point(FRACTIONS, [0.70] * 5, [100] * 5, full=0.70, full_size=100, baseline=0.25) is None


def test_a_drop_of_more_than_two_combined_standard_errors_is_the_collapse():
    # full 0.70 ± 0.046; 0.62 is 1.2 combined SE below it (noise), 0.55 is 2.2 SE below (collapse).
    scores = [0.70, 0.68, 0.62, 0.55, 0.60]
    assert collapse_point(FRACTIONS, scores, [100] * 5, 0.70, 100, 0.25) == 0.4
    assert collapse_point(FRACTIONS, scores, [100] * 5, 0.70, 100, 0.25, sigmas=3) is None
    # Input order does not matter, and a later recovery does not undo the collapse.
    assert collapse_point(FRACTIONS[::-1], scores[::-1], [100] * 5, 0.70, 100, 0.25) == 0.4


def test_a_point_within_noise_of_chance_is_a_collapse_even_if_the_drop_is_noise():
    # 20 questions: full 0.45 ± 0.11 is informative (0.20 > 2 × 0.097 above chance); 0.30 is only 1.0
    # combined SE below it, but within 2 SE of chance.
    assert is_informative(0.45, 20, 0.25)
    assert collapse_point([0.1, 0.2], [0.45, 0.30], [20, 20], 0.45, 20, 0.25) == 0.2


def test_collapse_points_of_a_sweep(tmp_path):
    # MMLU: flat at 0.70 unhealed, the healed n=4 points drop to 0.55. BoolQ: the full model (0.60) is under
    # the majority class (0.62) and the cut models rise to it: uninformative, whatever they do.
    fake_sweep(tmp_path, mmlu=lambda n, s, h: 0.55 if h == "lora" else 0.70,
               boolq=lambda n, s, h: 0.60 if n == 0 else 0.62)
    verdicts = {(v["task"], v["criterion"], v["heal"]): v for v in collapse_points(load_points(tmp_path))}
    assert verdicts["mmlu", "similarity", "none"]["status"] == "no collapse"
    assert verdicts["mmlu", "similarity", "none"]["fractions"] == [0.2, 0.4, 0.6]
    assert (verdicts["mmlu", "deepest", "lora"]["status"], verdicts["mmlu", "deepest", "lora"]["collapse_fraction"]) == ("collapse", 0.4)
    assert {v["status"] for k, v in verdicts.items() if k[0] == "boolq"} == {"uninformative"}
    assert all(v["collapse_fraction"] is None for k, v in verdicts.items() if k[0] == "boolq")


def test_headline_metric_prefers_acc_norm_for_hellaswag_only():
    points = [{"metrics": {"arc_easy_acc": 0.5, "arc_easy_acc_norm": 0.4, "hellaswag_acc": 0.3,
                           "hellaswag_acc_norm": 0.35, "boolq_acc": 0.6, "c4_loss_norm": 0.3}}]
    assert accuracy_tasks(points) == {"arc_easy": "arc_easy_acc", "hellaswag": "hellaswag_acc_norm", "boolq": "boolq_acc"}


def test_sample_size_of_an_lm_eval_task():
    point = {"details": {"evaluation": {"lm_eval": {"tasks": {"arc_challenge_local": {"num_examples": 42}}}}}}
    assert sample_size(point, "arc_challenge") == 42
    assert sample_size(point, "piqa") is None


# --- figures --------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The figures drawn, by file name, instead of only their PNGs."""
    drawn = {}
    save = report_figures.save_png

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(report_figures, "save_png", keep)
    return drawn


def test_healed_curves_join_only_healed_fractions(tmp_path, figures):
    fake_sweep(tmp_path)
    plot_accuracy(load_points(tmp_path), tmp_path / "accuracy.png")
    mmlu = figures["accuracy.png"].axes[0]
    curves = {c.get_label(): np.asarray(c.lines[0].get_xdata(), dtype=float) for c in mmlu.containers}
    assert np.round(curves["similarity, lora-healed"], 1).tolist() == [0.4]
    # An unhealed curve starts at the full model (nothing removed), exactly at 0.
    assert curves["similarity, not healed"][0] == 0.0
    assert np.round(curves["similarity, not healed"], 1).tolist() == [0.0, 0.2, 0.4, 0.6]
    assert "full model (reference)" in curves


@pytest.mark.parametrize("prefill, problem", [(lambda kept: -5 + 2 * kept, "negative fixed part"),
                                              (lambda kept: 3 + 0.5 * kept + 4 * (kept % 4 == 0), "R² = 0.")])
def test_cost_figure_refuses_a_fit_that_does_not_hold(tmp_path, figures, prefill, problem):
    fake_sweep(tmp_path, prefill=prefill)
    points = load_points(tmp_path)
    fit = cost_fits(points)["prefill_ms_per_token"]
    assert any(problem in p for p in fit["problems"])
    plot_cost(points, tmp_path / "cost.png")
    prefill_ax, decode_ax = figures["cost.png"].axes[:2]
    assert prefill_ax.get_lines() == [] and problem in prefill_ax.get_title()
    assert len(decode_ax.get_lines()) == 1 and decode_ax.get_title() == ""  # the good fit is drawn
    assert "one per point, the best of 3 repeats" in figures["cost.png"].get_suptitle()


def test_cost_fit_leaves_out_healed_points(tmp_path):
    # Healed models timed slower: a fit over every point would bend; the fit over unhealed ones is exact.
    fake_sweep(tmp_path)
    points = load_points(tmp_path)
    for p in points:
        if p["heal"] != "none":
            p["metrics"]["prefill_ms_per_token"] *= 3
    fit = cost_fits(points)["prefill_ms_per_token"]
    assert fit["per_unit"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0) and fit["num_points"] == 7


# --- the report -----------------------------------------------------------------------------------------


def test_store_round_trip(tmp_path):
    fake_sweep(tmp_path)
    points = load_points(tmp_path)
    assert len(points) == 9 and points[0]["n"] == 0 and points[-1]["removed_layers"] == list(range(6))
    assert "n=4/deepest/lora" in finished_keys(connect(tmp_path))
    assert to_csv(points).splitlines()[0].startswith("n,fraction,criterion,heal,removed_layers,distance,mmlu_acc")


def test_report_has_every_figure_tables_csv_and_the_fits(tmp_path):
    fake_sweep(tmp_path, mmlu=lambda n, s, h: 0.70 if n < 6 else 0.30)
    html = write_report(tmp_path).read_text()
    folder = tmp_path / "report"
    for name in ("accuracy.png", "c4_loss.png", "heatmap.png", "best_block.png", "cost.png", "selections.png",
                 "retained.png", "accuracy_parameters.png", "c4_loss_parameters.png"):
        assert (folder / name).stat().st_size > 5_000
    assert html.count("data:image/png;base64,") == 9
    summary = json.loads((folder / "summary.json").read_text())
    fit = summary["cost_fits"]["prefill_ms_per_token"]
    assert fit["per_unit"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0) and fit["problems"] == []
    assert fit["slope_over_measured"] == pytest.approx(1.0)
    mmlu = {(c["criterion"], c["heal"]): c["collapse_fraction"] for c in summary["collapse"] if c["task"] == "mmlu"}
    assert mmlu == {("similarity", "none"): 0.6, ("deepest", "none"): 0.6, ("similarity", "lora"): None,
                    ("deepest", "lora"): None}
    assert summary["sample_sizes"] == {"mmlu": 100, "boolq": 100} and "2 standard errors" in summary["collapse_definition"]
    # Main table: the compared columns, accuracies with their SE, fixed formats; the rest in CSV and <details>.
    header, rows = main_table(load_points(tmp_path))
    assert len(header) == 12 and rows[0][5] == "70.0 ± 4.6" and rows[0][8] == "3.00" and rows[-1][9] == "2.00×"
    assert header[4] == "parameters removed (%)" and rows[0][4] == "0.0"
    assert header[7] == "retained (%)" and rows[0][7] == "100.0"
    assert (folder / "results.csv").read_text() == to_csv(load_points(tmp_path))
    assert "href='results.csv'" in html and "data:text/csv;base64," in html
    assert "<table id='main-table'>" in html and "<details>" in html and "<table id='full-table'>" in html
    full_header, full_rows = full_table(load_points(tmp_path))
    assert "weight_bytes (MiB)" in full_header and full_rows[0][full_header.index("parameters")] == "500,000"
    assert full_rows[0][full_header.index("mmlu_acc (% ± SE)")] == "70.0 ± 4.6"
    assert full_rows[0][full_header.index("boolq_chance (%)")] == "62.0"
    assert "collapses at 0.60" in html and "none up to 0.40" in html and "class='note'" not in html


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_bad_sigmas_is_a_one_line_error(tmp_path, capsys, value):
    fake_sweep(tmp_path)
    assert main(["report", str(tmp_path), "--sigmas", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("depthprune: error: --sigmas must be a finite number above 0") and err.count("\n") == 1
    assert not (tmp_path / "report").exists()


def _report_process(directory) -> str:
    return str(write_report(directory))


def test_concurrent_reports_on_one_directory_both_succeed(tmp_path):
    # Two processes, as two `depthprune report` runs would be (matplotlib itself is not thread-safe).
    fake_sweep(tmp_path)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_report_process, [tmp_path, tmp_path])
    assert results == [str(tmp_path / "report" / "report.html")] * 2
    assert [p.name for p in (tmp_path / "report").iterdir() if TEMP_MARK in p.name or p.name.startswith(".")] == []
    assert (tmp_path / "report" / "report.html").read_text().endswith("</html>")
