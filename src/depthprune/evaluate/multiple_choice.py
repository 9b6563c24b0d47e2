"""Accuracy on multiple-choice questions scored like lm-evaluation-harness's ``multiple_choice`` tasks.

Each choice is scored by the summed log-likelihood of its tokens after the prompt (joined by one space);
``acc`` picks the highest, ``acc_norm`` the highest per character of the choice, as lm-eval does.
The choices of a question share its prompt, which runs once (the scorer's prefix cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .scoring import ChoiceRequest, choice_loglikelihoods, encode_choices


def multiple_choice_accuracy(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]],
                             labels: Sequence[int], *, batch_size: int = 8, max_length: int | None = None,
                             progress: bool = True, desc: str = "scoring") -> dict:
    """``acc``, ``acc_norm``, the chance level and the scores of each question."""
    encoded = encode_choices(tokenizer, prompts, [[" " + c for c in options] for options in choices])
    requests = [ChoiceRequest(ctx, conts, index) for index, (ctx, conts) in enumerate(encoded)]
    scores = choice_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                                   progress=progress, desc=desc)
    picked = [int(np.argmax(s)) for s in scores]
    picked_norm = [int(np.argmax(np.array(s) / [len(c) for c in options])) for s, options in zip(scores, choices, strict=True)]
    count = len(labels)
    return {
        "acc": sum(p == y for p, y in zip(picked, labels, strict=True)) / count,
        "acc_norm": sum(p == y for p, y in zip(picked_norm, labels, strict=True)) / count,
        "chance": float(np.mean([1 / len(options) for options in choices])),
        "num_examples": count,
        "scores": scores,
        "predictions": picked,
        "predictions_norm": picked_norm,
    }


def example_details(r: dict, labels: Sequence[int]) -> list[dict]:
    """Each question's choice log-likelihoods, its ``acc`` and ``acc_norm`` predictions (choice indices) and answer."""
    return [{"loglikelihoods": s, "prediction": p, "prediction_norm": q, "answer": y}
            for s, p, q, y in zip(r["scores"], r["predictions"], r["predictions_norm"], labels, strict=True)]
