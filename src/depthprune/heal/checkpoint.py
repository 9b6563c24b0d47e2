"""Checkpoints of a healing run: safetensors for tensors, JSON for everything else; loading unpickles nothing.

``checkpoint/`` in the run's work folder holds ``trainable.safetensors`` (the trainable weights),
``state.safetensors`` (the optimizer's tensors and each process's torch/CUDA RNG state as uint8 tensors)
and ``state.json`` (format number, progress, data position, scheduler, optimizer scalars, Python and
NumPy RNG states). A new checkpoint replaces the old one only once it is whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import DepthpruneError
from ..outputs import atomic_output_dir
from .distributed import is_sharded, load_full_training_state, set_rng_state

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "trainable.safetensors"
TENSORS_FILE = "state.safetensors"  # optimizer moments and RNG states
STATE_FILE = "state.json"  # everything else: progress, data position, scheduler, Python/NumPy RNG
FORMAT = 1  # raised when the layout of a checkpoint changes; others are refused, not misread


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work: Path, model, optimizer, scheduler, stream, progress: dict, rng_states: list[dict],
                    full: tuple[dict, dict] | None = None) -> None:
    """Write ``work/checkpoint``; a complete new one replaces the old one only once it is whole. ``full``: the
    trainable weights and optimizer state gathered from FSDP shards (``distributed.full_training_state``),
    written in place of the model's and optimizer's own (the same layout)."""
    from safetensors.torch import save_file

    weights, optimizer_state = full if full is not None else (trainable(model), optimizer.state_dict())
    tensors: dict[str, torch.Tensor] = {}
    state = {"format": FORMAT, "progress": progress, "data": stream.state_dict(), "scheduler": scheduler.state_dict(),
             "optimizer": _optimizer_to_safe(optimizer_state, tensors),
             "rng": _rng_to_safe(rng_states, tensors)}
    with atomic_output_dir(work / CHECKPOINT_DIR, force=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in weights.items()}, str(tmp / WEIGHTS_FILE))
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")


def load_checkpoint(work: Path, model, optimizer, scheduler, stream, rank: int = 0) -> dict:
    """Restore the run from ``work/checkpoint``, and process ``rank``'s RNG state; returns the progress.

    A checkpoint that does not parse (a damaged disk, a file edited by hand, the pickle format of older
    versions) is an error that says how to start over; nothing in it is executed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = work / CHECKPOINT_DIR
    params = trainable(model)
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
        tensors = load_file(str(folder / TENSORS_FILE))
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r}, this version reads {FORMAT}")
        if set(weights) != set(params) or any(weights[n].shape != p.shape for n, p in params.items()):
            raise ValueError("its weights do not match this model's trainable weights")
        optimizer_state = _optimizer_from_safe(state["optimizer"], tensors, list(params.values()))
        if is_sharded(model):  # FSDP: every process reads the whole checkpoint and keeps its shards
            load_full_training_state(model, optimizer, list(params), weights, optimizer_state)
        else:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name])
            optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        rng_states = _rng_from_safe(state["rng"], tensors)
        set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        return state["progress"]
    except (SafetensorError, OSError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except KeyError as exc:
        reason = f"it has no entry {exc}"
    raise DepthpruneError(f"the checkpoint in '{folder}' cannot be read ({reason}): rerun with --restart to "
                          "start this run over")


def _rng_to_safe(states: list[dict], tensors: dict[str, torch.Tensor]) -> list[dict]:
    """Put the RNG tensors of each process into ``tensors``; return the rest as JSON-ready values."""
    saved = []
    for i, state in enumerate(states):
        tensors[f"rng.{i}.torch"] = state["torch"]
        cuda = state.get("cuda", [])
        for j, tensor in enumerate(cuda):
            tensors[f"rng.{i}.cuda.{j}"] = tensor.cpu()
        version, internal, gauss = state["python"]
        name, keys, position, has_gauss, cached = state["numpy"]
        saved.append({"python": [version, list(internal), gauss], "cuda": len(cuda),
                      "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)]})
    return saved


def _rng_from_safe(saved: list[dict], tensors: dict[str, torch.Tensor]) -> list[dict]:
    import numpy as np

    states = []
    for i, entry in enumerate(saved):
        version, internal, gauss = entry["python"]
        name, keys, position, has_gauss, cached = entry["numpy"]
        state = {"torch": tensors[f"rng.{i}.torch"], "python": (version, tuple(internal), gauss),
                 "numpy": (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached)}
        if entry["cuda"]:
            state["cuda"] = [tensors[f"rng.{i}.cuda.{j}"] for j in range(entry["cuda"])]
        states.append(state)
    return states


def _optimizer_to_safe(state_dict: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Put the optimizer's per-parameter tensors into ``tensors``; return the rest as JSON-ready values."""
    values: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "values": values}


def _optimizer_from_safe(saved: dict, tensors: dict[str, torch.Tensor], params: list[nn.Parameter]) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            if tensor.dim() and tensor.shape != params[int(index)].shape:  # load_state_dict does not check
                raise ValueError(f"optimizer state {name} has shape {tuple(tensor.shape)}")
            state.setdefault(int(index), {})[key] = tensor
    for index, entry in saved["values"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": saved["param_groups"]}
