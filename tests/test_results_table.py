"""`depthprune results` fits a terminal: the compared columns in 160 characters with fixed number formats and
layer ranges, every column with --all, and one line when the store has no finished point."""

from __future__ import annotations

from pathlib import Path

import pytest

from depthprune.cli.app import main
from depthprune.report.terminal import results_lines
from depthprune.select import format_layers
from depthprune.sweep.store import (
    connect,
    is_repaired,
    is_sublayer,
    load_points,
    save_failure,
    save_point,
    table,
)

EXAMPLES = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "examples").glob("*/results.sqlite"))


def _point(n: int, layers: list[int], criterion: str = "similarity", heal: str = "none", **metrics) -> dict:
    return {"n": n, "fraction": n / 30, "criterion": criterion, "heal": heal, "removed_layers": layers,
            "distance": 0.123456 if n else None, "metrics": metrics, "details": {}}


def _columns(line: str) -> list[str]:
    return line.split()


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_fits_160_columns(example, capsys):
    assert main(["results", str(example)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 160
    points = load_points(example)
    assert len(lines) == 1 + len(points) + 1  # header, one row per point, the footer
    repair = ["repair"] if is_repaired(points) else []  # the repair examples' column
    finer = ["granularity"] if is_sublayer(points) else []  # the sub-layer examples' column
    assert _columns(lines[0])[:5 + len(repair) + len(finer)] == ["n", *finer, "fraction", "criterion", *repair, "heal",
                                                                  "removed_layers"]
    assert "c4_loss" in _columns(lines[0]) and lines[-1].endswith("--all shows every column")
    for point, line in zip(points, lines[1:-1], strict=True):  # removed layers as inclusive ranges
        if point["removed_layers"]:
            assert _columns(line)[4 + len(repair) + len(finer)] == format_layers(point["removed_layers"])


def test_all_prints_every_column_of_the_store(capsys):
    example = next(e for e in EXAMPLES if e.name == "smollm2-135m")
    assert main(["results", str(example), "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = table(load_points(example))
    assert _columns(lines[0]) == [h for h in header if not h.endswith("_chance")]
    assert len(lines) == 1 + len(rows) and max(len(line) for line in lines) > 160
    assert "14,15,16,17,18,19,20,21,22,23,24,25,26,27,28" in lines[-2]  # every removed layer, as stored


def test_ranges_and_number_formats():
    points = [_point(0, [], "unpruned", mmlu_acc=0.5, c4_loss=2.88512, weight_bytes=2**21),
              _point(6, list(range(13, 19)), mmlu_acc=1 / 3, c4_loss=3.4, weight_bytes=2**20),
              _point(4, [3, 7, 9, 10], "block-influence", "lora", mmlu_acc=0.25, heal_val_loss=4.05)]
    lines = results_lines("sweep", points, {})
    header = _columns(lines[0])
    assert header == ["n", "fraction", "criterion", "heal", "removed_layers", "distance", "mmlu_acc", "c4_loss",
                      "weight_MiB", "heal_val_loss"]
    full, block, cut = (_columns(line) for line in lines[1:4])
    assert full == ["0", "0.00", "unpruned", "none", "0.500", "2.885", "2.0"]
    assert block == ["6", "0.20", "similarity", "none", "13-18", "0.123", "0.333", "3.400", "1.0"]
    assert cut == ["4", "0.13", "block-influence", "lora", "3,7,9-10", "0.123", "0.250", "4.050"]
    assert lines[4] == "10 of 10 columns; --all shows every column"


def test_columns_left_out_to_fit_are_named():
    tasks = {f"task{i}_acc": 0.5 for i in range(12)}
    points = [_point(0, [], "unpruned", c4_loss=3.0, prefill_ms_per_token=2.5, **tasks),
              _point(3, [1, 2, 3], c4_loss=3.5, prefill_ms_per_token=2.0, **tasks)]
    lines = results_lines("sweep", points, {})
    assert max(len(line) for line in lines) <= 160
    header = _columns(lines[0])
    assert "c4_loss" in header and "task0_acc" in header and "prefill_ms_per_token" not in header
    assert "left out to fit 160 characters: " in lines[-1] and "prefill_ms_per_token" in lines[-1]
    assert lines[-1].endswith("--all shows every column")


def test_a_very_long_cut_is_shortened_and_failures_fit():
    scattered = list(range(0, 400, 2))  # 200 layers, none next to another: no range to write them as
    failed = {"n=9/similarity/none": {"attempts": 2, "failed": "2025-01-01T00:00:00Z", "error": "x" * 500}}
    lines = results_lines("sweep", [_point(200, scattered, c4_loss=9.0)], failed)
    assert max(len(line) for line in lines) <= 160
    assert _columns(lines[1])[4].endswith("…") and "removed_layers cut short" in lines[-2]
    assert lines[-1].startswith("failed: n=9/similarity/none (2x, last 2025-01-01T00:00:00Z): xxx")
    every = results_lines("sweep", [_point(200, scattered, c4_loss=9.0)], failed, every_column=True)
    assert every[-1].endswith("x" * 500) and ",".join(map(str, scattered)) in every[1]


def test_an_empty_store_says_so_in_one_line(tmp_path, capsys):
    connect(tmp_path).close()
    assert main(["results", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"depthprune: error: no finished points in '{tmp_path}' yet")


def test_a_store_of_failed_points_only_says_so_in_one_line(tmp_path, capsys):
    db = connect(tmp_path)
    save_failure(db, n=2, criterion="deepest", heal="lora", error="RuntimeError: out of memory\nat step 3")
    save_failure(db, n=4, criterion="deepest", heal="none", error="worker died")
    db.close()
    assert main(["results", str(tmp_path), "--all"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "2 failed (first n=2/deepest/lora: RuntimeError: out of memory at step 3); rerun the sweep" in err


def test_a_finished_point_beside_failed_ones_is_shown(tmp_path, capsys):
    db = connect(tmp_path)
    save_point(db, n=0, fraction=0.0, criterion="unpruned", heal="none", removed_layers=[], distance=None,
               metrics={"c4_loss": 3.0}, details={})
    save_failure(db, n=2, criterion="deepest", heal="lora", error="worker died")
    db.close()
    assert main(["results", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert _columns(lines[1]) == ["0", "0.00", "unpruned", "none", "3.000"]
    assert lines[-1].startswith("failed: n=2/deepest/lora (1x, last ")
