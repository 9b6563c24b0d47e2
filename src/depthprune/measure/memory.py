"""Memory sizes, and the memory an analysis needs in memory and streamed: the choice between the two.

The estimate comes from the safetensors headers, the config and the batch shapes, before anything loads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DepthpruneError
from ..model.load import DTYPES
from .checkpoint import Checkpoint, local_checkpoint

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MEMORY_HELP = "bytes, or a number with a unit: KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)"


def parse_memory(text: str | int) -> int:
    """Bytes from ``'2GiB'``, ``'1.5 GB'``, ``'512MiB'`` or a plain byte count (units are case-insensitive)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, "b"
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(text).lower())
        if not match or (match[2] or "b") not in _UNITS:
            raise DepthpruneError(f"memory size '{text}' not understood: give {MEMORY_HELP}, e.g. 2GiB")
        value, unit = float(match[1]), match[2] or "b"
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise DepthpruneError(f"memory size must be positive, got '{text}'")
    return size


def format_memory(size: float) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size >= _UNITS[unit.lower()]:
            return f"{size / _UNITS[unit.lower()]:.2f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """What an analysis needs on the device it runs on, in bytes: from the safetensors headers, the config
    and the batch shapes, before anything is loaded. An estimate, not a bound."""

    model: int  # every weight at the analysis dtype
    layer: int  # the largest decoder layer
    embedding_rows: int  # the rows of the token ids that can occur
    extras: int  # other weights outside the layers (position embeddings, norms)
    residual: int  # the residual stream of every calibration token (twice: a layer's input and output)
    arguments: int  # the captured layer arguments (masks, rotary cos/sin) and the kept token vectors
    batch_work: int  # one batch through one layer (attention scores, MLP), and the float64 distance maths

    @property
    def in_memory(self) -> int:
        return self.model + self.batch_work

    def streamed(self, offload: bool = False) -> int:
        """Peak of the streamed analysis; with ``offload`` the residual stream lives in CPU memory instead."""
        residual = 0 if offload else self.residual
        return self.layer + self.embedding_rows + self.extras + residual + self.arguments + self.batch_work

    def too_small(self, budget: int) -> DepthpruneError:
        return DepthpruneError(
            f"memory budget {format_memory(budget)} is too small to stream this model: one layer "
            f"({format_memory(self.layer)}) + embedding rows and other weights "
            f"({format_memory(self.embedding_rows + self.extras)}) + activations "
            f"({format_memory(self.residual + self.arguments + self.batch_work)}) need about "
            f"{format_memory(self.streamed())}; raise --max-memory or use fewer or shorter samples")


def estimate_memory(
    checkpoint: Checkpoint | str | Path,
    lengths: Sequence[int],
    *,
    batch_size: int = 8,
    token_mode: str = "last",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> MemoryEstimate:
    """Estimate the memory of the in-memory and the streamed analysis of sequences of ``lengths`` tokens
    (before tokenizing: ``[seq_len] * samples``, an upper bound)."""
    from transformers import AutoConfig

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", config)
    size = DTYPES[dtype].itemsize
    entries = checkpoint.entries
    layers = checkpoint.layer_groups()
    layer_bytes = max((checkpoint.nbytes(names, DTYPES[dtype]) for names in layers.values()), default=0)
    in_layers = {n for names in layers.values() for n in names}
    embedding = max((n for n in entries if n not in in_layers and len(entries[n].shape) == 2),
                    key=lambda n: entries[n].numel)
    vocab_size, hidden = entries[embedding].shape
    # Outside the layers, streaming never reads the embedding whole, nor an untied LM head (same shape).
    extras = checkpoint.nbytes([n for n in entries if n not in in_layers and entries[n].shape != entries[embedding].shape],
                               DTYPES[dtype])
    ordered = sorted(lengths, reverse=True)
    shapes = [(len(ordered[i : i + batch_size]), ordered[i]) for i in range(0, len(ordered), batch_size)]
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    kinds = len(set(getattr(config, "layer_types", None) or ["full"]))
    L = len(layers)
    kept_vectors = (len(ordered) if token_mode == "last" else sum(ordered)) * (L + 1) * hidden * size
    # Per batch and kind of layer: a (B, 1, T, T) mask and the rotary cos/sin (B, T, head_dim) each.
    arguments = sum(kinds * (b * t * t * size + 2 * b * t * head_dim * 4) for b, t in shapes)
    b, t = shapes[0]
    one_pass = b * t * (2 * heads * t + 3 * inner + 4 * hidden) * size
    distance_maths = 2 * (b if token_mode == "last" else b * t) * (L + 1) * hidden * 8
    return MemoryEstimate(
        model=checkpoint.nbytes(list(entries), DTYPES[dtype]), layer=layer_bytes,
        embedding_rows=min(vocab_size, sum(ordered)) * hidden * size, extras=extras,
        residual=2 * sum(b * t for b, t in shapes) * hidden * size, arguments=arguments + kept_vectors,
        batch_work=one_pass + distance_maths,
    )


@dataclass(frozen=True)
class StreamPlan:
    """How to stream a model: from which local directory, on which device, the residual stream where."""

    spec: str
    directory: Path
    device: str
    offload: bool


def plan_streaming(
    model,
    samples: int,
    seq_len: int,
    *,
    stream: bool = False,
    max_memory: int | str | None = None,
    batch_size: int = 8,
    token_mode: str = "last",
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> StreamPlan | None:
    """Decide between the in-memory (None) and the streamed analysis, before anything heavy loads.

    Streams when ``stream`` is set, or when the whole model would not fit ``max_memory`` (bytes or a string
    such as '2GiB', see :func:`parse_memory`: the memory of the device the analysis runs on). On a GPU, the
    residual stream goes to CPU memory when only that makes it fit. A budget smaller than the streamed
    analysis needs is an error.
    """
    if not stream and max_memory is None:
        return None
    if not isinstance(model, str):
        raise DepthpruneError("--stream and --max-memory need a model name or checkpoint directory, "
                              "not an already loaded model")
    budget = None if max_memory is None else parse_memory(max_memory)
    directory = local_checkpoint(model)
    estimate = estimate_memory(directory, [seq_len] * samples, batch_size=batch_size, token_mode=token_mode, dtype=dtype,
                               trust_remote_code=trust_remote_code)
    if budget is not None and not stream and estimate.in_memory <= budget:
        return None
    on_gpu = device in ("cuda", "auto")
    offload = budget is not None and on_gpu and estimate.streamed() > budget
    if budget is not None and estimate.streamed(offload) > budget:
        raise estimate.too_small(budget)
    if not stream:
        print(f"depthprune: '{model}' needs about {format_memory(estimate.in_memory)} in memory, more than "
              f"--max-memory {format_memory(budget)}: streaming it one layer at a time", flush=True)
    return StreamPlan(model, directory, "cuda" if on_gpu else "cpu", offload)
