"""A point's numbers as one flat mapping: what the results table stores and the report plots."""

from __future__ import annotations

from ..evaluate.registry import EVAL_TASKS

# Chance level of lm-eval multiple-choice tasks that are not registered tasks (4 choices each).
LM_EVAL_CHANCE = {"arc_challenge": 0.25}


def flatten_metrics(evaluation: dict, cost: dict | None, healing: dict | None) -> dict:
    """One flat name -> number mapping per point: what the results table and the report plot.

    Each registered task flattens its own result (``EvalTask.flatten``). Accuracy names say which measure
    they are, whichever route computed them: ``{task}_acc`` is the plain accuracy, ``{task}_acc_norm`` the
    length-normalized one (lm-eval's ``acc_norm``; ARC and HellaSwag).
    """
    m: dict = {}
    for task, r in evaluation.get("tasks", {}).items():
        if task in EVAL_TASKS:
            m.update(EVAL_TASKS.get(task).flatten(r))
    for task, r in evaluation.get("lm_eval", {}).get("tasks", {}).items():
        name = task.removesuffix("_local")
        found = {f"{name}_{k}": r[k] for k in ("acc", "acc_norm") if r.get(k) is not None}
        if found:
            m.update(found)
            m[f"{name}_chance"] = EVAL_TASKS.get(name).chance if name in EVAL_TASKS else LM_EVAL_CHANCE.get(name)
    if cost:
        from ..measure.cost import COST_METRICS

        m.update({k: cost[k] for k in COST_METRICS})
    if healing:
        m.update(heal_train_loss=healing.get("final_train_loss"), heal_val_loss_before=healing.get("val_loss_before"),
                 heal_val_loss=healing.get("val_loss_after"))
    return m

