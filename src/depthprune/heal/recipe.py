"""The healing recipe: short steps over a typed training state, in the style of torchtune's recipes.

:func:`heal_loaded` reads as the run does: check the inputs, plan where the results live (under OUT's
lock), :func:`setup` the model and its training state, resume from a checkpoint, :func:`train` (a loop
of :func:`train_step`, :func:`validate` and :func:`save_checkpoint`), and :func:`finish` (merge, save
and swap the result into place). Each step takes the run's fixed facts (:class:`Run`) and the state it
works on (:class:`TrainingState`); what the checkpoint keeps of the progress is :class:`Progress`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DepthpruneError
from ..model.load import decoder_layout, load_model, quiet_bitsandbytes
from ..model.record import RECORD_FILE, read_record
from ..outputs import follow_umask, replace_dir, temporary_dir_beside
from . import checkpoint as ckpt
from .data import PackedStream, check_vocabulary
from .distributed import (
    Processes,
    check_fsdp,
    full_training_state,
    gathered,
    shard,
    skeleton,
    start,
    world_size,
)
from .inputs import check_call, check_inputs, loaded_dtype, loaded_identity, model_identity
from .loss import compute_loss, input_device
from .methods import HEAL_METHODS, HealMethod
from .options import SCHEDULES, HealOptions, resolve_options, total_steps
from .outputs import (
    CONFIG_FILE,
    LOG_FILE,
    append_log,
    check_out,
    finished_result,
    holding,
    plan,
    prepare_work,
    share_plan,
    trim_log,
)

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
    """What :func:`heal_loaded` returns: the healing record, and the merged model (None when the run
    stopped early, and on processes other than rank 0)."""

    record: dict
    model: nn.Module | None
    tokenizer: Any = None


def heal(model, data, out, **kwargs) -> dict:
    """Heal ``model`` by fine-tuning on ``data`` and save the merged checkpoint to ``out``; returns the
    healing record written to ``depthprune.json`` (see :func:`heal_loaded` for the arguments)."""
    return heal_loaded(model, data, out, load_finished=False, **kwargs).record


def heal_loaded(
    model,
    data,
    out: str | Path,
    *,
    tokenizer=None,
    model_id: str | None = None,
    record: dict | None = None,
    val_data: str | None = None,
    preset: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    save_adapter: bool = False,
    force: bool = False,
    restart: bool = False,
    stop_after: int | None = None,
    trust_remote_code: bool = False,
    progress: bool | ProgressHook = True,
    load_finished: bool = True,
    merge_dtype: str | None = None,
    **options,
) -> Healed:
    """Heal ``model``, save the merged checkpoint to ``out``, and return the record and the merged model.

    ``model``: a checkpoint directory (e.g. from ``depthprune prune``) or anything :func:`load_model`
    takes; or a model in memory with its ``tokenizer``. An in-memory model is trained in place (lora,
    dora, full change its modules and weights; pass a copy to keep the original); for qlora it is only
    read, through a temporary 4-bit copy. ``model_id`` names it for resuming (default: a hash of its
    weights); ``record`` is the ``depthprune.json`` it stands for (e.g. the pruning record of a cut).

    ``data``: a text source (file, directory or Hugging Face dataset id, as for ``analyze``) or a list
    of token-id lists. ``val_data``: held-out text scored with the C4-loss evaluator every
    ``eval_every`` steps and at the end (default: the 'validation' split when ``data`` is a hub id).
    ``options``: the fields of :class:`HealOptions` (method, steps, train_tokens, batch_size, lr, rank,
    ...), on top of ``preset`` ('paper' — the default — or 'cpu-small'). ``device``: 'cpu', 'cuda' or
    'auto' (one process spread over all GPUs). ``dtype``: weights and compute (default float32 on CPU,
    bfloat16 on GPU; an in-memory model keeps its own). ``stop_after``: end this invocation after that
    many steps, with a checkpoint; the same call later continues. ``progress``: a tqdm bar (True), none
    (False), or a function called after every step with its log record plus ``total_steps``.

    The same call after a kill continues from the last checkpoint; after success it returns the stored
    record, marked ``already_healed`` (and, with ``load_finished``, the model read back from ``out``). ``restart`` discards an
    unfinished run in ``out`` and starts over; ``force`` replaces whatever else ``out`` holds, once the
    new result is complete. ``merge_dtype``: the dtype a 4-bit base (qlora) is merged into, layer by layer
    (default float32: full precision; the sweep asks for its own dtype, so no float32 copy is ever made).
    """
    quiet_bitsandbytes()
    o = resolve_options(preset, **options)
    given_dtype, dtype = dtype, check_call(o, device, dtype, world_size(), stop_after)
    check_fsdp(o, HEAL_METHODS.get(o.method).quantized_base, device, world_size())
    in_memory = isinstance(model, nn.Module)
    if in_memory:
        if tokenizer is None:
            raise DepthpruneError("a model given in memory needs its tokenizer: heal(model, ..., tokenizer=...)")
        if record is not None and not isinstance(record, dict):
            raise DepthpruneError(f"record must be a dict (the model's depthprune.json), got {record!r}")
        dtype = loaded_dtype(model, given_dtype)
        model_id = model_id or loaded_identity(model)
    else:
        model_id = model_identity(model, "model")
    if val_data is None and isinstance(data, str) and not Path(data).expanduser().exists():
        val_data = data  # a hub dataset: its validation split
    steps = total_steps(o)
    documents, identity = check_inputs(model_id, data, val_data, o, steps, dtype)
    out = check_out(out, (None if in_memory else model, data if isinstance(data, str) else None, val_data, o.teacher))
    processes = start(device)
    with holding(out, processes.rank):
        where = share_plan(plan(out, identity, force, restart) if processes.main else None, out, processes)
        if where.action == "finished":
            result = finished_result(out)
            return Healed(result, *(load_model(str(out), device, dtype) if load_finished else (None, None)))
        run = Run(o, HEAL_METHODS.get(o.method), steps, out, where.work, val_data, processes, device, dtype, stop_after)
        state = setup(run, model, tokenizer, documents, trust_remote_code)
        if processes.main:
            prepare_work(where, out, identity)
        processes.barrier()
        if where.action == "resume":
            resume(run, state)
        if processes.main:
            trim_log(run.work / LOG_FILE, -1 if state.saved_at is None else state.saved_at)
        if not train(run, state, progress):
            return Healed({"stopped_at_step": state.progress.step, "steps": steps}, None)
        result = healing_record(run, state, data)
        if o.fsdp:  # every process takes part in gathering the shards; rank 0 merges and saves the whole model
            state.net = gathered(state.net, state.skeleton, processes)
        base_record = record if in_memory else _input_record(model)
        merged = finish(run, state, result, base_record or {"source_model": model_id}, save_adapter, merge_dtype) \
            if processes.main else None
        processes.barrier()
    return Healed(result, merged, state.tokenizer)


# ------------------------------------------------------------------------------------------- steps


def setup(run: Run, model, tokenizer, documents: list, trust_remote_code: bool) -> TrainingState:
    """Load the model (and teacher), make it trainable, and build the optimizer, schedule and data."""
    o = run.o
    torch.manual_seed(o.seed)
    random.seed(o.seed)
    base, tokenizer = _base_model(run, model, tokenizer, trust_remote_code)
    base.config.use_cache = False
    vocab = base.config.vocab_size
    check_vocabulary(documents, vocab)
    teacher = None
    if o.teacher is not None:
        teacher, _ = load_model(o.teacher, run.load_device, run.dtype, trust_remote_code)
        teacher.eval().requires_grad_(False)
        if teacher.config.vocab_size != vocab:
            raise DepthpruneError(f"teacher '{o.teacher}' has a vocabulary of {teacher.config.vocab_size}, the student "
                                  f"{vocab}: distil from the model that was pruned")
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
    params = list(ckpt.trainable(net).values())
    # The fused kernel (CPU and CUDA): one pass over each tensor instead of a dozen (7x faster on CPU).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                                  fused=fused)
    from transformers import get_scheduler

    scheduler = get_scheduler(SCHEDULES[o.schedule], optimizer, num_warmup_steps=o.warmup,
                              num_training_steps=run.steps)
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


def train(run: Run, state: TrainingState, progress: bool | ProgressHook) -> bool:
    """Train to the last step (True), or stop after ``stop_after`` steps of this invocation (False).

    A checkpoint is written every ``save_every`` steps, when stopping, and after the last step, so a
    kill while the result is being saved costs no training.
    """
    o, p = run.o, state.progress
    if p.step == 0 and p.val_before is None:
        p.val_before = validate(run, state)
        if run.processes.main and p.val_before is not None:
            append_log(run.work, {"step": 0, "val_loss": p.val_before})
    state.net.train()
    state.started = time.perf_counter()
    with _reporter(run, state, progress) as report:
        while p.step < run.steps:
            record = train_step(run, state)
            if p.step % o.eval_every == 0 or p.step == run.steps:  # not counted as training time
                p.val_loss = validate(run, state)
                if p.val_loss is not None:
                    record["val_loss"] = p.val_loss
            if run.processes.main:
                append_log(run.work, record)
                report(record)
            stopping = run.stop_after is not None and state.run_steps >= run.stop_after and p.step < run.steps
            if p.step % o.save_every == 0 or stopping or p.step == run.steps:
                save_checkpoint(run, state)
            if stopping:
                return False
    return True


def train_step(run: Run, state: TrainingState) -> dict:
    """One optimizer step over the next global batch; returns its log record."""
    step_start = time.perf_counter()
    losses = _forward_backward(run, state)
    loss = losses[0].item()
    p = state.progress
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint (step {state.saved_at}) is kept in {run.work / ckpt.CHECKPOINT_DIR}; lower "
                "--lr or check the data, then rerun with --restart" if state.saved_at is not None else
                "no checkpoint was written yet; lower --lr or check the data and rerun")
        raise DepthpruneError(f"step {p.step + 1}: the loss is {loss}; {kept}")
    params = [param for group in state.optimizer.param_groups for param in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.o.max_grad_norm).item()
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    p.step += 1
    p.tokens += run.o.batch_size * run.o.seq_len
    p.recent_losses = (p.recent_losses + [loss])[-10:]
    p.elapsed += time.perf_counter() - step_start
    state.run_steps += 1
    record = {"step": p.step, "loss": loss, "lm_loss": losses[1].item(), "lr": lr, "grad_norm": grad_norm,
              "tokens": p.tokens}
    if state.teacher is not None:
        record["kd_loss"] = losses[2].item()
    record["tokens_per_s"] = state.run_steps * run.o.batch_size * run.o.seq_len / (time.perf_counter() - state.started)
    return record


def _forward_backward(run: Run, state: TrainingState) -> torch.Tensor:
    """Forward and backward passes over the next global batch; returns (loss, LM loss, KD loss), the
    mean over micro-batches and processes."""
    o, world, rank = run.o, run.processes.world, run.processes.rank
    micro = o.batch_size // (o.grad_accum * world)
    batch = state.stream.take(o.batch_size)  # every process draws the global batch and keeps its share
    mine = batch[rank * micro * o.grad_accum : (rank + 1) * micro * o.grad_accum]
    sums = torch.zeros(3, dtype=torch.float64)
    for k in range(o.grad_accum):
        ids = torch.tensor(mine[k * micro : (k + 1) * micro], dtype=torch.long, device=input_device(state.net))
        sync = k == o.grad_accum - 1 or world == 1
        with contextlib.nullcontext() if sync else state.train_net.no_sync():
            with torch.autocast(ids.device.type, torch.bfloat16, enabled=o.bf16_autocast):
                loss, lm, kd = compute_loss(state.train_net, state.teacher, ids, o)
            (loss / o.grad_accum).backward()
        sums += torch.tensor([loss.item(), lm.item(), kd.item() if kd is not None else 0.0], dtype=torch.float64)
    return run.processes.all_mean(sums / o.grad_accum)


def validate(run: Run, state: TrainingState) -> float | None:
    """The C4-style loss on the validation data (rank 0 scores; None without validation data)."""
    if run.val_data is None:
        return None
    loss = None
    if run.processes.main or run.o.fsdp:  # a sharded forward needs every process (each computes the same loss)
        from ..evaluate.tasks.c4 import c4_loss

        o = run.o
        state.net.eval()
        loss = c4_loss(state.net, state.tokenizer, run.val_data, num_sequences=o.val_sequences, seq_len=o.seq_len,
                       seed=o.seed, batch_size=max(1, o.batch_size // (o.grad_accum * run.processes.world)),
                       text_field=o.text_field, config=o.data_config, split="validation", progress=False)["loss"]
        state.net.train()
    run.processes.barrier()
    return loss


def save_checkpoint(run: Run, state: TrainingState) -> None:
    """Write the work folder's checkpoint (rank 0, with every process's RNG state); all processes wait."""
    rng_states = run.processes.gather_rng()
    full = full_training_state(state.net, state.optimizer, list(ckpt.trainable(state.net))) if run.o.fsdp else None
    if run.processes.main:
        ckpt.save_checkpoint(run.work, state.net, state.optimizer, state.scheduler, state.stream,
                             asdict(state.progress), rng_states, full)
    state.saved_at = state.progress.step
    run.processes.barrier()


def merged_model(net: nn.Module, o: HealOptions, dtype: str | None = None) -> nn.Module:
    """The trained model as an ordinary transformers model, merged by its method (a 4-bit base into ``dtype``,
    default float32)."""
    method = HEAL_METHODS.get(o.method)
    if method.quantized_base and dtype is not None:
        from ..model.load import DTYPES

        return method.merge(net, o, dtype=DTYPES[dtype])
    return method.merge(net, o)


def finish(run: Run, state: TrainingState, result: dict, base_record: dict, save_adapter: bool,
           merge_dtype: str | None = None) -> nn.Module:
    """Assemble the merged model beside OUT with the settings, log and record; swap it in; drop the work
    folder. Returns the merged model (in eval mode)."""
    adapters = hasattr(state.net, "peft_config")
    if adapters and run.o.target_modules is None:
        result["target_modules"] = sorted(next(iter(state.net.peft_config.values())).target_modules)
    record = {**base_record, "healing": result}
    tmp = temporary_dir_beside(run.out)
    try:
        if save_adapter and adapters:
            state.net.save_pretrained(tmp / "adapter")
        merged = merged_model(state.net, run.o, merge_dtype)
        merged.config.use_cache = True
        merged.save_pretrained(tmp)
        state.tokenizer.save_pretrained(tmp)
        for name in (CONFIG_FILE, LOG_FILE):
            if (run.work / name).is_file():
                shutil.copy2(run.work / name, tmp / name)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        follow_umask(tmp)  # safetensors writes 0600
        replace_dir(tmp, run.out)  # when the run worked in OUT, its checkpoint goes with the old OUT
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run.work != run.out:
        shutil.rmtree(run.work, ignore_errors=True)
    return merged.eval()


def healing_record(run: Run, state: TrainingState, data) -> dict:
    o, p = run.o, state.progress
    adapters = hasattr(state.net, "peft_config")
    recent = p.recent_losses
    return {
        "method": o.method,
        "teacher": o.teacher,
        "kd_weight": o.kd_weight if o.teacher else None,
        "steps": run.steps,
        "tokens": p.tokens,
        "batch_size": o.batch_size,
        "seq_len": o.seq_len,
        "lr": o.lr,
        "schedule": o.schedule,
        "warmup": o.warmup,
        "rank": o.rank if adapters else None,
        "alpha": (o.alpha if o.alpha is not None else o.rank) if adapters else None,
        "dropout": o.dropout if adapters else None,
        "target_modules": o.target_modules,
        "seed": o.seed,
        "dtype": run.dtype,
        "processes": run.processes.world,
        "data": data if isinstance(data, str) else "token ids",
        "val_data": run.val_data,
        "final_train_loss": sum(recent) / len(recent) if recent else None,
        "final_train_loss_note": f"mean over the last {len(recent)} steps",
        "val_loss_before": p.val_before,
        "val_loss_after": p.val_loss,
        "train_seconds": p.elapsed,
    }


# ----------------------------------------------------------------------------------------- helpers


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


def compile_layers(net: nn.Module) -> None:
    """torch.compile each decoder layer in place (one graph per layer, reused by its siblings); the loss,
    head and optimizer stay eager."""
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    for layer in decoder_layout(inner).layers:
        layer.compile()


def _input_record(spec: str) -> dict | None:
    source = Path(spec).expanduser()
    return read_record(source) if source.is_dir() else None


@contextlib.contextmanager
def _reporter(run: Run, state: TrainingState, progress: bool | ProgressHook):
    """A function to report each step's record to: a tqdm bar, the caller's hook, or nothing."""
    if callable(progress):
        yield lambda record: progress({**record, "total_steps": run.steps})
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=run.steps, initial=state.progress.step, unit="step", desc=f"heal ({run.o.method})",
               disable=not progress or not run.processes.main)

    def report(record: dict) -> None:
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        bar.update(1)

    with bar:
        yield report


__all__ = ["Healed", "Progress", "Run", "TrainingState", "finish", "heal", "heal_loaded", "healing_record",
           "merged_model", "resume", "save_checkpoint", "setup", "train", "train_step", "validate"]
