"""Where a healing run's results live, and what a rerun finds there (see the package docstring).

OUT holds either a finished result or the state of an unfinished run, never a mix; a ``--force`` run over
anything else works in the sibling ``OUT.unfinished`` and OUT stays untouched until the new result is
complete. :func:`plan` decides, from what OUT holds, whether this run is finished, resumes or starts,
and where it works. Rank 0 plans under OUT's lock; the other processes follow (:func:`share_plan`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DepthpruneError
from ..model.record import RECORD_FILE, read_record
from ..options import fields_with
from ..outputs import (
    atomic_write_text,
    check_not_input,
    check_output_dir,
    output_lock,
    remove_stale_temporaries,
)
from .checkpoint import CHECKPOINT_DIR
from .options import heal_options_class, option_defaults

CONFIG_FILE = "heal_config.json"
LOG_FILE = "heal_log.jsonl"
WORK_SUFFIX = ".unfinished"  # OUT.unfinished: where a --force run works while OUT keeps the old result


def read_json_object(path: Path, remedy: str) -> dict:
    """The JSON object in ``path`` (a run's settings, a checkpoint's config); anything else is an error ending
    in ``remedy``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DepthpruneError(f"'{path}' is not valid JSON ({exc}): {remedy}") from None
    if not isinstance(value, dict):
        raise DepthpruneError(f"'{path}' does not hold a JSON object: {remedy}")
    return value


def work_folder(out: Path) -> Path:
    return out.with_name(out.name + WORK_SUFFIX)


def check_out(out, inputs: tuple) -> Path:
    """Check where OUT (and its work folder) can be; what OUT holds is judged under its lock. Writes nothing."""
    if not isinstance(out, (str, Path)) or not str(out):
        raise DepthpruneError(f"the output must be a directory path, got {out!r}")
    # Absolute and without '..', so OUT's name and its siblings are well defined.
    out = Path(os.path.abspath(Path(out).expanduser()))
    check_output_dir(out, True, inputs)  # a non-empty OUT may be this run's: judged by plan()
    work = work_folder(out)
    if work.exists() and not work.is_dir():
        raise DepthpruneError(f"'{work}' is a file in the way of the work folder of --out: move it or choose another --out")
    check_not_input(work, inputs, "work folder")
    return out


@dataclass(frozen=True)
class Plan:
    action: str  # "finished" (OUT holds this run's result), "resume" (from work's checkpoint) or "start"
    work: Path  # where the checkpoint and log live while training: OUT, or OUT.unfinished beside it


def _changed(previous: dict, identity: dict) -> list[str]:
    if "tokens" in previous and "train_tokens" not in previous:  # the name of --train-tokens before 0.2
        previous = {("train_tokens" if k == "tokens" else k): v for k, v in previous.items()}
    # An option added since that run was recorded is no change while it is given at its default: the older
    # version trained as that default does.
    previous = {**{k: v for k, v in option_defaults().items() if k not in previous}, **previous}
    resumable = fields_with(heal_options_class(), "resumable")
    return sorted(k for k in set(previous) | set(identity)
                  if k not in resumable and previous.get(k) != identity.get(k))


def plan(out: Path, identity: dict, force: bool, restart: bool) -> Plan:
    """Decide from what OUT holds where this run works and whether it resumes (see the package docstring)."""
    if not out.is_dir() or not any(out.iterdir()):
        return Plan("start", out)
    config = out / CONFIG_FILE
    if not config.is_file():
        if not force:
            raise DepthpruneError(f"output directory '{out}' exists and is not a healing run: choose another --out "
                                  "or pass --force to replace it")
        return _plan_beside(out, identity, restart)
    if not (out / RECORD_FILE).is_file():  # an unfinished run
        if restart or not (out / CHECKPOINT_DIR).exists():  # (without a checkpoint it has nothing to keep)
            return Plan("start", out)
        changed = _changed(read_json_object(config, "pass --restart to discard that unfinished run"), identity)
        if not changed:
            return Plan("resume", out)
        if not force:
            raise DepthpruneError(f"'{out}' holds an unfinished healing run with other settings ({', '.join(changed)}): "
                                  "rerun it with the same options, or pass --restart to discard it and start over")
        return _plan_beside(out, identity, restart)
    if force:
        return _plan_beside(out, identity, restart)
    changed = _changed(read_json_object(config, "pass --force to heal again and replace that result"), identity)
    if changed:
        raise DepthpruneError(f"'{out}' already holds a healed model with other settings ({', '.join(changed)}): "
                              "choose another --out or pass --force to replace it")
    if restart:
        raise DepthpruneError(f"'{out}' holds the finished result of this run and --restart only discards unfinished "
                              "runs: pass --force to heal again and replace it")
    return Plan("finished", out)


def _plan_beside(out: Path, identity: dict, restart: bool) -> Plan:
    # --force over something that is not this unfinished run: OUT stays as it is until the new result
    # replaces it, and the run works in OUT.unfinished (continuing a killed --force run found there).
    work = work_folder(out)
    if work.is_dir() and any(work.iterdir()):
        if not (work / CONFIG_FILE).is_file():
            raise DepthpruneError(f"'{work}' is in the way: a --force run works there and it holds something "
                                  "else; move it or choose another --out")
        if not restart and (work / CHECKPOINT_DIR).exists():
            previous = read_json_object(work / CONFIG_FILE, "pass --restart to discard that unfinished run")
            changed = _changed(previous, identity)
            if changed:
                raise DepthpruneError(f"'{work}' holds an unfinished --force run with other settings "
                                      f"({', '.join(changed)}): rerun that command to finish it, or pass --restart "
                                      "to discard it")
            return Plan("resume", work)
    return Plan("start", work)


def share_plan(mine: Plan | None, out: Path, processes) -> Plan:
    """Rank 0 plans (under the lock); every process follows the same plan."""
    action, beside = processes.broadcast((mine.action, mine.work != out) if mine is not None else None)
    return Plan(action, work_folder(out) if beside else out)


def prepare_work(plan_: Plan, out: Path, identity: dict) -> None:
    """Rank 0, under the lock, once the model is loaded: clear what killed runs left and, when starting,
    drop what a discarded run left and record the settings."""
    remove_stale_temporaries(out)
    for name in (CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE):
        remove_stale_temporaries(plan_.work / name)
    if plan_.action == "start":
        shutil.rmtree(plan_.work / CHECKPOINT_DIR, ignore_errors=True)
        (plan_.work / LOG_FILE).unlink(missing_ok=True)
        plan_.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_.work / CONFIG_FILE, json.dumps(identity, indent=2) + "\n")


def finished_result(out: Path) -> dict:
    """The healing record of OUT's finished result, marked ``already_healed``."""
    record = read_record(out, "pass --force to heal again and replace that result") or {}
    if not isinstance(record.get("healing"), dict):
        raise DepthpruneError(f"'{out / RECORD_FILE}' has no healing record: pass --force to heal again and replace it")
    return {**record["healing"], "already_healed": True}


@contextlib.contextmanager
def holding(out: Path, rank: int) -> Iterator[None]:
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


def append_log(work: Path, record: dict) -> None:
    with (work / LOG_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _logged_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def trim_log(path: Path, step: int) -> None:
    """After a kill the log may run past the checkpoint (those steps are trained again: drop them; all of
    them, step = -1, when no checkpoint was reached) and end in a torn line (drop it too)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [line for line in text.splitlines() if (logged := _logged_step(line)) is not None and logged <= step]
    trimmed = "".join(line + "\n" for line in kept)
    if trimmed != text:
        atomic_write_text(path, trimmed)
