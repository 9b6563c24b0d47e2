"""A sweep on a tiny model: rows, figures, and kill-and-resume giving the same results."""

from __future__ import annotations

import pytest

from depthprune.cli.app import main
from depthprune.errors import DepthpruneError
from depthprune.sweep import point as point_module
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config
from depthprune.sweep.store import load_points


def _config(tiny_checkpoint, tiny_corpus, shared_data, out, **changes):
    settings = dict(
        model=str(tiny_checkpoint), out=str(out), data=str(tiny_corpus), samples=8, seq_len=16, n="0,2,4",
        tasks="mmlu,boolq,c4", mmlu=str(shared_data / "mmlu"), subjects="astronomy", mmlu_limit=3, limit=3, shots=1,
        boolq=str(shared_data / "boolq" / "dev.jsonl"), c4=str(tiny_corpus), c4_sequences=2, c4_seq_len=16,
        cost_prefill_len=8, cost_decode_tokens=2, cost_repeats=1)
    return resolve_config(**{**settings, **changes})


def _quality(points):
    return {(p["n"], p["criterion"], p["heal"]): {k: v for k, v in p["metrics"].items() if k.startswith(("mmlu", "boolq", "c4"))}
            for p in points}


def test_sweep_rows_report_and_resume(tiny_checkpoint, tiny_corpus, shared_data, tmp_path, monkeypatch, capsys):
    whole = run_sweep(_config(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "whole"), log=lambda _: None)
    points = load_points(whole)
    assert [(p["n"], p["criterion"]) for p in points] == [(0, "unpruned"), (2, "deepest"), (2, "similarity"),
                                                          (4, "deepest"), (4, "similarity")]
    for p in points:
        assert {"mmlu_acc", "boolq_acc", "c4_loss", "c4_loss_norm", "prefill_ms_per_token", "weight_bytes"} <= set(p["metrics"])
        assert len(p["removed_layers"]) == p["n"]
    assert points[1]["removed_layers"] == [3, 4]  # deepest 2 of 6: keeps the final layer

    # Kill the same sweep during its third point, then rerun: finished points are not redone.
    calls = {"n": 0}
    real = point_module._evaluate

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(point_module, "_evaluate", dying)
    config = _config(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, log=lambda _: None)
    assert len(load_points(tmp_path / "resumed")) == 2
    calls["n"] = 10  # no more deaths; count what the rerun evaluates
    run_sweep(config, log=lambda _: None)
    assert calls["n"] == 10 + 3
    assert _quality(load_points(tmp_path / "resumed")) == _quality(points)

    # The CLI reports on it, and a rerun with other settings is refused.
    assert main(["results", str(whole), "--csv", str(tmp_path / "t.csv")]) == 0
    assert (tmp_path / "t.csv").read_text().count("\n") == 6
    assert main(["report", str(whole)]) == 0
    for name in ("accuracy.png", "c4_loss.png", "heatmap.png", "best_block.png", "cost.png", "report.html"):
        assert (whole / "report" / name).is_file()
    with pytest.raises(DepthpruneError, match="other settings"):
        run_sweep(_config(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "whole", limit=2, mmlu_limit=2), log=lambda _: None)


def test_a_sweep_grows_with_more_criteria_and_sizes(tiny_checkpoint, tiny_corpus, shared_data, tmp_path, monkeypatch):
    """Criteria, sizes and healings only choose which points run: adding some keeps the finished points."""
    out = tmp_path / "s"
    small = dict(tasks="c4", cost=False)
    run_sweep(_config(tiny_checkpoint, tiny_corpus, shared_data, out, n="0,2", criteria="deepest", **small),
              log=lambda _: None)
    evaluated = []
    real = point_module._evaluate
    monkeypatch.setattr(point_module, "_evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    run_sweep(_config(tiny_checkpoint, tiny_corpus, shared_data, out, n="0,2,4", criteria="deepest,similarity",
                      **small), log=lambda _: None)
    assert len(evaluated) == 3  # 2/similarity, 4/deepest, 4/similarity: not the full model nor 2/deepest again
    assert {(p["n"], p["criterion"]) for p in load_points(out)} == {
        (0, "unpruned"), (2, "deepest"), (2, "similarity"), (4, "deepest"), (4, "similarity")}
    assert "similarity" in (out / "sweep.yaml").read_text()


def test_sweep_with_healing_resumes_an_interrupted_heal(tiny_checkpoint, tiny_corpus, shared_data, tmp_path,
                                                        monkeypatch):
    from depthprune import heal as heal_module

    heal_options = dict(steps=4, batch_size=2, seq_len=16, rank=2, warmup=1, eval_every=2, save_every=1,
                        val_sequences=2)
    config = _config(tiny_checkpoint, tiny_corpus, shared_data, tmp_path / "s", n="0,2,4", criteria="deepest",
                     heal="none,lora", heal_fractions=[0.3], tasks="c4", heal_data=str(tiny_corpus), heal_val_data=str(tiny_corpus),
                     heal_options=heal_options, cost=False)
    real_heal = heal_module.heal_loaded

    def killed_heal(*args, **kwargs):  # the first healing dies after 2 of its 4 steps
        assert kwargs["dtype"] == config.dtype  # healing follows the sweep's dtype
        real_heal(*args, stop_after=2, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(heal_module, "heal_loaded", killed_heal)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, log=lambda _: None)
    assert (tmp_path / "s" / "points" / "n002-deepest-lora" / "healed" / "checkpoint").is_dir()
    monkeypatch.setattr(heal_module, "heal_loaded", real_heal)
    run_sweep(config, log=lambda _: None)
    points = {(p["n"], p["heal"]): p for p in load_points(tmp_path / "s")}
    assert set(points) == {(0, "none"), (2, "none"), (2, "lora"), (4, "none")}  # only n = round(0.3 * 6) healed
    healing = points[(2, "lora")]["details"]["healing"]
    assert healing["steps"] == 4 and points[(2, "lora")]["metrics"]["heal_val_loss"] is not None
    assert not (tmp_path / "s" / "points" / "n002-deepest-lora").exists()  # models are not kept by default
