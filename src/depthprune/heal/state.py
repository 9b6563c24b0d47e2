"""A healing run's fixed facts (:class:`Run`) and the training state its steps work on: what it holds, how
:func:`setup` builds it (model, teacher, optimizer, schedule, data) and :func:`resume` restores it from a
checkpoint."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DepthpruneError
from ..model.load import decoder_layout, load_model
from ..outputs import temporary_dir_beside
from . import checkpoint as ckpt
from .data import PackedStream, check_vocabulary
from .distributed import Processes, shard, skeleton
from .methods import HealMethod
from .options import SCHEDULES, HealOptions

ProgressHook = Callable[[dict], None]


@dataclass
class Progress:
    """How far the run got: saved in every checkpoint (``state.json``'s ``progress``) and restored."""

    step: int = 0
    tokens: int = 0
    val_before: float | None = None
    val_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)  # the last 10, for the final train loss
    elapsed: float = 0.0  # training seconds over all invocations (validation not counted)


@dataclass(frozen=True)
class Run:
    """One invocation's fixed facts."""

    o: HealOptions
    method: HealMethod
    steps: int
    out: Path
    work: Path  # OUT, or OUT.unfinished while a --force run keeps the old OUT
    val_data: str | None
    processes: Processes
    device: str  # 'cpu', 'cuda' or 'auto'
    dtype: str
    stop_after: int | None

    @property
    def load_device(self) -> str:
        if self.o.fsdp:  # read whole into CPU memory; sharding puts each process's part on its GPU
            return "cpu"
        return f"cuda:{self.processes.local_rank}" if self.device == "cuda" else self.device


@dataclass
class TrainingState:
    """What the steps work on, built by :func:`setup`."""

    net: nn.Module  # the model being trained (peft-wrapped for the adapter methods)
    train_net: nn.Module  # net, or its DistributedDataParallel wrapper
    tokenizer: Any
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: PackedStream
    progress: Progress = field(default_factory=Progress)
    saved_at: int | None = None  # the step of the newest checkpoint (None: none yet)
    run_steps: int = 0  # steps taken by this invocation
    started: float = field(default_factory=time.perf_counter)
    skeleton: nn.Module | None = None  # FSDP, rank 0: the model's modules without weights, filled at the end


@dataclass
class Healed:
    """What :func:`~depthprune.heal.recipe.heal_loaded` returns: the healing record, and the merged model (None
    when the run stopped early, and on processes other than rank 0)."""

    record: dict
    model: nn.Module | None
    tokenizer: Any = None


def setup(run: Run, model, tokenizer, documents: list, trust_remote_code: bool) -> TrainingState:
    """Load the model (and teacher), make it trainable, and build the optimizer, schedule and data."""
    o = run.o
    torch.manual_seed(o.seed)
    random.seed(o.seed)
    base, tokenizer = _base_model(run, model, tokenizer, trust_remote_code)
    base.config.use_cache = False
    check_vocabulary(documents, base.config.vocab_size)
    teacher = _teacher(run, base.config.vocab_size, trust_remote_code)
    torch.manual_seed(o.seed)  # LoRA's initialization must not depend on what loading consumed
    if o.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = run.method.prepare(base, o)
    kept = None
    if o.fsdp:  # before the optimizer: sharding replaces the parameters by their shards
        kept = skeleton(net) if run.processes.main else None
        shard(net, run.processes, run.device, teacher)
    if o.compile:
        compile_layers(net)
    optimizer, scheduler = _optimizer(run, net)
    train_net = net
    if run.processes.world > 1 and not o.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_net = DistributedDataParallel(net, device_ids=[run.processes.local_rank] if run.device == "cuda" else None)
    return TrainingState(net, train_net, tokenizer, teacher, optimizer, scheduler,
                         PackedStream(documents, tokenizer, o.seq_len, o.seed), skeleton=kept)


def resume(run: Run, state: TrainingState) -> None:
    """Continue from the work folder's checkpoint: weights, optimizer, schedule, data position, RNG."""
    saved = ckpt.load_checkpoint(run.work, state.net, state.optimizer, state.scheduler, state.stream,
                                 run.processes.rank)
    try:
        state.progress = Progress(**saved)
    except TypeError:
        raise DepthpruneError(f"the checkpoint in '{run.work / ckpt.CHECKPOINT_DIR}' cannot be read (its progress "
                              "record has other fields): rerun with --restart to start this run over") from None
    state.saved_at = state.progress.step


def compile_layers(net: nn.Module) -> None:
    """torch.compile each decoder layer in place (one graph per layer, reused by its siblings); the loss,
    head and optimizer stay eager."""
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    for layer in decoder_layout(inner).layers:
        layer.compile()


def _base_model(run: Run, model, tokenizer, trust_remote_code: bool):
    """The model to train and its tokenizer: loaded (4-bit for a quantized-base method), or the one given."""
    quantize = "nf4" if run.method.quantized_base else None
    if isinstance(model, str):
        return load_model(model, run.load_device, run.dtype, trust_remote_code, quantize=quantize)
    if quantize is None:
        return model, tokenizer
    # A quantized base is made by loading: through a temporary checkpoint of the model given (removed
    # at once; a killed run's is removed by the next run, as every temporary beside OUT).
    tmp = temporary_dir_beside(run.out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        base, _ = load_model(str(tmp), run.load_device, run.dtype, trust_remote_code, quantize=quantize)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base, tokenizer


def _teacher(run: Run, vocab: int, trust_remote_code: bool) -> nn.Module | None:
    """The frozen teacher to distil from (None without one); it must share the student's vocabulary."""
    name = run.o.teacher
    if name is None:
        return None
    teacher, _ = load_model(name, run.load_device, run.dtype, trust_remote_code)
    teacher.eval().requires_grad_(False)
    if teacher.config.vocab_size != vocab:
        raise DepthpruneError(f"teacher '{name}' has a vocabulary of {teacher.config.vocab_size}, the student "
                              f"{vocab}: distil from the model that was pruned")
    return teacher


def _optimizer(run: Run, net: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable weights, and its learning-rate schedule."""
    o = run.o
    params = list(ckpt.trainable(net).values())
    # The fused kernel (CPU and CUDA): one pass over each tensor instead of a dozen (7x faster on CPU).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                  fused=fused)
    from transformers import get_scheduler

    scheduler = get_scheduler(SCHEDULES[o.schedule], optimizer, num_warmup_steps=o.warmup,
                              num_training_steps=run.steps)
    return optimizer, scheduler
