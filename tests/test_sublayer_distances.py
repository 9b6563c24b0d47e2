"""Sub-layer angular distances (issue 20): each layer's attention and MLP distance, measured in the analysis pass
(in memory and streamed), saved with the distances, and read by ``similarity`` at attention/mlp granularity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from badinput import run
from conftest import tiny_model

from depthprune.errors import DepthpruneError
from depthprune.measure.distances import load_distances, measure_distances
from depthprune.measure.stream import stream_distances
from depthprune.model.layout import decoder_layout
from depthprune.model.sublayers import SITES
from depthprune.select import SelectionContext, choose

SEQUENCES = [[1, *range(5 + i, 5 + i + length)] for i, length in enumerate([7, 12, 4, 9, 10])]


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return torch.arccos(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1, 1)) / math.pi


@torch.no_grad()
def _naive(model, token_mode: str) -> dict[str, np.ndarray]:
    """One sample at a time, hooks on each layer and its attention contribution: the definition, spelled out."""
    layers = decoder_layout(model).layers
    site = SITES[model.config.model_type].contributions["attention"]
    seen = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(("in", i), (args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(("out", i), out[0] if isinstance(out, tuple) else out)))
        hooks.append(getattr(layer, site).register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(("a", i), out[0] if isinstance(out, tuple) else out)))
    sums = {"attention": np.zeros(len(layers)), "mlp": np.zeros(len(layers))}
    for sequence in SEQUENCES:
        model(torch.tensor([sequence]), use_cache=False)
        for i in range(len(layers)):
            before, after = seen[("in", i)][0], seen[("out", i)][0]
            middle = before + seen[("a", i)][0]
            for kind, (x, y) in {"attention": (before, middle), "mlp": (middle, after)}.items():
                angles = _angle(x, y)
                sums[kind][i] += float(angles[-1] if token_mode == "last" else angles.mean())
    for hook in hooks:
        hook.remove()
    return {kind: values / len(SEQUENCES) for kind, values in sums.items()}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("token_mode", ["last", "all"])
def test_sublayer_distances_match_the_definition(arch, token_mode):
    model = tiny_model(arch)
    measured = measure_distances(model, SEQUENCES, batch_size=3, token_mode=token_mode, progress=False)
    naive = _naive(model, token_mode)
    for kind in ("attention", "mlp"):
        assert np.allclose(measured.sublayer_distances[kind], naive[kind], atol=1e-6), kind
        assert (measured.sublayer_distances[kind] > 0).all()


@pytest.mark.parametrize("token_mode", ["last", "all"])
def test_streamed_sublayer_distances_equal_the_in_memory_ones(token_mode, tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    in_memory = measure_distances(model, SEQUENCES, batch_size=2, token_mode=token_mode, progress=False)
    streamed = stream_distances(tmp_path, SEQUENCES, batch_size=2, token_mode=token_mode, progress=False)
    for kind in ("attention", "mlp"):
        assert np.allclose(streamed.sublayer_distances[kind], in_memory.sublayer_distances[kind], atol=1e-9)


def test_sublayer_distances_are_saved_loaded_and_checked(tmp_path):
    measured = measure_distances(tiny_model("llama"), SEQUENCES, batch_size=2, progress=False)
    measured.save(tmp_path)
    loaded = load_distances(tmp_path)
    for kind in ("attention", "mlp"):
        assert np.array_equal(loaded.sublayer_distances[kind], measured.sublayer_distances[kind])
    raw = json.loads((tmp_path / "distances.json").read_text())
    raw["sublayer_distances"]["mlp"] = raw["sublayer_distances"]["mlp"][:-1]
    (tmp_path / "distances.json").write_text(json.dumps(raw))
    with pytest.raises(DepthpruneError, match="damaged: 'sublayer_distances'"):
        load_distances(tmp_path)
    del raw["sublayer_distances"]
    (tmp_path / "distances.json").write_text(json.dumps(raw))
    old = load_distances(tmp_path)  # a file from before them still loads, and cannot serve sub-layer similarity
    assert old.sublayer_distances is None
    with pytest.raises(DepthpruneError, match="needs sub-layer distances"):
        choose("similarity", 2, SelectionContext(6, old, granularity="attention"))


@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_similarity_removes_the_sublayers_of_smallest_distance(kind):
    distances = measure_distances(tiny_model("gemma2"), SEQUENCES, batch_size=2, progress=False)
    values = distances.sublayer_distances[kind]
    selection = choose("similarity", 3, SelectionContext(6, distances, granularity=kind))
    assert selection.granularity == kind and len(selection.layers) == 3
    assert max(values[list(selection.layers)]) <= min(np.delete(values, list(selection.layers)))
    assert selection.scores[f"{kind}_distance_by_layer"] == [round(float(v), 6) for v in values]


def test_prune_by_sublayer_similarity_from_the_cli(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    code, out, err = run(capsys, "prune", tiny_checkpoint, "--granularity", "attention", "--n", "2", "--data",
                         tiny_corpus, "--samples", "8", "--seq-len", "32", "--out", tmp_path / "cut")
    assert code == 0, err
    record = json.loads((tmp_path / "cut" / "depthprune.json").read_text())
    scores = record["criterion_scores"]["attention_distance_by_layer"]
    assert record["removed_sublayers"]["attention"] == sorted(np.argsort(scores, kind="stable")[:2].tolist())


def _loss(model, sequences) -> float:
    """The calibration loss spelled out: every sequence on its own, the mean NLL of its predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sequence in sequences:
            logits = model(torch.tensor([sequence])).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(sequence[1:]), reduction="sum"))
            count += len(sequence) - 1
    return total / count


@pytest.mark.parametrize("arch, kind, budget", [("llama", "attention", None), ("gemma3", "attention", None),
                                                ("qwen2", "mlp", None), ("qwen2", "mlp", 0)])
def test_sublayer_greedy_is_the_greedy_of_full_losses(arch, kind, budget, monkeypatch):
    """perplexity-greedy at sub-layer granularity: each step removes the sub-layer whose removal (with the ones
    before it) gives the lowest loss of the whole model, as brute force finds it (``budget`` 0: the states do not
    fit, every candidate runs batch by batch)."""
    from depthprune.model.sublayers import check_sublayer_cut, sublayers_removed
    from depthprune.select import sublayer_calibration

    if budget is not None:
        monkeypatch.setattr(sublayer_calibration, "STATE_BUDGET_BYTES", budget)
    model = tiny_model(arch)
    context = SelectionContext(6, None, model, None, SEQUENCES, batch_size=2, granularity=kind)
    selection = choose("perplexity-greedy", 3, context)
    order, removed = selection.scores["removal_order"], []
    for step in range(3):
        losses = {}
        for c in range(6):
            if c in removed:
                continue
            try:
                check_sublayer_cut(model.config, {kind: [*removed, c]})
            except DepthpruneError:
                continue
            with sublayers_removed(model, {kind: [*removed, c]}):
                losses[c] = _loss(model, SEQUENCES)
        best = min(losses, key=lambda c: (losses[c], c))
        assert order[step] == best
        assert selection.scores["loss_after_step"][step] == pytest.approx(losses[best], rel=1e-5)
        removed.append(best)
    assert selection.layers == tuple(sorted(removed)) and selection.granularity == kind


def test_analyze_prints_and_saves_the_sublayer_distances(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    code, out, err = run(capsys, "analyze", tiny_checkpoint, "--data", tiny_corpus, "--samples", "8", "--seq-len",
                         "32", "--out", tmp_path / "d")
    assert code == 0, err
    saved = load_distances(tmp_path / "d").sublayer_distances
    rows = out.split("(sub-layer distances)\n")[1].splitlines()[:6]
    for layer, row in enumerate(rows):
        fields = row.split()
        assert int(fields[0]) == layer and float(fields[1]) == pytest.approx(saved["attention"][layer], abs=1e-4)
        assert float(fields[3]) == pytest.approx(saved["mlp"][layer], abs=1e-4)
    assert sorted(int(row.split()[2]) for row in rows) == list(range(1, 7))
