"""Healing one point of a sweep in memory: a copy of the cut trained and merged, resumed from its checkpoint
after a kill, while the sweep's loaded base model waits on the CPU."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import typing
from pathlib import Path

from ..heal import HEAL_METHODS as HEALING
from ..model.load import DTYPES, count_parameters, load_model
from ..model.record import pruning_record, read_record
from .config import SweepConfig
from .cut import point_cut
from .plan import Point, point_dir


@contextlib.contextmanager
def offloaded(model, device: str):
    """While a healed point trains and is evaluated on the GPU, the sweep's loaded base model waits in CPU
    memory (``device`` 'cuda'), and comes back after: the GPU holds one model at a time (see the paper
    config's memory per step). A no-op on CPU, and for 'auto' (a model dispatched over several GPUs by
    accelerate stays where its hooks put it)."""
    if device != "cuda":
        yield model
        return
    home = next(model.parameters()).device
    model.to("cpu")
    free_accelerator_cache()
    try:
        yield model
    finally:
        model.to(home)


def free_accelerator_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def heal_steps(c: SweepConfig, method: str) -> int | str:
    from ..heal import resolve_options

    return getattr(resolve_options(c.heal_preset, **{**c.heal_options, "method": method}), "steps", "?")


def heal_status(work: Path, point: Point, steps) -> typing.Callable[[], str | None]:
    """What the healing's own log says last (step k/N, loss, tokens/s), for the lines said while it runs."""
    import importlib

    heal_module = importlib.import_module("depthprune.heal")  # the attribute `heal` is the function
    healed = point_dir(work, point) / "healed"
    suffix = getattr(heal_module, "WORK_SUFFIX", None)
    log_name = getattr(heal_module, "LOG_FILE", None)

    def status() -> str | None:
        if log_name is None:
            return None
        for folder in [healed.with_name(healed.name + suffix)] * bool(suffix) + [healed]:
            try:
                last = (folder / log_name).read_text(encoding="utf-8").splitlines()[-1]
                record = json.loads(last)
            except (OSError, IndexError, ValueError):
                continue
            parts = [f"step {record.get('step', '?')}/{steps}"]
            if isinstance(record.get("loss"), (int, float)):
                parts.append(f"loss {record['loss']:.4f}")
            if isinstance(record.get("tokens_per_s"), (int, float)):
                parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
            return ", ".join(parts)
        return None

    return status


def healed_line(healing: dict | None) -> str:
    healing = healing or {}
    before, after = healing.get("val_loss_before"), healing.get("val_loss_after")
    loss = f": validation loss {before:.4f} -> {after:.4f}" if isinstance(before, float) and isinstance(after, float) \
        else ""
    return f"healed{loss}"


def heal_point(model, tokenizer, c: SweepConfig, work: Path, point: Point, selection, total: int,
               sequences: list[list[int]] | None = None):
    """Heal the cut in memory (resuming a killed healing from its checkpoint); returns the merged model, the
    healing record and the repair record (None for a cut without repair).

    A repaired point heals the repaired cut (repair, then healing), its map fitted on ``sequences`` on the
    sweep's device (a GPU sweep's base waits on the CPU, :func:`offloaded`: it comes to the GPU for the fit).

    lora, dora and full train and merge into the model they are given: they get a copy of the cut
    (``copy.deepcopy``: memory for the kept layers once more, as much as the saved-and-reloaded cut of
    earlier versions took, without the disk round trip), so the loaded model comes back unchanged for
    the next points. qlora only reads the cut, into a 4-bit copy. The healing is named by the base model
    and the layers removed (in ``heal_config.json``): a rerun recreates the same cut and resumes.

    Called with the base model offloaded to the CPU (:func:`offloaded`): the copy is made there and moved
    to the GPU alone, and qlora's merge writes each layer straight in the sweep's dtype (``merge_dtype``), so
    the GPU never holds the base beside the trainee, nor a float32 copy of the merged model.
    """
    from ..heal import heal_loaded

    healed = point_dir(work, point) / "healed"
    removed = "layers" if point.granularity == "layer" else f"the {point.granularity} of layers"
    model_id = f"{c.model} without {removed} {list(selection.layers)}" + \
        (f", repaired by {point.repair}" if point.repaired else "")
    if _started_elsewhere(healed, model_id):
        shutil.rmtree(healed)
    record = read_record(healed) if healed.is_dir() else None
    if record is not None and "healing" in record:  # healed before the sweep was stopped, not yet evaluated
        healed_model, _ = load_model(str(healed), device=c.device, dtype=c.dtype)
        # Named like the in-memory result of an uninterrupted run, so the recorded evaluation is the same.
        healed_model.config.name_or_path = model.config.name_or_path
        return healed_model, record["healing"], record.get("repair")
    options = {**c.heal_options, "method": point.heal}
    params_before = count_parameters(model)
    fit_on = "cuda" if c.device == "cuda" else None
    with point_cut(model, tokenizer, c, point, selection.layers, sequences, fit_on=fit_on) as (cut, repair):
        record = pruning_record(c.model, total, params_before, cut, selection)
        record.update({"repair": repair} if repair is not None else {})
        trainee = cut if HEALING.get(point.heal).quantized_base else copy.deepcopy(cut).to(_train_device(c, cut))
        result = heal_loaded(trainee, c.heal_data, str(healed), tokenizer=tokenizer, model_id=model_id, record=record,
                             val_data=c.heal_val_data, preset=c.heal_preset, device=c.device, dtype=c.dtype,
                             merge_dtype=c.dtype, progress=True, **options)
    del trainee
    return result.model.to(DTYPES[c.dtype]), result.record, repair


def _train_device(c: SweepConfig, cut):
    """Where a copied cut trains: the GPU for device 'cuda' (the base waits on the CPU meanwhile), else where it is."""
    return "cuda" if c.device == "cuda" else next(cut.parameters()).device


def _started_elsewhere(healed: Path, model_id: str) -> bool:
    """A healing recorded for another model (an older sweep named its input by the path of a saved cut,
    which heal would refuse to resume as 'other settings'): such a healing starts over."""
    from ..heal import CONFIG_FILE

    try:
        started = json.loads((healed / CONFIG_FILE).read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return False
    return started is not None and started != model_id
