"""BoolQ (Clark et al. 2019), 0-shot, in lm-evaluation-harness's format.

The prompt is "{passage}\\nQuestion: {question}?\\nAnswer:" and the prediction is whichever of " no" and
" yes" has the higher log-likelihood. Data: a local .jsonl/.json file (SuperGLUE's ``label`` as bool,
0/1 or "true"/"false", or the original ``answer`` bool) or a Hugging Face dataset id (google/boolq,
super_glue/boolq, aps/super_glue with config boolq), split validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...data import read_json, read_jsonl
from ...errors import DepthpruneError
from ...options import option
from ..registry import EVAL_TASKS, EvalTask, accuracy_flatten, agreement_rows

CHOICES = (" no", " yes")


def build_prompt(passage: str, question: str) -> str:
    return f"{passage}\nQuestion: {question}?\nAnswer:"


def _label(value, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise DepthpruneError(f"{where}: label {value!r} is not a yes/no answer (true/false, 1/0)")


def _example(row, where: str) -> tuple[str, str, int]:
    if not isinstance(row, dict):
        raise DepthpruneError(f"{where}: expected a JSON object with passage, question and label")
    missing = [k for k in ("passage", "question") if not isinstance(row.get(k), str)]
    if missing:
        raise DepthpruneError(f"{where}: missing text field(s) {', '.join(missing)}")
    key = "label" if "label" in row else "answer" if "answer" in row else None
    if key is None:
        raise DepthpruneError(f"{where}: no 'label' or 'answer' field")
    return row["passage"], row["question"], _label(row[key], where)


def load_boolq(source: str) -> list[tuple[str, str, int]]:
    """``(passage, question, label)`` triples, label 1 for yes; from a local file or a Hugging Face id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".json":
            rows = read_json(path)
            if not isinstance(rows, list):
                raise DepthpruneError(f"{path}: expected a JSON list of examples")
            examples = [_example(row, f"{path}: example {n}") for n, row in enumerate(rows, 1)]
        else:
            examples = [_example(row, f"{path}:{number}") for number, row in read_jsonl(path)]
    elif path.exists() or source.startswith((".", "/", "~")):
        raise DepthpruneError(f"BoolQ source '{source}' is not a file: pass a .jsonl file or a Hugging Face dataset id")
    else:
        examples = _hub_boolq(source)
    if not examples:
        raise DepthpruneError(f"BoolQ source '{source}' holds no examples")
    return examples


def _hub_boolq(dataset_id: str) -> list[tuple[str, str, int]]:
    import datasets

    config = "boolq" if "super_glue" in dataset_id else None
    try:
        rows = datasets.load_dataset(dataset_id, config, split="validation")
    except Exception as exc:
        raise DepthpruneError(f"could not load BoolQ from '{dataset_id}' (split validation): {exc}") from None
    return [_example(dict(row), f"{dataset_id} validation row {n}") for n, row in enumerate(rows)]


def evaluate_boolq(
    model,
    tokenizer,
    source: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    details: bool = False,
    progress: bool = True,
) -> dict:
    """0-shot BoolQ accuracy on the first ``limit`` examples (all if None), with the majority-class baseline."""
    from ..scoring import ChoiceRequest, choice_loglikelihoods, encode_choices

    if limit is not None and limit < 1:
        raise DepthpruneError(f"--limit must be at least 1, got {limit}")
    examples = load_boolq(source)[:limit]
    prompts = [build_prompt(passage, question) for passage, question, _ in examples]
    encoded = encode_choices(tokenizer, prompts, [CHOICES] * len(prompts))
    # Some passages come with several questions: their prompts share the passage, which then runs once.
    requests = [ChoiceRequest(ctx, conts, passage)
                for (ctx, conts), (passage, _, _) in zip(encoded, examples, strict=True)]
    scores = choice_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                                   progress=progress, desc="boolq")
    predictions = [int(s[1] > s[0]) for s in scores]
    labels = [label for *_, label in examples]
    yes = sum(labels) / len(labels)
    result = {
        "task": "boolq",
        "accuracy": sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels),
        "majority_baseline": max(yes, 1 - yes),
        "num_examples": len(labels),
        "limit": limit,
        "shots": 0,
        "data": source,
    }
    if details:
        result["examples"] = [{"loglikelihoods": s, "prediction": "yes" if p else "no", "answer": "yes" if y else "no"}
                              for s, p, y in zip(scores, predictions, labels, strict=True)]
    return result


@dataclass
class BoolQOptions:
    """BoolQ's own option (the evaluation's options hold it, beside the shared ``limit``)."""

    boolq_limit: int | None = option(None, minimum=1, metavar="N", help="BoolQ: the first N examples (default: "
                                                                         "--limit)")


def _run(model, tokenizer, source: str, options, *, details: bool = False, progress: bool = True) -> dict:
    return evaluate_boolq(model, tokenizer, source, limit=options.boolq_limit or options.limit,
                          batch_size=options.batch_size, max_length=options.max_length, details=details,
                          progress=progress)


TASK = EVAL_TASKS.register(EvalTask(
    name="boolq",
    description="BoolQ, 0-shot yes/no questions on a passage (Clark et al. 2019)",
    title="BoolQ (0-shot)",
    flag="--boolq",
    metavar="FILE_OR_ID",
    data_help="a .jsonl file, or google/boolq / super_glue/boolq",
    check=lambda source, options: load_boolq(source),
    run=_run,
    headline="boolq_acc",
    higher_is_better=True,
    chance=None,  # the majority class of the examples
    baseline_kind="majority class",
    flatten=accuracy_flatten("boolq", chance_key="majority_baseline"),
    summary=lambda r: [("boolq", "acc", r["accuracy"], r["majority_baseline"], r["num_examples"]),
                       *agreement_rows("boolq", r)],
    options=BoolQOptions,
    order=20,
    predictions=lambda r: [int(e["prediction"] == "yes") for e in r["examples"]],
    detail_keys=("examples",),
    agreement_choice="no/yes, the likelier",
))
