"""A sweep compares every criterion on one harness: one row per criterion and n, the greedy order computed
once for the whole sweep, each criterion's cut as the criterion chooses it alone, and a report comparing them."""

from __future__ import annotations

from depthprune.select import CRITERIA, SelectionContext, calibration, choose
from depthprune.sweep.run import run_sweep
from depthprune.sweep.settings import resolve_config
from depthprune.sweep.store import load_points

NEW = ["block-influence", "iterative-similarity", "perplexity-greedy", "perplexity-oneshot", "taylor"]


def test_sweep_runs_every_criterion(tiny_checkpoint, tiny_corpus, tmp_path, monkeypatch):
    steps = []
    original = calibration.LayerRunner.removal_losses

    def counting(self, kept, candidates, **kwargs):
        steps.append((len(kept), len(candidates)))
        return original(self, kept, candidates, **kwargs)

    monkeypatch.setattr(calibration.LayerRunner, "removal_losses", counting)
    config = resolve_config(model=str(tiny_checkpoint), out=str(tmp_path / "s"), data=str(tiny_corpus), samples=6,
                            seq_len=16, n="0,2,3", criteria=",".join(CRITERIA.names()), tasks="c4", c4=str(tiny_corpus),
                            c4_sequences=2, c4_seq_len=16, cost=False)
    out = run_sweep(config, log=lambda _: None)
    points = load_points(out)
    assert {(p["n"], p["criterion"]) for p in points} == {(0, "unpruned")} | {(n, c) for n in (2, 3) for c in CRITERIA.names()}
    # Greedy: one step per layer up to n = 3 (each n a prefix). One-shot shares greedy's first step: it
    # computes only the candidates that step stopped early, never one twice.
    assert sorted(k for k, _ in steps) in ([4, 5, 6], [4, 5, 6, 6])
    assert sum(c for k, c in steps if k == 6) < 12
    from depthprune.model.load import load_model

    model, tokenizer = load_model(str(tiny_checkpoint))
    from depthprune.data import load_texts, tokenize
    from depthprune.measure.distances import load_distances

    sequences = tokenize(load_texts(str(tiny_corpus), 6, 0), tokenizer, 16)
    for p in points:
        if p["n"] and p["criterion"] in NEW:
            alone = SelectionContext(6, load_distances(out / "analysis"), model, tokenizer, sequences)
            assert p["removed_layers"] == list(choose(p["criterion"], p["n"], alone).layers), p["key"]
    from depthprune.report.html import write_report

    html = write_report(out).read_text()
    assert "<table id='selection-table'>" in html and "perplexity-greedy / taylor" in html
