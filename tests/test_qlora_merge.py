"""QLoRA's merge, one linear layer at a time: the same weights as de-quantizing the whole model first, and
never more than one layer's float32 copy alive (counted over every live tensor during the merge)."""

from __future__ import annotations

import gc

import pytest
import torch

from depthprune.heal import resolve_options
from depthprune.heal.methods import qlora
from depthprune.model.load import load_model

pytest.importorskip("bitsandbytes")


def _trained(checkpoint):
    """The tiny model on a 4-bit base with LoRA adapters whose B is not zero (as after some training)."""
    model, _ = load_model(str(checkpoint), quantize="nf4")
    o = resolve_options(method="qlora", rank=4, dropout=0.0, steps=1, target_modules=["all-linear"])
    torch.manual_seed(0)
    net = qlora.prepare(model, o)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return net, o


def _merge_all_at_once(net):
    """The merge before issue 12: every 4-bit layer de-quantized to float32 first, then the deltas added."""
    from peft.tuners.lora import LoraLayer

    qlora.dequantize_model(net, torch.float32)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                for adapter in module.active_adapters:
                    base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
    return qlora.forget_quantization(net.unload())


def _live_bytes() -> tuple[int, int]:
    """Bytes of every live tensor's storage (each storage once), and how many float32 matrices there are."""
    seen, total, matrices = set(), 0, 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except Exception:  # noqa: BLE001 - tensor subclasses (fake tensors an earlier compile left) have no data
            continue
        if pointer in seen or storage.nbytes() == 0:
            continue
        seen.add(pointer)
        total += storage.nbytes()
        matrices += obj.dtype == torch.float32 and obj.dim() == 2 and min(obj.shape) > 8  # not LoRA's rank-4 A/B
    return total, matrices


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_layer_by_layer_merge_equals_the_whole_model_merge(tiny_checkpoint):
    reference = _weights(_merge_all_at_once(_trained(tiny_checkpoint)[0]))
    net, o = _trained(tiny_checkpoint)
    merged = qlora.merge(net, o)
    got = _weights(merged)
    assert got.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)
    kinds = {type(m).__module__.split(".")[0] for m in merged.modules()}
    assert not kinds & {"peft", "bitsandbytes"}, kinds


def test_merge_into_bfloat16_makes_no_float32_model(tiny_checkpoint, monkeypatch):
    reference = _weights(_merge_all_at_once(_trained(tiny_checkpoint)[0]))
    net, o = _trained(tiny_checkpoint)
    linears = [m for m in net.modules() if qlora._is_4bit(m)]
    one_layer = max(m.in_features * m.out_features for m in linears) * 4  # one float32 copy, in bytes
    output = sum(m.in_features * m.out_features for m in linears) * 2  # the merged linear layers in bfloat16
    del linears
    gc.collect()
    before, matrices = _live_bytes()
    peaks: list[tuple[int, int]] = []
    from peft.tuners.lora import LoraLayer

    LoraLinear = next(type(m) for m in net.modules() if isinstance(m, LoraLayer))  # peft's 4-bit LoRA wrapper
    real_delta, real_merge = LoraLinear.get_delta_weight, qlora._merged_linear

    def delta(self, adapter):  # the moment of the peak: the layer's float32 copy and its delta both alive
        value = real_delta(self, adapter)
        peaks.append(_live_bytes())
        return value

    def merged_linear(module, dtype):  # each layer done: its float32 copy is gone
        linear = real_merge(module, dtype)
        peaks.append(_live_bytes())
        return linear

    monkeypatch.setattr(LoraLinear, "get_delta_weight", delta)
    monkeypatch.setattr(qlora, "_merged_linear", merged_linear)
    merged = qlora.merge(net, o, dtype=torch.bfloat16)
    assert len(peaks) == 2 * 7 * 6  # every linear layer of the 6 blocks, one at a time
    assert max(m for _, m in peaks) - matrices <= 2, "a float32 copy of more than one layer was alive"
    assert max(m for _, m in peaks[1::2]) - matrices <= 0, "a layer's float32 copy outlived its merge"
    peak = max(b for b, _ in peaks)
    # The model as it was, plus what it becomes (its linear layers in bfloat16), plus one layer's float32 copy
    # and its delta: never a float32 copy of every linear layer at once (the merge before issue 12).
    assert peak <= before + output + 2 * one_layer, (peak, before, output, one_layer)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, reference[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
