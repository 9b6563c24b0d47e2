"""What a sweep says while it runs (stage lines, [k/N] across resumes, the ETA, --quiet without bars) and
its cost phase (every layer count timed in interleaved rounds, median and spread stored, points filled)."""

from __future__ import annotations

import re

import pytest

from depthprune.cli.app import main
from depthprune.measure import cost as cost_module
from depthprune.sweep import point as point_module
from depthprune.sweep import progress as progress_module
from depthprune.sweep import run as sweep_module
from depthprune.sweep.progress import SweepProgress, duration, estimate
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config
from depthprune.sweep.store import connect, load_cost, load_points

COST_KEYS = ("prefill_ms_per_token", "decode_ms_per_token", "weight_bytes", "peak_memory_bytes")


def _settings(checkpoint, corpus, shared_data, out, **changes) -> dict:
    """Three points of the 6-layer tiny model (n = 0, 2, 4 by `deepest`), two tasks, a tiny cost phase."""
    return {**dict(model=str(checkpoint), out=str(out), data=str(corpus), samples=4, seq_len=16, n=[0, 2, 4],
                   criteria=["deepest"], tasks=["boolq", "c4"], boolq=str(shared_data / "boolq" / "dev.jsonl"),
                   boolq_limit=4, c4=str(corpus), c4_sequences=2, c4_seq_len=16, batch_size=4, cost_prefill_len=8,
                   cost_decode_tokens=2, cost_repeats=1, cost_rounds=2), **changes}


def _config(*args, **changes):
    return resolve_config(**_settings(*args, **changes))


class Lines(list):
    def __call__(self, text: str) -> None:
        self.append(text)

    def matching(self, pattern: str) -> list[str]:
        return [line for line in self if re.search(pattern, line)]


@pytest.fixture
def recorded_costs(monkeypatch):
    """measure_cost replaced by a fast fake that records the layer counts in the order they are timed:
    prefill 1 + 0.5 ms per layer kept, plus 0.1 ms in odd calls (noise, so the spread is not zero)."""
    order = []

    def fake(model, prefill_len=256, decode_tokens=32, batch_size=1, repeats=3, seed=0):
        kept = len(model.model.layers)
        order.append(kept)
        noise = 0.1 * (len(order) % 2)
        return {"num_layers": kept, "parameters": 1000 * kept, "weight_bytes": 4000 * kept,
                "peak_memory_bytes": 5000 * kept, "prefill_tokens_per_s": 1e3 / (1 + 0.5 * kept + noise),
                "decode_tokens_per_s": 1e3 / (2 + kept), "prefill_ms_per_token": 1 + 0.5 * kept + noise,
                "decode_ms_per_token": 2 + kept, "layer_prefill_ms_per_token": 0.5, "layer_decode_ms_per_token": 1.0,
                "layer_weight_bytes": 4000, "kv_bytes_per_token": 64 * kept,
                "settings": {"prefill_len": prefill_len, "decode_tokens": decode_tokens, "batch_size": batch_size,
                             "repeats": repeats, "device": "cpu", "dtype": "float32"}}

    monkeypatch.setattr(cost_module, "measure_cost", fake)
    return order


def test_stages_counter_and_eta_across_a_resume(tiny_checkpoint, tiny_corpus, shared_data, tmp_path, monkeypatch,
                                                recorded_costs):
    config = _config(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s")
    real, calls = point_module._evaluate, {"n": 0}

    def dying(*args, **kwargs):  # the sweep is killed in its second point
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(point_module, "_evaluate", dying)
    first = Lines()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, log=first, quiet=True)
    assert first.matching(r"^3 points, 0 already finished$")
    assert first.matching(r"^\[1/3\] n=0/unpruned/none: cut: removing layers none$")
    assert first.matching(r"^\[1/3\] n=0/unpruned/none: evaluating boolq \(1/2\)$")
    assert first.matching(r"^\[1/3\] n=0/unpruned/none: evaluating c4 \(2/2\)$")
    assert first.matching(r"^\[1/3\] n=0/unpruned/none: done in \d+ s: boolq_acc=")
    # The ETA comes after the first finished point, from its time, and counts what is left.
    eta = first.matching(r"^ETA: ")
    assert len(eta) == 1 and "2 points left (2 unhealed)" in eta[0] and "unhealed " in eta[0]
    assert first.index(eta[0]) > first.index(first.matching(r"done in")[0])
    assert first.matching(r"^\[2/3\] n=2/deepest/none: cut: removing layers \[3, 4\]$")
    assert not first.matching("^cost")  # killed before the cost phase

    stored = load_points(tmp_path / "s")[0]["details"]["seconds"]
    calls["n"] = 10
    second = Lines()
    run_sweep(config, log=second, quiet=True)
    assert second[second.index("3 points, 1 already finished") + 1].startswith("ETA: 2 points left")  # at once
    assert f"unhealed {duration(stored)} each (median of 1)" in second.matching("^ETA")[0]
    assert second.matching(r"^\[2/3\] n=2/deepest/none: cut") and second.matching(r"^\[3/3\] n=4/deepest/none: cut")
    assert not second.matching(r"^\[1/3\]")
    assert second.matching(r"^ETA: all 3 points finished")
    assert second.matching(r"cost: timing 3 cut sizes \(n = 0, 2, 4\) in 2 interleaved rounds")
    assert second.matching(r"^cost round 1/2$") and second.matching(r"^cost round 2/2$")
    assert second[-1].startswith("sweep finished: 3 points")


def test_cost_phase_interleaves_stores_median_and_spread_and_fills_points(tiny_checkpoint, tiny_corpus, shared_data,
                                                                          tmp_path, monkeypatch, recorded_costs):
    config = _config(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", n=[0, 2, 4], criteria=["similarity",
                     "deepest"], cost_rounds=3, tasks=["c4"])
    real_phase = sweep_module.cost_phase

    def killed_phase(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "cost_phase", killed_phase)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, log=Lines(), quiet=True)
    points = load_points(tmp_path / "s")
    assert len(points) == 5 and not any("prefill_ms_per_token" in p["metrics"] for p in points)
    assert load_cost(tmp_path / "s") == {}

    # The rerun has no point left to run, and still times the cost: each layer count once per round, the
    # rounds alternating direction, from the one loaded model (healed or not, same shapes).
    monkeypatch.setattr(sweep_module, "cost_phase", real_phase)
    lines = Lines()
    run_sweep(config, log=lines, quiet=True)
    assert recorded_costs == [6, 4, 2, 2, 4, 6, 6, 4, 2]  # kept layers of n = 0, 2, 4, then 4, 2, 0, ...
    costs = load_cost(tmp_path / "s")
    assert sorted(costs) == [(0, "layer"), (2, "layer"), (4, "layer")]
    full = costs[0, "layer"]
    assert full["num_layers"] == 6 and full["rounds"] == 3 and full["settings"]["rounds"] == 3
    assert full["samples"]["prefill_ms_per_token"] == pytest.approx([4.1, 4.0, 4.1])
    assert full["prefill_ms_per_token"] == pytest.approx(4.1)  # the median
    assert full["spread"]["prefill_ms_per_token"] == pytest.approx([4.0, 4.1])
    assert full["phase"]["order"] == ["0", "2", "4", "4", "2", "0", "0", "2", "4"]
    # Every point carries its layer count's numbers, where the results table and the report read them.
    for p in load_points(tmp_path / "s"):
        record = costs[p["n"], "layer"]
        for key in COST_KEYS:
            assert p["metrics"][key] == pytest.approx(record[key])
        assert p["details"]["cost"]["spread"] == record["spread"]
    assert lines.matching(r"^cost n=2 \(4 layers\): prefill 3 ms/token \[3–3\.1\], decode 6 ms/token \[6–6\]")

    # A later run that finishes times it again (all counts under the same, current conditions).
    recorded_costs.clear()
    run_sweep(config, log=Lines(), quiet=True)
    assert len(recorded_costs) == 9


def test_quiet_cli_draws_no_bars_and_the_default_does(tiny_checkpoint, tiny_corpus, shared_data, tmp_path, capfd,
                                                      recorded_costs):
    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "q",
                                               n=[0, 2], samples=8)))
    assert main(["sweep", "--config", str(config), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in err and "it/s" not in err and "seq/s" not in err and "%|" not in err
    assert re.search(r"^\[2/2\] n=2/deepest/none: evaluating c4 \(2/2\)$", out, re.M)
    assert "cost round 2/2" in out and "report: " in out

    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "bars")]) == 0
    out, err = capfd.readouterr()
    assert "%|" in err and "\r" in err  # tqdm's bars, on standard error
    assert "[1/2] n=0/unpruned/none: evaluating boolq (1/2)" in out and "%|" not in out


def test_a_stage_without_a_bar_says_it_still_runs(monkeypatch):
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.05)
    lines = Lines()
    progress = SweepProgress(lines, [("n=2/deepest/lora", "healed")], {}, set())
    ticks = iter(["step 3/12, loss 2.5000"] * 1000)
    with progress.point("n=2/deepest/lora"):
        with progress.stage("healing (lora, 12 steps)", detail=lambda: next(ticks)):
            import time

            time.sleep(0.3)
        with progress.stage("evaluating c4 (1/1)", has_bar=True):  # its bar shows it: no lines
            time.sleep(0.15)
    assert lines[0] == "[1/1] n=2/deepest/lora: healing (lora, 12 steps)"
    beats = lines.matching(r"^\[1/1\] n=2/deepest/lora: healing: still running after 0 s, step 3/12, loss 2\.5000$")
    assert len(beats) >= 2
    assert not lines.matching("evaluating c4: still")


def test_estimate_by_kind():
    assert estimate({"unhealed": [10, 30, 20], "healed": [100]}, ["unhealed", "healed", "healed"]) == (220, [])
    # No healed point timed yet: counted as the slowest known kind, and said to be a lower bound.
    assert estimate({"unhealed": [10], "healed": []}, ["unhealed", "healed"]) == (20, ["healed"])
    assert [duration(s) for s in (7.4, 185, 3720)] == ["7 s", "3m05s", "1h02m"]


def test_progress_counts_points_finished_in_earlier_runs():
    lines = Lines()
    keys = [("n=0/unpruned/none", "unhealed"), ("n=2/deepest/none", "unhealed"), ("n=2/deepest/lora", "healed")]
    progress = SweepProgress(lines, keys, {"n=0/unpruned/none": 12.0, "gone": 5.0}, {"n=0/unpruned/none", "gone"})
    progress.begin()
    with progress.point("n=2/deepest/lora"):
        progress.say("cut")
    assert lines[0] == "3 points, 1 already finished"
    assert lines[1].startswith("ETA: 2 points left (1 unhealed, 1 healed), at least 24 s")
    assert "no healed point timed yet" in lines[1]
    assert lines[2] == "[2/3] n=2/deepest/lora: cut"
    progress.finished("n=2/deepest/lora", 100.0)
    assert lines[3].startswith("ETA: 1 point left (1 unhealed), about 12 s")
    without_cost = Lines()
    SweepProgress(without_cost, keys, {"n=0/unpruned/none": 12.0}, {"n=0/unpruned/none"}, cost_phase=False).log_eta()
    assert "cost phase" not in without_cost[0] and "cost phase" in lines[1]


def test_points_running_at_once_shorten_the_estimate():
    """Under Ray, k tasks at a time finish the remaining work k times sooner (never more than the points left)."""
    lines = Lines()
    keys = [("n=0/unpruned/none", "unhealed")] + [(f"n={n}/deepest/none", "unhealed") for n in (1, 2, 3, 4)]
    progress = SweepProgress(lines, keys, {"n=0/unpruned/none": 60.0}, {"n=0/unpruned/none"}, cost_phase=False)
    progress.log_eta()
    progress.parallel = 2
    progress.log_eta()
    progress.parallel = 8
    progress.log_eta()
    assert lines[0].startswith("ETA: 4 points left (4 unhealed), about 4m00s")
    assert lines[1].startswith("ETA: 4 points left (4 unhealed; 2 at a time), about 2m00s")
    assert lines[2].startswith("ETA: 4 points left (4 unhealed; 4 at a time), about 1m00s")


def test_the_cost_table_is_written_in_one_transaction(tmp_path):
    db = connect(tmp_path)
    from depthprune.sweep.store import read_cost, save_cost

    save_cost(db, {(0, "layer"): {"num_layers": 6, "x": 1}, (2, "layer"): {"num_layers": 4, "x": 2}}, {})
    save_cost(db, {(4, "layer"): {"num_layers": 2, "x": 3}, (4, "attention"): {"num_layers": 6, "x": 4}}, {})
    assert {size: r["x"] for size, r in read_cost(db).items()} == {(4, "layer"): 3, (4, "attention"): 4}  # all replaced
    db.close()


# --- the report of a sweep whose cost was timed in the cost phase ------------------------------------------


def _timed_together(tmp_path, prefill=lambda kept: 1 + 0.5 * kept):
    """test_report's synthetic sweep (10 layers; n = 0, 2, 4, 6), its cost recorded as the cost phase does:
    one record per layer count, healed points included, median and a spread of -10 % / +20 %."""
    from test_report import L, fake_sweep

    from depthprune.sweep.metrics import flatten_metrics
    from depthprune.sweep.store import read_points, save_cost

    fake_sweep(tmp_path, prefill=prefill)
    db = connect(tmp_path)
    costs, updates = {}, {}
    for p in read_points(db):
        kept = L - p["n"]
        medians = {key: p["metrics"][key] for key in ("prefill_ms_per_token", "decode_ms_per_token", "weight_bytes",
                                                        "peak_memory_bytes", "layer_prefill_ms_per_token",
                                                        "layer_weight_bytes", "parameters")}
        medians.update(prefill_tokens_per_s=1.0, decode_tokens_per_s=1.0, layer_decode_ms_per_token=1.0,
                       kv_bytes_per_token=64.0 * kept)
        record = costs.setdefault((p["n"], "layer"), {**medians, "num_layers": kept, "rounds": 3,
                                           "spread": {k: [0.9 * v, 1.2 * v] for k, v in medians.items()},
                                           "settings": {"repeats": 2, "rounds": 3}})
        if p["heal"] != "none":  # a healed point's own timing, say under load: replaced by its count's
            p["metrics"]["prefill_ms_per_token"] *= 3
        metrics = {**p["metrics"], **flatten_metrics({}, record, None)}
        updates[p["key"]] = (metrics, {**p["details"], "cost": record})
    save_cost(db, costs, updates)
    db.close()
    return load_points(tmp_path)


@pytest.fixture
def figures(monkeypatch):
    from depthprune.report import figures as report

    drawn, save = {}, report.save_png

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(report, "save_png", keep)
    return drawn


def test_report_fits_one_median_per_layer_count_and_draws_the_spread(tmp_path, figures):
    from depthprune.report.cost import cost_fits, timed_together
    from depthprune.report.figures import plot_cost
    from depthprune.report.html import write_report
    from depthprune.report.tables import cost_table

    points = _timed_together(tmp_path)
    assert timed_together(points)
    fit = cost_fits(points)["prefill_ms_per_token"]
    assert fit["num_points"] == 4 and fit["per_unit"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)
    plot_cost(points, tmp_path / "cost.png")
    prefill_ax = figures["cost.png"].axes[0]
    (bars,) = [c for c in prefill_ax.containers if c.has_yerr]
    lows, highs = zip(*[segment[:, 1] for segment in bars.lines[2][0].get_segments()], strict=True)
    medians = [1 + 0.5 * kept for kept in (10, 8, 6, 4)]
    assert list(lows) == pytest.approx([0.9 * m for m in medians]) and list(highs) == pytest.approx([1.2 * m for m in medians])
    assert any(line.get_label().startswith("fit") for line in prefill_ax.get_lines())  # the fit is drawn
    assert prefill_ax.get_title() == ""
    assert "3 interleaved rounds, each the best of 2 repeats" in figures["cost.png"].get_suptitle()

    html = write_report(tmp_path).read_text()
    assert "<table id='cost-table'>" in html and "medians of 3 interleaved rounds" in html
    assert "least squares over the 4 layer counts" in html
    header, rows = cost_table(points)
    assert rows[0][:3] == ["0", "10", "6 [5.4–7.2]"]


def test_report_still_refuses_a_bad_fit_of_the_medians(tmp_path, figures):
    from depthprune.report.cost import cost_fits
    from depthprune.report.figures import plot_cost

    points = _timed_together(tmp_path, prefill=lambda kept: -5 + 2 * kept)
    fit = cost_fits(points)["prefill_ms_per_token"]
    assert any("negative fixed part" in p for p in fit["problems"])
    plot_cost(points, tmp_path / "cost.png")
    prefill_ax = figures["cost.png"].axes[0]
    assert not any(line.get_label().startswith("fit") for line in prefill_ax.get_lines())
    assert "negative fixed part" in prefill_ax.get_title()
