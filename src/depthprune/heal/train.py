"""The training loop: :func:`train` runs :func:`train_step` to the last step, with :func:`validate` every
``eval_every`` steps and :func:`save_checkpoint` every ``save_every``, and reports each step."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict

import torch

from ..errors import DepthpruneError
from ..model.load import check_length
from ..model.loss import sample_sequences, sequence_losses
from . import checkpoint as ckpt
from .distributed import full_training_state
from .loss import compute_loss, input_device
from .outputs import append_log
from .state import ProgressHook, Run, TrainingState


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
    """The C4-style loss (mean nats per token) on ``val_sequences`` packed sequences of the validation data
    (rank 0 scores; None without validation data)."""
    if run.val_data is None:
        return None
    loss = None
    if run.processes.main or run.o.fsdp:  # a sharded forward needs every process (each computes the same loss)
        o = run.o
        state.net.eval()
        check_length(state.net.config, o.seq_len, "--seq-len")
        sequences = sample_sequences(state.tokenizer, run.val_data, o.val_sequences, o.seq_len, o.seed,
                                     o.text_field, o.data_config, "validation")
        total, count = sequence_losses(state.net, sequences,
                                       max(1, o.batch_size // (o.grad_accum * run.processes.world)), progress=False)
        loss = total / count
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
