"""The healing recipe: short steps over a typed training state, in the style of torchtune's recipes.

:func:`heal_loaded` reads as the run does: check the inputs, plan where the results live (under OUT's
lock, ``outputs.py``), :func:`~.state.setup` the model and its training state, resume from a checkpoint,
:func:`~.train.train` (a loop of steps, validations and checkpoints) and :func:`~.result.finish` (merge,
save and swap the result into place). Each step takes the run's fixed facts (:class:`~.state.Run`) and
the state it works on (:class:`~.state.TrainingState`), both in ``state.py``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import DepthpruneError
from ..model.load import load_model, quiet_bitsandbytes
from ..model.record import read_record
from .distributed import check_fsdp, gathered, joined, world_size
from .inputs import check_call, check_inputs, loaded_dtype, loaded_identity, model_identity
from .methods import HEAL_METHODS
from .options import resolve_options, total_steps
from .outputs import (
    LOG_FILE,
    Plan,
    check_out,
    finished_result,
    holding,
    plan,
    prepare_work,
    share_plan,
    trim_log,
)
from .result import finish, healing_record
from .state import Healed, ProgressHook, Run, TrainingState, resume, setup
from .train import train


def heal(model, data, out, **kwargs) -> dict:
    """Heal ``model`` by fine-tuning on ``data`` and save the merged checkpoint to ``out``; returns the
    healing record written to ``depthprune.json`` (see :func:`heal_loaded` for the arguments)."""
    return heal_loaded(model, data, out, load_finished=False, **kwargs).record


def heal_loaded(model, data, out: str | Path, *, tokenizer=None, model_id: str | None = None,
                record: dict | None = None, val_data: str | None = None, preset: str | None = None,
                device: str = "cpu", dtype: str | None = None, save_adapter: bool = False, force: bool = False,
                restart: bool = False, stop_after: int | None = None, trust_remote_code: bool = False,
                progress: bool | ProgressHook = True, load_finished: bool = True, merge_dtype: str | None = None,
                **options) -> Healed:
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
    dtype, model_id, record = _checked_model(model, tokenizer, record, given_dtype, dtype, model_id)
    if val_data is None and isinstance(data, str) and not Path(data).expanduser().exists():
        val_data = data  # a hub dataset: its validation split
    steps = total_steps(o)
    documents, identity = check_inputs(model_id, data, val_data, o, steps, dtype)
    out = check_out(out, (None if in_memory else model, data if isinstance(data, str) else None, val_data, o.teacher))
    with joined(device) as processes, holding(out, processes.rank):
        where = share_plan(plan(out, identity, force, restart) if processes.main else None, out, processes)
        if where.action == "finished":
            result = finished_result(out)
            return Healed(result, *(load_model(str(out), device, dtype) if load_finished else (None, None)))
        run = Run(o, HEAL_METHODS.get(o.method), steps, out, where.work, val_data, processes, device, dtype, stop_after)
        state = setup(run, model, tokenizer, documents, trust_remote_code)
        _begin(run, state, where, identity)
        if not train(run, state, progress):
            return Healed({"stopped_at_step": state.progress.step, "steps": steps}, None)
        result = healing_record(run, state, data)
        merged = _end(run, state, result, record or {"source_model": model_id}, save_adapter, merge_dtype)
    return Healed(result, merged, state.tokenizer)


def _checked_model(model, tokenizer, record, given_dtype: str | None, dtype: str,
                   model_id: str | None) -> tuple[str, str, dict | None]:
    """Check the model and what comes with it; returns the dtype to train in, the model's identity (what a
    rerun must share) and its ``depthprune.json``."""
    if not isinstance(model, nn.Module):
        return dtype, model_identity(model, "model"), _input_record(model)
    if tokenizer is None:
        raise DepthpruneError("a model given in memory needs its tokenizer: heal(model, ..., tokenizer=...)")
    if record is not None and not isinstance(record, dict):
        raise DepthpruneError(f"record must be a dict (the model's depthprune.json), got {record!r}")
    return loaded_dtype(model, given_dtype), model_id or loaded_identity(model), record


def _input_record(spec: str) -> dict | None:
    """The ``depthprune.json`` of a model given as a checkpoint folder (None for any other model)."""
    source = Path(spec).expanduser()
    return read_record(source) if source.is_dir() else None


def _begin(run: Run, state: TrainingState, where: Plan, identity: dict) -> None:
    """Make the work folder ready (rank 0), resume from its checkpoint, and drop the log lines past it."""
    if run.processes.main:
        prepare_work(where, run.out, identity)
    run.processes.barrier()
    if where.action == "resume":
        resume(run, state)
    if run.processes.main:
        trim_log(run.work / LOG_FILE, -1 if state.saved_at is None else state.saved_at)


def _end(run: Run, state: TrainingState, result: dict, base_record: dict, save_adapter: bool,
         merge_dtype: str | None) -> nn.Module | None:
    """Merge and save the result (rank 0, which returns the merged model); all processes wait for it."""
    if run.o.fsdp:  # every process takes part in gathering the shards; rank 0 merges and saves the whole model
        state.net = gathered(state.net, state.skeleton, run.processes)
    merged = finish(run, state, result, base_record, save_adapter, merge_dtype) if run.processes.main else None
    run.processes.barrier()
    return merged
