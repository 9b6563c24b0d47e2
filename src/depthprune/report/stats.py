"""The statistics of a sweep's points: accuracy with its uncertainty, the collapse rule, the curves per cut
(criterion, and its repair if any) and healing, agreement with the full model, and which layers each
criterion removes.

The question sets of a sweep are small, so every accuracy comes with its uncertainty and a collapse is called
only when the drop is larger than the noise. Nothing here imports torch or matplotlib: the terminal table uses it.
"""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95 % quantile of the normal distribution
# Titles of lm-eval tasks that are not registered tasks (the registered ones carry their own).
LM_EVAL_TITLES = {"arc_challenge": "ARC-Challenge"}


def task_title(task: str) -> str:
    """The report's name of a task: its registry title, else lm-eval's usual name, else the task name."""
    from ..evaluate.registry import EVAL_TASKS

    return EVAL_TASKS.get(task).title if task in EVAL_TASKS else LM_EVAL_TITLES.get(task, task)


# --- uncertainty and collapse ---------------------------------------------------------------------------


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` questions."""
    return math.sqrt(p * (1 - p) / n)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of an accuracy ``p`` on ``n`` questions (95 % by default).

    Unlike p ± z·SE it stays inside [0, 1] and does not shrink to nothing at 0 % or 100 %, which matters
    for cut models that answer every question alike.
    """
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def is_informative(full: float, n: int, baseline: float, sigmas: float = 2.0) -> bool:
    """Whether the full model beats the chance or majority level by more than ``sigmas`` standard errors of
    that level on ``n`` questions; if not, pruning has nothing measurable to lose."""
    return full - baseline > sigmas * standard_error(baseline, n)


def collapse_point(fractions, scores, sizes, full: float, full_size: int, baseline: float,
                   sigmas: float = 2.0) -> float | None:
    """The first fraction whose accuracy is within noise of the baseline (or under it), or below the full
    model's by more than ``sigmas`` combined standard errors; None if no measured fraction is."""
    full_se = standard_error(full, full_size)
    for fraction, score, n in sorted(zip(fractions, scores, sizes, strict=True)):
        near_baseline = score - baseline <= sigmas * standard_error(baseline, n)
        dropped = full - score > sigmas * math.hypot(full_se, standard_error(score, n))
        if near_baseline or dropped:
            return fraction
    return None


def collapse_definition(sigmas: float) -> str:
    """The collapse rule in words, with its threshold: the report's and summary.json's text."""
    return (f"A curve collapses at the first measured fraction whose accuracy is within {sigmas:g} standard errors "
            f"of the chance level (the majority class for BoolQ) or under it, or below the full model's accuracy by "
            f"more than {sigmas:g} combined standard errors (√(SE_full² + SE_cut²), SE = √(p(1−p)/n)). A task on "
            f"which the full model itself is not above that level by {sigmas:g} standard errors is uninformative: "
            f"it has no collapse point. Healed curves are judged only at the fractions that were healed.")


# --- reading the points ---------------------------------------------------------------------------------


def accuracy_tasks(points: list[dict]) -> dict[str, str]:
    """Task -> the metric that is its headline: the registered task's ``headline`` (acc_norm for HellaSwag),
    plain acc otherwise, whichever of ``{task}_acc`` / ``{task}_acc_norm`` the store has (older stores have
    only ``{task}_acc``)."""
    from ..evaluate.registry import EVAL_TASKS

    names = list(dict.fromkeys(k for p in points for k in p["metrics"]))
    tasks: dict[str, str] = {}
    for name in names:
        if not name.endswith(("_acc", "_acc_norm")):
            continue
        task = name.removesuffix("_norm").removesuffix("_acc")
        headline = EVAL_TASKS.get(task).headline if task in EVAL_TASKS else task + "_acc"
        order = [headline, task + "_acc", task + "_acc_norm"]
        tasks.setdefault(task, next(m for m in order if m in names))
    return tasks


def task_record(point: dict, task: str) -> dict:
    """The task's evaluation record of a point: native tasks, or lm-eval's (with or without ``_local``)."""
    evaluation = point["details"].get("evaluation") or {}
    lm_eval = (evaluation.get("lm_eval") or {}).get("tasks", {})
    return evaluation.get("tasks", {}).get(task) or lm_eval.get(task) or lm_eval.get(f"{task}_local") or {}


def sample_size(point: dict, task: str) -> int | None:
    """Questions the task's accuracy was measured on at this point (None if the record does not say)."""
    record = task_record(point, task)
    n = record.get("num_questions", record.get("num_examples"))
    return int(n) if n else None


def baseline(points: list[dict], task: str) -> tuple[float | None, str]:
    """The level a model reaches without knowing anything, and its name: 'majority class' or 'chance' (as the
    task registry says; older records say it by their key)."""
    from ..evaluate.registry import EVAL_TASKS

    declared = EVAL_TASKS.get(task).baseline_kind if task in EVAL_TASKS else None
    for p in points:
        record = task_record(p, task)
        value = p["metrics"].get(f"{task}_chance", record.get("majority_baseline", record.get("chance")))
        if value is not None:
            return value, declared or ("majority class" if "majority_baseline" in record else "chance")
    if task in EVAL_TASKS and EVAL_TASKS.get(task).chance is not None:
        return EVAL_TASKS.get(task).chance, declared
    return None, "chance"


def agreement_tasks(points: list[dict]) -> list[str]:
    """The tasks whose agreement with the full model the points measured (``{task}_agreement``), in store order."""
    names = dict.fromkeys(k for p in points for k, v in p["metrics"].items() if v is not None)
    return [name.removesuffix("_agreement") for name in names if name.endswith("_agreement")]


def agreement_size(point: dict, task: str) -> int | None:
    """Questions the agreement of ``task`` was counted on at this point (None if the record does not say)."""
    n = task_record(point, task).get("agreement_n")
    return int(n) if n else None


def cut_name(point: dict) -> str:
    """What cut a point is: its criterion, 'similarity+linear' when the cut was repaired ('repair' of a point
    or a verdict; points of older stores have none), 'similarity@attention' when it removed attention
    sub-layers ('granularity'; older points cut whole layers): each its own series."""
    repair = point.get("repair") or "none"
    granularity = point.get("granularity") or "layer"
    cut = point["criterion"] if repair == "none" else f"{point['criterion']}+{repair}"
    return cut if granularity == "layer" or point.get("n") == 0 else f"{cut}@{granularity}"


def split_cut(cut: str) -> tuple[str, str]:
    """(criterion, repair) of a :func:`cut_name` (repair 'none' when the cut was not repaired)."""
    criterion, _, repair = cut_granularity(cut)[0].partition("+")
    return criterion, repair or "none"


def cut_granularity(cut: str) -> tuple[str, str]:
    """(the cut without its granularity, the granularity: 'layer', 'attention' or 'mlp') of a :func:`cut_name`."""
    cut, _, granularity = cut.partition("@")
    return cut, granularity or "layer"


PARAMETERS_DEFINITION = ("fraction of parameters removed: 1 − the cut's parameters / the full model's (embeddings and "
                         "LM head included; a removed sub-layer's zeroed weights do not count)")


def parameters_removed(point: dict, full: dict | None) -> float | None:
    """The fraction of the full model's parameters ``point``'s cut removes: its ``params_removed`` (sweeps since
    issue 20), else from the cost's ``parameters`` of it and the full model; None when neither is known."""
    m = point["metrics"]
    if m.get("params_removed") is not None:
        return float(m["params_removed"])
    if point["n"] == 0:
        return 0.0
    base = full["metrics"].get("parameters") if full else None
    return 1.0 - m["parameters"] / base if base and m.get("parameters") else None


def reference(points: list[dict]) -> dict | None:
    """The full model, unhealed: the reference of every curve."""
    return next((p for p in points if p["n"] == 0 and p["heal"] == "none"), None)


def curves(points: list[dict], metric: str) -> dict[tuple[str, str], list[dict]]:
    """(cut, healing) -> its points that have ``metric``, by fraction; the cut is the criterion, or
    'criterion+repair' (:func:`cut_name`). An unhealed curve starts at the full model (nothing removed, nothing
    to heal or repair); a healed one has only the fractions that were healed."""
    full = reference(points)
    found: dict[tuple[str, str], list[dict]] = {}
    for p in sorted(points, key=lambda p: p["fraction"]):
        if p is not full and p["metrics"].get(metric) is not None:
            found.setdefault((cut_name(p), p["heal"]), []).append(p)
    if full is not None and full["metrics"].get(metric) is not None:
        for (_, heal), curve in found.items():
            if heal == "none":
                curve.insert(0, full)
    return dict(sorted(found.items()))


RETAINED_DEFINITION = ("% of the full model retained: the mean, over the accuracy tasks, of the point's headline "
                       "accuracy divided by the full model's (n = 0) on the same task, × 100, as ReplaceMe and "
                       "LLM-Streamline average it; every accuracy task counts, an uninformative one too.")


def retained(point: dict, full: dict | None, tasks: dict[str, str]) -> float | None:
    """The share of the full model's accuracy ``point`` keeps (1.0 = all of it): the mean over ``tasks`` (task
    -> headline metric, :func:`accuracy_tasks`) of point accuracy / full-model accuracy, over the tasks both
    measured (None: no such task, or no full model)."""
    if full is None:
        return None
    ratios = [point["metrics"][m] / full["metrics"][m] for m in tasks.values()
              if point["metrics"].get(m) is not None and full["metrics"].get(m)]
    return sum(ratios) / len(ratios) if ratios else None


def with_retained(points: list[dict]) -> list[dict]:
    """Copies of ``points`` whose metrics add ``retained`` (:func:`retained`; the full model's is 1.0), so that
    the curves and figures read it as any other metric."""
    full, tasks = reference(points), accuracy_tasks(points)
    copies = []
    for p in points:
        share = retained(p, full, tasks)
        copies.append({**p, "metrics": {**p["metrics"], **({"retained": share} if share is not None else {})}})
    return copies


def metric_name(points: list[dict], task: str, metric: str) -> str:
    """'acc' or 'acc_norm'. Older stores keep HellaSwag's acc_norm under ``hellaswag_acc``; its record then
    holds the plain acc as ``accuracy_unnormalized``."""
    if metric.endswith("_acc_norm") or any("accuracy_unnormalized" in task_record(p, task) for p in points):
        return "acc_norm"
    return "acc"


def curve_label(cut: str, heal: str) -> str:
    """'similarity, not healed', 'similarity, lora-healed', repaired 'similarity + linear, lora-healed', or at a
    sub-layer granularity 'similarity, attention, not healed': a curve's name in legends and tables (``cut``: a
    :func:`cut_name`)."""
    cut, granularity = cut_granularity(cut)
    kind = "" if granularity == "layer" else f", {granularity}"
    return f"{cut.replace('+', ' + ')}{kind}, {'not healed' if heal == 'none' else heal + '-healed'}"


def collapse_points(points: list[dict], sigmas: float = 2.0) -> list[dict]:
    """The verdict on every (task, cut, healing) curve: 'collapse' at a fraction, 'no collapse' within the
    measured fractions, 'uninformative' task, or 'unknown sample size'. A verdict names the criterion and the
    repair ('none' when not repaired) of its cut."""
    full = reference(points)
    found = []
    for task, metric in accuracy_tasks(points).items():
        if full is None or full["metrics"].get(metric) is None:
            continue
        level, kind = baseline(points, task)
        accuracy, n_full = full["metrics"][metric], sample_size(full, task)
        for (cut, heal), curve in curves(points, metric).items():
            judged = [p for p in curve if p is not full]
            sizes = [sample_size(p, task) for p in judged]
            criterion, repair = split_cut(cut)
            verdict = {"task": task, "metric": metric, "criterion": criterion, "repair": repair, "heal": heal,
                       "granularity": cut_granularity(cut)[1],
                       "full_accuracy": accuracy,
                       "num_questions": n_full, "baseline": level, "baseline_kind": kind,
                       "fractions": [p["fraction"] for p in judged], "collapse_fraction": None}
            if n_full is None or None in sizes or level is None:
                verdict["status"] = "unknown sample size" if level is not None else "unknown chance level"
            elif not is_informative(accuracy, n_full, level, sigmas):
                verdict["status"] = "uninformative"
            else:
                at = collapse_point(verdict["fractions"], [p["metrics"][metric] for p in judged], sizes, accuracy,
                                    n_full, level, sigmas)
                verdict.update(status="no collapse" if at is None else "collapse", collapse_fraction=at)
            found.append(verdict)
    return found


# --- comparing criteria ---------------------------------------------------------------------------------


def selections(points: list[dict]) -> dict[str, dict[int, list[int]]]:
    """criterion -> n -> the layers it removes (the unhealed points; healing does not change the cut); a
    sub-layer cut is 'criterion@attention' -> n -> the layers whose attention it removes (:func:`cut_granularity`)."""
    from ..select import CRITERIA

    found: dict[str, dict[int, list[int]]] = {}
    for p in sorted(points, key=lambda p: p["n"]):
        if p["n"] > 0:  # the unpruned point removes nothing
            granularity = p.get("granularity") or "layer"
            name = p["criterion"] if granularity == "layer" else f"{p['criterion']}@{granularity}"
            found.setdefault(name, {}).setdefault(p["n"], sorted(p["removed_layers"]))
    names = CRITERIA.names()  # the registry's order, as the curves' colours; whole layers before sub-layers

    def order(item):
        criterion, granularity = cut_granularity(item[0])
        return granularity != "layer", granularity, names.index(criterion) if criterion in names else len(names)

    return dict(sorted(found.items(), key=order))


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two sets of layers (1 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(points: list[dict]) -> list[dict]:
    """The Jaccard overlap of every pair of criteria at every n both measured (pairs of one granularity: the layers
    of an attention cut and of a layer cut are not the same thing removed)."""
    chosen = selections(points)
    names = list(chosen)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if cut_granularity(a)[1] != cut_granularity(b)[1]:
                continue
            shared = sorted(set(chosen[a]) & set(chosen[b]))
            rows.append({"criteria": [a, b], "by_n": {n: round(jaccard(chosen[a][n], chosen[b][n]), 4) for n in shared}})
    return rows
