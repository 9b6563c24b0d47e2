"""Layer-streamed analysis: the angular distances with one decoder layer in memory at a time.

:func:`~depthprune.measure.distances.measure_distances` needs the whole model loaded; a 70B model is ~140 GB in
bf16 for a measurement that only ever uses one layer at a time. Here the model is a skeleton on the
``meta`` device (no weights), and the weights are read from the safetensors files as they are needed
(:mod:`depthprune.measure.checkpoint`):

1. The input embedding gets only the rows of the token ids that occur; one pass of the skeleton per batch,
   with every decoder layer replaced by a weightless stand-in that hands its input on, records the embedded
   input of layer 0 and the exact arguments every layer is called with (causal or sliding-window masks,
   rotary position embeddings per layer type, position ids, ...: :func:`depthprune.model.capture.watch_layers`),
   so no architecture-specific code is needed. The final norm and LM head never run.
2. For each layer ℓ: its weights are read (memory-mapped, only its own tensors), every batch's residual
   stream goes through it with the captured arguments of layer ℓ, a callback sees its input and output,
   and the layer is freed before the next one is read.

Peak memory is one layer + the embedding rows used + the activations (residual stream of all calibration
tokens, captured arguments, the token vectors the distances keep), not the model.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Batch, batches, pad_id, tokenize
from ..errors import DepthpruneError
from ..model.capture import LayerCall, accepts, watch_layers
from ..model.load import DTYPES, check_length, decoder_layout, model_fingerprint
from .checkpoint import Checkpoint, local_checkpoint
from .distances import AngularDistances, check_measurable, pairwise_angles, token_mean_angles
from .sublayer_distances import SublayerWatch, attention_site


class _PassThrough(nn.Module):
    """Stands in for a decoder layer whose weights are not loaded: hands the hidden state on unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
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
        self._spare: dict[str, nn.Parameter] = {}
        for i in range(len(self.layers)):
            layout.layers[i] = _PassThrough()
        self.stand_ins = layout.layers
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
    def capture(self, batch: Batch, compact_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
        """Layer 0's input and every layer's call for one batch, from one skeleton pass."""
        seen: list = [None] * len(self.stand_ins)

        def on_input(index: int, hidden: torch.Tensor, call: LayerCall) -> None:
            seen[index] = hidden, call

        kwargs = {"position_ids": batch.position_ids} if accepts(self.backbone, "position_ids") else {}
        with watch_layers(self.stand_ins, on_input, stop_after_last=True):
            self.backbone(inputs_embeds=self.embedding(compact_ids), attention_mask=batch.attention_mask,
                          use_cache=False, **kwargs)
        first = seen[0][0] if seen[0] else None
        if first is None or any(s is None or s[0] is not first for s in seen):
            raise DepthpruneError(f"{type(self.model).__name__} does not pass the hidden state straight from one "
                                  "decoder layer to the next: layer streaming does not support it")
        return first, [call for _, call in seen]


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
    around_layer: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
) -> None:
    """Run ``batch_list`` through the model one decoder layer at a time, calling
    ``callback(layer, batch_index, layer_input, layer_output)`` for every layer and batch, in layer order.
    ``around_layer(layer)``, optional: a context each layer's calls run in (e.g. hooks on its sub-layers).

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
        with around_layer(layer) if around_layer is not None else contextlib.nullcontext():
            for b, call in enumerate(c[index] for c in calls):
                inputs = states[b].to(compute)
                output = call.replay(layer, inputs)
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

    def __init__(self, batch_list: Sequence[Batch], num_layers: int, token_mode: str, token_chunk: int = 1024,
                 sublayers: SublayerWatch | None = None):
        self.sublayers = sublayers
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
        if self.sublayers is not None:
            self.sublayers.add(layer, inputs, output, mask, self.last[b].to(inputs.device))
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
                total += pairwise_angles(unit).sum(dim=0)
                continue
            for real in unit.split(self.masks[b].sum(dim=1).tolist()):  # one sample's tokens: (T_real, L+1, H)
                total += token_mean_angles(real, self.token_chunk)
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
    check_measurable(sequences, token_mode)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    # Longest first, as measure_distances batches them: the same padding, so the same numbers.
    ordered = sorted(sequences, key=len, reverse=True)
    batch_list = list(batches(ordered, batch_size, pad_token_id, padding_side))
    config = _config(checkpoint, trust_remote_code)
    attribute = attention_site(config)
    sublayers = SublayerWatch(config.num_hidden_layers, token_mode, attribute) if attribute is not None else None
    collector = _DistanceCollector(batch_list, int(config.num_hidden_layers), token_mode, sublayers=sublayers)
    stream_layers(checkpoint, batch_list, collector, dtype=dtype, device=device, offload=offload,
                  trust_remote_code=trust_remote_code, progress=progress,
                  around_layer=sublayers.layer if sublayers is not None else None)
    return AngularDistances((collector.total() / len(ordered)).numpy(), len(ordered), token_mode,
                            block_influence=collector.block_influence(),
                            sublayer_distances=sublayers.means(len(ordered)) if sublayers is not None else None)


def _config(checkpoint: Checkpoint, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(checkpoint.directory, trust_remote_code=trust_remote_code)


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
