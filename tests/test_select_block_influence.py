"""block-influence (ShortGPT): BI measured in the analysis pass equals a naive reference from
output_hidden_states; it is saved beside the distances, and older files without it are refused cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from badinput import assert_clean_failure
from conftest import tiny_model
from criteria_reference import block_influence, sequences

from depthprune.measure.distances import load_distances, measure_distances
from depthprune.model.record import read_record
from depthprune.select import SelectionContext, choose


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("tokens", ["last", "all"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt", "qwen3"])
def test_block_influence_equals_naive(arch, tokens, padding_side):
    """Over all real tokens, whatever token mode the distances use and whichever side is padded."""
    model, seqs = tiny_model(arch), sequences(count=7)
    fast = measure_distances(model, seqs, batch_size=3, token_mode=tokens, padding_side=padding_side, progress=False)
    np.testing.assert_allclose(fast.block_influence, block_influence(model, seqs), atol=1e-6)
    assert fast.block_influence.min() > 1e-4  # not trivially zero


def test_selects_the_lowest_wherever_they_are():
    model, seqs = tiny_model("llama"), sequences()
    distances = measure_distances(model, seqs, batch_size=4, progress=False)
    bi = distances.block_influence
    context = SelectionContext(6, distances)
    for n in range(1, 6):
        selection = choose("block-influence", n, context)
        assert selection.layers == tuple(sorted(np.argsort(bi, kind="stable")[:n].tolist()))
        assert selection.scores["block_influence"] == pytest.approx(bi.tolist(), abs=1e-7)


def test_saved_beside_the_distances(tmp_path):
    model, seqs = tiny_model("gemma3"), sequences()
    distances = measure_distances(model, seqs, batch_size=4, progress=False)
    distances.save(tmp_path)
    saved = json.loads((tmp_path / "distances.json").read_text())
    assert len(saved["block_influence"]) == 6 and "ShortGPT" in saved["block_influence_definition"]
    np.testing.assert_allclose(load_distances(tmp_path).block_influence, distances.block_influence)
    assert "block_influence" not in load_distances(tmp_path).meta


def test_prune_from_distances_needs_no_pass(tiny_checkpoint, tiny_corpus, tmp_path, capsys, monkeypatch):
    from depthprune.cli.app import main
    from depthprune.measure import distances as similarity

    assert main(["analyze", str(tiny_checkpoint), "--data", str(tiny_corpus), "--samples", "8", "--seq-len", "16",
                 "--out", str(tmp_path / "a")]) == 0
    bi = json.loads((tmp_path / "a" / "distances.json").read_text())["block_influence"]
    monkeypatch.setattr(similarity, "measure_distances", lambda *a, **k: pytest.fail("measured again"))
    assert main(["prune", str(tiny_checkpoint), "--n", "3", "--criterion", "block-influence", "--distances",
                 str(tmp_path / "a"), "--out", str(tmp_path / "cut")]) == 0
    record = read_record(tmp_path / "cut")
    assert record["criterion"] == "block-influence"
    assert record["removed_layers"] == sorted(np.argsort(bi, kind="stable")[:3].tolist())
    assert record["criterion_scores"]["block_influence"] == pytest.approx(bi, abs=1e-7)
    capsys.readouterr()


def test_old_distances_without_block_influence_are_refused(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    from depthprune.cli.app import main

    assert main(["analyze", str(tiny_checkpoint), "--data", str(tiny_corpus), "--samples", "8", "--seq-len", "16",
                 "--out", str(tmp_path / "old")]) == 0
    path = tmp_path / "old" / "distances.json"
    saved = json.loads(path.read_text())
    del saved["block_influence"], saved["block_influence_definition"]
    path.write_text(json.dumps(saved))
    assert load_distances(path).block_influence is None  # still readable for the other criteria
    capsys.readouterr()
    assert_clean_failure(capsys, ["prune", tiny_checkpoint, "--n", "2", "--criterion", "block-influence",
                                  "--distances", tmp_path / "old", "--out", tmp_path / "cut"],
                         "run `depthprune analyze` again", watch=[tmp_path])
    assert main(["prune", str(tiny_checkpoint), "--n", "2", "--distances", str(tmp_path / "old"),
                 "--out", str(tmp_path / "by-similarity")]) == 0
