"""Our MMLU (5-shot) and BoolQ (0-shot) against lm-evaluation-harness 0.4.13 on the same model and data.

lm-eval runs its own ``mmlu`` template (``tasks/mmlu/default/_default_template_yaml``: prompt, description,
" A".." D" choices, first-n dev shots) and its own ``boolq`` task config, only re-pointed at local copies
of the data: the subjects' CSVs (parsed by depthprune, written as JSONL in cais/mmlu's schema) and
BoolQ's dev.jsonl (labels as 0/1, as lm-eval expects). Both sides load the model once and score the same
questions; the script prints each side's time, the ratio, how often the predictions agree, the accuracies
and the largest log-likelihood difference.

    python benchmarks/eval_speed.py                       # a few subjects and a BoolQ slice: minutes on a CPU
    python benchmarks/eval_speed.py --subjects all --limit 0 --boolq-limit 0   # everything
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from depthprune import load_model
from depthprune.evaluate.tasks.boolq import evaluate_boolq, load_boolq
from depthprune.evaluate.tasks.mmlu import LETTERS, build_prompt, evaluate_mmlu, format_subject, load_mmlu

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
DEFAULT_DATA = Path(os.environ.get("DEPTHPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


class Timer:
    """Wall-clock and CPU seconds of this process (all threads). On a machine shared with other jobs the
    CPU seconds are the steadier measure of the work done."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def mmlu_tasks(root: Path, test: dict, dev: dict) -> list[str]:
    """lm-eval task YAMLs, one per subject, that include lm-eval's own MMLU template and read local JSONL."""
    names = []
    for subject in test:
        files = {}
        for split, questions in (("test", test[subject]), ("dev", dev[subject])):
            path = root / f"{subject}_{split}.jsonl"
            path.write_text("".join(json.dumps({"question": q.question, "subject": subject, "choices": q.choices,
                                                "answer": q.answer}) + "\n" for q in questions))
            files[split] = str(path)
        name = f"mmlu_local_{subject}"
        config = {
            "include": str(LM_EVAL_TASKS / "mmlu" / "default" / "_default_template_yaml"),
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            "description": f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n",
        }
        (root / f"{name}.yaml").write_text(json.dumps(config))  # JSON is valid YAML
        names.append(name)
    return names


def boolq_task(root: Path, examples: list) -> str:
    """lm-eval's boolq task config, reading dev.jsonl (labels 0/1) instead of aps/super_glue."""
    path = root / "boolq_dev.jsonl"
    path.write_text("".join(json.dumps({"passage": p, "question": q, "label": y}) + "\n" for p, q, y in examples))
    config = {
        "include": str(LM_EVAL_TASKS / "super_glue" / "boolq" / "default.yaml"),
        "task": "boolq_local",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(path)}},
        "training_split": None,
    }
    (root / "boolq_local.yaml").write_text(json.dumps(config))
    return "boolq_local"


def lm_eval_run(model, tokenizer, root: Path, tasks: list[str], limit: int | None, shots: int | None, batch_size: int):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(root))
    with Timer() as timer:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=shots,
                                      log_samples=True, bootstrap_iters=0)
    return out, timer


def predictions(samples: list[dict]) -> dict[int, tuple[int, list[float], str]]:
    """doc_id -> (predicted choice, choice log-likelihoods, prompt) from lm-eval's logged samples."""
    out = {}
    for s in samples:
        logliks = [float(r[0]) for r in s["filtered_resps"]]
        out[s["doc_id"]] = (max(range(len(logliks)), key=logliks.__getitem__), logliks, s["arguments"][0][0])
    return out


def compare(label: str, ours: list[tuple], theirs: list[tuple], ours_t: Timer, theirs_t: Timer) -> None:
    """ours/theirs: (prediction, loglikelihoods, gold) per question, in the same order."""
    n = len(ours)
    agree = sum(a[0] == b[0] for a, b in zip(ours, theirs, strict=True))
    acc_ours = sum(a[0] == a[2] for a in ours) / n
    acc_theirs = sum(b[0] == b[2] for b in theirs) / n
    diff = max(abs(x - y) for a, b in zip(ours, theirs, strict=True) for x, y in zip(a[1], b[1], strict=True))
    print(f"\n{label}: {n} questions")
    print(f"  {'':<22}{'depthprune':>12}{'lm-eval':>12}")
    print(f"  {'wall seconds':<22}{ours_t.wall:>12.1f}{theirs_t.wall:>12.1f}")
    print(f"  {'CPU seconds':<22}{ours_t.cpu:>12.1f}{theirs_t.cpu:>12.1f}")
    print(f"  {'accuracy':<22}{acc_ours:>12.4f}{acc_theirs:>12.4f}")
    print(f"  speed-up: {theirs_t.wall / ours_t.wall:.2f}x wall, {theirs_t.cpu / ours_t.cpu:.2f}x CPU   "
          f"same prediction: {agree}/{n} ({100 * agree / n:.2f}%)   "
          f"accuracy gap: {100 * abs(acc_ours - acc_theirs):.2f} points   max |loglik diff|: {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data directory (mmlu/, boolq/)")
    parser.add_argument("--subjects", default="abstract_algebra,high_school_biology,marketing",
                        help="comma-separated MMLU subjects, or 'all'")
    parser.add_argument("--limit", type=int, default=20, help="test questions per subject (0: all)")
    parser.add_argument("--boolq-limit", type=int, default=64, help="BoolQ examples (0: all; -1: skip BoolQ)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (default 1: steady timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    subjects = None if args.subjects == "all" else args.subjects.split(",")
    limit = args.limit or None
    test, dev = load_mmlu(str(Path(args.data) / "mmlu"), subjects)
    print(f"model {args.model}, {len(test)} MMLU subjects x {limit or 'all'} questions, {args.shots}-shot, "
          f"batch size {args.batch_size}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with Timer() as ours_t:
            ours = evaluate_mmlu(model, tokenizer, str(Path(args.data) / "mmlu"), shots=args.shots,
                                 subjects=list(test), limit=limit, batch_size=args.batch_size, details=True)
        names = mmlu_tasks(root, test, dev)
        out, theirs_t = lm_eval_run(model, tokenizer, root, names, limit, args.shots, args.batch_size)
        ours_rows, theirs_rows, same_prompt = [], [], 0
        records = iter(ours["questions"])
        for subject, name in zip(test, names, strict=True):
            theirs = predictions(out["samples"][name])
            for i, q in enumerate(test[subject][:limit]):
                r = next(records)
                ours_rows.append((LETTERS.index(r["prediction"]), r["loglikelihoods"], q.answer))
                pred, logliks, prompt = theirs[i]
                theirs_rows.append((pred, logliks, q.answer))
                same_prompt += prompt == build_prompt(subject, dev[subject][: r["shots"]], q)
        compare(f"MMLU {args.shots}-shot", ours_rows, theirs_rows, ours_t, theirs_t)
        print(f"  identical prompt text: {same_prompt}/{len(ours_rows)}   "
              f"mean over subjects (ours): {ours['accuracy']:.4f}   lm-eval's {len(names)}-subject mean over questions: "
              f"{sum(out['results'][n]['acc,none'] * len(out['samples'][n]) for n in names) / len(ours_rows):.4f}")

        if args.boolq_limit >= 0:
            source = str(Path(args.data) / "boolq" / "dev.jsonl")
            blimit = args.boolq_limit or None
            with Timer() as ours_t:
                ours = evaluate_boolq(model, tokenizer, source, limit=blimit, batch_size=args.batch_size, details=True)
            examples = load_boolq(source)
            task = boolq_task(root, examples)
            out, theirs_t = lm_eval_run(model, tokenizer, root, [task], blimit, 0, args.batch_size)
            theirs = predictions(out["samples"][task])
            ours_rows = [(int(r["prediction"] == "yes"), r["loglikelihoods"], y)
                         for r, (*_, y) in zip(ours["examples"], examples, strict=False)]
            theirs_rows = [(theirs[i][0], theirs[i][1], y) for i, (*_, y) in enumerate(examples[: len(ours_rows)])]
            compare("BoolQ 0-shot", ours_rows, theirs_rows, ours_t, theirs_t)


if __name__ == "__main__":
    main()
