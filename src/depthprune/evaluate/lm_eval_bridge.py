"""Any lm-evaluation-harness task (hellaswag, arc_easy, ...) on an in-memory model, pruned or healed.

lm-eval's ``HFLM`` wraps the loaded model and tokenizer as they are, so nothing is saved or reloaded.
Tasks fetch their data as lm-eval defines it; ``lm_eval_tasks/`` next to this module adds tasks that
read local copies instead (``arc_easy_local``, ``arc_challenge_local``: ARC-Easy and ARC-Challenge through
lm-evaluation-harness, ``data_dir`` / DEPTHPRUNE_DATA),
and ``include`` adds a directory of the user's own task YAMLs. Needs ``pip install 'depthprune[lm-eval]'``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from ..errors import DepthpruneError

BUNDLED_TASKS = Path(__file__).parent / "lm_eval_tasks"


MISSING = "--lm-eval needs lm-evaluation-harness, which is not installed: pip install 'depthprune[lm-eval]'"


def task_manager(include: str | Path | None = None, data_dir: str | Path | None = None):
    """lm-eval's TaskManager with the bundled local tasks, ``include`` and ``data_dir`` for the local loaders."""
    try:
        import lm_eval  # noqa: F401  (checked here, not only when first indexed: the manager below is cached)
    except ImportError:
        raise DepthpruneError(MISSING) from None
    if include is not None and not Path(include).is_dir():
        raise DepthpruneError(f"--lm-eval-include '{include}' is not a directory of task YAML files")
    return _task_manager(None if include is None else str(include),
                         None if data_dir is None else str(Path(data_dir).expanduser()))


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None, data_dir: str | None):
    # Indexing lm-eval's thousands of task YAMLs takes seconds: do it once per process (a sweep
    # evaluates many models in one process).
    from lm_eval.tasks import TaskManager

    paths = [str(BUNDLED_TASKS)] + ([include] if include is not None else [])
    return TaskManager(include_path=paths, metadata={"data_dir": data_dir} if data_dir is not None else {})


def check_tasks(tasks: list[str], include: str | Path | None = None, data_dir: str | Path | None = None):
    """The task manager, once lm-eval is known to be installed and every task name to exist (before any model loads)."""
    manager = task_manager(include, data_dir)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DepthpruneError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm-eval ls tasks`, or add "
                              "--lm-eval-include DIR with your own task YAMLs")
    return manager


def run_lm_eval(model, tokenizer, tasks: list[str], *, include: str | Path | None = None,
                data_dir: str | Path | None = None, limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 8, max_length: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's own ``simple_evaluate`` output for ``tasks`` on the loaded ``model`` (samples if ``log_samples``)."""
    manager = check_tasks(tasks, include, data_dir)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=log_samples)


def lm_eval_summary(output: dict) -> dict:
    """The metrics of each task (and group) from ``run_lm_eval``'s output, as plain JSON numbers."""
    summary = {}
    for task, metrics in output["results"].items():
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            row[name] = None if isinstance(value, float) and math.isnan(value) else value
        row["num_examples"] = output.get("n-samples", {}).get(task, {}).get("effective")
        summary[task] = row
    return summary
