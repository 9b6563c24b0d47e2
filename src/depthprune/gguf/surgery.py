"""Cutting layers out of a GGUF file directly, without de-quantizing or re-quantizing anything.

A GGUF file is metadata (key/value pairs) followed by named tensors. A cut keeps every tensor of the kept
blocks byte for byte (same quantization type), renames ``blk.N.*`` to the new block numbers, sets
``{arch}.block_count``, cuts every per-layer metadata array, and records what was done under
``depthprune.*``. Tokenizer and chat-template keys are copied unchanged. A repaired cut (``gguf/repair.py``)
hands in new contents for the one tensor its fold changed; everything else is still copied byte for byte.

Two things can make a renumbered file load and compute something else, and both are refused:

- architectures where a block's behaviour depends on its index through something other than per-layer
  arrays (shared KV layers, multi-token-prediction blocks counted in ``block_count``, per-layer token
  embeddings, ...): only architectures checked against llama.cpp's source are cut;
- sliding-window models whose runtime derives each layer's attention type from its index. llama.cpp
  gives gemma3 a period of 6 (layer i is global iff i % 6 == 5) unless the file carries
  ``gemma3.attention.sliding_window_pattern`` (a per-layer bool array or a period). Older llama.cpp
  builds (and other runtimes) ignore that key and always use the period, so by default a cut must keep
  the period's pattern (``swa_pattern="period"``); ``swa_pattern="array"`` writes the per-layer array
  instead, which only runtimes that read it compute correctly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DepthpruneError
from ..outputs import check_output_file, remove_stale_temporaries, temporary_dir_beside

# Architectures whose llama.cpp implementation treats every block alike apart from per-layer arrays and
# the sliding-window period below (checked in llama.cpp's src/models/<arch>.cpp).
RENUMBERABLE_ARCHS = frozenset({
    "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "starcoder2", "olmo2", "granite", "stablelm",
})

# Sliding-window architectures whose llama.cpp loader derives the attention type from the layer index
# (``load_swa_pattern(ml, period)``, dense layer last in each period) when the file has no pattern array.
SWA_PERIODS = {"gemma2": 2, "gemma3": 6, "olmo2": 4}
SWA_PATTERN_MODES = ("period", "array")

PROVENANCE_PREFIX = "depthprune."
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped), or a one-line error for a corrupt file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise DepthpruneError(f"GGUF file '{path}' not found")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, struct errors, etc. on corrupt files
        raise DepthpruneError(f"'{path}' is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                              "re-download or re-export it") from None


def field_value(reader, key: str):
    """The decoded value of metadata ``key`` (lists for arrays), or None when the file lacks it."""
    field = reader.get_field(key)
    return field.contents() if field is not None else None


def gguf_architecture(reader) -> str:
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise DepthpruneError("the GGUF file has no general.architecture: it is not a model file")
    return arch


def gguf_block_count(reader) -> int:
    """``{arch}.block_count``: the number of decoder layers."""
    arch = gguf_architecture(reader)
    count = field_value(reader, f"{arch}.block_count")
    if not isinstance(count, int) or count < 1:
        raise DepthpruneError(f"the GGUF file has no valid {arch}.block_count: it is not a decoder model file")
    return count


def swa_period_pattern(period: int, count: int) -> list[bool]:
    """llama.cpp's ``set_swa_pattern(period)``: layer i slides unless it is the last of its period (0: all)."""
    return [period == 0 or i % period < period - 1 for i in range(count)]


def swa_period(reader) -> int | None:
    """The period by which llama.cpp assigns sliding-window layers of this file, or None when it uses none.

    A period stored in the file wins over the architecture's built-in one.
    """
    arch = gguf_architecture(reader)
    if arch not in SWA_PERIODS or not field_value(reader, f"{arch}.attention.sliding_window"):
        return None
    stored = field_value(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(stored, list):
        return None  # per layer: cut like every per-layer array
    return stored if isinstance(stored, int) else SWA_PERIODS[arch]


def check_swa_pattern(arch: str, kept: list[bool], swa_pattern: str, period: int | None = None) -> list[bool] | None:
    """The per-layer array to write so that every kept layer keeps its attention type, or None if none is needed.

    ``kept`` are the kept layers' sliding flags in their new order; ``period`` is the runtime's (default:
    the architecture's). With ``swa_pattern='period'`` a cut that the period would assign differently is refused.
    """
    if swa_pattern not in SWA_PATTERN_MODES:
        raise DepthpruneError(f"unknown swa_pattern '{swa_pattern}': choose one of {', '.join(SWA_PATTERN_MODES)}")
    period = SWA_PERIODS[arch] if period is None else period
    if kept == swa_period_pattern(period, len(kept)):
        return None
    if swa_pattern == "array":
        return kept
    globals_ = [i for i, slides in enumerate(kept) if not slides]
    raise DepthpruneError(
        f"this cut leaves global attention at layers {globals_} of {len(kept)}, but llama.cpp assigns {arch} "
        f"layers by a period of {period}, so the file would compute something else; choose other "
        "layers, or pass --swa-pattern array to write a per-layer pattern (needs a llama.cpp that reads "
        f"{arch}.attention.sliding_window_pattern)"
    )


def _known_tensor_names(arch: str) -> tuple[set[str], set[str]]:
    """(global tensor names, per-block name tails) gguf-py declares for ``arch``, without '.weight'/'.bias'."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    model_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    names = [TENSOR_NAMES[t] for t in MODEL_TENSORS[model_arch]]
    blocks = {n.removeprefix("blk.{bid}.") for n in names if n.startswith("blk.{bid}.")}
    return {n for n in names if "{" not in n}, blocks


def _check_tensors(reader, arch: str, count: int) -> None:
    """Refuse tensors that cannot be renumbered: unknown to the architecture, or outside blk.0 … blk.{count-1}."""
    global_names, block_tails = _known_tensor_names(arch)
    seen_blocks = set()
    for tensor in reader.tensors:
        stem = re.sub(r"\.(weight|bias)$", "", tensor.name)
        match = _BLOCK.match(stem)
        if match:
            index, tail = int(match[1]), match[2]
            if index >= count or tail not in block_tails:
                raise DepthpruneError(f"tensor '{tensor.name}' is not a known {arch} layer tensor of a "
                                      f"{count}-layer model: this file cannot be cut safely")
            seen_blocks.add(index)
        elif stem not in global_names:
            raise DepthpruneError(f"tensor '{tensor.name}' lies outside the layers (blk.N.*) and is not a known "
                                  f"{arch} tensor: it may depend on the layer count, so this file cannot be cut")
    if seen_blocks != set(range(count)):
        missing = sorted(set(range(count)) - seen_blocks)
        raise DepthpruneError(f"the GGUF file declares {count} layers but has no tensors for layers {missing}")


@dataclass(frozen=True)
class CutPlan:
    """What a cut of one GGUF file writes: checked completely before anything is written."""

    arch: str
    block_count: int
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    per_layer_keys: tuple[str, ...]  # metadata arrays with one entry per layer
    swa_array: tuple[bool, ...] | None  # a per-layer sliding-window pattern to add, when the period breaks


@dataclass(frozen=True)
class ReplacedTensor:
    """New contents for one kept tensor of a cut (a repair's folded weight): the stored array as gguf-py's
    ``quants.quantize`` returns it (bytes per row for block types) and its ``GGMLQuantizationType``."""

    data: Any
    tensor_type: Any


def check_renumberable(reader) -> int:
    """Check that the file's layers can be renumbered at all (architecture, tensor names); returns the layer count."""
    arch = gguf_architecture(reader)
    if arch not in RENUMBERABLE_ARCHS:
        raise DepthpruneError(f"cannot cut '{arch}' GGUF files: depthprune renumbers only architectures whose "
                              f"layers are known to be independent of their index ({', '.join(sorted(RENUMBERABLE_ARCHS))})")
    count = gguf_block_count(reader)
    _check_tensors(reader, arch, count)
    return count


def plan_cut(reader, removed: Sequence[int], swa_pattern: str = "period") -> CutPlan:
    """Check that ``removed`` (0-based) can be cut from the file read by ``reader``; writes nothing."""
    if swa_pattern not in SWA_PATTERN_MODES:
        raise DepthpruneError(f"unknown swa_pattern '{swa_pattern}': choose one of {', '.join(SWA_PATTERN_MODES)}")
    count = check_renumberable(reader)
    arch = gguf_architecture(reader)
    drop = sorted(set(removed))
    if not drop:
        raise DepthpruneError("no layers to remove: give at least one")
    if drop[0] < 0 or drop[-1] >= count:
        raise DepthpruneError(f"cannot remove layers {drop}: the model has layers 0..{count - 1}")
    if len(drop) >= count:
        raise DepthpruneError(f"cannot remove all {count} layers: keep at least one")
    kept = tuple(i for i in range(count) if i not in set(drop))
    per_layer = tuple(
        name for name, field in reader.fields.items()
        if name.startswith(f"{arch}.") and _is_array(field) and len(field.data) == count
    )
    swa_array = None
    period = swa_period(reader)
    if period is not None:
        sliding = swa_period_pattern(period, count)
        swa_array = check_swa_pattern(arch, [sliding[i] for i in kept], swa_pattern, period)
    return CutPlan(arch, count, tuple(drop), kept, per_layer, tuple(swa_array) if swa_array is not None else None)


def _is_array(field) -> bool:
    from gguf import GGUFValueType

    return field.types[0] == GGUFValueType.ARRAY


def _copy_metadata(reader, writer, plan: CutPlan) -> None:
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        # GGUF.* are the reader's virtual header fields; the writer adds the architecture itself.
        if name.startswith(("GGUF.", PROVENANCE_PREFIX)) or name == "general.architecture":
            continue
        if plan.swa_array is not None and name == f"{plan.arch}.attention.sliding_window_pattern":
            continue  # a stored period, replaced by the per-layer array below
        value = field.contents()
        if name == f"{plan.arch}.block_count":
            value = len(plan.kept)
        elif name == "general.size_label":  # e.g. "135M": the cut model's own parameter count
            value = _size_label(reader, plan)
        elif name in plan.per_layer_keys:
            value = [value[i] for i in plan.kept]
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    if plan.swa_array is not None:
        writer.add_key_value(f"{plan.arch}.attention.sliding_window_pattern", list(plan.swa_array),
                             GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)


def _size_label(reader, plan: CutPlan) -> str:
    from gguf.utility import size_label

    return size_label(sum(int(tensor.n_elements) for _, tensor in _kept_tensors(reader, plan)), 0, 0, 0)


def _provenance(writer, plan: CutPlan, source: str, criterion: str, distance: float | None,
                repair: str | None) -> None:
    from gguf import GGUFValueType

    writer.add_key_value("depthprune.source", source, GGUFValueType.STRING)
    writer.add_key_value("depthprune.criterion", criterion, GGUFValueType.STRING)
    writer.add_key_value("depthprune.layers_before", plan.block_count, GGUFValueType.UINT32)
    writer.add_key_value("depthprune.removed_layers", list(plan.removed), GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.UINT32)
    if distance is not None:
        writer.add_key_value("depthprune.angular_distance", float(distance), GGUFValueType.FLOAT32)
    if repair is not None:
        writer.add_key_value("depthprune.repair", repair, GGUFValueType.STRING)


def _kept_tensors(reader, plan: CutPlan):
    """(new name, tensor) of every tensor the cut keeps, in the source's order."""
    new_index = {old: new for new, old in enumerate(plan.kept)}
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match is None:
            yield tensor.name, tensor
        elif int(match[1]) in new_index:
            yield f"blk.{new_index[int(match[1])]}.{match[2]}", tensor


def _stored(tensor, replaced: dict[str, ReplacedTensor]) -> tuple[Any, Any]:
    """(array, type) written for a kept source tensor: its own bytes unless ``replaced`` names it."""
    new = replaced.get(tensor.name)
    return (tensor.data, tensor.tensor_type) if new is None else (new.data, new.tensor_type)


def check_replaced(reader, plan: CutPlan, replaced: dict[str, ReplacedTensor]) -> None:
    """Refuse replacements of tensors the cut drops or lacks, or of another element shape than the source's."""
    import numpy as np
    from gguf.quants import quant_shape_from_byte_shape

    kept = {tensor.name: tensor for _, tensor in _kept_tensors(reader, plan)}
    for name, new in replaced.items():
        if name not in kept:
            raise DepthpruneError(f"cannot write a new '{name}': the cut does not keep such a tensor")
        byte_rows = new.data.dtype == np.uint8  # block types and BF16: bytes per row, as gguf-py's writer reads them
        shape = tuple(quant_shape_from_byte_shape(new.data.shape, new.tensor_type) if byte_rows else new.data.shape)
        expected = tuple(reversed(kept[name].shape.tolist()))  # ne order in the file, row-major in numpy
        if shape != expected:
            raise DepthpruneError(f"the new '{name}' has shape {shape}, the source's {expected}")


def write_cut(reader, plan: CutPlan, path: Path, source: str, criterion: str, distance: float | None,
              replaced: dict[str, ReplacedTensor] | None = None, repair: str | None = None) -> None:
    """Write the cut file to ``path``: metadata, then the kept tensors' bytes exactly as in the source, but for
    the tensors ``replaced`` names (by their source names); ``repair`` is the ``depthprune.repair`` metadata."""
    replaced = replaced or {}

    def metadata(writer) -> None:
        _copy_metadata(reader, writer, plan)
        _provenance(writer, plan, source, criterion, distance, repair)

    write_gguf(reader, path, plan.arch, metadata,
               [(name, *_stored(tensor, replaced)) for name, tensor in _kept_tensors(reader, plan)])


def write_gguf(reader, path: Path, arch: str, metadata: Callable[[Any], None],
               tensors: list[tuple[str, Any, Any]]) -> None:
    """Write a GGUF to ``path`` in ``reader``'s byte order and alignment: ``metadata(writer)`` adds the key-value
    pairs, then ``tensors`` ((name, data, type), in file order) are written as they are."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch=arch, endianess=reader.endianess)
    alignment = field_value(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = alignment
    metadata(writer)
    for name, data, tensor_type in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in tensors:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()


def write_gguf_atomically(out: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``out``, then rename it into place.

    The temporary lies in a recognisable directory that the next run removes if this one is killed.
    """
    out = Path(out)
    remove_stale_temporaries(out)
    tmp_dir = temporary_dir_beside(out)
    try:
        tmp = tmp_dir / out.name
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp_dir)


def cut_gguf(
    source: str | Path,
    layers: Sequence[int],
    out: str | Path,
    *,
    criterion: str = "explicit",
    distance: float | None = None,
    swa_pattern: str = "period",
    source_name: str | None = None,
    reader=None,
    replaced: dict[str, ReplacedTensor] | None = None,
    repair: dict | None = None,
) -> dict:
    """Remove ``layers`` (0-based) from the GGUF file ``source`` and write the result to ``out``; returns a record.

    Every kept tensor keeps its bytes and quantization type, but those ``replaced`` names (by their names in
    the source): a repair's folded weight, with its ``repair`` record (stored as ``depthprune.repair``, JSON).
    Checks everything before writing; the output appears under a temporary name and is renamed into place
    when complete. Pass the ``reader`` of :func:`open_gguf` if you have one: gguf-py parses a large
    vocabulary slowly (seconds to minutes).
    """
    import json

    source = Path(source)
    check_output_file(out, [source], "output GGUF file")
    reader = reader if reader is not None else open_gguf(source)
    plan = plan_cut(reader, layers, swa_pattern)
    check_replaced(reader, plan, replaced or {})
    name = source_name or source.name
    metadata = json.dumps(repair, sort_keys=True) if repair is not None else None
    write_gguf_atomically(out, lambda tmp: write_cut(reader, plan, tmp, name, criterion, distance, replaced, metadata))
    record = cut_record(reader, plan, name, criterion, distance, Path(out))
    if repair is not None:
        record["repair"] = repair
    return record


def _parameters(tensors) -> int:
    return sum(int(t.n_elements) for t in tensors)


def cut_record(reader, plan: CutPlan, source: str, criterion: str, distance: float | None, out: Path) -> dict:
    """What the cut did, in the keys of ``depthprune.json`` plus the file sizes."""
    kept = [tensor for _, tensor in _kept_tensors(reader, plan)]
    return {
        "source_model": source,
        "removed_layers": list(plan.removed),
        "removed_layers_note": "0-based indices into the source model's layers, inclusive",
        "criterion": criterion,
        "angular_distance": distance,
        "layers_before": plan.block_count,
        "layers_after": len(plan.kept),
        "parameters_before": _parameters(reader.tensors),
        "parameters_after": _parameters(kept),
        "bytes_before": Path(reader.data.filename).stat().st_size,
        "bytes_after": out.stat().st_size,
        "sliding_window_pattern_written": plan.swa_array is not None,
    }
