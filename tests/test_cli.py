"""The CLI end to end on a tiny local checkpoint, and every kind of bad input it must refuse cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthprune.cli.app import main
from depthprune.model.record import read_record


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_then_prune_by_similarity(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    analysis = tmp_path / "analysis"
    code, out, err = _run(capsys, "analyze", tiny_checkpoint, "--data", tiny_corpus, "--samples", 12,
                          "--seq-len", 16, "--batch-size", 5, "--out", analysis)
    assert code == 0, err
    assert {p.name for p in analysis.iterdir()} == {"distances.json", "distances.csv", "heatmap.png"}
    saved = json.loads((analysis / "distances.json").read_text())
    assert saved["num_layers"] == 6 and saved["num_samples"] == 12 and saved["seq_len"] == 16
    best2 = saved["best"][1]
    assert best2["n"] == 2 and best2["end"] == best2["start"] + 1
    assert f"{best2['start']}-{best2['end']}" in out

    pruned = tmp_path / "pruned"
    code, out, err = _run(capsys, "prune", tiny_checkpoint, "--n", 2, "--distances", analysis, "--out", pruned)
    assert code == 0, err
    record = read_record(pruned)
    assert record["removed_layers"] == [best2["start"], best2["end"]]
    assert record["criterion"] == "similarity" and record["layers_before"] == 6 and record["layers_after"] == 4
    assert record["angular_distance"] == pytest.approx(best2["distance"])
    assert record["parameters_after"] < record["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert model.config.num_hidden_layers == 4
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_prune_measures_distances_when_given_data(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    code, _, err = _run(capsys, "prune", tiny_checkpoint, "--fraction", 0.5, "--data", tiny_corpus,
                        "--samples", 8, "--seq-len", 16, "--out", tmp_path / "p")
    assert code == 0, err
    record = read_record(tmp_path / "p")
    assert len(record["removed_layers"]) == 3 and record["distances"]["num_samples"] == 8


def test_prune_deepest_and_explicit(tiny_checkpoint, tmp_path, capsys):
    assert _run(capsys, "prune", tiny_checkpoint, "--n", 2, "--criterion", "deepest", "--out", tmp_path / "d")[0] == 0
    assert read_record(tmp_path / "d")["removed_layers"] == [3, 4]
    code, out, _ = _run(capsys, "prune", tiny_checkpoint, "--layers", "0,2-3", "--out", tmp_path / "e")
    assert code == 0 and "0,2-3" in out
    assert read_record(tmp_path / "e")["removed_layers"] == [0, 2, 3]


@pytest.fixture
def corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"NOTAGGUF" + bytes(64))
    return path


@pytest.fixture
def empty_data(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    return path


BAD_INPUTS = {
    "missing model": (["prune", "{tmp}/no-such-model", "--n", "1", "--criterion", "deepest"], "not found"),
    "unknown alias": (["prune", "smollm9-1b", "--n", "1", "--criterion", "deepest"], "not found"),
    "corrupt gguf": (["prune", "{gguf}", "--n", "1", "--criterion", "deepest"], "not a readable GGUF"),
    "empty data": (["analyze", "{ckpt}", "--data", "{empty}", "--seq-len", "16"], "no non-empty"),
    "missing data": (["analyze", "{ckpt}", "--data", "{tmp}/nothing.jsonl", "--seq-len", "16"], "not found"),
    "n zero": (["prune", "{ckpt}", "--n", "0", "--criterion", "deepest"], "out of range"),
    "n too large": (["prune", "{ckpt}", "--n", "6", "--criterion", "deepest"], "out of range"),
    "layer out of range": (["prune", "{ckpt}", "--layers", "2-6"], "out of range"),
    "all layers": (["prune", "{ckpt}", "--layers", "0-5"], "removes all"),
    "similarity without data": (["prune", "{ckpt}", "--n", "2"], "needs --distances"),
    "missing distances": (["prune", "{ckpt}", "--n", "2", "--distances", "{tmp}/none"], "no distances"),
    "non-empty out": (["prune", "{ckpt}", "--n", "1", "--criterion", "deepest"], "not empty"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clean_line(case, tiny_checkpoint, corrupt_gguf, empty_data, tmp_path, capsys):
    argv, message = BAD_INPUTS[case]
    fill = dict(tmp=tmp_path, gguf=corrupt_gguf, ckpt=tiny_checkpoint, empty=empty_data)
    out = tmp_path / "out"
    if case == "non-empty out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(capsys, *[a.format(**fill) for a in argv], "--out", out)
    assert code == 2
    # Progress bars (weight loading) may come first; the error itself is one line, and the last.
    errors = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("depthprune: error: ") and message in errors[0], err
    assert err.strip().endswith(errors[0]) and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written left behind
    if case == "non-empty out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_replaces_output(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _run(capsys, "prune", tiny_checkpoint, "--n", "1", "--criterion", "deepest", "--out", out, "--force")[0] == 0
    assert not (out / "old.txt").exists() and read_record(out)["removed_layers"] == [4]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "depthprune.cli", "prune", str(tmp_path / "missing"), "--n", "1",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("depthprune: error:")


def test_outputs_are_readable_by_others(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    import os

    mask = os.umask(0o022)
    try:
        assert _run(capsys, "analyze", tiny_checkpoint, "--data", tiny_corpus, "--samples", 4, "--seq-len", 8,
                    "--out", tmp_path / "a")[0] == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "distances.json").stat().st_mode & 0o777 == 0o644
