"""QLoRA: LoRA adapters on a 4-bit NF4 base, the paper's recipe (Appendix A.1).

The merge de-quantizes the base to float32 and adds the LoRA update there, never re-quantizing (merging
into 4-bit weights loses quality): the result computes exactly the function that was trained.
"""

from __future__ import annotations

from . import HEAL_METHODS, HealMethod


def prepare(model, options):
    from peft import prepare_model_for_kbit_training

    from .adapters import add_lora

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return add_lora(model, options)


def merge(model, options):
    import torch
    from peft.tuners.lora import LoraLayer

    dequantize_model(model, torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                for adapter in module.active_adapters:
                    base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
    return forget_quantization(model.unload())


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
    return model


HEAL_METHODS.register(HealMethod("qlora", "LoRA on a 4-bit NF4 base, merged into the de-quantized base (the paper's "
                                          "recipe)", True, prepare, merge))
