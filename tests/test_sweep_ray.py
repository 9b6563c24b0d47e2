"""Sweeps on Ray (a local instance on 2 CPUs): the same table as a serial sweep; a worker that dies or raises
leaves its point recorded as failed while the others finish, and a rerun retries only those; a killed driver
resumes; bad Ray input fails in one line. Skipped when Ray is not installed."""

from __future__ import annotations

import os
import sys

import pytest
from badinput import assert_clean_failure

from depthprune.cli.app import main
from depthprune.errors import DepthpruneError
from depthprune.measure.cost import COST_METRICS
from depthprune.sweep.executors import ray as ray_executor
from depthprune.sweep.executors.ray import FAULT_ENV
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config
from depthprune.sweep.store import load_cost, load_failed, load_points

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'depthprune[ray]' to test Ray sweeps")

DIES, RAISES = "n=2/deepest/none", "n=4/deepest/none"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray instance for the module; its workers inherit the fault switch (first attempts only)."""
    markers = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_ENV] = f"{DIES}|{markers / 'died'}|exit;{RAISES}|{markers / 'raised'}|raise"
    # Ray's memory monitor kills workers when the whole machine runs low, whoever uses the memory: on a shared
    # CI machine that would fail points at random (recorded as 'worker died (OutOfMemoryError)'), so it is off.
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield markers
    ray.shutdown()
    del os.environ[FAULT_ENV], os.environ["RAY_memory_monitor_refresh_ms"]


def _config(checkpoint, corpus, out, **changes):
    settings = dict(model=str(checkpoint), out=str(out), data=str(corpus), samples=4, seq_len=16, n=[0, 2, 4],
                    criteria=["deepest"], heal=["none", "lora"], heal_fractions=[0.3], tasks=["c4"], c4=str(corpus),
                    c4_sequences=2, c4_seq_len=16, batch_size=4, heal_data=str(corpus),
                    heal_options=dict(steps=2, batch_size=2, seq_len=16, rank=2, warmup=1, save_every=1),
                    cost_prefill_len=8, cost_decode_tokens=2, cost_repeats=1, cost_rounds=1)
    return resolve_config(**{**settings, **changes})


# What is timing, not a result: measured speeds and memory, durations, clock times.
TIMED = (set(COST_METRICS) - {"parameters", "weight_bytes", "layer_weight_bytes"}) | {
    "peak_memory_bytes", "seconds", "train_seconds", "created", "finished", "wall_s", "cpu_s"}


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    return value


def _table(out) -> dict:
    """Every point's row (its metrics and evaluation and healing records), without the timing fields."""
    return {p["key"]: _untimed({k: v for k, v in p.items() if k != "details"} | {
        "evaluation": p["details"]["evaluation"], "healing": p["details"]["healing"]}) for p in load_points(out)}


def test_ray_sweep_equals_serial_and_survives_dead_workers_and_a_killed_driver(
        local_ray, tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch, capsys):
    serial = run_sweep(_config(tiny_checkpoint, tiny_corpus, tmp_path / "serial"), log=lambda _: None)
    expected = _table(serial)
    assert set(expected) == {"n=0/unpruned/none", DIES, "n=2/deepest/lora", RAISES}

    # One worker dies (os._exit) and another task raises, on their first attempt: both recorded, the rest saved.
    lines: list[str] = []
    config = _config(tiny_checkpoint, tiny_corpus, tmp_path / "ray")
    with pytest.raises(DepthpruneError, match=r"^2 of 4 points failed: .*rerun the same command to retry only these"):
        run_sweep(config, log=lines.append, ray="local")
    assert (local_ray / "died").is_file() and (local_ray / "raised").is_file()
    assert any("2 at a time" in line for line in lines if line.startswith("ETA: ")), lines  # 2 CPUs, 1 per task
    failed = load_failed(tmp_path / "ray")
    assert set(failed) == {DIES, RAISES}
    assert failed[DIES]["error"].startswith("worker died") and failed[DIES]["attempts"] == 1
    assert failed[RAISES]["error"].startswith("RuntimeError: fault injected")
    assert set(_table(tmp_path / "ray")) == {"n=0/unpruned/none", "n=2/deepest/lora"}
    assert not load_cost(tmp_path / "ray")  # no cost phase while points are missing
    assert not (tmp_path / "ray" / "summary.json").exists()
    capsys.readouterr()
    assert main(["results", str(tmp_path / "ray")]) == 0
    assert f"failed: {DIES} (1x" in capsys.readouterr().out

    # The rerun runs only the two failed points, then the cost phase in the driver: the serial table.
    lines.clear()
    run_sweep(config, log=lines.append, ray="local")
    assert any(line.startswith("retrying 2 point(s) that failed before") for line in lines), lines
    assert any(line.startswith("2 points sent to Ray") for line in lines), lines
    assert not load_failed(tmp_path / "ray")
    assert _table(tmp_path / "ray") == expected
    assert set(load_cost(tmp_path / "ray")) == {(0, "layer"), (2, "layer"), (4, "layer")}

    # The driver killed after its first saved point: the rerun finishes the same table.
    saved = {"count": 0}
    real = ray_executor.record_point

    def killed_after_one(*args, **kwargs):
        if saved["count"] == 1:
            raise KeyboardInterrupt
        saved["count"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ray_executor, "record_point", killed_after_one)
    killed = _config(tiny_checkpoint, tiny_corpus, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(killed, log=lambda _: None, ray="local")
    assert len(load_points(tmp_path / "killed")) == 1
    monkeypatch.setattr(ray_executor, "record_point", real)
    run_sweep(killed, log=lambda _: None, ray="local")
    assert _table(tmp_path / "killed") == expected


def test_ray_bad_input(local_ray, tiny_checkpoint, tiny_corpus, tmp_path, capsys, monkeypatch):
    base = ["sweep", str(tiny_checkpoint), "--data", str(tiny_corpus), "--n", "0,2", "--criteria", "deepest",
            "--tasks", "c4", "--c4", str(tiny_corpus), "--out", str(tmp_path / "out")]
    watch = [tmp_path]
    assert_clean_failure(capsys, [*base, "--ray", "127.0.0.1:9"], "cannot reach the Ray cluster at '127.0.0.1:9'",
                         watch)
    assert_clean_failure(capsys, [*base, "--ray", "ray://127.0.0.1:9"], "start it with `ray start --head`", watch)
    assert_clean_failure(capsys, [*base, "--ray", "nowhere"], "is not a Ray address", watch)
    assert_clean_failure(capsys, [*base, "--ray", "--ray-cpus", "1000"],
                         "--ray-cpus 1000, but the Ray cluster has 2 CPUs in all", watch)
    assert_clean_failure(capsys, [*base, "--ray", "--ray-cpus", "0"], "'ray_cpus' must be above 0", watch)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert_clean_failure(capsys, [*base, "--ray"], "--ray needs Ray, which is not installed: pip install "
                                                   "'depthprune[ray]'", watch)


def test_ray_sweep_repairs_and_measures_agreement_as_the_serial_one(local_ray, tiny_checkpoint, tiny_corpus,
                                                                     shared_data, tmp_path):
    """The full model's point runs first, alone, so the other tasks get its choices; workers read the
    calibration text of the repaired points themselves. (Similarity: the deepest points' keys inject faults.)"""
    changes = dict(n=[0, 2], criteria=["similarity"], repair=["none", "linear"], repair_ridge=0.01, heal=["none"], heal_fractions=None,
                   tasks=["boolq", "c4"], boolq=str(shared_data / "boolq" / "dev.jsonl"), limit=4, cost=False)
    serial = _table(run_sweep(_config(tiny_checkpoint, tiny_corpus, tmp_path / "serial", **changes),
                              log=lambda _: None))
    assert serial["n=2/similarity+linear/none"]["metrics"]["boolq_agreement"] is not None
    assert _table(run_sweep(_config(tiny_checkpoint, tiny_corpus, tmp_path / "ray", **changes), log=lambda _: None,
                            ray="local")) == serial
