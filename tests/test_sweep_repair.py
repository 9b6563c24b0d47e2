"""The sweep's repair axis and agreement (issue 19): points crossed with repairs, a repaired point's cut as
``prune --repair`` makes it, resumption, agreement with the full model's answers, and the report's series."""

from __future__ import annotations

from pathlib import Path

import pytest

import depthprune
from depthprune.errors import DepthpruneError
from depthprune.evaluate.suite import evaluate, predictions
from depthprune.sweep import point as point_module
from depthprune.sweep.plan import UNPRUNED_POINT, Point, point_dir, sweep_points
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import eval_options, resolve_config
from depthprune.sweep.store import load_points

RIDGE = 0.01  # the tiny corpus has fewer tokens than a well-posed map without a ridge needs


def _settings(tiny_checkpoint, tiny_corpus, shared_data, out, **changes) -> dict:
    settings = dict(model=str(tiny_checkpoint), out=str(out), data=str(tiny_corpus), samples=8, seq_len=16, n="0,2",
                    criteria="deepest", repair="linear,none", repair_ridge=RIDGE, tasks="boolq,c4", limit=4,
                    boolq=str(shared_data / "boolq" / "dev.jsonl"), c4=str(tiny_corpus), c4_sequences=2,
                    c4_seq_len=16, cost=False)
    return {**settings, **changes}


def test_points_cross_criteria_repairs_and_healings():
    c = resolve_config(data="docs.jsonl", n=[0, 2], criteria=["deepest", "similarity"], repair=["none", "linear"],
                       heal=["none", "lora"], heal_data="docs.jsonl", tasks=["c4"], c4="docs.jsonl")
    points = sweep_points(c, 8)
    assert points[0] == UNPRUNED_POINT and len(points) == 1 + 2 * 2 * 2
    assert points[1:5] == [Point(2, "deepest", "none"), Point(2, "deepest", "lora"),
                           Point(2, "deepest", "none", "linear"), Point(2, "deepest", "lora", "linear")]
    # A point without repair keeps the key of the stores written before the axis; a repaired one names it.
    assert [p.key for p in points[1:5]] == ["n=2/deepest/none", "n=2/deepest/lora", "n=2/deepest+linear/none",
                                            "n=2/deepest+linear/lora"]
    assert point_dir(Path("out"), points[4]) == Path("out/points/n002-deepest+linear-lora")
    assert Point(2, "deepest", "lora") == Point(2, "deepest", "lora", "none")


@pytest.mark.parametrize("changes, message", [
    (dict(criteria="taylor", repair="none,linear"), "criterion 'taylor' may remove layers apart"),
    (dict(repair="none,magic"), "unknown repair 'magic'"),
    (dict(repair_ridge=-1.0), "repair_ridge"),
])
def test_repairs_it_cannot_make_are_refused_at_config_time(changes, message):
    with pytest.raises(DepthpruneError, match=message):
        resolve_config(data="docs.jsonl", n=[0, 2], tasks=["c4"], c4="docs.jsonl", **changes)


def _quality(points) -> dict:
    return {p["key"]: {k: v for k, v in p["metrics"].items() if k.startswith(("boolq", "c4"))} for p in points}


def test_a_repaired_sweep_cuts_as_prune_does_and_measures_agreement(tiny_checkpoint, tiny_corpus, shared_data,
                                                                     tmp_path):
    settings = _settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s")
    c = resolve_config(**settings)
    run_sweep(c, log=lambda _: None)
    points = {p["key"]: p for p in load_points(tmp_path / "s")}
    assert set(points) == {"n=0/unpruned/none", "n=2/deepest+linear/none", "n=2/deepest/none"}
    repaired, plain = points["n=2/deepest+linear/none"], points["n=2/deepest/none"]
    assert repaired["repair"] == "linear" and plain["repair"] == "none"
    assert repaired["details"]["repair"]["options"]["repair_ridge"] == RIDGE
    assert repaired["removed_layers"] == plain["removed_layers"] == [3, 4]

    # The same cuts made by prune (the repaired point ran first: the plain one met the model unchanged).
    data = depthprune.DataOptions(str(tiny_corpus), samples=8, seq_len=16)
    for name, repair in (("linear", "linear"), ("plain", None)):
        depthprune.prune(str(tiny_checkpoint), tmp_path / name, n=2, criterion="deepest", data=data, repair=repair,
                         progress=False, **({"repair_ridge": RIDGE} if repair else {}))
    full = evaluate(str(tiny_checkpoint), ["boolq"], options=eval_options(c), details=True, progress=False,
                    boolq=settings["boolq"])
    for key, folder in (("n=2/deepest+linear/none", "linear"), ("n=2/deepest/none", "plain")):
        expected = evaluate(str(tmp_path / folder), ["boolq", "c4"], options=eval_options(c), progress=False,
                            reference=predictions(full), boolq=settings["boolq"], c4=settings["c4"])
        got = points[key]["metrics"]
        assert got["c4_loss"] == pytest.approx(expected["tasks"]["c4"]["loss"], rel=1e-5)
        assert got["boolq_agreement"] == expected["tasks"]["boolq"]["agreement"]
    assert repaired["metrics"]["c4_loss"] != plain["metrics"]["c4_loss"]
    assert "boolq_agreement" not in points["n=0/unpruned/none"]["metrics"]
    assert points["n=0/unpruned/none"]["details"]["predictions"] == predictions(full)
    assert "examples" not in points["n=0/unpruned/none"]["details"]["evaluation"]["tasks"]["boolq"]
    _check_report(tmp_path / "s")


def _check_report(folder: Path) -> None:
    """The repair is a series of its own in the figures and a column of the tables; agreement has its figure."""
    from depthprune.report import stats
    from depthprune.report.html import write_report
    from depthprune.report.tables import main_table
    from depthprune.report.terminal import results_lines

    points = load_points(folder)
    assert set(stats.curves(points, "c4_loss_norm")) == {("deepest", "none"), ("deepest+linear", "none")}
    assert stats.curve_label("deepest+linear", "lora") == "deepest + linear, lora-healed"
    assert set(stats.curves(points, "boolq_agreement")) == {("deepest", "none"), ("deepest+linear", "none")}
    verdicts = {(v["criterion"], v["repair"]) for v in stats.collapse_points(points)}
    assert verdicts == {("deepest", "none"), ("deepest", "linear")}
    header, rows = main_table(points)
    assert header[2:4] == ["criterion", "repair"] and "BoolQ (0-shot) agreement (%)" in header
    assert [row[3] for row in rows] == ["none", "linear", "none"]
    agreement = [row[header.index("BoolQ (0-shot) agreement (%)")] for row in rows]
    assert agreement[0] == "" and all(" ± " in cell for cell in agreement[1:])
    lines = results_lines(folder, points, {})
    assert lines[0].split()[:4] == ["n", "fraction", "criterion", "repair"] and "boolq_agreement" in lines[0]
    assert max(map(len, lines)) <= 160
    page = write_report(folder).read_text()
    assert "deepest + linear, not healed" in page and "Agreement with the full model" in page
    assert (folder / "report" / "agreement.png").stat().st_size > 5_000


def test_a_repaired_sweep_resumes_and_refuses_other_repair_options(tiny_checkpoint, tiny_corpus, shared_data,
                                                                    tmp_path, monkeypatch):
    settings = _settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", repair="none,linear")
    calls = {"n": 0}
    real = point_module._evaluate

    def dying(*args, **kwargs):  # dies in the third point, the repaired one
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(point_module, "_evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(resolve_config(**settings), log=lambda _: None)
    assert [p["key"] for p in load_points(tmp_path / "s")] == ["n=0/unpruned/none", "n=2/deepest/none"]
    with pytest.raises(DepthpruneError, match=r"other settings \(repair_ridge\)"):
        run_sweep(resolve_config(**{**settings, "repair_ridge": 0.5}), log=lambda _: None)
    calls["n"] = 10
    run_sweep(resolve_config(**settings), log=lambda _: None)
    assert calls["n"] == 11  # only the repaired point ran again
    resumed = {p["key"]: p for p in load_points(tmp_path / "s")}
    assert resumed["n=2/deepest+linear/none"]["metrics"]["boolq_agreement"] is not None  # the stored reference


def test_a_healed_repaired_point_heals_the_repaired_cut(tiny_checkpoint, tiny_corpus, shared_data, tmp_path):
    heal_options = dict(steps=2, batch_size=2, seq_len=16, rank=2, warmup=1, eval_every=2, save_every=2,
                        val_sequences=2)
    settings = _settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", repair="linear", heal="lora",
                         tasks="c4", heal_data=str(tiny_corpus), heal_val_data=str(tiny_corpus),
                         heal_options=heal_options)
    run_sweep(resolve_config(**settings), log=lambda _: None)
    points = {p["key"]: p for p in load_points(tmp_path / "s")}
    assert set(points) == {"n=0/unpruned/none", "n=2/deepest+linear/lora"}
    healed = points["n=2/deepest+linear/lora"]
    assert healed["details"]["repair"]["method"] == "linear" and healed["details"]["healing"]["steps"] == 2


def test_a_cut_it_cannot_repair_stops_the_sweep_before_any_point(tiny_checkpoint, tiny_corpus, shared_data,
                                                                  tmp_path):
    """deepest 5 of 6 layers removes layers 0-4: no kept layer before the block to fold the map into."""
    settings = _settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", n="0,5", repair="none,linear")
    with pytest.raises(DepthpruneError, match="cannot repair a cut starting at layer 0"):
        run_sweep(resolve_config(**settings), log=lambda _: None)
    assert not (tmp_path / "s" / "results.sqlite").exists() or load_points(tmp_path / "s") == []


def test_the_repair_axis_and_its_options_are_flags_of_sweep():
    from depthprune.cli.app import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "--repair LIST" in text and "linear-cosine" in text and "--repair-ridge" in text


def test_without_the_full_model_there_is_no_agreement(tiny_checkpoint, tiny_corpus, shared_data, tmp_path):
    lines: list[str] = []
    run_sweep(resolve_config(**_settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", n="2",
                                         repair="none")), log=lines.append)
    (point,) = load_points(tmp_path / "s")
    assert "boolq_acc" in point["metrics"] and "boolq_agreement" not in point["metrics"]
    assert any(line.startswith("note: no agreement with the full model") for line in lines)


def test_a_repaired_cut_gives_the_model_back_as_it_was(tiny_checkpoint, tiny_corpus, shared_data, tmp_path):
    import torch

    from depthprune.sweep.cut import calibration_sequences, point_cut

    c = resolve_config(**_settings(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s"))
    model, tokenizer = depthprune.load_model(str(tiny_checkpoint))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    point = Point(2, "deepest", "none", "linear")
    with point_cut(model, tokenizer, c, point, (3, 4), calibration_sequences(c, tokenizer), fit_on="cpu") as (cut, rec):
        assert depthprune.num_layers(cut) == 4 and rec["folded_into"] == "model.layers.2.mlp.down_proj"
        assert not torch.equal(cut.model.layers[2].mlp.down_proj.weight, before["model.layers.2.mlp.down_proj.weight"])
    assert depthprune.num_layers(model) == 6
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
