"""The paper's evaluation in one call: the registered tasks (MMLU, BoolQ, C4 loss, ...) and any lm-eval task on
one model, as a plain dict.

Results record the model, its layers (and which were removed, for a checkpoint written by
``depthprune prune``), every task setting, data source and count, so runs can be compared later.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path

from ..errors import DepthpruneError
from ..model.check import check_model
from ..model.load import check_length, count_parameters, load_model, num_layers
from ..model.record import read_record
from ..options import convert
from ..outputs import atomic_write_text, check_output_file
from .registry import EVAL_TASKS, eval_options_class

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if tasks is None:
        return []
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in EVAL_TASKS]
    if unknown:
        raise DepthpruneError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(EVAL_TASKS.names())} "
                              "(use --lm-eval for lm-evaluation-harness tasks)")
    return list(dict.fromkeys(names))


def _check_lengths(config, options, chosen: list[str]) -> None:
    if options.max_length is not None:
        check_length(config, options.max_length, "--max-length")
    for task in chosen:
        for flag, length in (EVAL_TASKS.get(task).lengths or (lambda o: []))(options):
            check_length(config, length, flag)


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES


def split_settings(settings: dict) -> tuple[dict, dict]:
    """``evaluate``'s keyword settings as (task name -> data source, evaluation option -> value)."""
    options_class = eval_options_class()
    fields = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(settings) - fields - set(EVAL_TASKS.names()))
    if unknown:
        raise DepthpruneError(f"unknown evaluation setting(s) {', '.join(unknown)}: give a task's data "
                              f"({', '.join(EVAL_TASKS.names())}) or an option ({', '.join(sorted(fields))})")
    sources = {k: v for k, v in settings.items() if k in EVAL_TASKS and v is not None}
    hints = typing.get_type_hints(options_class)
    # Lists may be given as 'a,b' (lm_eval="hellaswag,arc_easy"), as on the command line.
    return sources, {k: convert(v, hints[k], k, "option") if isinstance(v, str) and "list" in str(hints[k]) else v
                     for k, v in settings.items() if k in fields}


def _model_info(spec, model) -> dict:
    info = {"model": spec if isinstance(spec, str) else str(model.config.name_or_path),
            "num_layers": num_layers(model), "parameters": count_parameters(model)}
    if isinstance(spec, str) and Path(spec).expanduser().is_dir():
        record = read_record(Path(spec).expanduser())
        if record is not None:
            info.update(source_model=record.get("source_model"), removed_layers=record.get("removed_layers"),
                        layers_before=record.get("layers_before"), criterion=record.get("criterion"))
    return info


def evaluate(
    model,
    tasks: str | list[str] | None = None,
    *,
    tokenizer=None,
    options=None,
    details: bool = False,
    out: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    progress: bool = True,
    reference=None,
    **settings,
) -> dict:
    """Evaluate ``model`` on ``tasks`` (names of the task registry; default: those given data) and return a dict.

    ``model`` is anything :func:`depthprune.load_model` takes, or a loaded model (then pass ``tokenizer``).
    Each task reads its data from the keyword of its name (``mmlu=DIR``, ``boolq=FILE``, ...: a local path
    or a Hugging Face id). The other keywords are fields of :class:`depthprune.EvalOptions` (the shared ones,
    ``limit`` per task, ``lm_eval``, ..., and each task's own: ``shots``, ``mmlu_limit`` per MMLU subject, ...),
    on top of ``options`` (an ``EvalOptions``).
    With ``out`` the dict is also written there as JSON (atomically). Every input (``out``, options, local
    data files, the model's files, lm-eval) is checked before the model loads; a bad one raises
    :class:`DepthpruneError`.

    ``reference`` (a model as ``model`` takes it, a loaded model sharing ``tokenizer``, or ``{task: [choice
    index per question]}`` as :func:`predictions` gives) adds to each multiple-choice task's result ``agreement``,
    the share of its ``agreement_n`` questions where the model picks the reference's choice (the choice
    ``agreement_choice`` names). The reference runs first, on the same questions with the same options.
    """
    sources, given = split_settings(settings)
    if out is not None:  # first: an unwritable --out must not be found after the whole evaluation
        check_output_file(out, [model if isinstance(model, str) else None,
                                reference if isinstance(reference, str) else None, *sources.values(),
                                given.get("lm_eval_include"), given.get("lm_eval_data")])
    options = dataclasses.replace(options or eval_options_class()(), **given)
    chosen, extra, config = _check_call(model, tasks, sources, options, trust_remote_code)
    compared = _check_reference(reference, chosen, config, trust_remote_code)
    expected, reference_vocab = _reference_before_loading(reference, compared, sources, options, device, dtype,
                                                          trust_remote_code, progress)
    if tokenizer is None and not isinstance(model, str):
        raise DepthpruneError("pass the tokenizer together with an already loaded model")
    spec = model
    if isinstance(model, str):
        model, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if reference_vocab is not None and reference_vocab != len(tokenizer):
        raise DepthpruneError(f"the reference model's tokenizer has {reference_vocab} tokens, the model's "
                              f"{len(tokenizer)}: agreement needs both to read the same questions the same way")
    _check_lengths(model.config, options, chosen)  # hub ids and GGUF files: known only now
    if expected is None and reference is not None:  # a loaded reference model: it shares the model's tokenizer
        if reference.config.vocab_size != model.config.vocab_size:
            raise DepthpruneError(f"the reference model's vocabulary has {reference.config.vocab_size} tokens, the "
                                  f"model's {model.config.vocab_size}: agreement needs the same tokenizer")
        expected = _run_reference(reference, tokenizer, compared, sources, options, progress)
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_model_info(spec, model),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "tasks": {}}
    for task in chosen:
        result["tasks"][task] = _run_task(task, model, tokenizer, sources[task], options, details, progress,
                                          expected.get(task) if expected is not None else None)
    if extra:
        result["lm_eval"] = _run_lm_eval(model, tokenizer, extra, options)
    if reference is not None:
        result["reference"] = {"model": reference if isinstance(reference, str) else
                               "precomputed predictions" if isinstance(reference, dict) else
                               str(reference.config.name_or_path), "tasks": compared}
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def _check_call(model, tasks, sources: dict, options, trust_remote_code: bool):
    """(the tasks, the lm-eval tasks, the model's config or None): every input checked before a model loads."""
    chosen = parse_tasks(tasks) if tasks is not None else [t for t in EVAL_TASKS.names() if t in sources]
    extra = parse_lm_eval(options.lm_eval)
    if not chosen and not extra:
        raise DepthpruneError("nothing to evaluate: give --tasks with their data options, e.g. --tasks mmlu --mmlu DIR")
    for task in chosen:
        if task not in sources:
            raise DepthpruneError(f"task '{task}' needs its data: pass {EVAL_TASKS.get(task).hint()}")
    config = check_model(model, trust_remote_code)
    if config is not None:
        _check_lengths(config, options, chosen)
    for task in chosen:  # local data now, so a damaged file fails before the model loads (hub ids: when it runs)
        if _is_local(sources[task]):
            EVAL_TASKS.get(task).check(sources[task], options)
    if extra:
        from .lm_eval_bridge import check_tasks

        check_tasks(extra, options.lm_eval_include, options.lm_eval_data)
    return chosen, extra, config


def _reference_before_loading(reference, compared: list[str], sources: dict, options, device: str, dtype: str,
                              trust_remote_code: bool, progress: bool):
    """(the reference's choices per task or None, its tokenizer's size or None) for a reference given as choices
    or as a model to load: run before the model loads, so one model is in memory at a time."""
    if isinstance(reference, dict):
        return {task: list(reference[task]) for task in compared}, None
    if isinstance(reference, str):
        ref_model, ref_tokenizer = load_model(reference, device=device, dtype=dtype,
                                              trust_remote_code=trust_remote_code)
        expected = _run_reference(ref_model, ref_tokenizer, compared, sources, options, progress)
        return expected, len(ref_tokenizer)
    return None, None


def _run_task(task: str, model, tokenizer, source: str, options, details: bool, progress: bool,
              expected: list[int] | None) -> dict:
    """One task's result, timed, with its agreement when the reference's choices are ``expected``."""
    start = time.perf_counter()
    r = EVAL_TASKS.get(task).run(model, tokenizer, source, options, details=details or expected is not None,
                                 progress=progress)
    if expected is not None:
        _add_agreement(task, r, expected, keep_details=details)
    r["seconds"] = round(time.perf_counter() - start, 2)
    return r


def _run_lm_eval(model, tokenizer, extra: list[str], options) -> dict:
    from .lm_eval_bridge import lm_eval_summary, run_lm_eval

    start = time.perf_counter()
    output = run_lm_eval(model, tokenizer, extra, include=options.lm_eval_include, data_dir=options.lm_eval_data,
                         limit=options.limit, num_fewshot=options.lm_eval_fewshot, batch_size=options.batch_size,
                         max_length=options.max_length)
    return {"tasks": lm_eval_summary(output), "num_fewshot": options.lm_eval_fewshot, "limit": options.limit,
            "seconds": round(time.perf_counter() - start, 2)}


def _multiple_choice(names) -> list[str]:
    return [t for t in names if t in EVAL_TASKS and EVAL_TASKS.get(t).predictions is not None]


def _check_reference(reference, chosen: list[str], config, trust_remote_code: bool) -> list[str]:
    """The tasks whose answers the reference is compared on; a reference that cannot be compared raises."""
    if reference is None:
        return []
    compared = _multiple_choice(chosen)
    if not compared:
        raise DepthpruneError(f"--reference compares multiple-choice answers, but no chosen task has them: add one of "
                              f"{', '.join(_multiple_choice(EVAL_TASKS.names()))}")
    if isinstance(reference, dict):
        missing = [t for t in compared if t not in reference]
        if missing:
            raise DepthpruneError(f"the reference predictions have no task {', '.join(missing)} "
                                  f"(they hold {', '.join(map(str, reference)) or 'none'})")
        for task in compared:
            values = reference[task]
            if isinstance(values, (str, bytes)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in values):
                raise DepthpruneError(f"the reference predictions of {task} must be a list of choice indices")
    elif isinstance(reference, str):
        ref_config = check_model(reference, trust_remote_code)
        sizes = [getattr(c, "vocab_size", None) for c in (ref_config, config) if c is not None]
        if len(sizes) == 2 and None not in sizes and sizes[0] != sizes[1]:
            raise DepthpruneError(f"the reference model's vocabulary has {sizes[0]} tokens, the model's {sizes[1]}: "
                                  "agreement needs the same tokenizer")
    elif not hasattr(reference, "config"):
        raise DepthpruneError("reference must be a model path or id, a loaded model, or predictions per task, "
                              f"not {type(reference).__name__}")
    return compared


def _run_reference(model, tokenizer, tasks: list[str], sources: dict, options, progress: bool) -> dict[str, list[int]]:
    """The reference model's choice per question of each task, on the same questions with the same options."""
    results = {task: EVAL_TASKS.get(task).run(model, tokenizer, sources[task], options, details=True,
                                              progress=progress) for task in tasks}
    return predictions({"tasks": results})


def predictions(result: dict) -> dict[str, list[int]]:
    """Each multiple-choice task's predicted choice per question, from a result evaluated with ``details=True``
    (the ``reference`` that :func:`evaluate` takes)."""
    out = {}
    for task in _multiple_choice(result.get("tasks", {})):
        task_def, r = EVAL_TASKS.get(task), result["tasks"][task]
        if all(key in r for key in task_def.detail_keys):
            out[task] = task_def.predictions(r)
    return out


def _add_agreement(task: str, r: dict, expected: list[int], keep_details: bool) -> None:
    task_def = EVAL_TASKS.get(task)
    got = task_def.predictions(r)
    if len(got) != len(expected):
        raise DepthpruneError(f"{task}: the reference has {len(expected)} predictions, the model {len(got)} "
                              "questions: give both the same data and options")
    if not keep_details:
        for key in task_def.detail_keys:
            r.pop(key, None)
    r["agreement"] = sum(a == b for a, b in zip(got, expected, strict=True)) / len(got)
    r["agreement_n"] = len(got)
    r["agreement_choice"] = task_def.agreement_choice


def parse_lm_eval(tasks: str | list[str] | None) -> list[str]:
    if tasks is None:
        return []
    names = tasks.split(",") if isinstance(tasks, str) else tasks
    return [t.strip() for t in names if t.strip()]


def summary_rows(result: dict) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric, value, baseline, count) rows for a printed table: each task's own rows, then lm-eval's."""
    rows = []
    for task, r in result.get("tasks", {}).items():
        if task in EVAL_TASKS:
            rows += EVAL_TASKS.get(task).summary(r)
    for task, metrics in result.get("lm_eval", {}).get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric != "num_examples" and "stderr" not in metric and value is not None:
                rows.append((f"lm-eval:{task}", metric, value, None, metrics.get("num_examples")))
    return rows
