"""Checking a run's inputs before anything is written, and the identity a rerun must share to resume."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import DEVICES
from ..data import TEXT_SUFFIXES
from ..errors import DepthpruneError
from ..model.load import DTYPES, check_checkpoint, resolve_model_source
from ..model.record import read_record
from .data import read_texts, training_documents
from .options import HealOptions
from .outputs import read_json_object


def model_identity(spec, what: str) -> str:
    """Check, without loading it, that ``spec`` names a model; return it as resuming compares it."""
    if not isinstance(spec, str) or not spec:
        raise DepthpruneError(f"the {what} must be a model name or path, got {spec!r}")
    source = resolve_model_source(spec)
    if source.kind == "local":
        folder = Path(source.location)
        read_json_object(folder / "config.json", f"repair the {what} checkpoint or choose another")
        read_record(folder)  # a damaged depthprune.json is refused before anything is written
        check_checkpoint(source.location)  # a config transformers reads and complete safetensors weights
    # Local paths resolved, so DIR, DIR/, ./DIR and /abs/DIR are the same run; hub ids and aliases as given.
    return source.location if source.kind in ("local", "gguf") else spec


def loaded_identity(model: torch.nn.Module) -> str:
    """The identity of an in-memory model given without a ``model_id``: a hash of its config and weights
    (reads every weight once: about a second per GB)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"in-memory {type(model).__name__} sha256:{digest.hexdigest()[:32]}"


def loaded_dtype(model: torch.nn.Module, dtype: str | None) -> str:
    """The dtype name of an in-memory model's weights; ``dtype``, when given, must be it."""
    found = next(model.parameters()).dtype
    name = next((k for k, v in DTYPES.items() if v == found), None)
    if name is None:
        raise DepthpruneError(f"the model's weights are {found}: healing trains in {', '.join(DTYPES)}")
    if dtype is not None and dtype != name:
        raise DepthpruneError(f"--dtype {dtype} but the model given is {name}: convert it first or drop --dtype")
    return name


def data_identity(source: str | None) -> str | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def check_call(o: HealOptions, device: str, dtype: str | None, world: int, stop_after) -> str:
    """Check the arguments that are not healing options; return the dtype to use."""
    if device not in DEVICES:
        raise DepthpruneError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device in ("cuda", "auto") and not torch.cuda.is_available():
        raise DepthpruneError(f"--device {device} needs a CUDA GPU and none is visible: use --device cpu")
    if device == "auto" and world > 1:
        raise DepthpruneError("--device auto spreads one process over all GPUs: do not combine it with torchrun")
    if o.batch_size % (o.grad_accum * world):
        raise DepthpruneError(f"--batch-size {o.batch_size} must be divisible by --grad-accum ({o.grad_accum}) "
                              f"times the number of processes ({world})")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise DepthpruneError(f"--stop-after must be a whole number, at least 1, got {stop_after!r}")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise DepthpruneError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    return dtype


def check_inputs(model_id: str, data, val_data, o: HealOptions, steps: int, dtype: str) -> tuple[list, dict]:
    """Check every input, cheap checks first, and read the training data; returns (documents, the run's
    identity: the settings a rerun must share to continue it). Writes nothing."""
    teacher_id = model_identity(o.teacher, "teacher") if o.teacher is not None else None
    if val_data is not None and not isinstance(val_data, str):
        raise DepthpruneError(f"the validation data must be a text source (a path or dataset id), got {val_data!r}")
    path = Path(val_data or "").expanduser()
    if val_data and (path.exists() or val_data.startswith((".", "/", "~")) or path.suffix.lower() in TEXT_SUFFIXES):
        # A local source is read now; a hub split is first streamed by the validation before step 1.
        read_texts(val_data, "validation data", 1, o.seed, o.text_field, o.data_config, "validation")
    documents = training_documents(data, o, steps * o.batch_size * o.seq_len)
    data_id = data_identity(data) if isinstance(data, str) else f"{len(documents)} token-id documents"
    identity = {**asdict(o), "model": model_id, "data": data_id, "val_data": data_identity(val_data),
                "dtype": dtype, "teacher": teacher_id}
    return documents, identity
