"""MMLU (Hendrycks et al. 2021), k-shot, scored like the original code and lm-evaluation-harness.

Data: the original CSV layout (a directory with ``dev/{subject}_dev.csv`` and ``test/{subject}_test.csv``,
headerless rows ``question,A,B,C,D,answer``) or a Hugging Face dataset in ``cais/mmlu``'s schema.

The prompt for a subject is "The following are multiple choice questions (with answers) about
{subject}.\\n\\n", the subject's first k ``dev`` examples each as "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..
\\nAnswer: X\\n\\n", then the test question ending in "Answer:". The prediction is the choice among
" A", " B", " C", " D" with the highest log-likelihood. Questions are stripped of surrounding
whitespace and subjects spelled with spaces, as lm-eval does, so both give the same prompts. A prompt
longer than the model's context drops shots from the front, as the original code does.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ...data import read_text
from ...errors import DepthpruneError
from ...options import option
from ..registry import EVAL_TASKS, EvalTask, agreement_rows

LETTERS = ("A", "B", "C", "D")
CHANCE = 0.25


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int  # 0..3


Splits = tuple[dict[str, list[Question]], dict[str, list[Question]]]  # (test, dev) questions per subject


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_example(q: Question, with_answer: bool) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
    text = q.question.strip() + options + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def prompt_prefix(subject: str, shots: list[Question]) -> str:
    """The part of a prompt shared by all questions of ``subject``: description and worked examples."""
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_example(s, True) for s in shots)


def build_prompt(subject: str, shots: list[Question], question: Question) -> str:
    return prompt_prefix(subject, shots) + format_example(question, False)


def _csv_rows(path: Path) -> list[list[str]]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        return list(reader)
    except csv.Error as exc:
        raise DepthpruneError(f"{path}: row {reader.line_num}: not valid CSV ({exc})") from None


def _read_csv(path: Path, subject: str) -> list[Question]:
    questions = []
    for number, row in enumerate(_csv_rows(path), 1):
        if len(row) != 6:
            raise DepthpruneError(
                f"{path}: row {number} has {len(row)} columns, expected 6 (question,A,B,C,D,answer)"
            )
        answer = row[5].strip()
        if answer not in LETTERS:
            raise DepthpruneError(f"{path}: row {number} has answer {row[5]!r}, expected one of A, B, C, D")
        questions.append(Question(subject, row[0], row[1:5], LETTERS.index(answer)))
    if not questions:
        raise DepthpruneError(f"{path}: no questions in this file; remove it or fill it")
    return questions


def _local_mmlu(root: Path, subjects: list[str] | None) -> Splits:
    test_dir, dev_dir = root / "test", root / "dev"
    for folder in (test_dir, dev_dir):
        if not folder.is_dir():
            raise DepthpruneError(f"MMLU directory '{root}' has no {folder.name}/ folder (expected dev/ and test/ CSVs)")
    available = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
    if not available:
        raise DepthpruneError(f"'{test_dir}' holds no *_test.csv files")
    chosen = _choose(available, subjects, str(test_dir))
    test, dev = {}, {}
    for subject in chosen:
        dev_file = dev_dir / f"{subject}_dev.csv"
        if not dev_file.is_file():
            raise DepthpruneError(f"'{dev_file}' is missing: each test subject needs its dev file for the shots")
        test[subject] = _read_csv(test_dir / f"{subject}_test.csv", subject)
        dev[subject] = _read_csv(dev_file, subject)
    return test, dev


def _choose(available: list[str], subjects: list[str] | None, where: str) -> list[str]:
    if not subjects:
        return available
    unknown = [s for s in subjects if s not in available]
    if unknown:
        raise DepthpruneError(f"unknown MMLU subject(s) {', '.join(unknown)} in {where}; available: {', '.join(available)}")
    return list(dict.fromkeys(subjects))


def _hub_mmlu(dataset_id: str, subjects: list[str] | None) -> Splits:
    import datasets

    def split(name: str) -> dict[str, list[Question]]:
        try:
            rows = datasets.load_dataset(dataset_id, "all", split=name)
        except Exception as exc:
            raise DepthpruneError(f"could not load MMLU split '{name}' of '{dataset_id}' (config 'all'): {exc}") from None
        out: dict[str, list[Question]] = defaultdict(list)
        for number, row in enumerate(rows):
            answer = row["answer"]
            if answer not in range(4) or len(row["choices"]) != 4:
                raise DepthpruneError(f"{dataset_id} {name} row {number}: expected 4 choices and an answer 0-3")
            out[row["subject"]].append(Question(row["subject"], row["question"], list(row["choices"]), answer))
        return out

    test, dev = split("test"), split("dev")
    chosen = _choose(sorted(test), subjects, dataset_id)
    missing = [s for s in chosen if not dev.get(s)]
    if missing:
        raise DepthpruneError(f"{dataset_id}: no dev examples for subject(s) {', '.join(missing)}")
    return {s: test[s] for s in chosen}, {s: dev[s] for s in chosen}


def load_mmlu(source: str, subjects: list[str] | None = None) -> Splits:
    """``(test, dev)`` questions per subject from a CSV directory or a Hugging Face dataset id (cais/mmlu)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DepthpruneError(f"MMLU source '{source}' is a file: pass the directory holding dev/ and test/")
        return _local_mmlu(path, subjects)
    if source.startswith((".", "/", "~")):
        raise DepthpruneError(f"MMLU directory '{source}' not found")
    return _hub_mmlu(source, subjects)


def check_shots(dev: dict[str, list[Question]], shots: int) -> None:
    """Every subject has at least ``shots`` dev examples to show."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise DepthpruneError(f"--shots must be 0 or more, got {shots!r}")
    for subject, examples in dev.items():
        if len(examples) < shots:
            raise DepthpruneError(f"MMLU subject '{subject}' has {len(examples)} dev examples, fewer than {shots} shots")


def _fitting_prompt(subject: str, dev: list[Question], q: Question, shots: int, tokenizer, max_length: int):
    """The prompt with as many of the first ``shots`` dev examples as fit in ``max_length`` tokens, and their count."""
    k = shots
    prompt = build_prompt(subject, dev[:k], q)
    while k > 0 and not _fits(prompt, tokenizer, max_length):
        k -= 1
        prompt = build_prompt(subject, dev[:k], q)
    return prompt, k


def _fits(prompt: str, tokenizer, max_length: int) -> bool:
    # A token covers at least one UTF-8 byte, so short prompts fit without tokenizing; 8 tokens spare
    # cover special tokens and an answer letter that splits in two.
    if len(prompt.encode()) + 8 <= max_length:
        return True
    return len(tokenizer(prompt, add_special_tokens=True)["input_ids"]) + 1 <= max_length


def evaluate_mmlu(
    model,
    tokenizer,
    source: str,
    *,
    shots: int = 5,
    subjects: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    details: bool = False,
    progress: bool = True,
) -> dict:
    """MMLU accuracy: per subject, the mean over subjects (the paper's number) and over questions (lm-eval's).

    ``limit`` keeps the first N test questions of each subject (``--mmlu-limit``). With ``details`` the result lists each
    question's choice log-likelihoods, prediction and answer.
    """
    from ..scoring import ChoiceRequest, choice_loglikelihoods, context_length, encode_choices

    if limit is not None and limit < 1:
        raise DepthpruneError(f"--mmlu-limit must be at least 1, got {limit}")
    test, dev = load_mmlu(source, subjects)
    check_shots(dev, shots)
    max_length = max_length or context_length(model, tokenizer)
    items = [(s, q) for s, qs in test.items() for q in qs[:limit]]
    prompts, used = [], []
    for subject, q in items:
        prompt, k = _fitting_prompt(subject, dev[subject], q, shots, tokenizer, max_length)
        prompts.append(prompt)
        used.append(k)
    encoded = encode_choices(tokenizer, prompts, [[f" {letter}" for letter in LETTERS]] * len(prompts))
    # Questions of one subject with the same number of shots share the prompt prefix: run it once.
    requests = [ChoiceRequest(ctx, conts, (subject, k))
                for (ctx, conts), (subject, _), k in zip(encoded, items, used, strict=True)]
    scores = choice_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                                   progress=progress, desc="mmlu")
    per_subject: dict[str, list[bool]] = defaultdict(list)
    records = []
    for (subject, q), k, logliks in zip(items, used, scores, strict=True):
        prediction = max(range(4), key=lambda i: logliks[i])
        per_subject[subject].append(prediction == q.answer)
        records.append({"subject": subject, "loglikelihoods": logliks, "prediction": LETTERS[prediction],
                        "answer": LETTERS[q.answer], "shots": k})
    subject_acc = {s: sum(v) / len(v) for s, v in per_subject.items()}
    result = {
        "task": "mmlu",
        "accuracy": sum(subject_acc.values()) / len(subject_acc),
        "accuracy_over_questions": sum(r["prediction"] == r["answer"] for r in records) / len(records),
        "chance": CHANCE,
        "subjects": {s: {"accuracy": subject_acc[s], "questions": len(per_subject[s])} for s in subject_acc},
        "num_subjects": len(subject_acc),
        "num_questions": len(records),
        "num_truncated": sum(k < shots for k in used),
        "shots": shots,
        "limit_per_subject": limit,
        "max_length": max_length,
        "data": source,
        "accuracy_note": "'accuracy' is the mean over subjects (the paper's); "
                         "lm-eval's 'mmlu' reports the mean over questions",
    }
    if details:
        result["questions"] = records
    return result


@dataclass
class MMLUOptions:
    """MMLU's own options (the evaluation's options hold them, beside the shared ones)."""

    shots: int = option(5, minimum=0, help="MMLU: worked examples in each prompt")
    subjects: list[str] | None = option(None, help="MMLU: comma-separated subjects (default: all 57)")
    mmlu_limit: int | None = option(None, minimum=1, metavar="N",
                                    help="MMLU: the first N questions of each subject (57 subjects: 57 x N questions; "
                                         "default: all)")


def _check(source: str, options) -> None:
    check_shots(load_mmlu(source, options.subjects)[1], options.shots)


def _run(model, tokenizer, source: str, options, *, details: bool = False, progress: bool = True) -> dict:
    return evaluate_mmlu(model, tokenizer, source, shots=options.shots, subjects=options.subjects,
                         limit=options.mmlu_limit, batch_size=options.batch_size, max_length=options.max_length,
                         details=details, progress=progress)


def _summary(r: dict) -> list:
    return [("mmlu", f"acc, mean over {r['num_subjects']} subjects", r["accuracy"], r["chance"], r["num_questions"]),
            ("mmlu", "acc, mean over questions", r["accuracy_over_questions"], r["chance"], r["num_questions"]),
            *agreement_rows("mmlu", r)]


TASK = EVAL_TASKS.register(EvalTask(
    name="mmlu",
    description="MMLU, k-shot multiple choice over 57 subjects (Hendrycks et al. 2021)",
    title="MMLU (5-shot)",
    flag="--mmlu",
    metavar="DIR_OR_ID",
    data_help="a directory with dev/ and test/ CSVs, or cais/mmlu",
    check=_check,
    run=_run,
    headline="mmlu_acc",
    higher_is_better=True,
    chance=CHANCE,
    flatten=lambda r: {"mmlu_acc": r["accuracy"], "mmlu_chance": r.get("chance"),
                       **({"mmlu_agreement": r["agreement"]} if "agreement" in r else {})},
    summary=_summary,
    options=MMLUOptions,
    order=10,
    predictions=lambda r: [LETTERS.index(q["prediction"]) for q in r["questions"]],
    detail_keys=("questions",),
    agreement_choice="the letter of highest log-likelihood",
))
