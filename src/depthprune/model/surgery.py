"""Removing layers from a loaded model so it stays an ordinary Hugging Face model, and saving it (with its
``depthprune.json``, :mod:`.record`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..errors import DepthpruneError
from ..outputs import atomic_output_dir, follow_umask
from .load import decoder_layout, num_layers
from .record import write_record
from .sublayers import assign_cache_slots


def _per_layer_config_keys(config, count: int) -> list[str]:
    # Per-layer settings are lists with one entry per layer (e.g. Gemma3/Qwen `layer_types`, SmolLM3
    # `no_rope_layers`); whatever their name, they must lose the removed layers' entries.
    return [key for key, value in vars(config).items() if isinstance(value, (list, tuple)) and len(value) == count]


def remove_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Remove the decoder ``layers`` (0-based) from ``model`` in place and return it.

    The remaining blocks are renumbered 0 … L'-1: the ModuleList, ``config.num_hidden_layers``, every
    per-layer config list, and each attention module's ``layer_idx`` (the KV cache is indexed by it).
    """
    layout = decoder_layout(model)
    total = len(layout.layers)
    drop = sorted(set(layers))
    if drop and (drop[0] < 0 or drop[-1] >= total):
        raise DepthpruneError(f"cannot remove layers {drop}: the model has layers 0..{total - 1}")
    if len(drop) >= total:
        raise DepthpruneError(f"cannot remove all {total} layers: keep at least one")
    if not drop:
        return model
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 then scales attention by 1/(layer_idx+1) at init: a reloaded cut model would rescale.
        raise DepthpruneError("models with scale_attn_by_inverse_layer_idx=True cannot be cut without changing them")
    keep = [i for i in range(total) if i not in set(drop)]
    parent_path, _, attr = layout.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([layout.layers[i] for i in keep]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    for key in _per_layer_config_keys(config, total):
        value = getattr(config, key)
        setattr(config, key, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    if num_layers(model) != len(keep):
        raise DepthpruneError(f"{type(model).__name__}: could not update the config's layer count")
    assign_cache_slots(model)  # a model with removed attention sub-layers packs its KV-cache slots again
    return model


@contextmanager
def layers_removed(model: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Cut ``layers`` for the duration of a ``with`` block, then put the model back exactly as it was.

    No weights are copied: a sweep evaluates many cuts of one loaded model this way.
    """
    layout = decoder_layout(model)
    parent_path, _, attr = layout.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    config = model.config
    saved_config = {key: getattr(config, key) for key in _per_layer_config_keys(config, len(layout.layers))}
    saved_config["num_hidden_layers"] = config.num_hidden_layers
    saved_indices = [(m, m.layer_idx) for m in layout.layers.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    remove_layers(model, layers)
    try:
        yield model
    finally:
        setattr(parent, attr, layout.layers)
        for key, value in saved_config.items():
            setattr(config, key, value)
        for module, index in saved_indices:
            module.layer_idx = index


def save_pruned(model, tokenizer, out: str | Path, record: dict, force: bool = False) -> Path:
    """Save the model, tokenizer and ``depthprune.json`` to ``out`` atomically (nothing left on failure)."""
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    with atomic_output_dir(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_record(tmp, record)
        follow_umask(tmp)
    return Path(out)
