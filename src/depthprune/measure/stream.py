"""Layer-streamed analysis: the angular distances with one decoder layer in memory at a time.

:func:`~depthprune.measure.distances.measure_distances` needs the whole model loaded; a 70B model is ~140 GB in
bf16 for a measurement that only ever uses one layer at a time. Here the model is a skeleton on the
``meta`` device (no weights), and the weights are read from the safetensors files as they are needed:

1. The input embedding gets only the rows of the token ids that occur; one pass of the skeleton per batch,
   with every decoder layer replaced by a :class:`_Capture` stand-in, records the embedded input of layer 0
   and the exact arguments every layer is called with (causal or sliding-window masks, rotary position
   embeddings per layer type, position ids, ...), so no architecture-specific code is needed.
2. For each layer ℓ: its weights are read (memory-mapped, only its own tensors), every batch's residual
   stream goes through it with the captured arguments of layer ℓ, a callback sees its input and output,
   and the layer is freed before the next one is read.

Peak memory is one layer + the embedding rows used + the activations (residual stream of all calibration
tokens, captured arguments, the token vectors the distances keep), not the model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import re
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Batch, batches, pad_id, tokenize
from ..errors import DepthpruneError
from ..model.load import (
    DTYPES,
    check_length,
    convert_gguf,
    decoder_layout,
    model_fingerprint,
    resolve_model_source,
)
from .distances import TOKEN_MODES, AngularDistances, _pairwise_angles

# --- memory sizes -------------------------------------------------------------------------------------

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


# --- safetensors checkpoints --------------------------------------------------------------------------

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str  # safetensors' name, e.g. 'BF16'
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: a little-endian u64 length, then that many bytes of JSON."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, struct.error, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        raise DepthpruneError(f"'{path}' is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """The tensors of a local safetensors checkpoint (single file or sharded), known from the headers only.

    Reading opens the files memory-mapped and closes them again at once: pages of a mapped file that were
    touched count as resident while it stays open, so a handle kept open would grow to the whole model.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.directory / name for name in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.directory.glob("*.bin"))
            found = f"only pickle weights ({', '.join(pickles[:2])})" if pickles else "no .safetensors weights"
            raise DepthpruneError(f"model directory '{self.directory}' has {found}: streaming reads safetensors "
                                  "only; re-save it with save_pretrained (safetensors is the default)")
        self.entries: dict[str, _Entry] = {}
        for file in files:
            if not file.is_file():
                raise DepthpruneError(f"'{index}' names '{file.name}', which is missing: is the download complete?")
            for name, info in _read_header(file).items():
                self.entries[name] = _Entry(file, info["dtype"], tuple(info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> _Entry:
        if name not in self.entries:
            raise DepthpruneError(f"checkpoint '{self.directory}' has no tensor '{name}': is it complete, "
                                  "and saved by transformers?")
        return self.entries[name]

    def tensors(self, names: Sequence[str], dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` converted to ``dtype`` on ``device``, one at a time; each file opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.entry(name).file, []).append(name)
        for file, group in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in group:
                    yield name, f.get_tensor(name).to(device=device, dtype=dtype)

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, reading only those rows' bytes."""
        from safetensors import safe_open

        # Consecutive ids are read as one slice: far fewer calls than one per row.
        breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
        starts, ends = [0, *breaks], [*breaks, len(rows)]
        with safe_open(self.entry(name).file, framework="pt") as f:
            view = f.get_slice(name)
            parts = [view[int(rows[s]) : int(rows[e - 1]) + 1] for s, e in zip(starts, ends, strict=True)]
        return torch.cat(parts).to(device=device, dtype=dtype)

    def nbytes(self, names: Sequence[str], dtype: torch.dtype) -> int:
        """Bytes the named tensors take once converted to ``dtype``."""
        return sum(self.entry(n).numel for n in names) * dtype.itemsize


def local_checkpoint(spec: str) -> Path:
    """The local directory to stream ``spec`` from: a checkpoint directory, a downloaded hub id, or the
    converted safetensors cache of a .gguf file or embedded alias (converted once, as :func:`load_model` does)."""
    source = resolve_model_source(spec)
    if source.kind in ("alias", "gguf"):
        return convert_gguf(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # LocalEntryNotFoundError and friends: not (fully) in the local cache
            raise DepthpruneError(f"'{spec}' is not downloaded and streaming reads local files only: run "
                                  f"`hf download {spec}` first, or pass the checkpoint directory") from None
    return Path(source.location)


# --- the model skeleton -------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the last layer's stand-in: the rest of the forward (final norm, ...) is not needed."""


class _Capture(nn.Module):
    """Stands in for decoder layer ``index``: records the call and hands the hidden state on unchanged."""

    def __init__(self, index: int, calls: list, last: bool):
        super().__init__()
        self.index, self.calls, self.last = index, calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (hidden_states, args, kwargs)
        if self.last:
            raise _Captured
        return hidden_states


class _Skeleton:
    """A model built on the meta device from its config, whose weights are read from ``checkpoint`` on demand.

    Buffers that are not in a checkpoint (rotary ``inv_freq``, Gemma's embedding scale) are computed at
    construction exactly as the model computes them: accelerate's ``init_empty_weights`` puts only
    parameters on the meta device.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        try:
            config = AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise DepthpruneError(f"could not read the config of '{checkpoint.directory}': "
                                  f"{str(exc).splitlines()[0]}") from None
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        for module in self.model.modules():  # the real buffers to the device; meta parameters stay meta
            module._buffers.update({k: b.to(device) for k, b in module._buffers.items() if b is not None})
        layout = decoder_layout(self.model)
        self.backbone, self.layers_path = layout.backbone, layout.layers_path
        # The real layers leave the model for good, so that dropping one here frees it; stand-ins take their place.
        self.layers: list[nn.Module | None] = list(layout.layers)
        self.calls: list = [None] * len(self.layers)
        self._spare: dict[str, nn.Parameter] = {}
        for i in range(len(self.layers)):
            layout.layers[i] = _Capture(i, self.calls, last=i == len(self.layers) - 1)
        self.embedding = self.model.get_input_embeddings()
        names = {id(module): name for name, module in self.model.named_modules()}
        self.embedding_name = f"{names[id(self.embedding)]}.weight"
        # Checkpoints saved from the bare backbone (e.g. the original gpt2) lack the 'transformer.' prefix.
        prefix = f"{self.model.base_model_prefix}."
        self.strip = "" if self.embedding_name in checkpoint or not self.embedding_name.startswith(prefix) else prefix
        backbone_prefix = f"{names[id(self.backbone)]}." if names[id(self.backbone)] else ""
        self.extra_names = [  # everything else outside the layers: position embeddings, norms (small)
            backbone_prefix + name for name, _ in self.backbone.named_parameters()
            if backbone_prefix + name != self.embedding_name
            and not (backbone_prefix + name).startswith(self.layers_path + ".")
        ]
        self._check_layer_count()

    def _check_layer_count(self) -> None:
        """Refuse weights of more layers than config.json has: they would be ignored and the result wrong."""
        pattern = re.compile(re.escape(self.file_name(self.layers_path)) + r"\.(\d+)\.")
        found = {int(m[1]) for m in map(pattern.match, self.checkpoint.entries) if m}
        if found and max(found) >= len(self.layers):
            raise DepthpruneError(f"the checkpoint in '{self.checkpoint.directory}' has weights of {max(found) + 1} "
                                  f"layers but its config.json says {len(self.layers)}: fix num_hidden_layers")

    def file_name(self, name: str) -> str:
        return name.removeprefix(self.strip)

    def layer_names(self, index: int) -> list[str]:
        return [f"{self.layers_path}.{index}.{name}" for name, _ in self.layers[index].named_parameters()]

    def _assign(self, module: nn.Module, prefix: str, names: Sequence[str], spare: dict | None = None) -> None:
        """Fill the meta parameters ``names`` of ``module`` from the checkpoint. A parameter of the same name and
        shape in ``spare`` (the previous layer's) is overwritten in place: the allocator then reuses one layer's
        memory instead of fragmenting the heap with a fresh layer every time."""
        model_names = {self.file_name(n): n for n in names}
        for file_name, tensor in self.checkpoint.tensors(list(model_names), self.dtype, self.device):
            name = model_names[file_name]
            owner, _, leaf = name.removeprefix(prefix).rpartition(".")
            target = module.get_submodule(owner)
            if target._parameters[leaf].shape != tensor.shape:
                raise DepthpruneError(f"tensor '{file_name}' has shape {tuple(tensor.shape)} in the checkpoint but "
                                      f"{tuple(target._parameters[leaf].shape)} in the model config.json describes")
            reuse = (spare or {}).get(name.removeprefix(prefix))
            if reuse is not None and reuse.shape == tensor.shape:
                target._parameters[leaf] = reuse.copy_(tensor)
            else:
                target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            del tensor

    def load_extras(self, vocabulary: torch.Tensor) -> None:
        """Materialize the embedding, only at the rows of ``vocabulary`` (sorted ids), and the other small
        parameters outside the layers."""
        rows = self.checkpoint.read_rows(self.file_name(self.embedding_name), vocabulary, self.dtype, self.device)
        self.embedding.weight = nn.Parameter(rows, requires_grad=False)
        self._assign(self.model, "", self.extra_names)

    def free_embedding(self) -> None:
        self.embedding.weight = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        self._assign(layer, f"{self.layers_path}.{index}.", self.layer_names(index), self._spare)
        self._spare = {}
        return layer

    def free_layer(self, index: int) -> None:
        """Drop layer ``index``: its weights are never needed again, their memory serves the next layer."""
        self._spare = dict(self.layers[index].named_parameters())
        self.layers[index] = None

    @torch.no_grad()
    def capture(self, batch: Batch, compact_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple]]:
        """Layer 0's input and every layer's ``(args, kwargs)`` for one batch, from one skeleton pass."""
        calls = self.calls
        calls[:] = [None] * len(calls)
        kwargs = {"position_ids": batch.position_ids} if _accepts(self.backbone, "position_ids") else {}
        try:
            self.backbone(inputs_embeds=self.embedding(compact_ids), attention_mask=batch.attention_mask,
                          use_cache=False, **kwargs)
        except _Captured:
            pass
        first = calls[0][0] if calls[0] else None
        if first is None or any(call is None or call[0] is not first for call in calls):
            raise DepthpruneError(f"{type(self.model).__name__} does not pass the hidden state straight from one "
                                  "decoder layer to the next: layer streaming does not support it")
        return first, [(args, kwargs) for _, args, kwargs in calls]  # a new list: the next batch reuses `calls`


def _accepts(module: nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(module.forward).parameters


# --- streaming ----------------------------------------------------------------------------------------

LayerCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def stream_layers(
    checkpoint: Checkpoint | str | Path,
    batch_list: Sequence[Batch],
    callback: LayerCallback,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    offload: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> None:
    """Run ``batch_list`` through the model one decoder layer at a time, calling
    ``callback(layer, batch_index, layer_input, layer_output)`` for every layer and batch, in layer order.

    Only one layer's weights are in memory at a time. The residual stream of every batch stays on
    ``device``, or in CPU memory with ``offload``. The callback must not change the tensors it gets:
    the output is the next layer's input.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    if dtype not in DTYPES:
        raise DepthpruneError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    compute = torch.device(device)
    storage = torch.device("cpu") if offload else compute
    skeleton = _Skeleton(checkpoint, DTYPES[dtype], compute, trust_remote_code)
    vocabulary = torch.unique(torch.cat([b.input_ids.flatten() for b in batch_list]))  # sorted
    skeleton.load_extras(vocabulary)
    batch_list = [b.to(compute) for b in batch_list]
    states, calls = [], []
    for batch in batch_list:
        compact = torch.searchsorted(vocabulary.to(compute), batch.input_ids)
        hidden, layer_calls = skeleton.capture(batch, compact)
        states.append(hidden.to(storage))
        calls.append(layer_calls)
    skeleton.free_embedding()
    for index in tqdm(range(len(skeleton.layers)), unit="layer", desc="streamed layers", disable=not progress):
        layer = skeleton.load_layer(index)
        for b, (args, kwargs) in enumerate(c[index] for c in calls):
            inputs = states[b].to(compute)
            output = layer(inputs, *args, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            callback(index, b, inputs, output)
            states[b] = output.to(storage)
        del layer
        skeleton.free_layer(index)
        _return_free_memory()


@functools.cache
def _malloc_trim():
    library = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None  # glibc only


def _return_free_memory() -> None:
    """Hand freed heap memory back to the OS. Freeing a layer's weights and activations at every step
    fragments glibc's heap: without this the resident set creeps up by MiBs per layer (measured: SmolLM2
    ends 240 MiB higher after 30 layers), and peak memory is what streaming is for."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _DistanceCollector:
    """Keeps, per batch and layer input x⁽ˡ⁾, the token vectors the distances need; then averages as
    :func:`~depthprune.measure.distances.measure_distances` does, on the same values in the same float64 arithmetic.
    Block influence is summed as each layer runs: cos(input, output) over every real token."""

    def __init__(self, batch_list: Sequence[Batch], num_layers: int, token_mode: str, token_chunk: int = 1024):
        self.masks = [b.attention_mask.bool() for b in batch_list]
        self.last = [torch.where(m, torch.arange(m.shape[1]), -1).max(dim=1).values for m in self.masks]
        self.token_mode, self.token_chunk = token_mode, token_chunk
        self.kept: list[list[torch.Tensor | None]] = [[None] * (num_layers + 1) for _ in batch_list]
        self.cos_sums = torch.zeros(num_layers, dtype=torch.float64)
        self.real_tokens = sum(int(m.sum()) for m in self.masks)

    def _keep(self, index: int, b: int, hidden: torch.Tensor) -> None:
        mask = self.masks[b].to(hidden.device)
        if self.token_mode == "last":
            selected = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.last[b].to(hidden.device)]
        else:
            selected = hidden[mask]  # (real tokens of the batch, H), row after row
        self.kept[b][index] = selected.cpu()

    def __call__(self, layer: int, b: int, inputs: torch.Tensor, output: torch.Tensor) -> None:
        if layer == 0:
            self._keep(0, b, inputs)
        self._keep(layer + 1, b, output)
        mask = self.masks[b].to(inputs.device)
        before, after = inputs[mask], output[mask]
        for s in range(0, len(before), self.token_chunk):  # float64 copies of a chunk of tokens at a time
            self.cos_sums[layer] += float(torch.nn.functional.cosine_similarity(
                before[s : s + self.token_chunk].to(torch.float64), after[s : s + self.token_chunk].to(torch.float64),
                dim=-1).sum())

    def block_influence(self) -> np.ndarray:
        """BI(ℓ) = 1 - mean over every real token of cos(x⁽ˡ⁾, x⁽ˡ⁺¹⁾), as the in-memory pass computes it."""
        return np.clip((1.0 - self.cos_sums / self.real_tokens).numpy(), 0.0, 2.0)

    def total(self) -> torch.Tensor:
        """Sum over samples of the (L+1)×(L+1) mean-angle matrices."""
        size = len(self.kept[0])
        total = torch.zeros((size, size), dtype=torch.float64)
        for b, states in enumerate(self.kept):
            unit = torch.nn.functional.normalize(torch.stack([s.to(torch.float64) for s in states], dim=-2), dim=-1)
            if self.token_mode == "last":
                total += _pairwise_angles(unit).sum(dim=0)
                continue
            for real in unit.split(self.masks[b].sum(dim=1).tolist()):  # one sample's tokens: (T_real, L+1, H)
                per_token = sum(_pairwise_angles(real[s : s + self.token_chunk]).sum(dim=0)
                                for s in range(0, len(real), self.token_chunk))
                total += per_token / len(real)
            self.kept[b] = []  # free as we go
        return total


def stream_distances(
    checkpoint: Checkpoint | str | Path,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    token_mode: str = "last",
    pad_token_id: int = 0,
    padding_side: str = "right",
    dtype: str = "float32",
    device: str = "cpu",
    offload: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> AngularDistances:
    """:func:`~depthprune.measure.distances.measure_distances` of the checkpoint in ``checkpoint`` (a directory),
    streamed one layer at a time: the same batches, the same result."""
    if token_mode not in TOKEN_MODES:
        raise DepthpruneError(f"unknown token mode '{token_mode}': choose one of {', '.join(TOKEN_MODES)}")
    if not sequences:
        raise DepthpruneError("no calibration sequences to measure")
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    # Longest first, as measure_distances batches them: the same padding, so the same numbers.
    ordered = sorted(sequences, key=len, reverse=True)
    batch_list = list(batches(ordered, batch_size, pad_token_id, padding_side))
    collector = _DistanceCollector(batch_list, _num_layers(checkpoint, trust_remote_code), token_mode)
    stream_layers(checkpoint, batch_list, collector, dtype=dtype, device=device, offload=offload,
                  trust_remote_code=trust_remote_code, progress=progress)
    return AngularDistances((collector.total() / len(ordered)).numpy(), len(ordered), token_mode,
                            block_influence=collector.block_influence())


def _num_layers(checkpoint: Checkpoint, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=trust_remote_code)
    return int(config.num_hidden_layers)


def compute_distances_streamed(
    spec: str,
    texts: Sequence[str],
    *,
    tokenizer=None,
    seq_len: int = 1024,
    batch_size: int = 8,
    token_mode: str = "last",
    padding_side: str = "right",
    dtype: str = "float32",
    device: str = "cpu",
    offload: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> AngularDistances:
    """Tokenize ``texts`` and measure the distances of model ``spec`` streamed; records the settings as
    ``depthprune.analyze`` does. ``tokenizer``: the checkpoint's own if None."""
    from transformers import AutoConfig, AutoTokenizer

    directory = local_checkpoint(spec)
    checkpoint = Checkpoint(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    check_length(config, seq_len, "--seq-len")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    sequences = tokenize(texts, tokenizer, seq_len)
    result = stream_distances(checkpoint, sequences, batch_size=batch_size, token_mode=token_mode,
                              pad_token_id=pad_id(tokenizer), padding_side=padding_side, dtype=dtype, device=device,
                              offload=offload, trust_remote_code=trust_remote_code, progress=progress)
    result.meta.update(model=spec, model_fingerprint=model_fingerprint(config), seq_len=seq_len,
                       num_tokens=int(sum(len(s) for s in sequences)), streamed=True)
    return result


# --- memory estimates and the choice ------------------------------------------------------------------


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
    layers = _group_layers(entries)
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


def _group_layers(entries: dict[str, _Entry]) -> dict[str, list[str]]:
    """Tensor names grouped by decoder layer: the names with a '.<index>.' whose prefix occurs most often."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in entries:
        match = re.match(r"(.*?)\.(\d+)\.", name)
        if match:
            groups.setdefault((match[1], int(match[2])), []).append(name)
    if not groups:
        return {}
    prefixes = [prefix for prefix, _ in groups]
    main = max(set(prefixes), key=prefixes.count)
    return {f"{prefix}.{i}": names for (prefix, i), names in groups.items() if prefix == main}


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
