"""Sub-layer cuts: the attention or the MLP of chosen decoder layers removed, exactly, in a standard checkpoint.

Removing a sub-layer removes its contribution to the residual stream: the layer adds 0 where it added f(x).
Saved, the checkpoint stays an ordinary Hugging Face model that plain transformers loads without remote code:
the removed sub-layer's weights are zeros, so its output projection gives exactly 0, and where a norm sits
between that output and the residual add (Gemma 2/3's post-attention and post-feedforward RMSNorms) the norm
of 0 is 0. :data:`SITES` lists the architectures whose decoder layers were checked to be exact this way
(``tests/test_sublayers.py`` proves each); any other is refused in one line.

Loaded by depthprune (:func:`~depthprune.model.load.load_model` reads ``removed_sublayers`` from
``depthprune.json``), a removed sub-layer is a :class:`RemovedSublayer`: it returns zeros without computing and
holds no weights and no KV cache. Its state dict still holds the zeros, so ``save_pretrained`` of such a model
writes the standard checkpoint again (healing saves through it).

The KV cache: transformers builds one cache layer per decoder layer (typed by ``config.layer_types``: full or
sliding window), reads the cached length from cache layer 0 and each mask's sizes from the first cache layer of
its type. The kept attention modules therefore get cache slots (``layer_idx``) packed per type: the k-th kept
attention of a type writes the k-th cache layer of that type, so the slots in use are the first of each type and
the others are never filled. Removing the attention of every layer of layer 0's type would leave cache layer 0
empty, and is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DepthpruneError
from .granularity import SUBLAYER_KINDS
from .layout import decoder_layout, num_layers


@dataclass(frozen=True)
class Sites:
    """Where a decoder layer keeps its sub-layers. ``modules``: each kind's attribute of the layer;
    ``contributions``: the attribute whose output is that kind's contribution to the residual stream (the
    sub-layer itself, or the norm applied to its output before the add)."""

    modules: dict[str, str]
    contributions: dict[str, str]


_PLAIN = Sites({"attention": "self_attn", "mlp": "mlp"}, {"attention": "self_attn", "mlp": "mlp"})
_POST_NORMED = Sites({"attention": "self_attn", "mlp": "mlp"},
                     {"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"})
SITES = {
    "llama": _PLAIN, "mistral": _PLAIN, "qwen2": _PLAIN, "qwen3": _PLAIN, "phi3": _PLAIN,
    "gemma2": _POST_NORMED, "gemma3_text": _POST_NORMED,
    "gpt2": Sites({"attention": "attn", "mlp": "mlp"}, {"attention": "attn", "mlp": "mlp"}),
    # Parallel residual (x + attn(x) + mlp(x)) or not: either sub-layer's output is only ever added.
    "gpt_neox": Sites({"attention": "attention", "mlp": "mlp"}, {"attention": "attention", "mlp": "mlp"}),
    # OPT's MLP is two linear layers of the decoder layer itself (fc1, fc2), not one module.
    "opt": Sites({"attention": "self_attn"}, {"attention": "self_attn"}),
}


def sites_of(config, kind: str) -> Sites:
    """The sub-layer sites of ``config``'s architecture, refusing in one line one that cannot lose ``kind`` exactly."""
    model_type = getattr(config, "model_type", None)
    sites = SITES.get(model_type)
    if sites is None:
        supported = ", ".join(sorted(SITES))
        raise DepthpruneError(f"--granularity {kind}: sub-layer cuts are exact only on architectures checked for it "
                              f"({supported}); {model_type} is not one: cut whole layers (--granularity layer)")
    if kind not in sites.modules:
        raise DepthpruneError(f"--granularity {kind}: {model_type}'s {kind} is not one module of its decoder layer: "
                              f"cut {' or '.join(sites.modules)} sub-layers or whole layers")
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise DepthpruneError("--granularity attention: this OPT model normalizes after the residual add "
                              "(do_layer_norm_before=False), so a sub-layer's output is not simply added: cut whole layers")
    return sites


def _attention_types(config, total: int) -> list[str]:
    """The KV-cache layer type of each layer (one type for all when the config lists none)."""
    types = getattr(config, "layer_types", None)
    return list(types) if isinstance(types, (list, tuple)) and len(types) == total else ["full_attention"] * total


def check_sublayer_cut(config, removed: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """``removed`` ({kind: layer indices}) as sorted lists, checked against ``config``: kinds, the architecture,
    indices in range, at least one sub-layer of each kind kept, cache layer 0 kept in use. One-line errors."""
    total = num_layers(config)
    clean = {}
    for kind, layers in removed.items():
        if kind not in SUBLAYER_KINDS:
            raise DepthpruneError(f"unknown sub-layer kind {kind!r}: choose one of {', '.join(SUBLAYER_KINDS)}")
        sites_of(config, kind)
        layers = sorted(set(layers))
        if layers and (layers[0] < 0 or layers[-1] >= total):
            raise DepthpruneError(f"cannot remove the {kind} of layers {layers}: the model has layers 0..{total - 1}")
        if len(layers) >= total:
            raise DepthpruneError(f"cannot remove all {total} {kind} sub-layers: keep at least one")
        clean[kind] = layers
    types = _attention_types(config, total)
    gone = set(clean.get("attention", ()))
    if gone and all(i in gone for i in range(total) if types[i] == types[0]):
        raise DepthpruneError(f"cannot remove the attention of every {types[0]} layer: transformers reads the KV "
                              "cache's length from the first one; keep the attention of one of them")
    return clean


def _full_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    # A 4-bit parameter's own shape is its packed storage; its quantization state knows the real one.
    state = getattr(parameter, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(parameter.shape)


def _float_dtype(parameter: torch.Tensor) -> torch.dtype:
    state = getattr(parameter, "quant_state", None)
    return state.dtype if state is not None else parameter.dtype


def _is_zero(parameter: torch.Tensor) -> bool:
    state = getattr(parameter, "quant_state", None)
    return not bool((state.absmax if state is not None else parameter).any())


def _zeros_into_state_dict(module: RemovedSublayer, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, shape in module.shapes.items():
        state_dict[prefix + name] = torch.zeros(shape, dtype=module.dtype_probe.dtype, device=module.dtype_probe.device)


def _zeros_out_of_state_dict(module: RemovedSublayer, state_dict: dict, prefix: str, local_metadata, strict,
                             missing_keys, unexpected_keys, error_msgs) -> None:
    for name in module.shapes:
        value = state_dict.pop(prefix + name, None)
        if value is not None and value.any():
            error_msgs.append(f"{prefix}{name}: a removed {module.kind} sub-layer's weights must be zeros")


class RemovedSublayer(nn.Module):
    """Stands in for a removed attention or MLP module: returns zeros of its input's shape (attention:
    ``(zeros, None)``, as attention modules return output and weights) without computing, holds no weights and
    never touches the KV cache. Its state dict holds zeros of the original's parameters (so saving writes the
    standard checkpoint) and loading one takes them back (refusing any that are not zero)."""

    def __init__(self, kind: str, original: nn.Module):
        super().__init__()
        self.kind = kind
        self.replaces = type(original).__name__
        parameters = dict(original.named_parameters())
        self.shapes = {name: _full_shape(p) for name, p in parameters.items()}
        first = next(iter(parameters.values()))
        # Zero-size, moved and cast with the model: the device and dtype of the zeros in the state dict.
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=_float_dtype(first), device=first.device),
                             persistent=False)
        self.register_state_dict_post_hook(_zeros_into_state_dict)
        self.register_load_state_dict_pre_hook(_zeros_out_of_state_dict)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.kind == "attention" else zeros

    def extra_repr(self) -> str:
        return f"removed {self.kind} ({self.replaces})"


def removed_sublayers_of(model: nn.Module) -> dict[str, list[int]]:
    """Which sub-layers of ``model`` are :class:`RemovedSublayer` stand-ins: {kind: layer indices}, kinds with
    none left out."""
    found: dict[str, list[int]] = {}
    for index, layer in enumerate(decoder_layout(model).layers):
        for child in layer.children():
            if isinstance(child, RemovedSublayer):
                found.setdefault(child.kind, []).append(index)
    return found


def assign_cache_slots(model: nn.Module) -> None:
    """Give the kept attention modules of a model with removed attention their KV-cache slots, packed per layer
    type (see the module docstring); a model without removed attention keeps its own indices."""
    removed = set(removed_sublayers_of(model).get("attention", ()))
    if not removed:
        return
    layers = decoder_layout(model).layers
    attribute = sites_of(model.config, "attention").modules["attention"]
    types = _attention_types(model.config, len(layers))
    free: dict[str, list[int]] = {}
    for index, kind in enumerate(types):
        free.setdefault(kind, []).append(index)
    for index, layer in enumerate(layers):
        if index in removed:
            continue
        slot = free[types[index]].pop(0)
        for module in getattr(layer, attribute).modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = slot


def remove_sublayers(model: nn.Module, removed: Mapping[str, Iterable[int]]) -> nn.Module:
    """Replace the sub-layers ``removed`` ({kind: 0-based layer indices}) of ``model`` in place by
    :class:`RemovedSublayer` stand-ins, give the kept attention their cache slots, and return the model."""
    removed = check_sublayer_cut(model.config, removed)
    present = removed_sublayers_of(model)
    for kind, layers in removed.items():
        again = sorted(set(layers) & set(present.get(kind, ())))
        if again:
            raise DepthpruneError(f"the {kind} of layer(s) {again} is already removed from this model")
    check_sublayer_cut(model.config, {kind: [*present.get(kind, ()), *removed.get(kind, ())]
                                      for kind in {*present, *removed}})
    layers = decoder_layout(model).layers
    for kind, indices in removed.items():
        attribute = sites_of(model.config, kind).modules[kind]
        for index in indices:
            setattr(layers[index], attribute, RemovedSublayer(kind, getattr(layers[index], attribute)))
    assign_cache_slots(model)
    return model


@contextmanager
def sublayers_removed(model: nn.Module, removed: Mapping[str, Iterable[int]]) -> Iterator[nn.Module]:
    """:func:`remove_sublayers` for the duration of a ``with`` block, then the model exactly as it was (no weight
    is copied or changed)."""
    layers = decoder_layout(model).layers
    children = [(layer, name, child) for layer in layers for name, child in layer.named_children()]
    indices = [(m, m.layer_idx) for m in layers.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    remove_sublayers(model, removed)
    try:
        yield model
    finally:
        for layer, name, child in children:
            setattr(layer, name, child)
        for module, index in indices:
            module.layer_idx = index


def stand_in_removed(model: nn.Module, removed: Mapping[str, Iterable[int]], where: str) -> nn.Module:
    """What loading a sub-layer cut does to the freshly loaded ``model``: check that the sub-layers ``removed``
    hold only zeros (else the stand-ins would not compute the checkpoint's model), then :func:`remove_sublayers`.
    ``where`` names the checkpoint."""
    removed = check_sublayer_cut(model.config, removed)
    layers = decoder_layout(model).layers
    for kind, indices in removed.items():
        attribute = sites_of(model.config, kind).modules[kind]
        for index in indices:
            changed = [name for name, p in getattr(layers[index], attribute).named_parameters() if not _is_zero(p)]
            if changed:
                raise DepthpruneError(f"'{where}': depthprune.json says the {kind} of layer {index} is removed, but "
                                      f"its weights are not zero (e.g. {changed[0]}): prune the model again")
    return remove_sublayers(model, removed)
