"""QLoRA: LoRA adapters on a 4-bit NF4 base, the paper's recipe (Appendix A.1).

The merge de-quantizes the base to float32 and adds the LoRA update there, never re-quantizing (merging
into 4-bit weights loses quality): the result computes exactly the function that was trained.

It works one linear layer at a time: de-quantize that layer to float32, add its LoRA delta, store it in the
output dtype (float32 by default; the sweep asks for its bfloat16), replace the 4-bit layer and its adapter,
and let both go before the next. The merge's peak is therefore the model plus one layer's float32 copy, not
a float32 copy of every linear layer at once (≈ 27 GB for Llama-2-7B).

On CPU bitsandbytes de-quantizes every 4-bit weight at every forward and again at every backward. With
``qlora_cache_dequantized`` each weight is de-quantized once, at prepare, and its 4-bit layer computes from
that copy: the same values (the 4-bit weights, de-quantized exactly as bitsandbytes does), so the same
function trains, for the memory of the copy (its dtype's size per weight instead of half a byte). GPUs
keep bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...options import option
from . import HEAL_METHODS, HealMethod
from .adapters import LoraOptions


@dataclass
class QLoraOptions(LoraOptions):
    """LoRA's options and qlora's own."""

    qlora_cache_dequantized: bool = option(
        False, help="qlora on CPU: de-quantize the 4-bit base once and keep the copy (the dtype's size instead of 4 "
                    "bits per weight) rather than at every forward and backward; the same 4-bit function trains")


def prepare(model, options):
    from peft import prepare_model_for_kbit_training

    from .adapters import add_lora

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.qlora_cache_dequantized:
        cache_dequantized(model)
    return add_lora(model, options)


def cache_dequantized(model) -> int:
    """Make every 4-bit linear layer on the CPU compute from a copy of its weights de-quantized once (as
    bitsandbytes' CPU path de-quantizes them at each call); returns how many. The 4-bit weights stay the
    layer's parameters (checkpoints and the merge read them)."""
    import types

    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            module.dequantized = _dequantized_weight(module)  # float32
            module.forward = types.MethodType(_forward_from_cache, module)
            count += 1
    return count


def _forward_from_cache(self, x):
    """bitsandbytes' Linear4bit.forward with the de-quantization done once (``self.dequantized``)."""
    import torch.nn.functional as F

    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.dequantized.to(x.dtype), bias).to(inp_dtype)


def merge(model, options, dtype=None):
    """Fold every LoRA adapter into its de-quantized base layer, layer by layer; returns the plain model.

    ``dtype``: the dtype of the merged linear layers (default float32, bit for bit what de-quantizing the
    whole model and adding every delta gives); with another dtype the model's other weights are cast to it
    too. Each layer is done on its own device; the 4-bit layer and its adapter are dropped as soon as their
    merged replacement is in place, so no float32 copy of more than one layer exists at a time.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    target = dtype or torch.float32
    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    names = [name for name, module in model.named_modules()
             if name in wrapped or (_is_4bit(module) and name.rpartition(".")[0] not in wrapped)]
    with torch.no_grad():
        for name in names:  # names only: holding the modules would keep every replaced layer alive
            _replace(model, name, _merged_linear(model.get_submodule(name), target))
    merged = forget_quantization(model.unload() if hasattr(model, "unload") else model)
    if dtype is not None and dtype != torch.float32:
        merged.to(dtype)  # the rest (embeddings, norms, the head): small next to the linear layers
    return merged


def _is_4bit(module) -> bool:
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def _merged_linear(module, dtype):
    """A plain nn.Linear in ``dtype`` holding the de-quantized weight of ``module`` (a 4-bit layer, or a LoRA
    wrapper of one or of a float layer) plus its active LoRA deltas, computed in float32."""
    import torch
    from peft.tuners.lora import LoraLayer
    from torch import nn

    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    weight = _dequantized_weight(base) if _is_4bit(base) else base.weight.detach().float()
    if isinstance(module, LoraLayer):
        for adapter in module.active_adapters:
            weight += module.get_delta_weight(adapter).to(torch.float32)
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                       device=weight.device)
    linear.weight.copy_(weight)
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear


def _replace(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def dequantize_model(model, dtype=None):
    """Replace every bitsandbytes 4-bit linear layer (also inside LoRA wrappers) by an ordinary nn.Linear
    holding its de-quantized weights, in place (float32 unless ``dtype``)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=dtype, device=module.weight.device)
            with torch.no_grad():
                linear.weight.copy_(_dequantized_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def _dequantized_weight(module):
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        weight.data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    return bnbf.dequantize_4bit(weight.data, state).float()


def forget_quantization(model):
    """A model loaded 4-bit keeps its quantizer and config entry; once de-quantized it must save as an
    ordinary float checkpoint."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    model.hf_quantizer = None
    if "quantization_method" in vars(model):  # else model.to(dtype) refuses: "cannot cast a bitsandbytes model"
        del model.quantization_method
    return model


HEAL_METHODS.register(HealMethod("qlora", "LoRA on a 4-bit NF4 base, merged into the de-quantized base (the paper's "
                                          "recipe)", True, prepare, merge, options=QLoraOptions, order=10))
