"""Healing a pruned model: a short fine-tune on C4 that repairs the damage at the cut (paper, App. A.1).

Methods: ``qlora`` (LoRA on a 4-bit NF4 base, the paper's recipe), ``lora`` (LoRA on a full-precision
base), ``full`` (all weights). With a ``teacher`` (the unpruned model) the loss mixes the LM loss with
the KL divergence between the teacher's and the student's next-token distributions (logit distillation,
as in Minitron). A plain PyTorch loop in the style of torchtune's recipes:

- documents are tokenized whole and packed into ``seq_len``-token sequences, in a seeded order;
- every ``save_every`` steps (and after the last one) the trainable weights, optimizer, scheduler, RNG
  states and data position go to ``checkpoint/`` of the run's work folder (atomically), so rerunning
  the same command continues where it stopped and ends with the same weights as an uninterrupted run;
- under ``torchrun``/``accelerate launch`` it trains data-parallel (DDP): the global batch is split over
  the processes and only rank 0 writes;
- the result is an ordinary Hugging Face checkpoint with the adapter merged (for QLoRA into the
  de-quantized base, in full precision) and ``depthprune.json`` extended by the healing record.

Where things live (nothing is lost, nothing half-written is ever taken for a result):

- every input and option is checked, and the training data read, before anything is written; a run
  that fails to start leaves nothing behind;
- OUT holds either a finished result (the merged model, ``heal_config.json``, ``heal_log.jsonl`` and
  ``depthprune.json`` with a ``healing`` record) or the state of an unfinished run (``heal_config.json``,
  ``heal_log.jsonl``, ``checkpoint/``), never a mix. Rerunning a finished command reports the result;
- a run works in OUT itself when OUT is new, empty, or holds an unfinished run of the same settings
  (or one without a checkpoint: nothing to keep). With ``force`` over anything else (an older result, a
  run of other settings, other files) it works in the visible sibling folder ``OUT.unfinished``, and
  OUT stays untouched until the new result is complete;
- the merged model is assembled in a temporary folder beside OUT, with the log and settings, and swapped
  in by :func:`~depthprune.outputs.replace_dir`; the work folder goes last. Temporaries are never inside
  a result, and those of a killed run are removed by the next run. One run at a time holds OUT's lock;
- checkpoints are safetensors (weights, optimizer moments, RNG states) plus JSON (everything else):
  resuming unpickles nothing. A checkpoint that does not parse asks for ``restart``, which discards an
  unfinished run (never a finished result: replacing one takes ``force``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import TEXT_SUFFIXES, load_texts, tokenize
from .errors import DepthpruneError
from .models import DTYPES, convert_gguf, decoder_layout, resolve_model_source
from .outputs import (
    atomic_output_dir,
    atomic_write_text,
    check_not_input,
    check_output_dir,
    output_lock,
    remove_stale_temporaries,
    replace_dir,
    temporary_dir_beside,
)
from .surgery import RECORD_FILE

METHODS = ("qlora", "lora", "full")
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
CONFIG_FILE = "heal_config.json"
LOG_FILE = "heal_log.jsonl"
CHECKPOINT_DIR = "checkpoint"
WORK_SUFFIX = ".unfinished"  # OUT.unfinished: where a --force run works while OUT keeps the old result
_WEIGHTS_FILE = "trainable.safetensors"
_TENSORS_FILE = "state.safetensors"  # optimizer moments and RNG states
_STATE_FILE = "state.json"  # everything else: progress, data position, scheduler, Python/NumPy RNG
_CHECKPOINT_FORMAT = 1  # raised when the layout of a checkpoint changes; others are refused, not misread
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


@dataclass
class HealOptions:
    """Everything that decides a healing run. The defaults are the paper's recipe (Appendix A.1)."""

    method: str = "qlora"
    steps: int | None = 5000
    tokens: int | None = None  # instead of steps: train on this many tokens (rounded up to whole steps)
    batch_size: int = 16  # global batch, in sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step (per process); micro batch = batch / (grad_accum * world)
    seq_len: int = 2048
    lr: float = 3e-4
    rank: int = 64
    alpha: float | None = None  # None: alpha = rank, as in the paper
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the MLP projections of the architecture
    warmup: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    teacher: str | None = None
    kd_weight: float = 0.5  # loss = (1 - w) * LM + w * KL(teacher || student)
    kd_temperature: float = 1.0
    eval_every: int = 500
    save_every: int = 500
    val_sequences: int = 64
    seed: int = 0
    gradient_checkpointing: bool = False
    text_field: str = "text"
    data_config: str | None = None
    data_split: str = "train"


# Presets replace the defaults; options given explicitly replace the preset.
PRESETS: dict[str, dict] = {
    "paper": {},
    # A few minutes on a laptop CPU for a ~100M-parameter model: 10k training tokens.
    "cpu-small": dict(steps=20, batch_size=4, seq_len=128, rank=8, lr=1e-3, warmup=2, eval_every=10,
                      save_every=5, val_sequences=16),
}

# Options that may change between a run and its resumption without changing its result.
_RESUMABLE_CHANGES = {"eval_every", "save_every", "val_sequences", "gradient_checkpointing"}

# Numeric options: (int or float, valid?, the rule as the error states it). Floats must also be finite.
_NUMBERS = {
    "steps": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "tokens": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "batch_size": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "grad_accum": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "seq_len": (int, lambda v: v >= 2, "a whole number, at least 2"),
    "rank": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "warmup": (int, lambda v: v >= 0, "a whole number, 0 or more"),
    "eval_every": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "save_every": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "val_sequences": (int, lambda v: v >= 1, "a whole number, at least 1"),
    "seed": (int, lambda v: 0 <= v < 2**32, "a whole number in [0, 2^32)"),
    "lr": (float, lambda v: v > 0, "a finite number above 0"),
    "alpha": (float, lambda v: v > 0, "a finite number above 0"),
    "dropout": (float, lambda v: 0 <= v < 1, "a finite number in [0, 1)"),
    "weight_decay": (float, lambda v: v >= 0, "a finite number, 0 or more"),
    "max_grad_norm": (float, lambda v: v > 0, "a finite number above 0"),
    "kd_weight": (float, lambda v: 0 <= v <= 1, "a finite number in [0, 1]"),
    "kd_temperature": (float, lambda v: v > 0, "a finite number above 0"),
}
_OPTIONAL = {"steps", "tokens", "alpha"}  # None is allowed: another option decides


def resolve_options(preset: str | None = None, **options) -> HealOptions:
    """The options of a run: the defaults, then ``preset``, then the explicitly given ``options``."""
    if preset is not None and preset not in PRESETS:
        raise DepthpruneError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(HealOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DepthpruneError(f"unknown healing option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**PRESETS.get(preset or "paper", {}), **given}
    if "tokens" in given and "steps" not in given:
        merged["steps"] = None  # --tokens decides the length instead of the default number of steps
    opts = HealOptions(**merged)
    _check(opts)
    return opts


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(o: HealOptions) -> None:
    if o.method not in METHODS:
        raise DepthpruneError(f"unknown method '{o.method}': choose one of {', '.join(METHODS)}")
    if o.schedule not in SCHEDULES:
        raise DepthpruneError(f"unknown schedule '{o.schedule}': choose one of {', '.join(SCHEDULES)}")
    if (o.steps is None) == (o.tokens is None):
        raise DepthpruneError("give either --steps or --tokens, not both")
    for name, (kind, valid, rule) in _NUMBERS.items():
        value = getattr(o, name)
        if value is None and name in _OPTIONAL:
            continue
        typed = isinstance(value, int) if kind is int else (isinstance(value, (int, float)) and math.isfinite(value))
        if isinstance(value, bool) or not typed or not valid(value):
            raise DepthpruneError(f"{_flag(name)} must be {rule}, got {value!r}")
    for name, optional in (("text_field", False), ("data_split", False), ("teacher", True), ("data_config", True)):
        value = getattr(o, name)
        if not (optional and value is None) and (not isinstance(value, str) or not value):
            raise DepthpruneError(f"{_flag(name)} must be a non-empty name, got {value!r}")
    targets = o.target_modules
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise DepthpruneError(f"--target-modules must be a list of module names, got {targets!r}")
    if not isinstance(o.gradient_checkpointing, bool):
        raise DepthpruneError(f"gradient_checkpointing must be True or False, got {o.gradient_checkpointing!r}")


def total_steps(o: HealOptions) -> int:
    return o.steps if o.steps is not None else math.ceil(o.tokens / (o.batch_size * o.seq_len))


# --------------------------------------------------------------------------------------------- data


class PackedStream:
    """An endless, seeded stream of ``seq_len``-token sequences packed from whole documents.

    Each epoch visits the documents in a new seeded order. The position (epoch, next document, tokens
    waiting to be packed) is the whole state, so a resumed run continues with exactly the next sequence.
    """

    def __init__(self, documents, tokenizer, seq_len: int, seed: int):
        # documents: a list of texts, or of token-id lists (already tokenized; no tokenizer needed)
        self.documents, self.tokenizer, self.seq_len, self.seed = documents, tokenizer, seq_len, seed
        self.epoch, self.index, self.buffer = 0, 0, []
        self._order = self._epoch_order()
        self._tokenized: dict[int, list[int]] = {}

    def _epoch_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.documents), generator=generator).tolist()

    def _document(self, i: int) -> list[int]:
        doc = self.documents[self._order[i]]
        if not isinstance(doc, str):
            return list(doc)
        if i not in self._tokenized:  # tokenize ahead in chunks: much faster than one text at a time
            chunk = range(i, min(i + 64, len(self._order)))
            encoded = tokenize([self.documents[self._order[j]] for j in chunk], self.tokenizer, None)
            if len(encoded) != len(chunk):  # a document tokenized to nothing: fall back to one at a time
                encoded = [(tokenize([self.documents[self._order[j]]], self.tokenizer, None) or [[]])[0]
                           for j in chunk]
            self._tokenized = dict(zip(chunk, encoded, strict=True))
        return self._tokenized[i]

    def take(self, count: int) -> list[list[int]]:
        out = []
        while len(out) < count:
            while len(self.buffer) < self.seq_len:
                if self.index == len(self._order):
                    self.epoch, self.index, self._tokenized = self.epoch + 1, 0, {}
                    self._order = self._epoch_order()
                self.buffer += self._document(self.index)
                self.index += 1
            out.append(self.buffer[: self.seq_len])
            self.buffer = self.buffer[self.seq_len :]
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.buffer = state["epoch"], state["index"], list(state["buffer"])
        self._order, self._tokenized = self._epoch_order(), {}


def _training_documents(data, o: HealOptions, needed_tokens: int) -> list:
    """The training documents, read (and checked) before anything is written."""
    if not isinstance(data, str):
        return _token_documents(data)
    local = Path(data).expanduser().exists()
    # A streamed hub dataset is read once, as far as the run needs (C4 documents average some hundred
    # tokens, so one document per 64 needed tokens leaves ample margin); a local source is read whole.
    count = None if local else max(1000, needed_tokens // 64)
    return _read_texts(data, "training data", count, o.seed, o.text_field, o.data_config, o.data_split)


def _token_documents(data) -> list[list[int]]:
    try:
        documents = [[int(t) for t in document] for document in data]
    except (TypeError, ValueError):
        raise DepthpruneError("training data must be a text source (a path or dataset id) or a list of "
                              "token-id lists") from None
    if any(t < 0 for document in documents for t in document):
        raise DepthpruneError("the training data holds negative token ids")
    if not any(documents):
        raise DepthpruneError("the training data holds no tokens")
    return documents


def _read_texts(source: str, what: str, count: int | None, seed: int, field: str, config: str | None,
                split: str) -> list[str]:
    # data.load_texts raises DepthpruneError for what it recognises; a file that is not text (or a
    # corrupt .json/.parquet) surfaces as the decoder's error, named here.
    try:
        return load_texts(source, count, seed, field, config, split)
    except UnicodeDecodeError:
        raise DepthpruneError(f"{what} '{source}' is not UTF-8 text: give a .jsonl/.json/.txt/.parquet text file") from None
    except ValueError as exc:  # json.JSONDecodeError, pyarrow.ArrowInvalid
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DepthpruneError(f"{what} '{source}' cannot be read ({reason}): check the file") from None


# ------------------------------------------------------------------------------------------- model


def default_target_modules(model: nn.Module) -> list[str]:
    """The linear layers of the MLP of a decoder block (gate/up/down_proj for Llama and Mistral).

    Names are given relative to the block; a name that also occurs outside the MLP (GPT-2's ``c_proj``)
    is qualified by the MLP's attribute (``mlp.c_proj``), so attention is never targeted by accident.
    """
    layer = decoder_layout(model).layers[0]
    mlp_name = next((n for n in _MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
    if mlp_name is None:
        raise DepthpruneError(f"cannot find the MLP of {type(layer).__name__}: name the layers with --target-modules")
    linear_names = {n.rpartition(".")[2] for n, m in layer.named_modules() if _is_linear(m)}
    targets = []
    for name, module in getattr(layer, mlp_name).named_modules():
        if name and _is_linear(module):
            leaf = name.rpartition(".")[2]
            outside = [n for n, m in layer.named_modules() if _is_linear(m) and n.rpartition(".")[2] == leaf
                       and not n.startswith(mlp_name + ".")]
            targets.append(f"{mlp_name}.{name}" if outside else leaf)
    if not targets or not linear_names:
        raise DepthpruneError(f"no linear layers in the MLP of {type(layer).__name__}: use --target-modules")
    return sorted(set(targets))


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear; GPT-2 style models use transformers' Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _location(spec: str) -> str:
    source = resolve_model_source(spec)
    return str(convert_gguf(source.location)) if source.kind in ("alias", "gguf") else source.location


def _without_missing_kernels_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _quiet_bitsandbytes() -> None:
    # Importing transformers' optimization module or peft imports bitsandbytes whenever it is installed
    # (so also for lora and full), and on CPUs with AVX512-BF16 it then warns that the optional
    # `kernels` package is missing. That kernel only serves the repacked 4-bit layout, which healing
    # turns off (_disable_cpu_repacking), so the warning is noise for every method. The filter sits on
    # bitsandbytes' own logger, which getLogger creates before bitsandbytes is imported.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_without_missing_kernels_warning)


def _load(spec: str, o: HealOptions, device: str, dtype: torch.dtype, quantize: bool, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = _location(spec)
    kwargs: dict = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif quantize:
        kwargs["device_map"] = {"": device}
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DepthpruneError("--method qlora needs bitsandbytes: pip install 'depthprune[qlora]'") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise DepthpruneError(f"could not load model '{spec}': {str(exc).splitlines()[0]}") from None
    if device not in ("auto",) and not quantize:
        model.to(device)
    if quantize:
        _disable_cpu_repacking(model)
    model.config.use_cache = False
    return model, tokenizer


def _disable_cpu_repacking(model: nn.Module) -> None:
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first no-grad forward into a
    # bf16 layout that dequantize_4bit cannot read and that computes in bf16: keep the standard layout so
    # validation, training and the final merge all see the same de-quantized weights.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _dequantized_weight(module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        weight.data, state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    return bnbf.dequantize_4bit(weight.data, state).float()


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes 4-bit linear layer (also inside LoRA wrappers) by an ordinary nn.Linear
    holding its de-quantized weights, in place."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=dtype, device=module.weight.device)
            with torch.no_grad():
                linear.weight.copy_(_dequantized_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def _forget_quantization(model: nn.Module) -> nn.Module:
    # A model loaded 4-bit keeps its quantizer and config entry; once de-quantized it must save as an
    # ordinary float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    model.hf_quantizer = None
    return model


def prepare_model(model: nn.Module, o: HealOptions) -> nn.Module:
    """Make the trainable model: LoRA adapters on the target modules (lora, qlora), or all weights (full)."""
    if o.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if o.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if o.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = o.target_modules or default_target_modules(model)
    config = LoraConfig(r=o.rank, lora_alpha=o.alpha if o.alpha is not None else o.rank, lora_dropout=o.dropout,
                        target_modules=targets if targets != ["all-linear"] else "all-linear",
                        task_type="CAUSAL_LM", bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise DepthpruneError(f"--target-modules {','.join(targets)}: {str(exc).splitlines()[0]}") from None


def merged_model(model: nn.Module, o: HealOptions) -> nn.Module:
    """The trained model as an ordinary transformers model: LoRA merged into its base.

    For QLoRA the 4-bit base is first de-quantized to float32 and the LoRA update added there, never
    re-quantized (merging into 4-bit weights loses quality); that is exactly the function trained.
    """
    if o.method == "full":
        return model
    from peft.tuners.lora import LoraLayer

    if o.method == "qlora":
        dequantize_model(model, torch.float32)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    base = module.get_base_layer()
                    for adapter in module.active_adapters:
                        base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
        return _forget_quantization(model.unload())
    return model.merge_and_unload()


# -------------------------------------------------------------------------------------------- loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions, times T² (Hinton et al.)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _loss(model, teacher, ids: torch.Tensor, o: HealOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    logits = model(input_ids=ids, use_cache=False).logits
    lm = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    if teacher is None:
        return lm, lm, None
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids.to(_input_device(teacher)), use_cache=False).logits
    kd = distillation_loss(logits, teacher_logits.to(logits.device), o.kd_temperature)
    return (1 - o.kd_weight) * lm + o.kd_weight * kd, lm, kd


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


# ------------------------------------------------------------------------------------- checkpoints
#
# A checkpoint is checkpoint/trainable.safetensors (the trainable weights), state.safetensors (the
# optimizer's tensors and each process's torch/CUDA RNG state as uint8 tensors) and state.json (the
# rest). Loading uses safetensors and json only: a checkpoint cannot execute code.


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work: Path, model, optimizer, scheduler, stream: PackedStream, progress: dict,
                    rng_states: list[dict]) -> None:
    """Write ``work/checkpoint``; a complete new one replaces the old one only once it is whole."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    state = {"format": _CHECKPOINT_FORMAT, "progress": progress, "data": stream.state_dict(), "scheduler": scheduler.state_dict(),
             "optimizer": _optimizer_to_safe(optimizer.state_dict(), tensors),
             "rng": _rng_to_safe(rng_states, tensors)}
    with atomic_output_dir(work / CHECKPOINT_DIR, force=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}, str(tmp / _WEIGHTS_FILE))
        save_file(tensors, str(tmp / _TENSORS_FILE))
        (tmp / _STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")


def load_checkpoint(work: Path, model, optimizer, scheduler, stream: PackedStream, rank: int = 0) -> dict:
    """Restore the run from ``work/checkpoint``, and process ``rank``'s RNG state; returns the progress.

    A checkpoint that does not parse (a damaged disk, a file edited by hand, the pickle format of older
    versions) is an error that says how to start over; nothing in it is executed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = work / CHECKPOINT_DIR
    params = _trainable(model)
    try:
        weights = load_file(str(folder / _WEIGHTS_FILE))
        tensors = load_file(str(folder / _TENSORS_FILE))
        state = json.loads((folder / _STATE_FILE).read_text(encoding="utf-8"))
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, this version reads {_CHECKPOINT_FORMAT}")
        if set(weights) != set(params) or any(weights[n].shape != p.shape for n, p in params.items()):
            raise ValueError("its weights do not match this model's trainable weights")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        optimizer.load_state_dict(_optimizer_from_safe(state["optimizer"], tensors, list(params.values())))
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["data"])
        rng_states = _rng_from_safe(state["rng"], tensors)
        _set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        return state["progress"]
    except (SafetensorError, OSError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except KeyError as exc:
        reason = f"it has no entry {exc}"
    raise DepthpruneError(f"the checkpoint in '{folder}' cannot be read ({reason}): rerun with --restart to "
                          "start this run over")


# ----------------------------------------------------------------------------------- distributed


def _distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size); starts the process group under torchrun / accelerate launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def _all_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
        values /= world
    return values


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather_rng(world: int) -> list[dict]:
    # Each process keeps its own RNG stream (LoRA dropout differs per process): keep all of them.
    if world == 1:
        return [_rng_state()]
    import torch.distributed as dist

    states: list = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


# ---------------------------------------------------------------------------------------- inputs


def _read_json_object(path: Path, remedy: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DepthpruneError(f"'{path}' is not valid JSON ({exc}): {remedy}") from None
    if not isinstance(value, dict):
        raise DepthpruneError(f"'{path}' does not hold a JSON object: {remedy}")
    return value


def _input_record(folder: Path) -> dict | None:
    """The ``depthprune.json`` of an input checkpoint (None for an ordinary one), checked."""
    path = folder / RECORD_FILE
    return _read_json_object(path, "fix or remove that file of the input model") if path.is_file() else None


def _model_identity(spec, what: str) -> str:
    """Check, without loading it, that ``spec`` names a model; return it as resuming compares it."""
    if not isinstance(spec, str) or not spec:
        raise DepthpruneError(f"the {what} must be a model name or path, got {spec!r}")
    source = resolve_model_source(spec)
    if source.kind == "local":
        folder = Path(source.location)
        _read_json_object(folder / "config.json", f"repair the {what} checkpoint or choose another")
        _input_record(folder)
    # Local paths resolved, so DIR, DIR/, ./DIR and /abs/DIR are the same run; hub ids and aliases as given.
    return source.location if source.kind in ("local", "gguf") else spec


def _data_identity(source: str | None) -> str | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _check_call(o: HealOptions, device: str, dtype: str | None, world: int, stop_after) -> str:
    """Check the arguments that are not healing options; return the dtype to use."""
    if device not in ("cpu", "cuda", "auto"):
        raise DepthpruneError(f"unknown device '{device}': choose cpu, cuda or auto")
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


def _check_inputs(model, data, val_data, o: HealOptions, steps: int, dtype: str) -> tuple[list, dict]:
    """Check every input, cheap checks first, and read the training data; returns (documents, the run's
    identity: the settings a rerun must share to continue it). Writes nothing."""
    model_id = _model_identity(model, "model")
    teacher_id = _model_identity(o.teacher, "teacher") if o.teacher is not None else None
    if val_data is not None and not isinstance(val_data, str):
        raise DepthpruneError(f"the validation data must be a text source (a path or dataset id), got {val_data!r}")
    path = Path(val_data or "").expanduser()
    if val_data and (path.exists() or val_data.startswith((".", "/", "~")) or path.suffix.lower() in TEXT_SUFFIXES):
        # A local source is read now; a hub split is first streamed by the validation before step 1.
        _read_texts(val_data, "validation data", 1, o.seed, o.text_field, o.data_config, "validation")
    documents = _training_documents(data, o, steps * o.batch_size * o.seq_len)
    data_id = _data_identity(data) if isinstance(data, str) else f"{len(documents)} token-id documents"
    identity = {**asdict(o), "model": model_id, "data": data_id, "val_data": _data_identity(val_data),
                "dtype": dtype, "teacher": teacher_id}
    return documents, identity


# ------------------------------------------------------------------------------------ the output


def _work_folder(out: Path) -> Path:
    return out.with_name(out.name + WORK_SUFFIX)


def _check_out(out, inputs: tuple) -> Path:
    """Check where OUT (and its work folder) can be; what OUT holds is judged under its lock. Writes nothing."""
    if not isinstance(out, (str, Path)) or not str(out):
        raise DepthpruneError(f"the output must be a directory path, got {out!r}")
    # Absolute and without '..', so OUT's name and its siblings are well defined.
    out = Path(os.path.abspath(Path(out).expanduser()))
    check_output_dir(out, True, inputs)  # a non-empty OUT may be this run's: judged by _plan
    work = _work_folder(out)
    if work.exists() and not work.is_dir():
        raise DepthpruneError(f"'{work}' is a file in the way of the work folder of --out: move it or choose another --out")
    check_not_input(work, inputs, "work folder")
    return out


@dataclass(frozen=True)
class _Plan:
    action: str  # "finished" (OUT holds this run's result), "resume" (from work's checkpoint) or "start"
    work: Path  # where the checkpoint and log live while training: OUT, or OUT.unfinished beside it


def _changed(previous: dict, identity: dict) -> list[str]:
    return sorted(k for k in set(previous) | set(identity)
                  if k not in _RESUMABLE_CHANGES and previous.get(k) != identity.get(k))


def _plan(out: Path, identity: dict, force: bool, restart: bool) -> _Plan:
    """Decide from what OUT holds where this run works and whether it resumes (see the module docstring)."""
    if not out.is_dir() or not any(out.iterdir()):
        return _Plan("start", out)
    config = out / CONFIG_FILE
    if not config.is_file():
        if not force:
            raise DepthpruneError(f"output directory '{out}' exists and is not a healing run: choose another --out "
                                  "or pass --force to replace it")
        return _plan_beside(out, identity, restart)
    if not (out / RECORD_FILE).is_file():  # an unfinished run
        if restart or not (out / CHECKPOINT_DIR).exists():  # (without a checkpoint it has nothing to keep)
            return _Plan("start", out)
        changed = _changed(_read_json_object(config, "pass --restart to discard that unfinished run"), identity)
        if not changed:
            return _Plan("resume", out)
        if not force:
            raise DepthpruneError(f"'{out}' holds an unfinished healing run with other settings ({', '.join(changed)}): "
                                  "rerun it with the same options, or pass --restart to discard it and start over")
        return _plan_beside(out, identity, restart)
    if force:
        return _plan_beside(out, identity, restart)
    changed = _changed(_read_json_object(config, "pass --force to heal again and replace that result"), identity)
    if changed:
        raise DepthpruneError(f"'{out}' already holds a healed model with other settings ({', '.join(changed)}): "
                              "choose another --out or pass --force to replace it")
    if restart:
        raise DepthpruneError(f"'{out}' holds the finished result of this run and --restart only discards unfinished "
                              "runs: pass --force to heal again and replace it")
    return _Plan("finished", out)


def _plan_beside(out: Path, identity: dict, restart: bool) -> _Plan:
    # --force over something that is not this unfinished run: OUT stays as it is until the new result
    # replaces it, and the run works in OUT.unfinished (continuing a killed --force run found there).
    work = _work_folder(out)
    if work.is_dir() and any(work.iterdir()):
        if not (work / CONFIG_FILE).is_file():
            raise DepthpruneError(f"'{work}' is in the way: a --force run works there and it holds something "
                                  "else; move it or choose another --out")
        if not restart and (work / CHECKPOINT_DIR).exists():
            previous = _read_json_object(work / CONFIG_FILE, "pass --restart to discard that unfinished run")
            changed = _changed(previous, identity)
            if changed:
                raise DepthpruneError(f"'{work}' holds an unfinished --force run with other settings "
                                      f"({', '.join(changed)}): rerun that command to finish it, or pass --restart "
                                      "to discard it")
            return _Plan("resume", work)
    return _Plan("start", work)


def _share_plan(plan: _Plan | None, out: Path, world: int) -> _Plan:
    """Rank 0 plans (under the lock); every process follows the same plan."""
    if world == 1:
        return plan
    import torch.distributed as dist

    shared = [(plan.action, plan.work != out) if plan is not None else None]
    dist.broadcast_object_list(shared, src=0)
    action, beside = shared[0]
    return _Plan(action, _work_folder(out) if beside else out)


def _prepare_work(plan: _Plan, out: Path, identity: dict) -> None:
    """Rank 0, under the lock, once the model is loaded: clear what killed runs left and, when starting,
    drop what a discarded run left and record the settings."""
    remove_stale_temporaries(out)
    for name in (CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE):
        remove_stale_temporaries(plan.work / name)
    if plan.action == "start":
        shutil.rmtree(plan.work / CHECKPOINT_DIR, ignore_errors=True)
        (plan.work / LOG_FILE).unlink(missing_ok=True)
        plan.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.work / CONFIG_FILE, json.dumps(identity, indent=2) + "\n")


def _finished_result(out: Path) -> dict:
    """The healing record of OUT's finished result, marked ``already_healed``."""
    record = _read_json_object(out / RECORD_FILE, "pass --force to heal again and replace that result")
    if not isinstance(record.get("healing"), dict):
        raise DepthpruneError(f"'{out / RECORD_FILE}' has no healing record: pass --force to heal again and replace it")
    return {**record["healing"], "already_healed": True}


@contextlib.contextmanager
def _holding(out: Path, rank: int) -> Iterator[None]:
    """Hold OUT's lock for the block (rank 0); folders made only to hold it go again if left empty."""
    if rank != 0:
        yield
        return
    new_parents = [folder for folder in out.parents if not folder.exists()]  # the deepest first
    try:
        with output_lock(out):
            yield
    finally:
        for folder in new_parents:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                folder.rmdir()


def _log(work: Path, record: dict) -> None:
    with (work / LOG_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _trim_log(path: Path, step: int) -> None:
    # After a kill the log may run past the checkpoint (those steps are trained again: drop them; all of
    # them, step = -1, when no checkpoint was reached) and end in a torn line (drop it too).
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line for line in text.splitlines() if (logged := _logged_step(line)) is not None and logged <= step]
    trimmed = "".join(line + "\n" for line in kept)
    if trimmed != text:
        atomic_write_text(path, trimmed)


# ------------------------------------------------------------------------------------------ the run


@dataclass
class _Run:
    """One invocation's fixed facts: the options, where it works, and which process this is."""

    o: HealOptions
    steps: int
    work: Path
    val_data: str | None
    rank: int
    local_rank: int
    world: int
    device: str  # 'cpu', 'cuda' or 'auto'


@dataclass
class _Session:
    """What the training loop works on, built by :func:`_setup`."""

    net: nn.Module
    tokenizer: object
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: PackedStream
    progress: dict


def heal(
    model: str,
    data,
    out: str | Path,
    *,
    val_data: str | None = None,
    preset: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    save_adapter: bool = False,
    force: bool = False,
    restart: bool = False,
    stop_after: int | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    **options,
) -> dict:
    """Heal the (pruned) ``model`` by fine-tuning on ``data`` and save the merged checkpoint to ``out``.

    ``model``: a checkpoint directory (e.g. from ``depthprune prune``) or anything :func:`load_model`
    takes. ``data``: a text source (file, directory or Hugging Face dataset id, as for ``analyze``) or a
    list of token-id lists. ``val_data``: held-out text scored with the C4-loss evaluator every
    ``eval_every`` steps and at the end (default: the 'validation' split when ``data`` is a hub id).
    ``options``: the fields of :class:`HealOptions` (method, steps, tokens, batch_size, lr, rank, ...),
    on top of ``preset`` ('paper' — the default — or 'cpu-small'). ``device``: 'cpu', 'cuda' or 'auto'
    (one process spread over all GPUs). ``dtype``: weights and compute (default float32 on CPU,
    bfloat16 on GPU). ``stop_after``: end this invocation after that many steps, with a checkpoint; the
    same call later continues.

    The same call after a kill continues from the last checkpoint; after success it returns the stored
    record, marked ``already_healed``. ``restart`` discards an unfinished run in ``out`` and starts over;
    ``force`` replaces whatever else ``out`` holds, once the new result is complete. Returns the healing
    record written to ``depthprune.json``.
    """
    _quiet_bitsandbytes()
    o = resolve_options(preset, **options)
    rank, local_rank, world = _distributed()
    dtype = _check_call(o, device, dtype, world, stop_after)
    if val_data is None and isinstance(data, str) and not Path(data).expanduser().exists():
        val_data = data  # a hub dataset: its validation split
    steps = total_steps(o)
    documents, identity = _check_inputs(model, data, val_data, o, steps, dtype)
    out = _check_out(out, (model, data, val_data, o.teacher))
    with _holding(out, rank):
        plan = _share_plan(_plan(out, identity, force, restart) if rank == 0 else None, out, world)
        if plan.action == "finished":
            return _finished_result(out)
        run = _Run(o, steps, plan.work, val_data, rank, local_rank, world, device)
        session = _setup(run, model, documents, DTYPES[dtype], trust_remote_code)
        if rank == 0:
            _prepare_work(plan, out, identity)
        _barrier(world)
        saved_at = None
        if plan.action == "resume":
            session.progress = load_checkpoint(plan.work, session.net, session.optimizer, session.scheduler,
                                               session.stream, rank)
            saved_at = session.progress["step"]
        if rank == 0:
            _trim_log(plan.work / LOG_FILE, -1 if saved_at is None else saved_at)
        if not _train(run, session, saved_at, stop_after, progress):
            return {"stopped_at_step": session.progress["step"], "steps": steps}
        result = _healing_record(model, data, val_data, dtype, o, steps, session.progress, world)
        if rank == 0:
            _finish(run, session, out, model, result, save_adapter)
        _barrier(world)
    return result


def _setup(run: _Run, model: str, documents: list, dtype: torch.dtype, trust_remote_code: bool) -> _Session:
    """Load the model (and teacher), wrap it for training, and build the optimizer, schedule and data."""
    o = run.o
    device = f"cuda:{run.local_rank}" if run.device == "cuda" else run.device
    torch.manual_seed(o.seed)
    random.seed(o.seed)
    base, tokenizer = _load(model, o, device, dtype, o.method == "qlora", trust_remote_code)
    vocab = base.config.vocab_size
    if documents and not isinstance(documents[0], str) and max(max(d, default=0) for d in documents) >= vocab:
        raise DepthpruneError(f"the training data holds token ids beyond the model's vocabulary of {vocab}")
    teacher = None
    if o.teacher is not None:
        teacher, _ = _load(o.teacher, o, device, dtype, False, trust_remote_code)
        teacher.eval().requires_grad_(False)
        if teacher.config.vocab_size != vocab:
            raise DepthpruneError(f"teacher '{o.teacher}' has a vocabulary of {teacher.config.vocab_size}, the student "
                                  f"{vocab}: distil from the model that was pruned")
    torch.manual_seed(o.seed)  # LoRA's initialization must not depend on what loading consumed
    net = prepare_model(base, o)
    optimizer = torch.optim.AdamW(list(_trainable(net).values()), lr=o.lr, weight_decay=o.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    from transformers import get_scheduler

    scheduler = get_scheduler(SCHEDULES[o.schedule], optimizer, num_warmup_steps=o.warmup,
                              num_training_steps=run.steps)
    stream = PackedStream(documents, tokenizer, o.seq_len, o.seed)
    progress = {"step": 0, "tokens": 0, "val_before": None, "val_loss": None, "recent_losses": [], "elapsed": 0.0}
    return _Session(net, tokenizer, teacher, optimizer, scheduler, stream, progress)


def _validate(run: _Run, s: _Session) -> float | None:
    if run.val_data is None:
        return None
    loss = None
    if run.rank == 0:
        from .evaluate.c4 import c4_loss

        o = run.o
        s.net.eval()
        loss = c4_loss(s.net, s.tokenizer, run.val_data, num_sequences=o.val_sequences, seq_len=o.seq_len,
                       seed=o.seed, batch_size=max(1, o.batch_size // (o.grad_accum * run.world)),
                       text_field=o.text_field, config=o.data_config, split="validation", progress=False)["loss"]
        s.net.train()
    _barrier(run.world)
    return loss


def _train(run: _Run, s: _Session, saved_at: int | None, stop_after: int | None, show_progress: bool) -> bool:
    """Train to the last step (True), or stop after ``stop_after`` steps of this invocation (False).

    ``saved_at``: the step of the newest checkpoint (None: none yet). A checkpoint is written every
    ``save_every`` steps, when stopping, and after the last step, so a kill while the result is being
    saved costs no training.
    """
    o, state = run.o, s.progress
    if state["step"] == 0 and state["val_before"] is None:
        state["val_before"] = _validate(run, s)
        if run.rank == 0 and state["val_before"] is not None:
            _log(run.work, {"step": 0, "val_loss": state["val_before"]})
    train_net = s.net
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_net = DistributedDataParallel(s.net, device_ids=[run.local_rank] if run.device == "cuda" else None)
    bar = tqdm(total=run.steps, initial=state["step"], unit="step", desc=f"heal ({o.method})",
               disable=not show_progress or run.rank != 0)
    s.net.train()
    run_steps, started = 0, time.perf_counter()
    with bar:
        while state["step"] < run.steps:
            step_start = time.perf_counter()
            sums = _forward_backward(run, s, train_net)
            record = _update(run, s, sums, saved_at)
            run_steps += 1
            state["elapsed"] += time.perf_counter() - step_start
            record["tokens_per_s"] = run_steps * o.batch_size * o.seq_len / (time.perf_counter() - started)
            if state["step"] % o.eval_every == 0 or state["step"] == run.steps:  # not counted as training time
                state["val_loss"] = _validate(run, s)
                if state["val_loss"] is not None:
                    record["val_loss"] = state["val_loss"]
            if run.rank == 0:
                _log(run.work, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                bar.update(1)
            stopping = stop_after is not None and run_steps >= stop_after and state["step"] < run.steps
            if state["step"] % o.save_every == 0 or stopping or state["step"] == run.steps:
                rng_states = _gather_rng(run.world)
                if run.rank == 0:
                    save_checkpoint(run.work, s.net, s.optimizer, s.scheduler, s.stream, state, rng_states)
                saved_at = state["step"]
                _barrier(run.world)
            if stopping:
                return False
    return True


def _forward_backward(run: _Run, s: _Session, train_net: nn.Module) -> torch.Tensor:
    """Forward and backward passes over the next global batch; returns (loss, LM loss, KD loss), the
    mean over micro-batches and processes."""
    o, world = run.o, run.world
    micro = o.batch_size // (o.grad_accum * world)
    batch = s.stream.take(o.batch_size)  # every process draws the global batch and keeps its share
    mine = batch[run.rank * micro * o.grad_accum : (run.rank + 1) * micro * o.grad_accum]
    sums = torch.zeros(3, dtype=torch.float64)
    for k in range(o.grad_accum):
        ids = torch.tensor(mine[k * micro : (k + 1) * micro], dtype=torch.long, device=_input_device(s.net))
        sync = k == o.grad_accum - 1 or world == 1
        with contextlib.nullcontext() if sync else train_net.no_sync():
            loss, lm, kd = _loss(train_net, s.teacher, ids, o)
            (loss / o.grad_accum).backward()
        sums += torch.tensor([loss.item(), lm.item(), kd.item() if kd is not None else 0.0], dtype=torch.float64)
    return _all_mean(sums / o.grad_accum, world)


def _update(run: _Run, s: _Session, sums: torch.Tensor, saved_at: int | None) -> dict:
    """Clip, take the optimizer and schedule step, count it; returns the step's log record."""
    state = s.progress
    loss = sums[0].item()
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint (step {saved_at}) is kept in {run.work / CHECKPOINT_DIR}; lower --lr or "
                "check the data, then rerun with --restart" if saved_at is not None else
                "no checkpoint was written yet; lower --lr or check the data and rerun")
        raise DepthpruneError(f"step {state['step'] + 1}: the loss is {loss}; {kept}")
    params = [p for group in s.optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.o.max_grad_norm).item()
    lr = s.scheduler.get_last_lr()[0]
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["tokens"] += run.o.batch_size * run.o.seq_len
    state["recent_losses"] = (state["recent_losses"] + [loss])[-10:]
    record = {"step": state["step"], "loss": loss, "lm_loss": sums[1].item(), "lr": lr, "grad_norm": grad_norm,
              "tokens": state["tokens"]}
    if s.teacher is not None:
        record["kd_loss"] = sums[2].item()
    return record


def _healing_record(model, data, val_data, dtype, o: HealOptions, steps: int, state: dict, world: int) -> dict:
    recent = state["recent_losses"]
    return {
        "method": o.method,
        "teacher": o.teacher,
        "kd_weight": o.kd_weight if o.teacher else None,
        "steps": steps,
        "tokens": state["tokens"],
        "batch_size": o.batch_size,
        "seq_len": o.seq_len,
        "lr": o.lr,
        "schedule": o.schedule,
        "warmup": o.warmup,
        "rank": o.rank if o.method != "full" else None,
        "alpha": (o.alpha if o.alpha is not None else o.rank) if o.method != "full" else None,
        "dropout": o.dropout if o.method != "full" else None,
        "target_modules": o.target_modules,
        "seed": o.seed,
        "dtype": dtype,
        "processes": world,
        "data": data if isinstance(data, str) else "token ids",
        "val_data": val_data,
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "final_train_loss_note": f"mean over the last {len(recent)} steps",
        "val_loss_before": state["val_before"],
        "val_loss_after": state["val_loss"],
        "train_seconds": state["elapsed"],
    }


def _finish(run: _Run, s: _Session, out: Path, model_spec: str, result: dict, save_adapter: bool) -> None:
    """Assemble the merged model beside OUT with the settings, log and record; swap it in; drop the work folder."""
    o = run.o
    if o.method != "full" and o.target_modules is None:
        result["target_modules"] = sorted(next(iter(s.net.peft_config.values())).target_modules)
    source = Path(model_spec).expanduser()
    record = dict((_input_record(source) if source.is_dir() else None) or {"source_model": model_spec})
    record["healing"] = result
    tmp = temporary_dir_beside(out)
    try:
        if save_adapter and o.method != "full":
            s.net.save_pretrained(tmp / "adapter")
        merged = merged_model(s.net, o)
        merged.config.use_cache = True
        merged.save_pretrained(tmp)
        s.tokenizer.save_pretrained(tmp)
        for name in (CONFIG_FILE, LOG_FILE):
            if (run.work / name).is_file():
                shutil.copy2(run.work / name, tmp / name)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)  # when the run worked in OUT, its checkpoint goes with the old OUT
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run.work != out:
        shutil.rmtree(run.work, ignore_errors=True)
