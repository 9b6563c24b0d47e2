"""The paper's evaluation in one call: MMLU, BoolQ, C4 loss (and any lm-eval task) on one model, as a plain dict.

Results record the model, its layers (and which were removed, for a checkpoint written by
``depthprune prune``), every task setting, data source and count, so runs can be compared later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..api import check_model
from ..data import check_int, load_texts
from ..errors import DepthpruneError
from ..models import check_length, count_parameters, load_model, num_layers
from ..outputs import atomic_write_text, check_output_file
from ..surgery import read_record

TASKS = ("mmlu", "boolq", "c4", "arc_easy", "hellaswag")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
DATA_HINTS = {
    "mmlu": "--mmlu DIR_OR_ID (a directory with dev/ and test/ CSVs, or cais/mmlu)",
    "boolq": "--boolq FILE_OR_ID (a .jsonl file, or google/boolq / super_glue/boolq)",
    "arc_easy": "--arc-easy FILE_OR_ID (ARC-Easy-Test.jsonl of the original release, or allenai/ai2_arc)",
    "hellaswag": "--hellaswag FILE_OR_ID (a .jsonl file of the original schema, or Rowan/hellaswag)",
    "c4": "--c4 FILE_OR_ID (a .jsonl file of documents, or allenai/c4)",
}


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if tasks is None:
        return []
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise DepthpruneError(f"unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)} "
                              "(use --lm-eval for lm-evaluation-harness tasks)")
    return list(dict.fromkeys(names))


def _check_options(shots, limit, boolq_limit, batch_size, max_length, c4_sequences, c4_seq_len,
                   lm_eval_fewshot) -> None:
    check_int(shots, "--shots", 0)
    check_int(batch_size, "--batch-size", 1)
    check_int(c4_sequences, "--c4-sequences", 1)
    check_int(c4_seq_len, "--c4-seq-len", 2)
    for name, value, minimum in (("--limit", limit, 1), ("--boolq-limit", boolq_limit, 1),
                                 ("--max-length", max_length, 2), ("--lm-eval-fewshot", lm_eval_fewshot, 0)):
        if value is not None:
            check_int(value, name, minimum)


def _check_lengths(config, max_length: int | None, c4_seq_len: int | None) -> None:
    if max_length is not None:
        check_length(config, max_length, "--max-length")
    if c4_seq_len is not None:
        check_length(config, c4_seq_len, "--c4-seq-len")


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES


def _check_data(task: str, source: str, subjects: list[str] | None, shots: int, c4_config: str | None,
                c4_split: str) -> None:
    """Read a local data source now, so a damaged file fails before the model loads (hub ids: when the task runs)."""
    if not _is_local(source):
        return
    from .arc import load_arc
    from .boolq import load_boolq
    from .hellaswag import load_hellaswag
    from .mmlu import check_shots, load_mmlu

    if task == "mmlu":
        check_shots(load_mmlu(source, subjects)[1], shots)
    elif task == "boolq":
        load_boolq(source)
    elif task == "arc_easy":
        load_arc(source)
    elif task == "hellaswag":
        load_hellaswag(source)
    else:
        load_texts(source, None, config=c4_config, split=c4_split)


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
    mmlu: str | None = None,
    boolq: str | None = None,
    c4: str | None = None,
    arc_easy: str | None = None,
    hellaswag: str | None = None,
    shots: int = 5,
    subjects: list[str] | None = None,
    limit: int | None = None,
    boolq_limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    c4_sequences: int = 64,
    c4_seq_len: int = 512,
    c4_config: str | None = None,
    c4_split: str = "validation",
    seed: int = 0,
    lm_eval: str | list[str] | None = None,
    lm_eval_include: str | None = None,
    lm_eval_data: str | None = None,
    lm_eval_fewshot: int | None = None,
    details: bool = False,
    out: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` on ``tasks`` ('mmlu', 'boolq', 'c4'; default: those given a data source) and return a dict.

    ``model`` is anything :func:`depthprune.load_model` takes, or a loaded model (then pass ``tokenizer``).
    Each task reads its data from its own option (``mmlu``, ``boolq``, ``c4``): a local path or a Hugging
    Face id. ``limit`` caps MMLU questions per subject, BoolQ examples (unless ``boolq_limit``) and lm-eval
    examples per task.
    ``lm_eval`` names lm-evaluation-harness tasks to run as well. With ``out`` the dict is also written
    there as JSON (atomically). Every input (``out``, options, local data files, the model's files, lm-eval)
    is checked before the model loads; a bad one raises :class:`DepthpruneError`.
    """
    sources = {"mmlu": mmlu, "boolq": boolq, "c4": c4, "arc_easy": arc_easy, "hellaswag": hellaswag}
    if out is not None:  # first: an unwritable --out must not be found after the whole evaluation
        check_output_file(out, [model if isinstance(model, str) else None, *sources.values(), lm_eval_include,
                                lm_eval_data])
    chosen = parse_tasks(tasks) if tasks is not None else [t for t in TASKS if sources[t] is not None]
    extra = parse_lm_eval(lm_eval)
    if not chosen and not extra:
        raise DepthpruneError("nothing to evaluate: give --tasks with their data options, e.g. --tasks mmlu --mmlu DIR")
    for task in chosen:
        if sources[task] is None:
            raise DepthpruneError(f"task '{task}' needs its data: pass {DATA_HINTS[task]}")
    _check_options(shots, limit, boolq_limit, batch_size, max_length, c4_sequences, c4_seq_len, lm_eval_fewshot)
    scored_len = c4_seq_len if "c4" in chosen else None
    config = check_model(model, trust_remote_code)
    if config is not None:
        _check_lengths(config, max_length, scored_len)
    c4_config = c4_config if c4_config is not None else ("en" if c4 == "allenai/c4" else None)
    for task in chosen:
        _check_data(task, sources[task], subjects, shots, c4_config, c4_split)
    if extra:
        from .lm_eval_bridge import check_tasks

        check_tasks(extra, lm_eval_include, lm_eval_data)
    spec = model
    if isinstance(model, str):
        model, tokenizer = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    elif tokenizer is None:
        raise DepthpruneError("pass the tokenizer together with an already loaded model")
    _check_lengths(model.config, max_length, scored_len)  # hub ids and GGUF files: known only now

    from .arc import evaluate_arc
    from .boolq import evaluate_boolq
    from .c4 import c4_loss
    from .hellaswag import evaluate_hellaswag
    from .mmlu import evaluate_mmlu

    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **_model_info(spec, model),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "tasks": {}}
    for task in chosen:
        start = time.perf_counter()
        if task == "mmlu":
            r = evaluate_mmlu(model, tokenizer, mmlu, shots=shots, subjects=subjects, limit=limit,
                              batch_size=batch_size, max_length=max_length, details=details, progress=progress)
        elif task == "boolq":
            r = evaluate_boolq(model, tokenizer, boolq, limit=boolq_limit or limit, batch_size=batch_size,
                               max_length=max_length, details=details, progress=progress)
        elif task == "arc_easy":
            r = evaluate_arc(model, tokenizer, arc_easy, limit=limit, batch_size=batch_size, max_length=max_length,
                             progress=progress)
        elif task == "hellaswag":
            r = evaluate_hellaswag(model, tokenizer, hellaswag, limit=limit, batch_size=batch_size,
                                   max_length=max_length, progress=progress)
        else:
            r = c4_loss(model, tokenizer, c4, num_sequences=c4_sequences, seq_len=c4_seq_len, seed=seed,
                        batch_size=batch_size, config=c4_config, split=c4_split, progress=progress)
        r["seconds"] = round(time.perf_counter() - start, 2)
        result["tasks"][task] = r
    if extra:
        from .lm_eval_bridge import lm_eval_summary, run_lm_eval

        start = time.perf_counter()
        output = run_lm_eval(model, tokenizer, extra, include=lm_eval_include, data_dir=lm_eval_data, limit=limit,
                             num_fewshot=lm_eval_fewshot, batch_size=batch_size, max_length=max_length)
        result["lm_eval"] = {"tasks": lm_eval_summary(output), "num_fewshot": lm_eval_fewshot, "limit": limit,
                             "seconds": round(time.perf_counter() - start, 2)}
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def parse_lm_eval(tasks: str | list[str] | None) -> list[str]:
    if tasks is None:
        return []
    names = tasks.split(",") if isinstance(tasks, str) else tasks
    return [t.strip() for t in names if t.strip()]


def summary_rows(result: dict) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric, value, baseline, count) rows for a printed table."""
    rows = []
    tasks = result.get("tasks", {})
    if "mmlu" in tasks:
        m = tasks["mmlu"]
        rows.append(("mmlu", f"acc, mean over {m['num_subjects']} subjects", m["accuracy"], m["chance"], m["num_questions"]))
        rows.append(("mmlu", "acc, mean over questions", m["accuracy_over_questions"], m["chance"], m["num_questions"]))
    if "boolq" in tasks:
        b = tasks["boolq"]
        rows.append(("boolq", "acc", b["accuracy"], b["majority_baseline"], b["num_examples"]))
    if "arc_easy" in tasks:
        a = tasks["arc_easy"]
        rows.append(("arc_easy", "acc", a["accuracy"], a["chance"], a["num_examples"]))
        rows.append(("arc_easy", "acc_norm", a["accuracy_norm"], a["chance"], a["num_examples"]))
    if "hellaswag" in tasks:
        h = tasks["hellaswag"]
        rows.append(("hellaswag", "acc_norm", h["accuracy"], h["chance"], h["num_examples"]))
        rows.append(("hellaswag", "acc", h["accuracy_unnormalized"], h["chance"], h["num_examples"]))
    if "c4" in tasks:
        c = tasks["c4"]
        rows.append(("c4", "loss (nats/token)", c["loss"], None, c["num_tokens_scored"]))
        rows.append(("c4", "loss / log(vocab)", c["loss_over_log_vocab"], 1.0, c["num_tokens_scored"]))
    for task, metrics in result.get("lm_eval", {}).get("tasks", {}).items():
        for metric, value in metrics.items():
            if metric != "num_examples" and "stderr" not in metric and value is not None:
                rows.append((f"lm-eval:{task}", metric, value, None, metrics.get("num_examples")))
    return rows
