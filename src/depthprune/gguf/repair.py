"""A repaired cut written as GGUF: the map fitted on the de-quantized model, one tensor re-quantized.

``prune MODEL.gguf --format gguf --repair linear`` fits the repair (``depthprune.repair``) on the
transformers model that the GGUF file de-quantizes to, exactly as a checkpoint cut does, and folds it into
the last kept layer's MLP output projection there. The cut GGUF then byte-copies every tensor but that
projection's (``blk.K.ffn_down.weight``, and its bias where it has one), which is written from the folded
float32 weight W' = Tᵀ W, W being the de-quantized original: re-quantizing W' is the only error the file adds.

The written type is the source tensor's own when gguf-py can quantize it (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1 and a few more at gguf-py 0.19). gguf-py only de-quantizes the K- and I-quants (Q4_K, Q6_K, ...
of a Q4_K_M file): those become Q8_0, the nearest type it writes whose error stays below every one of them
(8.5 bits per weight against at most 6.6 for Q6_K), or F16 where rows are not a multiple of 32 weights. The
types, and the relative error of the re-quantization, are recorded in the record's ``repair.gguf_tensors``
and in the file's ``depthprune.repair`` metadata.

The GGUF and transformers layouts meet through gguf-py's tensor-name map; a linear layer's (out, in) weight
is the GGUF tensor's row-major array (ne reversed) as is, and Llama's Q/K row permutation does not touch the
MLP. That the de-quantized model's projection equals the GGUF tensor is checked before the fit: a loader
that transforms it some other way is refused, not written wrongly.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..config import DataOptions
from ..errors import DepthpruneError
from .surgery import ReplacedTensor

# gguf-py writes this instead of a type it can only de-quantize (see the module text for why Q8_0).
FALLBACK_TYPE = "Q8_0"
FALLBACK_UNBLOCKED = "F16"
# Largest |W_gguf − W_transformers| accepted as "the same tensor": both de-quantize with gguf-py to float32.
LAYOUT_TOLERANCE = 1e-6


@functools.cache
def can_quantize(type_name: str) -> bool:
    """Whether the installed gguf-py can write ``type_name`` (it only de-quantizes the K- and I-quants)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    try:
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def written_type(source_type: str, row_length: int) -> str:
    """The type a re-quantized tensor of ``source_type`` is written in (see the module text)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if can_quantize(source_type):
        return source_type
    block = GGML_QUANT_SIZES[GGMLQuantizationType[FALLBACK_TYPE]][0]
    return FALLBACK_TYPE if row_length % block == 0 else FALLBACK_UNBLOCKED


def requantized(values: np.ndarray, source_type: str) -> tuple[ReplacedTensor, dict]:
    """``values`` (float32, the GGUF tensor's row-major array) stored for the file, and what that did."""
    from gguf import GGMLQuantizationType, dequantize, quants

    type_name = written_type(source_type, values.shape[-1])
    qtype = GGMLQuantizationType[type_name]
    stored = quants.quantize(values.astype(np.float32), qtype)
    back = dequantize(stored, qtype).reshape(values.shape).astype(np.float64)
    norm = float(np.linalg.norm(values))
    error = float(np.linalg.norm(back - values)) / norm if norm > 0 else 0.0
    return ReplacedTensor(stored, qtype), {"source_type": source_type, "written_type": type_name,
                                           "requantization_error": error}


def site_tensors(reader, site) -> dict[str, Any]:
    """{parameter name ('weight', 'bias'): the GGUF tensor} behind the fold site's projection; a one-line refusal
    where the file names it otherwise or stores it in another layout than the de-quantized model."""
    from gguf import dequantize, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES

    from .surgery import gguf_architecture, gguf_block_count

    arch = gguf_architecture(reader)
    model_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    names = get_tensor_name_map(model_arch, gguf_block_count(reader))
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    found = {}
    for parameter, value in site.projection.named_parameters(recurse=False):
        gguf_name = names.get_name(f"{site.name}.{parameter}", try_suffixes=(".weight", ".bias"))
        tensor = by_name.get(gguf_name)
        if tensor is None:
            where = gguf_name or f"no {arch} name"
            raise DepthpruneError(f"the GGUF file has no tensor for {site.name}.{parameter} ({where}), so the repaired "
                                  "weight has nowhere to go: prune to a checkpoint directory with --repair, then "
                                  "`depthprune export` it to GGUF")
        stored = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
        model_value = value.detach().float().cpu().numpy()
        if stored.shape != model_value.shape or not np.abs(stored - model_value).max() <= LAYOUT_TOLERANCE:
            raise DepthpruneError(f"{gguf_name} of the GGUF file does not equal {site.name}.{parameter} of its "
                                  "de-quantized model (another layout), so the repaired tensor cannot be written "
                                  "into the file: prune to a checkpoint directory with --repair, then `depthprune "
                                  "export` it to GGUF")
        found[parameter] = tensor
    return found


def check_fold_site(model, reader, layer: int):
    """The fold site of ``layer`` and its GGUF tensors; one-line refusals before anything slow or written."""
    from ..repair.site import find_site

    site = find_site(model, layer)
    return site, site_tensors(reader, site)


def repair_gguf_cut(reader, model, tokenizer, layers: list[int], method: str, settings, data: DataOptions,
                    texts: list[str], batch_size: int = 8,
                    progress: bool = True) -> tuple[dict[str, ReplacedTensor], dict]:
    """Fit ``method`` on the de-quantized ``model`` (cut and folded in place) for the cut of ``layers``.

    Returns the re-quantized tensors by their names in the source file, and the ``repair`` record with
    ``gguf_tensors``: each replaced tensor's source and written type and relative re-quantization error.
    """
    from ..data import pad_id, tokenize
    from ..model.load import num_layers
    from ..repair.apply import repair_cut, repairable_block

    start, _ = repairable_block(layers, num_layers(model))
    site, tensors = check_fold_site(model, reader, start - 1)
    sequences = tokenize(texts, tokenizer, data.seq_len)
    record = repair_cut(model, layers, sequences, method, settings, pad_token_id=pad_id(tokenizer),
                        batch_size=batch_size, progress=progress)
    record["calibration"] = {"data": data.source, "samples": data.samples, "seq_len": data.seq_len,
                             "seed": data.seed, "tokens": sum(map(len, sequences))}
    replaced, written = {}, {}
    for parameter, tensor in tensors.items():
        folded = getattr(site.projection, parameter).detach().float().cpu().numpy()
        replaced[tensor.name], written[tensor.name] = requantized(folded, tensor.tensor_type.name)
    record["gguf_tensors"] = written
    return replaced, record
