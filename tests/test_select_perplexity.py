"""perplexity-greedy (SLEB) and perplexity-oneshot (Shortened LLaMA's PPL) equal full forward passes of
explicitly cut models, and the fast path behind them computes what the cut model computes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from criteria_reference import cut_loss, greedy, oneshot, sequences

from depthprune.select import SelectionContext, choose
from depthprune.select.calibration import LayerRunner

ARCHS = ["llama", "gemma3", "gemma2", "qwen3", "gpt2", "opt", "gpt_neox", "phi3"]


def _context(model, seqs, batch_size: int = 4) -> SelectionContext:
    return SelectionContext(6, None, model, tiny_tokenizer(), seqs, batch_size=batch_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_loss_equals_the_cut_model(arch):
    """Every kept set (contiguous or not) gives the loss of the explicitly cut model's full forward pass."""
    model, seqs = tiny_model(arch), sequences()
    runner = LayerRunner(model, seqs, batch_size=4)
    assert runner.full_loss == pytest.approx(cut_loss(model, seqs), rel=1e-5)
    for removed in [(0,), (2,), (5,), (1, 3), (0, 2, 4), (3, 4)]:
        kept = [i for i in range(6) if i not in removed]
        losses = runner.removal_losses(kept, [kept[-1]], exhaustive=True)
        # the cut without kept[-1] as well: removal_losses' own answer for one candidate
        assert losses[kept[-1]] == pytest.approx(cut_loss(model, seqs, (*removed, kept[-1])), rel=1e-5)
        with torch.no_grad():
            total = sum(runner.nll_sum(runner.run(kept, 0, runner.embeddings[b], b), b)
                        for b in range(len(runner.batches)))
        assert total / runner.num_predicted == pytest.approx(cut_loss(model, seqs, removed), rel=1e-5)


def test_gemma_layers_keep_their_own_attention_type():
    """Tiny Gemma 3 has 4-token sliding windows on layers 0, 1, 3, 4 and global attention on 2 and 5: a layer
    that moves up after a cut must keep its own mask and rotary table. Reusing the arguments of the position
    it moves to (the wrong way) gives another loss, so the test above would catch it."""
    model, seqs = tiny_model("gemma3"), sequences(low=10, high=15)
    runner = LayerRunner(model, seqs, batch_size=3)
    removed = 1  # layer 2 (global) then runs where layer 1 (sliding) was
    kept = [i for i in range(6) if i != removed]
    right = runner.removal_losses(range(6), [removed], exhaustive=True)[removed]
    assert right == pytest.approx(cut_loss(model, seqs, [removed]), rel=1e-5)
    wrong = 0.0
    with torch.no_grad():
        for b in range(len(runner.batches)):
            hidden = runner.embeddings[b]
            for position, index in enumerate(kept):
                rest, kwargs, key = runner.calls[b][position]  # the arguments of the position, not the layer
                out = runner.layers[index](hidden, *rest, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            wrong += runner.nll_sum(hidden, b)
    assert abs(wrong / runner.num_predicted - right) > 1e-4


@pytest.mark.parametrize("arch,batch_size", [("llama", 4), ("gemma3", 4), ("gpt2", 4), ("qwen2", 4), ("llama", 1),
                                             ("gemma3", 1)])
def test_greedy_equals_the_naive_greedy(arch, batch_size):
    """Batches of 1: candidates stop early after a few sequences, and runs carried between steps are partial."""
    model, seqs = tiny_model(arch), sequences()
    order, losses = greedy(model, seqs, 4)
    context = _context(model, seqs, batch_size=batch_size)
    for n in range(1, 5):
        selection = choose("perplexity-greedy", n, context)
        assert selection.layers == tuple(sorted(order[:n]))
        assert selection.scores["removal_order"] == order[:n]
        assert selection.scores["loss_after_step"] == pytest.approx(losses[:n], rel=1e-5)
    assert selection.scores["full_loss"] == pytest.approx(cut_loss(model, seqs), rel=1e-5)


def test_greedy_reuses_the_layers_before_the_removed_one():
    """After a step removes the layer at position q, candidates before q do not run the layers up to q again."""
    from depthprune.select import calibration as _calibration

    model, seqs = tiny_model("llama"), sequences()
    counts = {}
    for reuse in (True, False):
        context = _context(model, seqs)
        choose("perplexity-greedy", 1, context)
        runner = context.cache["runner"]
        if not reuse:
            context.cache["greedy"]["reuse"] = None
        calls = []
        original = runner.call
        runner.call = lambda *a, calls=calls, original=original: calls.append(1) or original(*a)
        counts[reuse] = (choose("perplexity-greedy", 3, context).layers, len(calls))
    assert counts[True][0] == counts[False][0] and counts[True][1] < counts[False][1]
    assert _calibration.STATE_BUDGET_BYTES > 0


def test_greedy_order_is_computed_once_and_extended():
    model, seqs = tiny_model("llama"), sequences()
    context = _context(model, seqs)
    choose("perplexity-greedy", 3, context)
    runner = context.cache["runner"]
    calls = []
    original = runner.removal_losses
    runner.removal_losses = lambda *a, **k: calls.append(1) or original(*a, **k)
    choose("perplexity-greedy", 2, context)  # a prefix: no work
    assert calls == []
    choose("perplexity-greedy", 4, context)  # one more step only
    assert len(calls) == 1


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt"])
def test_oneshot_equals_single_cuts(arch):
    model, seqs = tiny_model(arch), sequences()
    reference = oneshot(model, seqs)
    context = _context(model, seqs, batch_size=5)
    ranked = sorted(range(6), key=lambda c: (reference[c], c))
    for n in (1, 3, 5):
        selection = choose("perplexity-oneshot", n, context)
        assert selection.layers == tuple(sorted(ranked[:n]))
    assert selection.scores["loss_without_layer"] == pytest.approx(reference, rel=1e-5)


def test_oneshot_and_greedy_share_their_first_step():
    model, seqs = tiny_model("llama"), sequences()
    context = _context(model, seqs)
    first = choose("perplexity-oneshot", 1, context)
    runner = context.cache["runner"]
    calls = []
    original = runner.removal_losses
    runner.removal_losses = lambda *a, **k: calls.append(1) or original(*a, **k)
    assert choose("perplexity-greedy", 1, context).layers == first.layers
    assert calls == []


def test_batch_by_batch_path_equals_the_stored_states(monkeypatch):
    """Calibration sets too large to keep every state run batch by batch, with the same losses."""
    from depthprune.select import calibration as _calibration

    model, seqs = tiny_model("gemma3"), sequences()
    stored = LayerRunner(model, seqs, batch_size=2).removal_losses(range(6), range(6), exhaustive=True)
    monkeypatch.setattr(_calibration, "STATE_BUDGET_BYTES", 0)
    streamed = LayerRunner(model, seqs, batch_size=2).removal_losses(range(6), range(6), exhaustive=True)
    assert streamed == pytest.approx(stored, rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt", "gpt2"])  # gemma2: soft-capped logits; opt: project_out
def test_vocabulary_subset_bound_is_below_the_loss_and_exact_on_the_whole_vocabulary(arch):
    model, seqs = tiny_model(arch), sequences()
    runner = LayerRunner(model, seqs, batch_size=4)
    assert runner.can_bound()
    vocabulary = runner.layout.lm_head.weight.shape[0]
    with torch.no_grad():
        last = [runner.states(list(range(6)), b)[-1] for b in range(len(runner.batches))]
        subsets = runner.vocabulary_subsets(last)
        for b, hidden in enumerate(runner.run([0, 2, 3, 5], 0, runner.embeddings[b], b) for b in range(len(last))):
            exact = runner.nll_sum(hidden, b)
            assert len(subsets[b][0]) == -(-vocabulary // 8)
            assert runner._nll_lower_bound(hidden, b, subsets[b]) < exact
            everything = (torch.arange(vocabulary), torch.ones(len(runner.targets[b][0]), dtype=torch.bool))
            assert runner._nll_lower_bound(hidden, b, everything) == pytest.approx(exact, rel=1e-6)


def test_the_bound_skips_full_heads_and_chooses_the_same(monkeypatch):
    """With the subset grown to the whole vocabulary the bound equals the loss, so every candidate but the
    best is dropped without its full head; the order and losses are those computed without any bound."""
    from depthprune.select import calibration as _calibration

    model, seqs = tiny_model("llama"), sequences()
    heads = {}
    for bound in (False, True):
        monkeypatch.setattr(_calibration, "SUBSET_DIVISOR", 1)
        monkeypatch.setattr(LayerRunner, "can_bound", lambda self, bound=bound: bound)
        context = _context(model, seqs, batch_size=16)  # one batch: no stop on a partial sum
        calls = []
        original = LayerRunner._nll_sum
        monkeypatch.setattr(LayerRunner, "_nll_sum",
                            lambda self, *a, calls=calls, original=original: calls.append(1) or original(self, *a))
        selection = choose("perplexity-greedy", 3, context)
        heads[bound] = (selection.scores, len(calls))
        monkeypatch.undo()
    assert heads[True][0] == heads[False][0]
    assert heads[True][1] < heads[False][1] / 2
