"""The ``arc_easy`` task: ARC-Easy (AI2 Reasoning Challenge), 0-shot, in lm-eval's ``arc_easy`` format.

Prompt "Question: {question}\\nAnswer:", each choice's text scored after it. Data: the original
ARC-V1-Feb2018 JSONL (``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``, as in
``../shared/data/arc``) or the Hugging Face ``allenai/ai2_arc`` dataset. The readers of the ARC format serve
ARC-Challenge too (config ARC-Challenge; the bundled lm-eval task ``arc_challenge_local``).
"""

from __future__ import annotations

from pathlib import Path

from ...data import read_jsonl
from ...errors import DepthpruneError
from ..registry import EVAL_TASKS, EvalTask, accuracy_flatten, agreement_rows

Example = tuple[str, list[str], int]  # question, choices, index of the answer


def build_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _example(question: str, texts: list[str], labels: list[str], answer: str, where: str) -> Example:
    if answer not in labels:
        raise DepthpruneError(f"{where}: answer {answer!r} is not one of the choice labels {labels}")
    if len(texts) < 2:
        raise DepthpruneError(f"{where}: fewer than 2 choices")
    return question, texts, labels.index(answer)


def read_arc_jsonl(path: Path) -> list[dict]:
    """The original ARC JSONL, as rows of the Hugging Face ``allenai/ai2_arc`` schema."""
    rows = []
    for number, record in read_jsonl(path):
        try:
            choices = record["question"]["choices"]
            rows.append({"id": record.get("id", str(number)), "question": record["question"]["stem"],
                         "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                         "answerKey": record["answerKey"], "where": f"{path}:{number}"})
        except (KeyError, TypeError) as exc:
            raise DepthpruneError(f"{path}:{number}: not an ARC record ({type(exc).__name__}: {exc})") from None
    return rows


def load_arc(source: str, config: str = "ARC-Easy", split: str = "test") -> list[Example]:
    """ARC questions from a local JSONL file or a Hugging Face id (``config``/``split`` apply to hub ids)."""
    path = Path(source).expanduser()
    if path.is_file():
        rows = read_arc_jsonl(path)
    elif source.startswith((".", "/", "~")) or path.suffix:
        raise DepthpruneError(f"ARC file '{source}' not found")
    else:
        import datasets

        try:
            rows = [{**r, "where": f"{source} row {n}"}
                    for n, r in enumerate(datasets.load_dataset(source, config, split=split))]
        except Exception as exc:
            raise DepthpruneError(f"could not load ARC from '{source}' ({config}, {split}): {exc}") from None
    examples = [_example(r["question"], list(r["choices"]["text"]), list(r["choices"]["label"]), r["answerKey"],
                         r["where"]) for r in rows]
    if not examples:
        raise DepthpruneError(f"ARC source '{source}' holds no questions")
    return examples


def evaluate_arc_easy(model, tokenizer, source: str, *, limit: int | None = None, batch_size: int = 8,
                      max_length: int | None = None, details: bool = False, progress: bool = True) -> dict:
    """0-shot ARC-Easy accuracy on the first ``limit`` questions: ``accuracy`` is lm-eval's ``acc``."""
    from ..multiple_choice import example_details, multiple_choice_accuracy

    examples = load_arc(source)[:limit]
    r = multiple_choice_accuracy(model, tokenizer, [build_prompt(q) for q, _, _ in examples],
                                 [c for _, c, _ in examples], [y for *_, y in examples], batch_size=batch_size,
                                 max_length=max_length, progress=progress, desc="arc_easy")
    result = {"task": "arc_easy", "accuracy": r["acc"], "accuracy_norm": r["acc_norm"], "chance": r["chance"],
              "num_examples": r["num_examples"], "limit": limit, "shots": 0, "data": source,
              "accuracy_note": "'accuracy' is lm-eval's acc, 'accuracy_norm' its acc_norm (per-character)"}
    if details:
        result["examples"] = example_details(r, [y for *_, y in examples])
    return result


def _run(model, tokenizer, source: str, options, *, details: bool = False, progress: bool = True) -> dict:
    return evaluate_arc_easy(model, tokenizer, source, limit=options.limit, batch_size=options.batch_size,
                             max_length=options.max_length, details=details, progress=progress)


def _summary(r: dict) -> list:
    return [("arc_easy", "acc", r["accuracy"], r["chance"], r["num_examples"]),
            ("arc_easy", "acc_norm", r["accuracy_norm"], r["chance"], r["num_examples"]),
            *agreement_rows("arc_easy", r)]


TASK = EVAL_TASKS.register(EvalTask(
    name="arc_easy",
    description="ARC-Easy, 0-shot grade-school science questions (Clark et al. 2018)",
    title="ARC-Easy",
    flag="--arc-easy",
    metavar="FILE_OR_ID",
    data_help="ARC-Easy-Test.jsonl of the original release, or allenai/ai2_arc",
    check=lambda source, options: load_arc(source),
    run=_run,
    headline="arc_easy_acc",
    higher_is_better=True,
    chance=0.25,
    flatten=accuracy_flatten("arc_easy"),
    summary=_summary,
    predictions=lambda r: [e["prediction"] for e in r["examples"]],
    detail_keys=("examples",),
    agreement_choice="acc's choice (highest log-likelihood), as the headline arc_easy_acc",
    order=40,
))
