"""What the adapter methods share: their options (declared once, the options of lora and dora, and the base
of qlora's), the default target modules and peft's LoRA (or DoRA) wrapping. Not a method itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import DepthpruneError
from ...options import option

if TYPE_CHECKING:
    from torch import nn

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


@dataclass
class LoraOptions:
    """The options of the LoRA family (qlora, lora, dora)."""

    rank: int = option(64, help="LoRA rank", minimum=1)
    alpha: float | None = option(None, help="LoRA alpha (default: = rank, as in the paper)", above=0)
    dropout: float = option(0.05, help="LoRA dropout", minimum=0, below=1)
    target_modules: list[str] | None = option(
        None, help="comma-separated module names for LoRA, or all-linear (default: the MLP projections, e.g. "
                   "gate_proj,up_proj,down_proj)", nonempty=True, describe="a list of module names")


def default_target_modules(model: nn.Module) -> list[str]:
    """The linear layers of the MLP of a decoder block (gate/up/down_proj for Llama and Mistral).

    Names are given relative to the block; a name that also occurs outside the MLP (GPT-2's ``c_proj``)
    is qualified by the MLP's attribute (``mlp.c_proj``), so attention is never targeted by accident.
    """
    from torch import nn

    from ...model.load import decoder_layout

    layer = decoder_layout(model).layers[0]
    mlp_name = next((n for n in _MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
    if mlp_name is None:
        raise DepthpruneError(f"cannot find the MLP of {type(layer).__name__}: name the layers with --target-modules")
    linear_names = {n.rpartition(".")[2] for n, m in layer.named_modules() if is_linear(m)}
    targets = []
    for name, module in getattr(layer, mlp_name).named_modules():
        if name and is_linear(module):
            leaf = name.rpartition(".")[2]
            outside = [n for n, m in layer.named_modules() if is_linear(m) and n.rpartition(".")[2] == leaf
                       and not n.startswith(mlp_name + ".")]
            targets.append(f"{mlp_name}.{name}" if outside else leaf)
    if not targets or not linear_names:
        raise DepthpruneError(f"no linear layers in the MLP of {type(layer).__name__}: use --target-modules")
    return sorted(set(targets))


def is_linear(module: nn.Module) -> bool:
    from torch import nn

    # bitsandbytes' Linear4bit subclasses nn.Linear; GPT-2 style models use transformers' Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def add_lora(model: nn.Module, o, **extra) -> nn.Module:
    """Wrap the target modules of ``model`` in LoRA adapters (``extra``: more LoraConfig fields, e.g. use_dora)."""
    from peft import LoraConfig, get_peft_model

    targets = o.target_modules or default_target_modules(model)
    config = LoraConfig(r=o.rank, lora_alpha=o.alpha if o.alpha is not None else o.rank, lora_dropout=o.dropout,
                        target_modules=targets if targets != ["all-linear"] else "all-linear",
                        task_type="CAUSAL_LM", bias="none", **extra)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise DepthpruneError(f"--target-modules {','.join(targets)}: {str(exc).splitlines()[0]}") from None
