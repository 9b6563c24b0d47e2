"""Cost measurement on a tiny model, and the linear fit the report checks savings with."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_model

from depthprune.measure import cost as cost
from depthprune.measure.cost import linear_fit, measure_cost, weight_bytes
from depthprune.model.surgery import remove_layers


def test_measure_cost_fields_and_sizes():
    model = tiny_model("llama")
    full = measure_cost(model, prefill_len=16, decode_tokens=4, repeats=1)
    assert full["num_layers"] == 6 and full["weight_bytes"] == weight_bytes(model)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "layer_prefill_ms_per_token", "layer_decode_ms_per_token"):
        assert full[key] > 0
    cut = measure_cost(remove_layers(model, [1, 2, 3]), prefill_len=16, decode_tokens=4, repeats=1)
    assert full["weight_bytes"] - cut["weight_bytes"] == pytest.approx(3 * full["layer_weight_bytes"])
    assert cut["parameters"] < full["parameters"]


def test_peak_memory_is_weights_plus_the_measured_rise(monkeypatch):
    rise = 12_345

    @contextmanager
    def measured(device):
        result = {}
        yield result
        result["bytes"] = rise

    monkeypatch.setattr(cost, "_peak_memory", measured)
    model = tiny_model("llama")
    assert measure_cost(model, prefill_len=8, decode_tokens=2, repeats=1)["peak_memory_bytes"] == weight_bytes(model) + rise


def test_cpu_memory_rise_is_measured():
    size = 64 * 2**20  # above glibc's largest mmap threshold: fresh pages, so the resident set must grow
    with cost._peak_memory(torch.device("cpu")) as memory:
        block = torch.ones(size // 4)  # touched, so resident
    assert block.numel() * 4 == size
    assert 0.9 * size <= memory["bytes"] <= size + 32 * 2**20


def test_weight_bytes_counts_tied_weights_once():
    model = tiny_model("gemma3")  # ties the LM head to the embedding
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    expected = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model) == expected


def test_linear_fit():
    fit = linear_fit([2, 4, 6, 8], [3.0, 5.0, 7.0, 9.0])
    assert fit == {"fixed": pytest.approx(1.0), "per_unit": pytest.approx(1.0), "r2": pytest.approx(1.0)}
    noisy = linear_fit([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert 0 < noisy["r2"] < 1
