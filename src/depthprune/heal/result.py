"""The end of a healing run: the healing record, the trained model merged by its method, and the finished
result assembled beside OUT and swapped into place."""

from __future__ import annotations

import shutil

from torch import nn

from ..model.record import write_record
from ..outputs import follow_umask, replace_dir, temporary_dir_beside
from .methods import HEAL_METHODS
from .options import HealOptions
from .outputs import CONFIG_FILE, LOG_FILE
from .state import Run, TrainingState


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
        write_record(tmp, record)
        follow_umask(tmp)  # safetensors writes 0600
        replace_dir(tmp, run.out)  # when the run worked in OUT, its checkpoint goes with the old OUT
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if run.work != run.out:
        shutil.rmtree(run.work, ignore_errors=True)
    return merged.eval()


def healing_record(run: Run, state: TrainingState, data) -> dict:
    """What ``depthprune.json``'s ``healing`` record says about the run: its settings, data and losses (and what
    trained, from a method that says: ``HealMethod.describe``)."""
    o, p = run.o, state.progress
    adapters = hasattr(state.net, "peft_config")
    recent = p.recent_losses
    trained = {"trained": run.method.describe(state.net, o)} if run.method.describe is not None else {}
    return {
        "method": o.method,
        **trained,
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
