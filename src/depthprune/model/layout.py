"""Where a causal LM keeps its decoder layers, final norm and LM head, and how many layers and parameters it has.

The model stage's lowest module: loading, surgery, sub-layer cuts and the pruning record all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import DepthpruneError


@dataclass
class DecoderLayout:
    """Where a causal LM keeps the parts layer pruning touches.

    ``backbone`` maps input ids to the final (normed) hidden state without the LM head; ``layers`` is
    the ModuleList of decoder blocks, found at ``layers_path`` (dotted, from the top model);
    ``final_norm`` is None for models without one (e.g. OPT-350m).
    """

    backbone: nn.Module
    layers: nn.ModuleList
    layers_path: str
    final_norm: nn.Module | None
    lm_head: nn.Module


_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_norm", "final_layernorm")


def num_layers(model) -> int:
    """The number of decoder layers of a model (or of its config), as the config states it."""
    config = getattr(model, "config", model)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DepthpruneError(f"{type(model).__name__}: num_hidden_layers is {n!r}, expected a positive layer count")
    return n


def decoder_layout(model: nn.Module) -> DecoderLayout:
    """Find the decoder layers, final norm and LM head of any causal LM with the standard layout.

    The standard layout (Llama, Mistral, Qwen, Gemma, Phi, GPT-2, GPT-NeoX, OPT, Falcon, ...) is one
    ModuleList of ``num_hidden_layers`` blocks inside ``model.base_model``, with the final norm beside it.
    """
    n = num_layers(model)
    backbone = model.base_model
    candidates = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0
    ]
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(name for name, _ in candidates)
        raise DepthpruneError(
            f"cannot find the decoder layers of {type(model).__name__}: expected one list of {n} blocks, "
            f"found {found}; this architecture is not supported"
        )
    name, layers = candidates[0]
    parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
    final_norm = next(
        (getattr(parent, attr) for attr in _FINAL_NORM_NAMES if isinstance(getattr(parent, attr, None), nn.Module)),
        None,
    )
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise DepthpruneError(f"{type(model).__name__} has no LM head: load a *ForCausalLM model")
    prefix = model.base_model_prefix
    layers_path = f"{prefix}.{name}" if backbone is not model else name
    return DecoderLayout(backbone, layers, layers_path, final_norm, lm_head)


def count_parameters(model: nn.Module) -> int:
    """Parameters, counting tied weights (embedding = LM head) once."""
    return sum(p.numel() for p in model.parameters())
