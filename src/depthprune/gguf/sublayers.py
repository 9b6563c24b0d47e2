"""Cutting attention sub-layers out of a Llama GGUF file, for llama.cpp, without de-quantizing anything.

llama.cpp expresses such a model in its ``deci`` architecture (Nemotron-NAS): Llama's tensor names, rope
layout (Q/K rows already permuted) and graph, with per-layer arrays ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length``. A layer with 0 heads passes its input
straight to its MLP (no attention tensors, no attention norm, no KV cache entries: K takes 0 bytes; V
too with flash attention, else llama.cpp pads V to the widest layer). The cut renames ``llama.*`` keys to
``deci.*``, copies every other key (tokenizer, chat template) unchanged and every kept tensor byte for byte.
A layer whose two sub-layers both go is removed whole and the layers after it renumbered.

What the llama.cpp bundled with llama-cpp-python 0.3.36 cannot express, checked against it (see
``tests/test_gguf_sublayers.py``), is refused:

- an MLP removed while its layer's attention stays: deci skips a layer with ``feed_forward_length`` 0
  entirely, its attention output included;
- the first kept layer without attention: the loader takes the head size and rope dimension from layer 0;
- anything but a dense Llama file (other architectures, mixture-of-experts, keys deci may read otherwise).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DepthpruneError
from ..outputs import check_output_file
from .surgery import (
    PROVENANCE_PREFIX,
    check_renumberable,
    field_value,
    gguf_architecture,
    open_gguf,
    write_gguf,
    write_gguf_atomically,
)

SOURCE_ARCH = "llama"
TARGET_ARCH = "deci"
ATTENTION_TENSORS = frozenset({"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"})
MLP_TENSORS = frozenset({"ffn_norm", "ffn_gate", "ffn_up", "ffn_down"})
# The llama.* keys llama.cpp's loader reads the same way for every architecture (llama_model::load_hparams),
# so renamed to deci.* they mean what they meant. Anything else (expert counts, ...) is refused.
SHARED_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
    "rope.scale_linear", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
    "rope.scaling.finetuned",
})
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
WHAT_WORKS = ("attention sub-layers of any layers but the first kept one, and whole layers (both sub-layers "
              "of a layer)")
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


@dataclass(frozen=True)
class SublayerPlan:
    """What a sub-layer cut writes, checked completely before anything is written. Indices are 0-based, source."""

    block_count: int
    attention: tuple[int, ...]  # layers whose attention goes
    mlp: tuple[int, ...]  # layers whose MLP goes (always with their attention: those layers go whole)
    kept: tuple[int, ...]  # source layers written, in order
    per_layer: dict[str, tuple[int, ...]]  # PER_LAYER_KEYS -> one value per kept layer

    @property
    def removed_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.attention) & set(self.mlp)))


def _indices(what: str, values: Sequence[int], count: int) -> tuple[int, ...]:
    chosen = sorted({int(v) for v in values})
    if chosen and (chosen[0] < 0 or chosen[-1] >= count):
        raise DepthpruneError(f"cannot remove the {what} sub-layers of layers {chosen}: the model has layers "
                              f"0..{count - 1}")
    return tuple(chosen)


def _per_layer_value(reader, key: str, count: int, default=None) -> list[int]:
    value = field_value(reader, f"{SOURCE_ARCH}.{key}")
    value = default if value is None else value
    if isinstance(value, list) and len(value) == count:
        return [int(v) for v in value]
    if isinstance(value, int):
        return [value] * count
    raise DepthpruneError(f"the GGUF file's {SOURCE_ARCH}.{key} is neither one number nor one per layer: "
                          "it is not a Llama model file llama.cpp reads")


def _check_dense_llama(reader) -> int:
    """Refuse what deci would compute differently from the Llama file; returns the layer count."""
    arch = gguf_architecture(reader)
    if arch != SOURCE_ARCH:
        raise DepthpruneError(f"cannot cut sub-layers out of a '{arch}' GGUF file: llama.cpp runs layers without "
                              f"attention only in its deci architecture, which depthprune writes from Llama files; "
                              "cut whole layers of this model instead")
    count = check_renumberable(reader)
    for name in reader.fields:
        key = name.removeprefix(f"{SOURCE_ARCH}.")
        if name.startswith(f"{SOURCE_ARCH}.") and key not in SHARED_KEYS:
            raise DepthpruneError(f"the GGUF file has '{name}', which llama.cpp's deci architecture may not read "
                                  "as llama does: only dense Llama files can lose sub-layers; cut whole layers")
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if tensor.name.startswith("blk.") and (match is None or match[2] not in ATTENTION_TENSORS | MLP_TENSORS):
            raise DepthpruneError(f"tensor '{tensor.name}' is not a dense Llama layer weight, which llama.cpp's deci "
                                  "architecture does not load: only dense Llama files can lose sub-layers")
    return count


def _mlp_alone_error(layers: str) -> DepthpruneError:
    return DepthpruneError(f"cannot remove the MLP of {layers} alone in a GGUF file: llama.cpp's deci architecture "
                           f"skips a layer without MLP entirely, attention included; GGUF cuts support {WHAT_WORKS}")


def check_sublayer_source(reader, granularity: str) -> int:
    """Refuse, before anything is measured, a file or granularity no sub-layer GGUF cut can serve; returns the
    layer count. ``granularity`` is ``attention`` or ``mlp`` (removing MLPs alone is never expressible)."""
    count = _check_dense_llama(reader)
    if granularity == "mlp":
        raise _mlp_alone_error("any layer")
    if granularity != "attention":
        raise DepthpruneError(f"unknown sub-layer granularity '{granularity}': choose attention or mlp")
    return count


def plan_sublayer_cut(reader, attention: Sequence[int], mlp: Sequence[int]) -> SublayerPlan:
    """Check that the sub-layers can be cut from the file read by ``reader`` and what to write; writes nothing."""
    count = _check_dense_llama(reader)
    attention, mlp = _indices("attention", attention, count), _indices("MLP", mlp, count)
    if not attention and not mlp:
        raise DepthpruneError("no sub-layers to remove: give at least one attention or MLP sub-layer")
    mlp_alone = sorted(set(mlp) - set(attention))
    if mlp_alone:
        raise _mlp_alone_error(f"layers {mlp_alone}")
    kept = tuple(i for i in range(count) if not (i in attention and i in mlp))
    if not kept:
        raise DepthpruneError(f"cannot remove all {count} layers: keep at least one")
    if kept[0] in attention:
        raise DepthpruneError(f"cannot remove the attention of layer {kept[0]}, the first kept layer, in a GGUF file: "
                              f"llama.cpp's deci loader takes the head size from it; GGUF cuts support {WHAT_WORKS}")
    heads = _per_layer_value(reader, "attention.head_count", count)
    source = {"attention.head_count": heads,
              "attention.head_count_kv": _per_layer_value(reader, "attention.head_count_kv", count, heads),
              "feed_forward_length": _per_layer_value(reader, "feed_forward_length", count)}
    per_layer = {key: tuple(0 if key.startswith("attention.") and i in attention else values[i] for i in kept)
                 for key, values in source.items()}
    return SublayerPlan(count, attention, mlp, kept, per_layer)


def _kept_tensors(reader, plan: SublayerPlan):
    """(new name, tensor) of every tensor the cut keeps, in the source's order, layers renumbered."""
    new_index = {old: new for new, old in enumerate(plan.kept)}
    for tensor in reader.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if match is None:
            yield tensor.name, tensor
            continue
        layer, part = int(match[1]), match[2]
        gone = (layer in plan.attention and part in ATTENTION_TENSORS) or (layer in plan.mlp and part in MLP_TENSORS)
        if layer in new_index and not gone:
            yield f"blk.{new_index[layer]}.{part}.weight", tensor


def _copy_metadata(reader, writer, plan: SublayerPlan) -> None:
    from gguf import GGUFValueType
    from gguf.utility import size_label

    for name, field in reader.fields.items():
        # GGUF.* are the reader's virtual header fields; the writer adds the architecture itself.
        if name.startswith(("GGUF.", PROVENANCE_PREFIX)) or name == "general.architecture":
            continue
        key = name.removeprefix(f"{SOURCE_ARCH}.")
        if key in PER_LAYER_KEYS:
            continue  # written below, one value per layer
        value = field.contents()
        if key == "block_count":
            value = len(plan.kept)
        elif name == "general.size_label":  # e.g. "135M": the cut model's own parameter count
            value = size_label(sum(int(t.n_elements) for _, t in _kept_tensors(reader, plan)), 0, 0, 0)
        new_name = f"{TARGET_ARCH}.{key}" if name.startswith(f"{SOURCE_ARCH}.") else name
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(new_name, value, field.types[0], sub_type=sub_type)
    for key, values in plan.per_layer.items():
        writer.add_key_value(f"{TARGET_ARCH}.{key}", list(values), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)


def _provenance(writer, plan: SublayerPlan, source: str, criterion: str) -> None:
    from gguf import GGUFValueType

    writer.add_key_value("depthprune.source", source, GGUFValueType.STRING)
    writer.add_key_value("depthprune.criterion", criterion, GGUFValueType.STRING)
    writer.add_key_value("depthprune.source_architecture", SOURCE_ARCH, GGUFValueType.STRING)
    writer.add_key_value("depthprune.layers_before", plan.block_count, GGUFValueType.UINT32)
    for what, layers in (("attention", plan.attention), ("mlp", plan.mlp)):
        if layers:  # GGUF has no empty arrays: a missing key means none
            writer.add_key_value(f"depthprune.removed_{what}", list(layers), GGUFValueType.ARRAY,
                                 sub_type=GGUFValueType.UINT32)


def write_sublayer_cut(reader, plan: SublayerPlan, path: Path, source: str, criterion: str) -> None:
    """Write the deci file to ``path``: metadata, then the kept tensors' bytes exactly as in the source."""

    def metadata(writer) -> None:
        _copy_metadata(reader, writer, plan)
        _provenance(writer, plan, source, criterion)

    write_gguf(reader, path, TARGET_ARCH, metadata,
               [(name, tensor.data, tensor.tensor_type) for name, tensor in _kept_tensors(reader, plan)])


def cut_sublayers_gguf(
    source: str | Path,
    out: str | Path,
    attention: Sequence[int],
    mlp: Sequence[int] = (),
    *,
    criterion: str = "explicit",
    source_name: str | None = None,
    reader=None,
) -> dict:
    """Remove the attention sub-layers ``attention`` and the MLP sub-layers ``mlp`` (0-based layer indices) from
    the Llama GGUF file ``source``, writing a llama.cpp ``deci`` file to ``out``; returns the record.

    A layer in both lists is removed whole. Every kept tensor keeps its bytes and quantization type. Checks
    everything before writing (what llama.cpp cannot express is refused in one line); the output appears
    under a temporary name and is renamed into place when complete. Pass the ``reader`` of
    :func:`~depthprune.gguf.surgery.open_gguf` if you have one: gguf-py parses a large vocabulary slowly.
    """
    source = Path(source)
    check_output_file(out, [source], "output GGUF file")
    reader = reader if reader is not None else open_gguf(source)
    plan = plan_sublayer_cut(reader, attention, mlp)
    name = source_name or source.name
    write_gguf_atomically(out, lambda tmp: write_sublayer_cut(reader, plan, tmp, name, criterion))
    return sublayer_record(reader, plan, name, criterion, Path(out))


def sublayer_record(reader, plan: SublayerPlan, source: str, criterion: str, out: Path) -> dict:
    """What the cut did, in the keys of ``depthprune.json`` plus the file sizes."""
    kept = [tensor for _, tensor in _kept_tensors(reader, plan)]
    return {
        "source_model": source,
        "removed_sublayers": {"attention": list(plan.attention), "mlp": list(plan.mlp)},
        "removed_sublayers_note": "0-based indices into the source model's layers; a layer in both lists is "
                                  "removed whole",
        "removed_layers": list(plan.removed_layers),
        "criterion": criterion,
        "architecture_before": SOURCE_ARCH,
        "architecture_after": TARGET_ARCH,
        "layers_before": plan.block_count,
        "layers_after": len(plan.kept),
        "attention_layers_after": sum(1 for heads in plan.per_layer["attention.head_count"] if heads),
        "parameters_before": sum(int(t.n_elements) for t in reader.tensors),
        "parameters_after": sum(int(t.n_elements) for t in kept),
        "bytes_before": Path(reader.data.filename).stat().st_size,
        "bytes_after": out.stat().st_size,
    }
