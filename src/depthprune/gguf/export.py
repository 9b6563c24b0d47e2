"""Exporting a pruned, healed or merged Hugging Face checkpoint: to GGUF for llama.cpp, or as a mergekit recipe.

GGUF export follows llama.cpp's own converter for the architectures it supports here (Llama, Gemma 3):
gguf-py's tensor-name map, Llama's Q/K row permutation (llama.cpp rotates interleaved pairs, HF rotates
halves), Gemma's norm weights stored as 1 + w, norms in float32 and matrices in the chosen ``outtype``.
The tokenizer metadata is copied from the GGUF the checkpoint was cut from (``depthprune.json`` names
it), so the exported file tokenizes exactly as the original did in llama.cpp.

The mergekit format is the passthrough recipe that rebuilds the cut from the source model: one slice
per kept run of layers, ``layer_range`` half-open [start, end).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DepthpruneError
from ..model.record import RECORD_FILE, read_record
from ..outputs import atomic_write_text, check_output_file
from .surgery import check_swa_pattern, field_value, open_gguf, write_gguf_atomically

FORMATS = ("gguf", "mergekit")
OUTTYPES = ("f16", "bf16", "q8_0")


def _outtype(name: str):
    from gguf import GGMLQuantizationType, LlamaFileType

    types = {"f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
             "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
             "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
    if name not in types:
        raise DepthpruneError(f"unknown outtype '{name}': choose one of {', '.join(OUTTYPES)}")
    return types[name]


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face checkpoint directory: its config, its ``depthprune.json`` (if any) and weight files."""

    path: Path
    config: dict
    record: dict | None

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise DepthpruneError(f"'{path}' is not a checkpoint directory (no config.json): export a directory "
                                  "written by depthprune prune, heal or save_pretrained")
        return cls(path, json.loads((path / "config.json").read_text()), read_record(path))

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 array) of every weight, one at a time (safetensors only, never pickles)."""
        from safetensors import safe_open

        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise DepthpruneError(f"'{self.path}' has no .safetensors weights: save the model with save_pretrained")
        for file in files:
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).float().numpy()


# --- architectures -------------------------------------------------------------------------------------


def _rope_theta(config: dict, layer_type: str | None = None) -> float:
    params = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    params = params.get(layer_type, params) if layer_type else params
    if params.get("rope_type", "default") != "default":
        raise DepthpruneError(f"rope scaling '{params['rope_type']}' is not supported by depthprune's GGUF export: "
                              "convert with llama.cpp's convert_hf_to_gguf.py")
    return float(params["rope_theta"])


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _common_metadata(writer, config: dict) -> None:
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])


def _llama_metadata(writer, config: dict, swa_pattern: str) -> None:
    _common_metadata(writer, config)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_vocab_size(config["vocab_size"])
    if _head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))


def _permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved pairs."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _llama_tensor(name: str, data: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return _permute_rotary(data, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return _permute_rotary(data, config.get("num_key_value_heads", config["num_attention_heads"]))
    return data


def _gemma3_metadata(writer, config: dict, swa_pattern: str) -> None:
    if config.get("query_pre_attn_scalar", _head_dim(config)) != _head_dim(config):
        # llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 size but the 27B.
        raise DepthpruneError("this Gemma 3 checkpoint's query_pre_attn_scalar differs from head_dim, which "
                              "depthprune's GGUF export cannot represent: use llama.cpp's convert_hf_to_gguf.py")
    _common_metadata(writer, config)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config, "full_attention"))
    writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
    writer.add_sliding_window(config["sliding_window"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    sliding = [t == "sliding_attention" for t in config["layer_types"]]
    pattern = check_swa_pattern("gemma3", sliding, swa_pattern)
    if pattern is not None:
        writer.add_sliding_window_pattern(pattern)


def _gemma3_tensor(name: str, data: np.ndarray, config: dict) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp multiplies by the stored weight.
    return data + 1.0 if name.endswith("norm.weight") else data


@dataclass(frozen=True)
class GGUFArch:
    name: str  # gguf-py's architecture name
    metadata: Callable[..., None]
    tensor: Callable[[str, np.ndarray, dict], np.ndarray]


GGUF_ARCHS = {
    "llama": GGUFArch("llama", _llama_metadata, _llama_tensor),
    "gemma3_text": GGUFArch("gemma3", _gemma3_metadata, _gemma3_tensor),
}


def gguf_arch(config: dict) -> GGUFArch:
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise DepthpruneError(f"no GGUF mapping for model type '{model_type}': depthprune exports "
                              f"{', '.join(GGUF_ARCHS)}; convert others with llama.cpp's convert_hf_to_gguf.py")
    return GGUF_ARCHS[model_type]


# --- GGUF ----------------------------------------------------------------------------------------------


def tokenizer_gguf(checkpoint: Checkpoint) -> Path:
    """The GGUF whose tokenizer the checkpoint uses: the file or embedded alias its cut started from."""
    from ..model.load import resolve_model_source

    source = (checkpoint.record or {}).get("source_model")
    hint = "pass --tokenizer-gguf FILE.gguf with the source model's tokenizer, or convert with llama.cpp's " \
           "convert_hf_to_gguf.py"
    if source is None:
        raise DepthpruneError(f"'{checkpoint.path}' does not say which GGUF it came from (no {RECORD_FILE}): {hint}")
    resolved = resolve_model_source(source)
    if resolved.kind not in ("alias", "gguf"):
        raise DepthpruneError(f"'{checkpoint.path}' was cut from '{source}', not from a GGUF file: {hint}")
    return Path(resolved.location)


def _copy_tokenizer(writer, reader, vocab_rows: int) -> None:
    from gguf import GGUFValueType

    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if not tokens or len(tokens) != vocab_rows:
        raise DepthpruneError(f"the tokenizer GGUF has {len(tokens or [])} tokens but the checkpoint's embedding has "
                              f"{vocab_rows} rows: pass the GGUF this checkpoint was made from")
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)


def _provenance(writer, checkpoint: Checkpoint) -> None:
    record = checkpoint.record or {}
    writer.add_string("depthprune.source", str(record.get("source_model", checkpoint.path.name)))
    if record.get("removed_layers"):
        writer.add_array("depthprune.removed_layers", [int(i) for i in record["removed_layers"]])
        writer.add_uint32("depthprune.layers_before", int(record["layers_before"]))
        writer.add_string("depthprune.criterion", str(record.get("criterion")))
    for step in ("repair", "healing"):  # what changed the kept weights, as in depthprune.json
        if record.get(step):
            writer.add_string(f"depthprune.{step}", json.dumps(record[step], sort_keys=True))


def _quantized(data: np.ndarray, qtype):
    """(bytes-or-array, type) as llama.cpp's converter stores it: vectors in F32, matrices in ``qtype``."""
    from gguf import GGMLQuantizationType, QuantError, quants

    if data.ndim <= 1:
        return data.astype(np.float32), GGMLQuantizationType.F32
    try:
        return quants.quantize(data, qtype), qtype
    except QuantError:  # rows not a multiple of the block size
        return quants.quantize(data, GGMLQuantizationType.F16), GGMLQuantizationType.F16


def _write_gguf(path: Path, checkpoint: Checkpoint, arch: GGUFArch, outtype: str, swa_pattern: str,
                tokenizer_reader) -> None:
    from gguf import GGUFWriter, get_tensor_name_map
    from gguf.constants import MODEL_ARCH_NAMES

    qtype, file_type = _outtype(outtype)
    config = checkpoint.config
    writer = GGUFWriter(path, arch=arch.name, use_temp_file=True)
    model_arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch.name)
    names = get_tensor_name_map(model_arch, config["num_hidden_layers"])
    name = field_value(tokenizer_reader, "general.name") or checkpoint.path.name
    writer.add_name(f"{name} (depthprune)")
    arch.metadata(writer, config, swa_pattern)
    writer.add_file_type(file_type)
    tied = config.get("tie_word_embeddings", False)
    vocab_rows = None
    for hf_name, data in checkpoint.tensors():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DepthpruneError(f"checkpoint tensor '{hf_name}' has no {arch.name} GGUF name: this checkpoint "
                                  "is not a plain causal LM of its type; convert it with convert_hf_to_gguf.py")
        if gguf_name == "token_embd.weight":
            vocab_rows = data.shape[0]
        stored, stored_type = _quantized(arch.tensor(hf_name, data, config), qtype)
        writer.add_tensor(gguf_name, stored, raw_dtype=stored_type)
    _copy_tokenizer(writer, tokenizer_reader, vocab_rows)
    _provenance(writer, checkpoint)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_new_file(out: str | Path, inputs: list, force: bool) -> None:
    check_output_file(out, inputs, "output file")
    if Path(out).exists() and not force:
        raise DepthpruneError(f"output file '{out}' exists: choose another --out or pass --force")


def export_gguf(checkpoint: str | Path, out: str | Path, outtype: str = "f16", *, swa_pattern: str = "period",
                tokenizer: str | Path | None = None, force: bool = False) -> Path:
    """Write the checkpoint as a GGUF file for llama.cpp; checked before anything is written, renamed into place."""
    _outtype(outtype)
    ckpt = Checkpoint.open(checkpoint)
    arch = gguf_arch(ckpt.config)
    source = Path(tokenizer) if tokenizer is not None else tokenizer_gguf(ckpt)
    _check_new_file(out, [ckpt.path, source], force)
    reader = open_gguf(source)
    write_gguf_atomically(out, lambda tmp: _write_gguf(tmp, ckpt, arch, outtype, swa_pattern, reader))
    return Path(out)


# --- mergekit ------------------------------------------------------------------------------------------


def kept_ranges(removed: list[int], total: int) -> list[tuple[int, int]]:
    """The runs of kept layers as half-open [start, end) ranges, in order."""
    gone = set(removed)
    ranges: list[tuple[int, int]] = []
    for layer in range(total):
        if layer in gone:
            continue
        if ranges and ranges[-1][1] == layer:
            ranges[-1] = (ranges[-1][0], layer + 1)
        else:
            ranges.append((layer, layer + 1))
    return ranges


def mergekit_source(spec: str) -> str:
    """What mergekit can read for the model ``spec``: GGUF sources become their de-quantized checkpoint."""
    from ..model.load import convert_gguf, resolve_model_source

    source = resolve_model_source(spec)
    return str(convert_gguf(source.location)) if source.kind in ("alias", "gguf") else source.location


def _check_mergekit_can_cut(model: str, layers: int) -> None:
    """Refuse sources with per-layer config lists: mergekit's passthrough copies them uncut.

    mergekit 0.1.5 sets num_hidden_layers but leaves e.g. Gemma 3's ``layer_types`` at the source's
    length, which transformers then rejects; the recipe would fail in mergekit.
    """
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return  # a hub id: nothing to read without downloading
    config = json.loads(config_file.read_text())
    per_layer = [key for key, value in config.items() if isinstance(value, list) and len(value) == layers]
    if per_layer:
        raise DepthpruneError(f"the source's config has per-layer lists ({', '.join(per_layer)}) that mergekit's "
                              "passthrough merge does not cut, so the recipe would fail: use depthprune prune, or "
                              "export --format gguf")


def mergekit_yaml(checkpoint: str | Path, source: str | None = None) -> str:
    """The mergekit passthrough recipe that rebuilds the cut recorded in the checkpoint's ``depthprune.json``."""
    import yaml

    ckpt = Checkpoint.open(checkpoint)
    record = ckpt.record
    if not record or "removed_layers" not in record or "layers_before" not in record:
        raise DepthpruneError(f"'{ckpt.path}' has no {RECORD_FILE} with removed layers: export a checkpoint written "
                              "by depthprune prune (or healed from one)")
    model = source or mergekit_source(record["source_model"])
    _check_mergekit_can_cut(model, record["layers_before"])
    recipe = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [{"sources": [{"model": model, "layer_range": [start, end]}]}
                   for start, end in kept_ranges(record["removed_layers"], record["layers_before"])],
    }
    header = (f"# depthprune: rebuilds the cut of {record['source_model']} without layers {record['removed_layers']}"
              " (0-based);\n# layer_range is half-open [start, end). Healing, if any, is not part of this recipe.\n")
    return header + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def export_mergekit(checkpoint: str | Path, out: str | Path, source: str | None = None, force: bool = False) -> Path:
    """Write :func:`mergekit_yaml` to ``out`` atomically."""
    _check_new_file(out, [checkpoint], force)
    atomic_write_text(out, mergekit_yaml(checkpoint, source))
    return Path(out)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "gguf", outtype: str = "f16", *,
           swa_pattern: str = "period", tokenizer: str | Path | None = None, force: bool = False) -> Path:
    """``depthprune export``: the checkpoint as a GGUF file (``fmt='gguf'``) or a mergekit recipe ('mergekit')."""
    if fmt == "gguf":
        return export_gguf(checkpoint, out, outtype, swa_pattern=swa_pattern, tokenizer=tokenizer, force=force)
    if fmt == "mergekit":
        return export_mergekit(checkpoint, out, force=force)
    raise DepthpruneError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
