"""Healing a pruned model: a short fine-tune on C4 that repairs the damage at the cut (paper, App. A.1).

Methods: ``qlora`` (LoRA on a 4-bit NF4 base, the paper's recipe), ``lora`` (LoRA on a full-precision
base), ``full`` (all weights). With a ``teacher`` (the unpruned model) the loss mixes the LM loss with
the KL divergence between the teacher's and the student's next-token distributions (logit distillation,
as in Minitron). A plain PyTorch loop in the style of torchtune's recipes:

- documents are tokenized whole and packed into ``seq_len``-token sequences, in a seeded order;
- every ``save_every`` steps the trainable weights, optimizer, scheduler, RNG states and data position go
  to ``OUT/checkpoint`` (atomically), so rerunning the same command continues where it stopped and ends
  with the same weights as an uninterrupted run;
- under ``torchrun``/``accelerate launch`` it trains data-parallel (DDP): the global batch is split over
  the processes and only rank 0 writes;
- the result is an ordinary Hugging Face checkpoint with the adapter merged (for QLoRA into the
  de-quantized base, in full precision) and ``depthprune.json`` extended by the healing record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import load_texts, tokenize
from .errors import DepthpruneError
from .models import DTYPES, convert_gguf, decoder_layout, resolve_model_source
from .outputs import atomic_output_dir, atomic_write_text
from .surgery import RECORD_FILE, read_record

METHODS = ("qlora", "lora", "full")
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
CONFIG_FILE = "heal_config.json"
LOG_FILE = "heal_log.jsonl"
CHECKPOINT_DIR = "checkpoint"
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


def _check(o: HealOptions) -> None:
    if o.method not in METHODS:
        raise DepthpruneError(f"unknown method '{o.method}': choose one of {', '.join(METHODS)}")
    if o.schedule not in SCHEDULES:
        raise DepthpruneError(f"unknown schedule '{o.schedule}': choose one of {', '.join(SCHEDULES)}")
    if (o.steps is None) == (o.tokens is None):
        raise DepthpruneError("give either --steps or --tokens, not both")
    for name in ("batch_size", "grad_accum", "seq_len", "rank", "eval_every", "save_every", "val_sequences"):
        if getattr(o, name) < 1:
            raise DepthpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    if o.seq_len < 2:
        raise DepthpruneError(f"--seq-len must be at least 2, got {o.seq_len}")
    if (o.steps is not None and o.steps < 1) or (o.tokens is not None and o.tokens < 1):
        raise DepthpruneError("--steps/--tokens must be at least 1")
    if not 0 <= o.dropout < 1:
        raise DepthpruneError(f"--dropout must be in [0, 1), got {o.dropout}")
    if not 0 <= o.kd_weight <= 1:
        raise DepthpruneError(f"--kd-weight must be in [0, 1], got {o.kd_weight}")
    if o.lr <= 0 or o.warmup < 0 or o.kd_temperature <= 0:
        raise DepthpruneError("--lr and --kd-temperature must be positive and --warmup not negative")


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


def _training_documents(data, o: HealOptions, needed_tokens: int):
    if not isinstance(data, str):
        documents = [list(map(int, d)) for d in data]
        if not any(documents):
            raise DepthpruneError("the training data holds no tokens")
        return documents
    local = Path(data).expanduser().exists()
    # A streamed hub dataset is read once, as far as the run needs (C4 documents average some hundred
    # tokens, so one document per 64 needed tokens leaves ample margin); a local source is read whole.
    count = None if local else max(1000, needed_tokens // 64)
    return load_texts(data, count, o.seed, o.text_field, o.data_config, o.data_split)


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


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model, optimizer, scheduler, stream: PackedStream, progress: dict,
                    rng_states: list[dict]) -> None:
    """Write OUT/checkpoint atomically: a complete new one replaces the old one only once it is whole."""
    from safetensors.torch import save_file

    # The new checkpoint replaces the old one only once it is complete.
    with atomic_output_dir(out / CHECKPOINT_DIR, force=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "data": stream.state_dict(), "rng": rng_states, "progress": progress}, tmp / "state.pt")


def load_checkpoint(out: Path, model, optimizer, scheduler, stream: PackedStream) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file

    folder = out / CHECKPOINT_DIR
    weights = load_file(str(folder / "trainable.safetensors"))
    params = _trainable(model)
    if set(weights) != set(params):
        raise DepthpruneError(f"{folder} does not match this model's trainable weights: rerun with --force to restart")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    state = torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    return state["progress"], state["rng"]


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


def _broadcast_flag(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor([int(flag)])
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


# ------------------------------------------------------------------------------------------ the run


def _prepare_output(out: Path, identity: dict, force: bool, rank: int, world: int) -> bool:
    """Create OUT or check it belongs to this run; True when there is a checkpoint to resume from."""
    resume = False
    if rank == 0:
        config_file = out / CONFIG_FILE
        if out.exists() and not out.is_dir():
            raise DepthpruneError(f"output '{out}' exists and is not a directory: choose another --out")
        if force and out.exists():
            shutil.rmtree(out)
        if out.is_dir() and any(out.iterdir()):
            if (out / RECORD_FILE).is_file() and not (out / CHECKPOINT_DIR).exists() and config_file.is_file():
                raise DepthpruneError(f"'{out}' already holds a healed model: choose another --out or pass --force")
            if not config_file.is_file():
                raise DepthpruneError(f"output directory '{out}' exists and is not a healing run: choose another "
                                      "--out or pass --force")
            previous = json.loads(config_file.read_text())
            changed = sorted(k for k in set(previous) | set(identity)
                             if k not in _RESUMABLE_CHANGES and previous.get(k) != identity.get(k))
            if changed:
                raise DepthpruneError(f"'{out}' holds a healing run with other settings ({', '.join(changed)}): "
                                      "rerun it with the same options, or pass --force to start over")
            resume = (out / CHECKPOINT_DIR / "state.pt").is_file()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_file, json.dumps(identity, indent=2) + "\n")
    return _broadcast_flag(resume, world)


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
    same call later continues. Returns the healing record written to ``depthprune.json``.
    """
    o = resolve_options(preset, **options)
    rank, local_rank, world = _distributed()
    if device not in ("cpu", "cuda", "auto"):
        raise DepthpruneError(f"unknown device '{device}': choose cpu, cuda or auto")
    if device in ("cuda", "auto") and not torch.cuda.is_available():
        raise DepthpruneError(f"--device {device} needs a CUDA GPU and none is visible: use --device cpu")
    if device == "auto" and world > 1:
        raise DepthpruneError("--device auto spreads one process over all GPUs: do not combine it with torchrun")
    if o.batch_size % (o.grad_accum * world):
        raise DepthpruneError(f"--batch-size {o.batch_size} must be divisible by --grad-accum ({o.grad_accum}) "
                              f"times the number of processes ({world})")
    dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
    if dtype not in DTYPES:
        raise DepthpruneError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    torch_device = f"cuda:{local_rank}" if device == "cuda" else device
    if val_data is None and isinstance(data, str) and not Path(data).expanduser().exists():
        val_data = data  # a hub dataset: its validation split
    steps = total_steps(o)
    out = Path(out)
    identity = {"model": str(model), "data": data if isinstance(data, str) else f"{len(data)} token-id documents",
                "val_data": val_data, "dtype": dtype, **asdict(o)}
    resume = _prepare_output(out, identity, force, rank, world)

    torch.manual_seed(o.seed)
    random.seed(o.seed)
    base, tokenizer = _load(model, o, torch_device, DTYPES[dtype], o.method == "qlora", trust_remote_code)
    teacher = None
    if o.teacher is not None:
        teacher, _ = _load(o.teacher, o, torch_device, DTYPES[dtype], False, trust_remote_code)
        teacher.eval().requires_grad_(False)
        if teacher.config.vocab_size != base.config.vocab_size:
            raise DepthpruneError(f"teacher '{o.teacher}' has a vocabulary of {teacher.config.vocab_size}, the student "
                                  f"{base.config.vocab_size}: distil from the model that was pruned")
    torch.manual_seed(o.seed)  # LoRA's initialization must not depend on what loading consumed
    net = prepare_model(base, o)
    params = list(_trainable(net).values())
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    from transformers import get_scheduler

    scheduler = get_scheduler(SCHEDULES[o.schedule], optimizer, num_warmup_steps=o.warmup, num_training_steps=steps)
    stream = PackedStream(_training_documents(data, o, steps * o.batch_size * o.seq_len), tokenizer, o.seq_len, o.seed)

    state = {"step": 0, "tokens": 0, "val_before": None, "val_loss": None, "recent_losses": [], "elapsed": 0.0}
    if resume:
        state, rng_states = load_checkpoint(out, net, optimizer, scheduler, stream)
        _set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    if rank == 0:
        _trim_log(out / LOG_FILE, state["step"] if resume else -1)

    def validate() -> float | None:
        if val_data is None:
            return None
        loss = None
        if rank == 0:
            from .evaluate.c4 import c4_loss

            net.eval()
            loss = c4_loss(net, tokenizer, val_data, num_sequences=o.val_sequences, seq_len=o.seq_len, seed=o.seed,
                           batch_size=max(1, o.batch_size // (o.grad_accum * world)), text_field=o.text_field,
                           config=o.data_config, split="validation", progress=False)["loss"]
            net.train()
        _barrier(world)
        return loss

    if state["step"] == 0 and state["val_before"] is None:
        state["val_before"] = validate()
        if rank == 0 and state["val_before"] is not None:
            _log(out, {"step": 0, "val_loss": state["val_before"]})

    train_net = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_net = DistributedDataParallel(net, device_ids=[local_rank] if device == "cuda" else None)
    micro = o.batch_size // (o.grad_accum * world)
    tokens_per_step = o.batch_size * o.seq_len
    bar = tqdm(total=steps, initial=state["step"], unit="step", desc=f"heal ({o.method})",
               disable=not progress or rank != 0)
    net.train()
    run_steps = 0
    started = time.perf_counter()
    while state["step"] < steps:
        step_start = time.perf_counter()
        batch = stream.take(o.batch_size)  # every process draws the global batch and keeps its share
        mine = batch[rank * micro * o.grad_accum : (rank + 1) * micro * o.grad_accum]
        sums = torch.zeros(3, dtype=torch.float64)
        for k in range(o.grad_accum):
            ids = torch.tensor(mine[k * micro : (k + 1) * micro], dtype=torch.long, device=_input_device(net))
            sync = k == o.grad_accum - 1 or world == 1
            context = train_net.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss, lm, kd = _loss(train_net, teacher, ids, o)
                (loss / o.grad_accum).backward()
            sums += torch.tensor([loss.item(), lm.item(), kd.item() if kd is not None else 0.0],
                                 dtype=torch.float64)
        sums = _all_mean(sums / o.grad_accum, world)
        loss_value = sums[0].item()
        if not math.isfinite(loss_value):
            bar.close()
            kept = f"the last good checkpoint (step {_checkpoint_step(out)}) is kept in {out / CHECKPOINT_DIR}" \
                if (out / CHECKPOINT_DIR).exists() else "no checkpoint was written yet"
            raise DepthpruneError(f"step {state['step'] + 1}: the loss is {loss_value}; {kept}; lower --lr or "
                                  "check the data, then rerun with --force")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += tokens_per_step
        state["recent_losses"] = (state["recent_losses"] + [loss_value])[-10:]
        run_steps += 1
        seconds = time.perf_counter() - step_start
        state["elapsed"] += seconds
        throughput = run_steps * tokens_per_step / (time.perf_counter() - started)
        record = {"step": state["step"], "loss": loss_value, "lm_loss": sums[1].item(), "lr": lr,
                  "grad_norm": grad_norm, "tokens": state["tokens"], "tokens_per_s": throughput}
        if teacher is not None:
            record["kd_loss"] = sums[2].item()
        if state["step"] % o.eval_every == 0 or state["step"] == steps:
            state["val_loss"] = validate()
            if state["val_loss"] is not None:
                record["val_loss"] = state["val_loss"]
        if rank == 0:
            _log(out, record)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{throughput:,.0f}", refresh=False)
            bar.update(1)
        stopping = stop_after is not None and run_steps >= stop_after and state["step"] < steps
        if state["step"] % o.save_every == 0 or stopping:
            rng_states = _gather_rng(world)
            if rank == 0:
                save_checkpoint(out, net, optimizer, scheduler, stream, state, rng_states)
            _barrier(world)
        if stopping:
            bar.close()
            return {"stopped_at_step": state["step"], "steps": steps}
    bar.close()

    result = _healing_record(model, data, val_data, dtype, o, steps, state, world)
    if rank == 0:
        _save_result(out, model, net, tokenizer, o, result, save_adapter)
    _barrier(world)
    return result


def _gather_rng(world: int) -> list[dict]:
    # Each process keeps its own RNG stream (LoRA dropout differs per process): keep all of them.
    if world == 1:
        return [_rng_state()]
    import torch.distributed as dist

    states: list = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def _checkpoint_step(out: Path) -> int | None:
    try:
        return torch.load(out / CHECKPOINT_DIR / "state.pt", weights_only=False)["progress"]["step"]
    except FileNotFoundError:
        return None


def _log(out: Path, record: dict) -> None:
    with (out / LOG_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(path: Path, step: int) -> None:
    # After a kill the log may run past the checkpoint; those steps are trained again, so drop them
    # (all of them, step = -1, when no checkpoint was reached).
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


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


def _save_result(out: Path, model_spec: str, net, tokenizer, o: HealOptions, result: dict, save_adapter: bool) -> None:
    """Write the merged checkpoint into OUT (beside the log), depthprune.json last, then drop the checkpoint."""
    if o.method != "full" and o.target_modules is None:
        result["target_modules"] = sorted(next(iter(net.peft_config.values())).target_modules)
    tmp = Path(tempfile.mkdtemp(prefix=".result.tmp-", dir=out))
    try:
        if save_adapter and o.method != "full":
            net.save_pretrained(tmp / "adapter")
        merged = merged_model(net, o)
        merged.config.use_cache = True
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source_dir = Path(model_spec)
        record = read_record(source_dir) if source_dir.is_dir() else None
        record = dict(record or {"source_model": model_spec})
        record["healing"] = result
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)

