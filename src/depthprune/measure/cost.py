"""What a model costs to run, measured: parameters, weight memory, peak memory, KV cache, prefill and decode speed.

Measured the same way for the full and every pruned model, so savings are shown, not assumed. The
per-layer time comes from hooks around each decoder layer during the same prefill pass, which is what
the ideal "fixed part + per-layer part" line is checked against.

A whole-layer cut's cost depends only on its number of layers, and a sub-layer cut's only on how many attention or
MLP sub-layers it removes (which ones, and whether it was healed, changes no shape; the layers keep one
hidden size), so a sweep times each distinct cut size of one loaded model, cut in memory as a loaded checkpoint
of it is (removed layers gone; removed sub-layers replaced by stand-ins that compute nothing and hold no KV
cache), in :func:`interleaved_costs`: round after round over every size, so machine noise hits all alike, and
keeps the median and the spread of the rounds.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from contextlib import contextmanager

import numpy as np
import torch

from ..model.capture import cache_argument
from ..model.load import count_parameters, decoder_layout
from ..model.sublayers import sublayers_removed
from ..model.surgery import layers_removed

# The numbers of a cost record that the results table, the report and a point's metrics carry.
COST_METRICS = ("parameters", "weight_bytes", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
                "prefill_ms_per_token", "decode_ms_per_token", "layer_prefill_ms_per_token",
                "layer_decode_ms_per_token", "layer_weight_bytes", "kv_bytes_per_token")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, tied weights counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@contextmanager
def _peak_memory(device: torch.device):
    """Yield a dict that holds, afterwards, how far memory rose above where it was when entering."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    # On CPU, sample the resident set: the process's lifetime peak would include loading the model.
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield result
    finally:
        done.set()
        watcher.join()
        result["bytes"] = max(0, max(peak[0], _rss_bytes()) - base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a KV cache holds (a transformers ``Cache`` with ``layers``, or the legacy
    tuple of (key, value) per layer); layers never filled count 0."""
    tensors = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [getattr(layer, name, None) for name in ("keys", "values")]
    else:
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _prefill_and_decode(model, ids: torch.Tensor, decode_tokens: int, cache_name: str, clock) -> int:
    """Prefill ``ids``, then decode greedily token by token with the KV cache; ``clock(phase)`` marks phases.
    Returns the bytes the cache holds at the end (measured after the clock stopped)."""
    clock("prefill")
    out = model(input_ids=ids, use_cache=True)
    cache, token = out[cache_name], out.logits[:, -1:].argmax(-1)
    clock("decode")
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{cache_name: cache})
        cache, token = out[cache_name], out.logits[:, -1:].argmax(-1)
    clock("end")
    return cache_bytes(cache)


@torch.no_grad()
def measure_cost(model, prefill_len: int = 256, decode_tokens: int = 32, batch_size: int = 1,
                 repeats: int = 3, seed: int = 0) -> dict:
    """Prefill and decode time per token (best of ``repeats``), one layer's share of each, and memory.

    Prefill runs ``batch_size`` random sequences of ``prefill_len`` tokens; decode then generates
    ``decode_tokens`` tokens one at a time with the KV cache. A second series of the same passes times
    every decoder layer with hooks (kept apart so the hooks do not slow the totals): one layer's cost is
    the mean over layers. Peak memory is the weights plus the rise in memory during the passes (CUDA
    allocator on GPU, resident set on CPU). ``kv_bytes_per_token``: the KV cache's bytes after the decode,
    per token it holds (one sequence): what removed layers or removed attention save in it.
    """
    device = model.get_input_embeddings().weight.device
    layers = decoder_layout(model).layers
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prefill_len), generator=generator).to(device)
    cache_name = cache_argument(model)
    state = {"phase": None, "start": 0.0, "layer_start": 0.0, "cache_bytes": 0}
    totals: dict[str, float] = {}  # seconds per phase, of the whole model or of its layers

    def clock(phase: str) -> None:
        _sync(device)
        now = time.perf_counter()
        if state["phase"] is not None:
            totals[state["phase"]] = totals.get(state["phase"], 0.0) + now - state["start"]
        state.update(phase=phase, start=now)

    def before(module, args):
        _sync(device)
        state["layer_start"] = time.perf_counter()

    def after(module, args, output):
        _sync(device)
        key = "layers_" + state["phase"]
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - state["layer_start"]

    def run_once() -> dict[str, float]:
        totals.clear()
        state["phase"] = None
        state["cache_bytes"] = _prefill_and_decode(model, ids, decode_tokens, cache_name, clock)
        return dict(totals)

    with _peak_memory(device) as memory:
        model(input_ids=ids[:, :8], use_cache=False)  # warm-up
        timed = [run_once() for _ in range(repeats)]
        handles = [h for layer in layers for h in (layer.register_forward_pre_hook(before),
                                                   layer.register_forward_hook(after))]
        try:
            hooked = [run_once() for _ in range(repeats)]
        finally:
            for h in handles:
                h.remove()
    prefill_tokens, decoded = batch_size * prefill_len, batch_size * decode_tokens
    weights = weight_bytes(model)
    return {
        "num_layers": len(layers),
        "parameters": count_parameters(model),
        "weight_bytes": weights,
        "peak_memory_bytes": weights + memory["bytes"],
        "prefill_tokens_per_s": prefill_tokens / min(t["prefill"] for t in timed),
        "decode_tokens_per_s": decoded / min(t["decode"] for t in timed),
        "prefill_ms_per_token": 1e3 * min(t["prefill"] for t in timed) / prefill_tokens,
        "decode_ms_per_token": 1e3 * min(t["decode"] for t in timed) / decoded,
        "layer_prefill_ms_per_token": 1e3 * min(t["layers_prefill"] for t in hooked) / len(layers) / prefill_tokens,
        "layer_decode_ms_per_token": 1e3 * min(t["layers_decode"] for t in hooked) / len(layers) / decoded,
        "layer_weight_bytes": weight_bytes(layers) / len(layers),
        "kv_bytes_per_token": state["cache_bytes"] / (batch_size * (prefill_len + decode_tokens)),
        "settings": {"prefill_len": prefill_len, "decode_tokens": decode_tokens, "batch_size": batch_size,
                     "repeats": repeats, "device": str(device), "dtype": str(model.dtype).removeprefix("torch.")},
    }


def linear_fit(x, y) -> dict:
    """Least-squares y = fixed + per_unit·x, with R²: the 'fixed part + equal part per layer' model."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    spread = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / spread if spread > 0 else 1.0
    return {"fixed": float(intercept), "per_unit": float(slope), "r2": float(r2)}


def round_order(sizes: Iterable[int], rounds: int) -> list[tuple[int, int]]:
    """(round, n) in the order they are timed: every n once per round, ascending in even rounds and
    descending in odd ones, so a machine that grows busier or quieter during the phase favours no end."""
    ordered = sorted(set(sizes))
    return [(r, n) for r in range(rounds) for n in (ordered if r % 2 == 0 else ordered[::-1])]


def summarize_rounds(samples: list[dict]) -> dict:
    """One record from the rounds' records of one cut size: the median of every number in
    :data:`COST_METRICS`, its spread over the rounds (``spread[key] = [min, max]``) and the values themselves."""
    first = samples[0]
    record = {key: value for key, value in first.items() if key not in COST_METRICS}
    values = {key: [s[key] for s in samples] for key in COST_METRICS}
    record.update({key: float(np.median(v)) if key not in ("parameters", "weight_bytes", "kv_bytes_per_token") else v[0]
                   for key, v in values.items()})
    record["spread"] = {key: [min(v), max(v)] for key, v in values.items()}
    record["rounds"] = len(samples)
    record["samples"] = values
    record["settings"] = {**first.get("settings", {}), "rounds": len(samples)}
    return record


Removal = Iterable[int] | Mapping[str, Iterable[int]]  # the layers to remove, or {kind: layers} of sub-layers


def removed(model, removal: Removal):
    """``model`` cut in memory for a ``with`` block: the layers of ``removal`` gone, or, for a mapping
    {'attention' / 'mlp': layers}, those sub-layers replaced by stand-ins that compute nothing."""
    if isinstance(removal, Mapping):
        return sublayers_removed(model, removal)
    return layers_removed(model, removal)


@torch.no_grad()
def interleaved_costs(model, removals: dict[Hashable, Removal], rounds: int = 3,
                      on_measure: Callable[[int, int, Hashable], None] | None = None, **options) -> dict[Hashable, dict]:
    """Time ``model`` with each cut of ``removals`` (a sortable key, e.g. n, -> the layers to remove or
    {kind: layers} of sub-layers) made in memory, ``rounds`` times in :func:`round_order`; returns key ->
    :func:`summarize_rounds` of its rounds.

    ``options`` go to :func:`measure_cost` (each round's number is itself the best of its ``repeats``);
    ``on_measure(index, round, key)`` is called before each timing, ``index`` counting from 0.
    """
    samples: dict[int, list[dict]] = {n: [] for n in removals}
    for index, (r, n) in enumerate(round_order(removals, rounds)):
        if on_measure is not None:
            on_measure(index, r, n)
        with removed(model, removals[n]) as cut:
            samples[n].append(measure_cost(cut, **options))
    return {n: summarize_rounds(s) for n, s in sorted(samples.items())}
