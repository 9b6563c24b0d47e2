"""HellaSwag, 0-shot, in lm-eval's ``hellaswag`` format: pick the likeliest ending of an activity description.

The context is "{activity_label}: {ctx_a} {Ctx_b}" and the endings are cleaned as lm-eval's
``preprocess`` does (WikiHow "[title]" markers and bracketed notes removed). Its result names each measure
as ARC's does: ``accuracy`` is lm-eval's ``acc``, ``accuracy_norm`` its ``acc_norm`` (log-likelihood per
character), the usual figure and the headline. Results written before issue 18 held acc_norm as ``accuracy``
and acc as ``accuracy_unnormalized``; :func:`current_result` reads them.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...data import read_jsonl
from ...errors import DepthpruneError
from ..registry import EVAL_TASKS, EvalTask, accuracy_flatten, agreement_rows


def preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def build_example(row: dict, where: str) -> tuple[str, list[str], int]:
    try:
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        prompt = preprocess(row["activity_label"] + ": " + context)
        endings = [preprocess(e) for e in row["endings"]]
        label = int(row["label"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DepthpruneError(f"{where}: not a HellaSwag record ({type(exc).__name__}: {exc})") from None
    if not 0 <= label < len(endings):
        raise DepthpruneError(f"{where}: label {label} out of range for {len(endings)} endings")
    return prompt, endings, label


def load_hellaswag(source: str, split: str = "validation") -> list[tuple[str, list[str], int]]:
    """Examples from a local JSONL file (the original schema) or a Hugging Face id (``Rowan/hellaswag``)."""
    path = Path(source).expanduser()
    if path.is_file():
        examples = [build_example(row, f"{path}:{number}") for number, row in read_jsonl(path)]
    elif source.startswith((".", "/", "~")) or path.suffix:
        raise DepthpruneError(f"HellaSwag file '{source}' not found")
    else:
        import datasets

        try:
            rows = datasets.load_dataset(source, split=split)
        except Exception as exc:
            raise DepthpruneError(f"could not load HellaSwag from '{source}' ({split}): {exc}") from None
        examples = [build_example(dict(r), f"{source} row {n}") for n, r in enumerate(rows)]
    if not examples:
        raise DepthpruneError(f"HellaSwag source '{source}' holds no examples")
    return examples


def evaluate_hellaswag(model, tokenizer, source: str, *, limit: int | None = None, batch_size: int = 8,
                       max_length: int | None = None, details: bool = False, progress: bool = True) -> dict:
    """0-shot HellaSwag on the first ``limit`` examples: ``accuracy`` is lm-eval's ``acc``, ``accuracy_norm`` its
    ``acc_norm``."""
    from ..multiple_choice import example_details, multiple_choice_accuracy

    examples = load_hellaswag(source)[:limit]
    r = multiple_choice_accuracy(model, tokenizer, [p for p, _, _ in examples], [e for _, e, _ in examples],
                                 [y for *_, y in examples], batch_size=batch_size, max_length=max_length,
                                 progress=progress, desc="hellaswag")
    result = {"task": "hellaswag", "accuracy": r["acc"], "accuracy_norm": r["acc_norm"], "chance": r["chance"],
              "num_examples": r["num_examples"], "limit": limit, "shots": 0, "data": source}
    if details:
        result["examples"] = example_details(r, [y for *_, y in examples])
    return result


def _run(model, tokenizer, source: str, options, *, details: bool = False, progress: bool = True) -> dict:
    return evaluate_hellaswag(model, tokenizer, source, limit=options.limit, batch_size=options.batch_size,
                              max_length=options.max_length, details=details, progress=progress)


def current_result(r: dict) -> dict:
    """A result as written today; one of a store from before issue 18 (which the cost phase flattens again)
    held acc_norm as ``accuracy`` and acc as ``accuracy_unnormalized``."""
    if "accuracy_unnormalized" not in r:
        return r
    kept = {k: v for k, v in r.items() if k not in ("accuracy_unnormalized", "accuracy_note")}
    return {**kept, "accuracy": r["accuracy_unnormalized"], "accuracy_norm": r["accuracy"]}


_flatten_current = accuracy_flatten("hellaswag")


def _flatten(r: dict) -> dict:
    return _flatten_current(current_result(r))


def _summary(r: dict) -> list:
    return [("hellaswag", "acc_norm", r["accuracy_norm"], r["chance"], r["num_examples"]),
            ("hellaswag", "acc", r["accuracy"], r["chance"], r["num_examples"]),
            *agreement_rows("hellaswag", r)]


TASK = EVAL_TASKS.register(EvalTask(
    name="hellaswag",
    description="HellaSwag, 0-shot choice of the likeliest ending (Zellers et al. 2019)",
    title="HellaSwag",
    flag="--hellaswag",
    metavar="FILE_OR_ID",
    data_help="a .jsonl file of the original schema, or Rowan/hellaswag",
    check=lambda source, options: load_hellaswag(source),
    run=_run,
    headline="hellaswag_acc_norm",
    higher_is_better=True,
    chance=0.25,
    flatten=_flatten,
    summary=_summary,
    predictions=lambda r: [e["prediction_norm"] for e in r["examples"]],
    detail_keys=("examples",),
    agreement_choice="acc_norm's choice (highest log-likelihood per character), as the headline hellaswag_acc_norm",
    order=50,
))
