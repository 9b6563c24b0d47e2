"""FSDP healing (torch's FSDP2 over gloo, two CPU processes): the same losses and weights as one process of
full fine-tuning, also across a stop and resume; the places it cannot apply, refused in one line; and the
process group healing started, destroyed when it ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from badinput import assert_clean_failure
from safetensors.torch import load_file

from depthprune.heal import distributed

SRC = Path(__file__).resolve().parents[1] / "src"


def _losses(out: Path) -> list[float]:
    lines = (out / "heal_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_fsdp_on_two_processes_matches_one_process(tiny_checkpoint, tiny_corpus, tmp_path):
    # Global batch 4: one process with 2 micro-batches of 2, or two FSDP processes with 1 of 2 each.
    common = [str(tiny_checkpoint), "--data", str(tiny_corpus), "--val-data", str(tiny_corpus), "--method", "full",
              "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-3", "--warmup", "1",
              "--save-every", "1", "--eval-every", "2", "--val-sequences", "2"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "depthprune.cli", "heal", *common, "--grad-accum", "2",
                    "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True, timeout=300)
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "depthprune.cli", "heal", *common, "--fsdp", "--out", str(tmp_path / "two")]
    stopped = subprocess.run([*two, "--stop-after", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoint").is_dir()  # gathered from the shards, written by rank 0
    resumed = subprocess.run(two, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two_losses) == 4
    assert one == pytest.approx(two_losses, rel=1e-4, abs=1e-5)
    record = json.loads((tmp_path / "two" / "depthprune.json").read_text())["healing"]
    assert record["processes"] == 2 and record["val_loss_after"] == pytest.approx(
        json.loads((tmp_path / "one" / "depthprune.json").read_text())["healing"]["val_loss_after"], rel=1e-4)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_fsdp_refused_where_it_cannot_apply(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    base = ["heal", str(tiny_checkpoint), "--data", str(tiny_corpus), "--steps", "1", "--out", str(tmp_path / "o")]
    assert_clean_failure(capsys, [*base, "--method", "qlora", "--fsdp"], "cannot shard qlora's 4-bit base",
                         [tmp_path])
    assert_clean_failure(capsys, [*base, "--method", "full", "--fsdp"],
                         "--fsdp shards the model over several processes, and this is one", [tmp_path])


def _group_of_one(monkeypatch):
    """A real gloo group of one process that ``joined`` takes for a torchrun run (it reads WORLD_SIZE)."""
    import torch.distributed as dist

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    return dist


def test_a_process_group_heal_started_is_destroyed_when_it_ends(monkeypatch):
    # Left to the interpreter's exit, gloo's threads aborted a finished torchrun run (SIGABRT) now and then.
    dist = _group_of_one(monkeypatch)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: dist.distributed_c10d.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1))
    with distributed.joined("cpu") as processes:
        assert dist.is_initialized() and processes.world == 2
    assert not dist.is_initialized()


def test_a_process_group_the_caller_started_stays(monkeypatch):
    dist = _group_of_one(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with distributed.joined("cpu"):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
