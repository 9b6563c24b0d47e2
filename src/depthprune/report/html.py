"""Figures and the HTML report: accuracy with its uncertainty, collapse points, C4 loss, the heatmap, the
optimal block, and measured cost.

Every figure is a PNG of its own; ``write_report`` embeds them and the full results table (as CSV too) in
one self-contained HTML file. The question sets of a sweep are small, so every accuracy is shown with its
uncertainty and a collapse is called only when the drop is larger than the noise.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import DepthpruneError
from ..measure.cost import linear_fit
from ..measure.distances import AngularDistances, load_distances
from ..outputs import atomic_write_bytes, atomic_write_text
from ..sweep.store import load_points, table, to_csv

Z95 = 1.959964  # two-sided 95 % quantile of the normal distribution
MIN_R2 = 0.9  # below this the linear cost model explains too little of the timings to draw it as "ideal"
# Criteria get colours and markers in registry order, so any number of them can be told apart.
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan")
MARKERS = ("o", "s", "D", "v", "^", "P", "X", "<", ">")
# Titles of lm-eval tasks that are not registered tasks (the registered ones carry their own).
LM_EVAL_TITLES = {"arc_challenge": "ARC-Challenge"}


def criterion_style(criterion: str) -> tuple[str, str]:
    """(colour, marker) of a criterion's curves: by its place in the registry; the full model is a black star."""
    from ..select import CRITERIA

    if criterion == "full":
        return "black", "*"
    names = CRITERIA.names()
    if criterion not in names:  # a criterion of an older store, or of a plug-in not loaded now
        return "tab:gray", "^"
    i = names.index(criterion)
    return COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]


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
    return (f"A curve collapses at the first measured fraction whose accuracy is within {sigmas:g} standard errors "
            f"of the chance level (the majority class for BoolQ) or under it, or below the full model's accuracy by "
            f"more than {sigmas:g} combined standard errors (√(SE_full² + SE_cut²), SE = √(p(1−p)/n)). A task on "
            f"which the full model itself is not above that level by {sigmas:g} standard errors is uninformative: "
            f"it has no collapse point. Healed curves are judged only at the fractions that were healed.")


# --- reading the store ----------------------------------------------------------------------------------


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


def _record(point: dict, task: str) -> dict:
    """The task's evaluation record of a point: native tasks, or lm-eval's (with or without ``_local``)."""
    evaluation = point["details"].get("evaluation") or {}
    lm_eval = (evaluation.get("lm_eval") or {}).get("tasks", {})
    return evaluation.get("tasks", {}).get(task) or lm_eval.get(task) or lm_eval.get(f"{task}_local") or {}


def sample_size(point: dict, task: str) -> int | None:
    """Questions the task's accuracy was measured on at this point (None if the record does not say)."""
    record = _record(point, task)
    n = record.get("num_questions", record.get("num_examples"))
    return int(n) if n else None


def baseline(points: list[dict], task: str) -> tuple[float | None, str]:
    """The level a model reaches without knowing anything, and its name: 'majority class' or 'chance' (as the
    task registry says; older records say it by their key)."""
    from ..evaluate.registry import EVAL_TASKS

    declared = EVAL_TASKS.get(task).baseline_kind if task in EVAL_TASKS else None
    for p in points:
        record = _record(p, task)
        value = p["metrics"].get(f"{task}_chance", record.get("majority_baseline", record.get("chance")))
        if value is not None:
            return value, declared or ("majority class" if "majority_baseline" in record else "chance")
    if task in EVAL_TASKS and EVAL_TASKS.get(task).chance is not None:
        return EVAL_TASKS.get(task).chance, declared
    return None, "chance"


def _reference(points: list[dict]) -> dict | None:
    """The full model, unhealed: the reference of every curve."""
    return next((p for p in points if p["n"] == 0 and p["heal"] == "none"), None)


def _curves(points: list[dict], metric: str) -> dict[tuple[str, str], list[dict]]:
    """(criterion, healing) -> its points that have ``metric``, by fraction. An unhealed curve starts at the
    full model (nothing removed, nothing to heal); a healed one has only the fractions that were healed."""
    full = _reference(points)
    curves: dict[tuple[str, str], list[dict]] = {}
    for p in sorted(points, key=lambda p: p["fraction"]):
        if p is not full and p["metrics"].get(metric) is not None:
            curves.setdefault((p["criterion"], p["heal"]), []).append(p)
    if full is not None and full["metrics"].get(metric) is not None:
        for (_, heal), curve in curves.items():
            if heal == "none":
                curve.insert(0, full)
    return dict(sorted(curves.items()))


def _metric_name(points: list[dict], task: str, metric: str) -> str:
    """'acc' or 'acc_norm'. Older stores keep HellaSwag's acc_norm under ``hellaswag_acc``; its record then
    holds the plain acc as ``accuracy_unnormalized``."""
    if metric.endswith("_acc_norm") or any("accuracy_unnormalized" in _record(p, task) for p in points):
        return "acc_norm"
    return "acc"


def _curve_label(criterion: str, heal: str) -> str:
    return f"{criterion}, {'not healed' if heal == 'none' else heal + '-healed'}"


def collapse_points(points: list[dict], sigmas: float = 2.0) -> list[dict]:
    """The verdict on every (task, criterion, healing) curve: 'collapse' at a fraction, 'no collapse' within
    the measured fractions, 'uninformative' task, or 'unknown sample size'."""
    full = _reference(points)
    found = []
    for task, metric in accuracy_tasks(points).items():
        if full is None or full["metrics"].get(metric) is None:
            continue
        level, kind = baseline(points, task)
        accuracy, n_full = full["metrics"][metric], sample_size(full, task)
        for (criterion, heal), curve in _curves(points, metric).items():
            judged = [p for p in curve if p is not full]
            sizes = [sample_size(p, task) for p in judged]
            verdict = {"task": task, "metric": metric, "criterion": criterion, "heal": heal, "full_accuracy": accuracy,
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


# --- figures --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # A bare Figure, not pyplot: no global figure registry to close it in, no GUI backend to choose.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _save(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_heatmap(distances: AngularDistances, path: str | Path, title: str | None = None,
                 selections: dict[str, dict[int, list[int]]] | None = None) -> Path:
    """Block size n (rows) against starting layer ℓ (columns), colour = D[n][ℓ], with ℓ*(n) marked.

    ``selections`` (criterion -> n -> removed layers): each criterion's removed layers are drawn on row n
    as its own markers, one per removed layer, so a non-contiguous cut shows every layer it removes (a
    contiguous block ℓ..ℓ+n-1 is a run of markers starting at its ℓ)."""
    L = distances.num_layers
    grid = np.full((L, L), np.nan)  # row n-1, column ℓ; blocks running past the last layer stay blank
    for n in range(1, L + 1):
        grid[n - 1, : L - n + 1] = distances.block(n)
    best = [distances.best(n)[0] for n in range(1, L + 1)]

    fig = _figure(6.4, 5.2)
    ax = fig.subplots()
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(-0.5, L - 0.5, 0.5, L + 0.5))
    ax.plot(best, np.arange(1, L + 1), linestyle="none", marker="o", markersize=3.5, markerfacecolor="white",
            markeredgecolor="black", markeredgewidth=0.6, label=r"$\ell^*(n)$ = argmin$_\ell$ d")
    selections = {c: by_n for c, by_n in (selections or {}).items() if by_n}
    for i, (criterion, by_n) in enumerate(selections.items()):
        color, marker = criterion_style(criterion)
        offset = (i - (len(selections) - 1) / 2) * min(0.12, 0.8 / max(1, len(selections)))
        xs = [layer for n in sorted(by_n) for layer in by_n[n]]
        ys = [n + offset for n in sorted(by_n) for _ in by_n[n]]
        ax.plot(xs, ys, linestyle="none", marker=marker, markersize=3, color=color, markeredgecolor="black",
                markeredgewidth=0.3, label=f"{criterion}: removed layers")
    fig.colorbar(image, ax=ax, label=r"angular distance $d(x^{(\ell)}, x^{(\ell+n)})$")
    ax.set_xlabel(r"first layer of the block, $\ell$ (0-based)")
    ax.set_ylabel("block size $n$ (layers)")
    model = distances.meta.get("model", "")
    ax.set_title(title or f"{model}: {distances.num_samples} samples, {'last token' if distances.tokens == 'last' else 'all tokens'}", fontsize=10)
    ax.legend(loc="upper right", fontsize=7 if selections else 8, framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


# --- comparing criteria ---------------------------------------------------------------------------------


def selections(points: list[dict]) -> dict[str, dict[int, list[int]]]:
    """criterion -> n -> the layers it removes (the unhealed points; healing does not change the cut)."""
    from ..select import CRITERIA

    found: dict[str, dict[int, list[int]]] = {}
    for p in sorted(points, key=lambda p: p["n"]):
        if p["n"] > 0 and p["criterion"] != "full":
            found.setdefault(p["criterion"], {}).setdefault(p["n"], sorted(p["removed_layers"]))
    names = CRITERIA.names()  # the registry's order, as the curves' colours
    return dict(sorted(found.items(), key=lambda item: names.index(item[0]) if item[0] in names else len(names)))


def jaccard(a, b) -> float:
    """|A ∩ B| / |A ∪ B| of two sets of layers (1 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(points: list[dict]) -> list[dict]:
    """The Jaccard overlap of every pair of criteria at every n both measured."""
    chosen = selections(points)
    names = list(chosen)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(chosen[a]) & set(chosen[b]))
            rows.append({"criteria": [a, b], "by_n": {n: round(jaccard(chosen[a][n], chosen[b][n]), 4) for n in shared}})
    return rows


def plot_selections(points: list[dict], path: str | Path, total_layers: int | None = None) -> Path | None:
    """One panel per criterion: the layers it removes (columns) at each n of the sweep (rows)."""
    chosen = selections(points)
    if not chosen:
        return None
    total = total_layers or max(1 + max(layer for by_n in chosen.values() for ls in by_n.values() for layer in ls), 1)
    sizes = sorted({n for by_n in chosen.values() for n in by_n})
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    fig = _figure(4.0 * cols, 0.45 * len(sizes) * rows + 1.3 * rows + 0.4)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (criterion, by_n) in zip(axes, chosen.items(), strict=False):
        color, _ = criterion_style(criterion)
        grid = np.zeros((len(sizes), total))
        for r, n in enumerate(sizes):
            grid[r, by_n.get(n, [])] = 1 if n in by_n else np.nan
        from matplotlib.colors import ListedColormap

        ax.imshow(grid, aspect="auto", cmap=ListedColormap(["#f2f2f2", color]), vmin=0, vmax=1,
                  interpolation="nearest", extent=(-0.5, total - 0.5, len(sizes) - 0.5, -0.5))
        ax.set_yticks(range(len(sizes)), [str(n) for n in sizes])
        ax.set_xticks(range(0, total, max(1, total // 10)))
        ax.set_xticks(np.arange(-0.5, total, 1), minor=True)
        ax.grid(which="minor", axis="x", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
        ax.set_title(criterion, fontsize=9, color=color)
        ax.set_xlabel("layer (0-based)", fontsize=8)
        ax.set_ylabel("n removed", fontsize=8)
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    fig.suptitle("Layers each criterion removes (filled), per number of layers removed", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def selection_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows n, columns criteria: the layers removed, as '3,7,9-10'."""
    from ..select import format_layers

    chosen = selections(points)
    sizes = sorted({n for by_n in chosen.values() for n in by_n})
    return (["n"] + list(chosen),
            [[str(n)] + [format_layers(by_n[n]) if n in by_n else "" for by_n in chosen.values()] for n in sizes])


def overlap_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: pairs of criteria; columns: n; cells: the Jaccard overlap of their removed layers."""
    pairs = overlap(points)
    sizes = sorted({n for pair in pairs for n in pair["by_n"]})
    rows = [[f"{a} / {b}"] + [f"{pair['by_n'][n]:.2f}" if n in pair["by_n"] else "" for n in sizes]
            + [f"{np.mean(list(pair['by_n'].values())):.2f}" if pair["by_n"] else ""]
            for pair in pairs for a, b in [pair["criteria"]]]
    return ["criteria"] + [f"n={n}" for n in sizes] + ["mean"], rows


def plot_best_block(distances: AngularDistances, path: str | Path) -> Path:
    """ℓ*(n) and its distance D[n][ℓ*(n)] against the block size n."""
    sizes = np.arange(1, distances.num_layers + 1)
    best = [distances.best(int(n)) for n in sizes]
    fig = _figure(6.4, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(sizes, [b[0] for b in best], marker="o", markersize=3.5, color="tab:blue")
    top.set_ylabel(r"optimal first layer $\ell^*(n)$")
    bottom.plot(sizes, [b[1] for b in best], marker="o", markersize=3.5, color="tab:green")
    bottom.set_ylabel(r"$d(x^{(\ell^*)}, x^{(\ell^*+n)})$")
    bottom.set_xlabel("block size $n$ (layers removed)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_title("the most redundant block of each size", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _draw_curves(ax, points: list[dict], metric: str, scale: float = 1.0, task: str | None = None) -> None:
    """One line per (criterion, healing), Wilson 95 % bars when ``task`` gives the sample sizes, and the full
    model as a black star. Curves with bars are nudged sideways a little so the bars do not hide each other."""
    curves = _curves(points, metric)
    for i, ((criterion, heal), curve) in enumerate(curves.items()):
        color, marker = criterion_style(criterion)
        nudge = (i - (len(curves) - 1) / 2) * 0.008 if task is not None else 0.0
        xs = [p["fraction"] + (nudge if p["n"] else 0) for p in curve]
        ys = np.array([p["metrics"][metric] for p in curve])
        bars = None
        if task is not None:  # no bar on the full model's point: its star carries it
            sizes = [sample_size(p, task) if p["n"] else None for p in curve]
            intervals = [wilson_interval(y, n) if n else (y, y) for y, n in zip(ys, sizes, strict=True)]
            bars = np.abs(np.array(intervals).T - ys) * scale
        ax.errorbar(xs, ys * scale, yerr=bars, color=color, marker=marker, markersize=4, capsize=2, elinewidth=0.8,
                    linestyle="--" if heal == "none" else "-", linewidth=1.3, label=_curve_label(criterion, heal),
                    markerfacecolor="white" if heal == "none" else color)
    full = _reference(points)
    if full is not None and full["metrics"].get(metric) is not None:
        y = full["metrics"][metric]
        n = sample_size(full, task) if task else None
        bar = np.abs(np.array(wilson_interval(y, n)) - y)[:, None] * scale if n else None
        ax.errorbar([0], [y * scale], yerr=bar, color="black", marker="*", markersize=10, capsize=2, linestyle="none",
                    label="full model (reference)", zorder=5)
    ax.grid(alpha=0.3)
    ax.set_xlabel("fraction of layers removed")


def plot_accuracy(points: list[dict], path: str | Path, sigmas: float = 2.0) -> Path | None:
    """Accuracy (%) against the fraction removed, one panel per task, with Wilson 95 % bars, the chance or
    majority level and its noise band; uninformative tasks are labelled as such."""
    from matplotlib.patches import Patch

    tasks = accuracy_tasks(points)
    if not tasks:
        return None
    cols = min(2, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig = _figure(5.4 * cols, 3.6 * rows + 0.5)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    full = _reference(points)
    verdicts = collapse_points(points, sigmas)
    for ax, (task, metric) in zip(axes, tasks.items(), strict=False):
        level, kind = baseline(points, task)
        n = sample_size(full, task) if full else None
        if level is not None:
            ax.axhline(100 * level, color="black", linestyle=":", linewidth=1)
            if n:
                noise = 100 * sigmas * standard_error(level, n)
                ax.axhspan(100 * level - noise, 100 * level + noise, color="0.88", zorder=0, linewidth=0)
        _draw_curves(ax, points, metric, scale=100, task=task)
        ax.set_ylabel(f"{_metric_name(points, task, metric)} (%)")
        title = f"{task_title(task)}: {n or '?'} questions"
        title += f", dotted: {kind} {100 * level:.1f} %" if level is not None else ""
        if any(v["task"] == task and v["status"] == "uninformative" for v in verdicts):  # in the title: hides no point
            ax.set_title(f"{title}\nuninformative: the full model is not above the {kind} by {sigmas:g} SE",
                         fontsize=9, color="firebrick")
        else:
            ax.set_title(title, fontsize=9)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    handles.append(Patch(color="0.88"))
    labels.append(f"within {sigmas:g} SE of chance / majority (noise)")
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Accuracy vs layers removed; bars: Wilson 95 % intervals", fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / (3.6 * rows + 0.5), 1, 1))
    return _save(fig, path)


def plot_c4_loss(points: list[dict], path: str | Path) -> Path | None:
    """C4 validation loss / ln(vocabulary size) against the fraction removed (the paper's normalisation),
    with nats on the right axis."""
    if not any("c4_loss_norm" in p["metrics"] for p in points):
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    _draw_curves(ax, points, "c4_loss_norm")
    ax.set_ylabel("C4 validation loss / ln(vocabulary size)")
    values = [p["metrics"]["c4_loss_norm"] for p in points if (p["metrics"].get("c4_loss_norm") or 0) > 0]
    # One collapsed cut (a loss many times the others) would flatten every other curve on a linear axis.
    wide = bool(values) and max(values) > 4 * min(values)
    if wide:
        ax.set_yscale("log")
    axes = [ax]
    vocab = next((_record(p, "c4").get("vocab_size") for p in points if _record(p, "c4").get("vocab_size")), None)
    if vocab:
        nats = math.log(vocab)
        axes.append(ax.secondary_yaxis("right", functions=(lambda y: y * nats, lambda y: y / nats)))
        axes[-1].set_ylabel("nats")
    if wide:
        from matplotlib.ticker import FormatStrFormatter

        for axis in axes:  # 0.3, 2, 20 rather than 3 x 10^-1
            axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_title("C4 validation loss (lower is better" + (", log scale)" if wide else ")"), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# --- cost -----------------------------------------------------------------------------------------------

COST_PANELS = [("prefill_ms_per_token", "prefill time per token", "ms", 1.0, "layer_prefill_ms_per_token"),
               ("decode_ms_per_token", "decode time per token", "ms", 1.0, "layer_decode_ms_per_token"),
               ("weight_bytes", "weight memory", "MiB", 1 / 2**20, "layer_weight_bytes"),
               ("peak_memory_bytes", "peak memory", "MiB", 1 / 2**20, None)]


def timed_together(points: list[dict]) -> bool:
    """Whether the sweep's cost comes from its final cost phase: every layer count timed in the same
    interleaved rounds, one record per count with the median and spread (min, max) of the rounds. Older
    sweeps timed each point once, whenever it ran."""
    return any("spread" in (p["details"].get("cost") or {}) for p in points)


def _cost_points(points: list[dict]) -> list[dict]:
    """The points the cost figure and fits use: one per layer count timed in the cost phase (its cost is
    the same for every point with that count, healed or not); in older sweeps, every unhealed point."""
    measured = [p for p in points if p["metrics"].get("prefill_ms_per_token") is not None]
    if not timed_together(measured):
        # Unhealed models only, so a fit describes one condition: healed models are extra timings of the
        # same architectures, taken at other moments of the sweep.
        return [p for p in measured if p["heal"] == "none"]
    by_count: dict[int, dict] = {}
    for p in sorted(measured, key=lambda p: (p["n"], p["heal"] != "none", p["criterion"])):
        by_count.setdefault(p["details"]["cost"]["num_layers"], p)
    return list(by_count.values())


def _cost_timing(measured: list[dict]) -> dict:
    """How the timings were taken: rounds and repeats, from the first cost record."""
    settings = measured[0]["details"]["cost"].get("settings") or {}
    return {"together": timed_together(measured), "rounds": settings.get("rounds", "?"),
            "repeats": settings.get("repeats", "?")}


def fit_problems(fit: dict, scale: float = 1.0, unit: str = "") -> list[str]:
    """Why the line fixed + per_layer × layers kept should not be drawn as the ideal: [] when it may."""
    problems = []
    if fit["r2"] < MIN_R2:
        problems.append(f"R² = {fit['r2']:.2f} < {MIN_R2}")
    if fit["fixed"] < 0:
        problems.append(f"negative fixed part ({fit['fixed'] * scale:.3g} {unit})")
    if fit["per_unit"] <= 0:
        problems.append(f"per-layer part not positive ({fit['per_unit'] * scale:.3g} {unit})")
    return problems


def cost_fits(points: list[dict]) -> dict:
    """For each cost, the fit cost = fixed + per_layer × layers kept over the unhealed points, with R² and
    its problems, and (where measured directly) one layer's own cost in the full model, to compare with
    the fitted slope."""
    measured = _cost_points(points)
    if len({p["n"] for p in measured}) < 3:
        return {}
    full = _reference(measured)
    fits = {}
    for metric, _, unit, scale, layer_metric in COST_PANELS:
        fit = linear_fit([p["details"]["cost"]["num_layers"] for p in measured], [p["metrics"][metric] for p in measured])
        fit["problems"] = fit_problems(fit, scale, unit)
        one_layer = full["metrics"].get(layer_metric) if layer_metric and full else None
        if one_layer:
            fit.update(one_layer_measured=one_layer, slope_over_measured=fit["per_unit"] / one_layer)
        fit["num_points"] = len(measured)
        fits[metric] = fit
    return fits


def timing_spread(points: list[dict], metric: str) -> float | None:
    """The largest relative spread (max − min) / min between unhealed models with the same number of layers:
    they cost the same, so this is the noise of a single timing."""
    by_size: dict[int, list[float]] = {}
    for p in _cost_points(points):
        by_size.setdefault(p["details"]["cost"]["num_layers"], []).append(p["metrics"][metric])
    spreads = [(max(v) - min(v)) / min(v) for v in by_size.values() if len(v) > 1 and min(v) > 0]
    return max(spreads) if spreads else None


def _spread_bars(measured: list[dict], metric: str, scale: float) -> np.ndarray | None:
    """Error bars from the median down to the fastest round and up to the slowest (None without spreads)."""
    bars = []
    for p in measured:
        low, high = (p["details"]["cost"].get("spread") or {}).get(metric) or (None, None)
        if low is None:
            return None
        value = p["metrics"][metric]
        bars.append((max(0.0, value - low) * scale, max(0.0, high - value) * scale))
    return np.array(bars).T


def plot_cost(points: list[dict], path: str | Path) -> Path | None:
    """Measured cost against the fraction removed, with the line fixed + per-layer × layers kept only where it
    describes the measurements; otherwise the panel says why not."""
    fits = cost_fits(points)
    if not fits:
        return None
    measured = _cost_points(points)
    total = max(p["details"]["cost"]["num_layers"] for p in measured)
    timing = _cost_timing(measured)
    fig = _figure(10.4, 7.4)
    for ax, (metric, label, unit, scale, _) in zip(fig.subplots(2, 2).flat, COST_PANELS, strict=True):
        if timing["together"]:
            ax.errorbar([p["fraction"] for p in measured], [p["metrics"][metric] * scale for p in measured],
                        yerr=_spread_bars(measured, metric, scale), color="tab:green", marker="o", markersize=4,
                        capsize=3, elinewidth=0.9, linestyle="none", zorder=3,
                        label=f"median of {timing['rounds']} rounds; bars: fastest–slowest")
            full = _reference(measured)
            if full is not None:
                ax.scatter([0], [full["metrics"][metric] * scale], color="black", marker="*", s=60, zorder=4,
                           label="full model")
        for criterion in [] if timing["together"] else sorted({p["criterion"] for p in measured}):
            color, marker = criterion_style(criterion)
            chosen = [p for p in measured if p["criterion"] == criterion]
            ax.scatter([p["fraction"] for p in chosen], [p["metrics"][metric] * scale for p in chosen], color=color,
                       marker=marker, s=60 if criterion == "full" else 24,
                       label="full model" if criterion == "full" else criterion,
                       zorder=3)
        fit = fits[metric]
        if fit["problems"]:  # said above the panel, where it cannot hide a point
            ax.set_title("no ideal line, it does not fit: " + "; ".join(fit["problems"]), fontsize=8, color="firebrick")
        else:
            fractions = np.linspace(0, max(p["fraction"] for p in measured), 50)
            ax.plot(fractions, (fit["fixed"] + fit["per_unit"] * total * (1 - fractions)) * scale, color="black",
                    linewidth=1, label=f"fit: {fit['fixed'] * scale:.3g} + {fit['per_unit'] * scale:.3g} {unit}/layer "
                                       f"(R² {fit['r2']:.3f})")
        ax.set_xlabel("fraction of layers removed")
        ax.set_ylabel(f"{label} ({unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    line = (f"line: fixed part (embeddings, LM head) + equal part per layer, drawn only if R² ≥ {MIN_R2}, fixed ≥ 0, "
            "per layer > 0")
    if timing["together"]:
        fig.suptitle(f"Measured cost per number of layers (healed or not: the same shapes); {line}\nTimings: every "
                     f"layer count timed at the end of the sweep in {timing['rounds']} interleaved rounds, each the best "
                     f"of {timing['repeats']} repeats; points: median, bars: fastest and slowest round", fontsize=9)
    else:
        spreads = {m.split("_")[0]: timing_spread(points, m) for m, *_ in COST_PANELS[:2]}
        spread_text = " and ".join(f"{100 * v:.0f} % ({name})" for name, v in spreads.items() if v is not None)
        fig.suptitle(f"Measured cost of the unhealed models; {line}\nTimings: one per point, the best of "
                     f"{timing['repeats']} repeats (their spread is not stored)"
                     + (f"; models of the same size differ by up to {spread_text}" if spread_text else ""), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# --- the HTML report ------------------------------------------------------------------------------------


def _accuracy_cell(value: float, n: int | None) -> str:
    return f"{100 * value:.1f}" if n is None else f"{100 * value:.1f} ± {100 * standard_error(value, n):.1f}"


def _layers(removed: list[int]) -> str:
    """'4: 20-23' or '4: 3,7,9-10': the count, then compact inclusive ranges (non-contiguous cuts as they are)."""
    from ..select import format_layers

    return f"{len(removed)}: {format_layers(removed)}" if removed else "–"


def main_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The columns people compare, formatted: fraction, layers, criterion, healing, each task's headline
    accuracy ± SE (%), C4 loss (nats), speed-ups against the full model, weight memory (MiB)."""
    tasks = accuracy_tasks(points)
    full = _reference(points)
    header = ["removed", "layers (0-based)", "criterion", "healing"]
    header += [f"{task_title(t)} {_metric_name(points, t, m)} (%)" for t, m in tasks.items()]
    header += ["C4 loss (nats)", "prefill speed-up", "decode speed-up", "weights (MiB)"]
    rows = []
    for p in points:
        m = p["metrics"]
        row = [f"{p['fraction']:.2f}", _layers(p["removed_layers"]), p["criterion"], p["heal"]]
        row += ["" if m.get(k) is None else _accuracy_cell(m[k], sample_size(p, t)) for t, k in tasks.items()]
        row.append("" if m.get("c4_loss") is None else f"{m['c4_loss']:.2f}")
        for key in ("prefill_ms_per_token", "decode_ms_per_token"):
            base = full["metrics"].get(key) if full else None
            row.append(f"{base / m[key]:.2f}×" if base and m.get(key) else "")
        row.append("" if m.get("weight_bytes") is None else f"{m['weight_bytes'] / 2**20:,.1f}")
        rows.append(row)
    return header, rows


def _formatter(name: str, values: list):
    """One format per column of the full table, so numbers line up: MiB for bytes, % for chance levels,
    thousands separators for counts, a fixed number of decimals for the rest."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return lambda v: "" if v is None else str(v)
    if name.endswith("_bytes"):
        return lambda v: "" if v is None else f"{v / 2**20:,.1f}"
    if name.endswith("_chance"):  # in % like the accuracies beside it
        return lambda v: "" if v is None else f"{100 * v:.1f}"
    if all(float(v).is_integer() for v in numbers):
        return lambda v: "" if v is None else f"{int(v):,}"
    decimals = 4 if max(abs(v) for v in numbers) < 10 else 2
    return lambda v: "" if v is None else f"{v:,.{decimals}f}"


def full_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every column of the store, each in one format; accuracies in % with their standard error."""
    header, rows = table(points)
    task = {h: h.removesuffix("_norm").removesuffix("_acc") for h in header if h.endswith(("_acc", "_acc_norm"))}
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in header]
    formats = [_formatter(h, list(c)) for h, c in zip(header, columns, strict=True)]
    cells = []
    for p, row in zip(points, rows, strict=True):
        cells.append([_accuracy_cell(v, sample_size(p, task[h])) if h in task and v is not None else f(v)
                      for h, v, f in zip(header, row, formats, strict=True)])
    units = {h: " (MiB)" if h.endswith("_bytes") else " (% ± SE)" if h in task else " (%)" if h.endswith("_chance") else ""
             for h in header}
    return [h + units[h] for h in header], cells


def _html_table(header: list[str], rows: list[list[str]], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' id={table_id!r}' if table_id else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _collapse_html(verdicts: list[dict], sigmas: float) -> str:
    """One row per task: the full model and its baseline, then one cell per curve (or one uninformative cell)."""
    if not verdicts:
        return "<p>No accuracy was measured on the full model.</p>"
    curves = list(dict.fromkeys((v["criterion"], v["heal"]) for v in verdicts))
    measured = {(v["criterion"], v["heal"]): v["fractions"] for v in verdicts}
    header = ["task", "full model (%)", "baseline (%)"]
    header += [f"{_curve_label(*c)} (at {', '.join(f'{f:.2f}' for f in measured[c])})" for c in curves]
    rows = []
    for task in dict.fromkeys(v["task"] for v in verdicts):
        mine = {(v["criterion"], v["heal"]): v for v in verdicts if v["task"] == task}
        first = next(iter(mine.values()))
        n, level = first["num_questions"], first["baseline"]
        cells = [f"{task_title(task)} ({n or '?'} questions)", _accuracy_cell(first["full_accuracy"], n),
                 "?" if level is None else f"{100 * level:.1f} ({first['baseline_kind']})"]
        if first["status"] == "uninformative":
            note = (f"uninformative: the full model is not above the {first['baseline_kind']} by {sigmas:g} SE, so "
                    "pruning has nothing measurable to lose (a cut model near that level says nothing)")
            rows.append("".join(f"<td>{html.escape(c)}</td>" for c in cells)
                        + f"<td class='note' colspan='{len(curves)}'>{html.escape(note)}</td>")
            continue
        for c in curves:
            v = mine.get(c)
            text = ("–" if v is None else f"collapses at {v['collapse_fraction']:.2f}" if v["status"] == "collapse"
                    else f"none up to {max(v['fractions']):.2f}" if v["status"] == "no collapse" else v["status"])
            cells.append(text)
        rows.append("".join(f"<td>{html.escape(c)}</td>" for c in cells))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return (f"<table id='collapse-table'><thead><tr>{head}</tr></thead><tbody>" + "".join(f"<tr>{r}</tr>" for r in rows)
            + "</tbody></table>")


def _cost_html(fits: dict) -> str:
    header = ["cost", "fixed", "per layer", "R²", "one layer, measured", "per layer / measured", "line drawn?"]
    rows = []
    for metric, _, unit, scale, _ in COST_PANELS:
        f = fits[metric]
        one = f.get("one_layer_measured")
        rows.append([f"{metric} ({unit})", f"{f['fixed'] * scale:,.3f}", f"{f['per_unit'] * scale:,.3f}", f"{f['r2']:.3f}",
                     "" if one is None else f"{one * scale:,.3f}",
                     "" if one is None else f"{f['slope_over_measured']:.2f}",
                     "yes" if not f["problems"] else "no: " + "; ".join(f["problems"])])
    return _html_table(header, rows)


def _criteria_html(points: list[dict]) -> str:
    """What each criterion of the sweep does, from the registry (layers are 0-based, ranges inclusive)."""
    from ..select import CRITERIA

    used = [name for name in dict.fromkeys(p["criterion"] for p in points) if name != "full"]
    described = [f"<em>{html.escape(name)}</em>: {html.escape(CRITERIA.get(name).description)}"
                 + ("" if CRITERIA.get(name).contiguous else " (not one block)")
                 for name in used if name in CRITERIA]
    return ("<p>Layers are 0-based and ranges inclusive. Criteria: " + "; ".join(described) + ".</p>") if described \
        else "<p>Layers are 0-based and ranges inclusive.</p>"


def _comparison_html(points: list[dict]) -> list[str]:
    """The layers each criterion removes at each n, and how much the criteria agree (when there are several)."""
    header, rows = selection_table(points)
    if not rows:
        return []
    parts = ["<h2>Layers removed by each criterion</h2><p>0-based, inclusive ranges; a criterion that is not "
             "contiguous may remove layers anywhere ('3,7,9-10').</p>",
             f"<div class='scroll'>{_html_table(header, rows, table_id='selection-table')}</div>"]
    overlap_header, overlap_rows = overlap_table(points)
    if overlap_rows:
        parts += ["<h2>Overlap between criteria</h2><p>Jaccard index |A ∩ B| / |A ∪ B| of the layers two criteria "
                  "remove at the same n: 1 = the same layers, 0 = none in common.</p>",
                  f"<div class='scroll'>{_html_table(overlap_header, overlap_rows, table_id='overlap-table')}</div>"]
    return parts


def cost_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per layer count timed in the cost phase: medians and [fastest–slowest round] ([] for older sweeps)."""
    measured = _cost_points(points)
    if not timed_together(measured):
        return [], []
    header = ["removed (n)", "layers kept", "prefill (ms/token)", "decode (ms/token)", "weights (MiB)",
              "peak memory (MiB)", "one layer, prefill (ms/token)"]

    def cell(p: dict, metric: str, scale: float = 1.0, digits: int = 4) -> str:
        value, (low, high) = p["metrics"][metric], p["details"]["cost"]["spread"][metric]
        return f"{value * scale:,.{digits}g} [{low * scale:,.{digits}g}–{high * scale:,.{digits}g}]"

    rows = [[str(p["n"]), str(p["details"]["cost"]["num_layers"]), cell(p, "prefill_ms_per_token"),
             cell(p, "decode_ms_per_token"), f"{p['metrics']['weight_bytes'] / 2**20:,.1f}",
             cell(p, "peak_memory_bytes", 1 / 2**20), cell(p, "layer_prefill_ms_per_token")] for p in measured]
    return header, rows


def _image(path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1120px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}"
    "img{max-width:100%;height:auto}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
    "table{border-collapse:collapse;font-size:.82em;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3;white-space:normal;vertical-align:bottom}"
    "td:first-child,th:first-child,#main-table :is(td,th):nth-child(-n+4),#collapse-table :is(td,th){text-align:left}"
    "td.note{white-space:normal;color:#8b1a1a}"
    ".scroll{overflow-x:auto;max-width:100%}summary{cursor:pointer;margin:1em 0}"
)


def write_report(directory: str | Path, sigmas: float = 2.0) -> Path:
    """Draw every figure of a sweep directory into ``DIR/report/``, write ``summary.json``, ``results.csv``
    and the self-contained ``report.html`` there; ``sigmas`` is the noise threshold of a collapse."""
    if not (isinstance(sigmas, (int, float)) and math.isfinite(sigmas) and sigmas > 0):
        raise DepthpruneError(f"--sigmas must be a finite number above 0 (standard errors), got {sigmas}")
    directory = Path(directory)
    points = load_points(directory)
    folder = directory / "report"
    analysis = directory / "analysis"
    distances = load_distances(analysis) if (analysis / "distances.json").is_file() else None
    figures = [
        (plot_accuracy(points, folder / "accuracy.png", sigmas),
         "Accuracy vs fraction of layers removed. Bars: Wilson 95 % intervals from the number of questions; dotted: "
         "chance (the majority class for BoolQ); grey band: within noise of it. Healed curves join only the healed "
         "fractions; the star is the full model."),
        (plot_c4_loss(points, folder / "c4_loss.png"), "C4 validation loss, normalised by ln(vocabulary size)"),
        (plot_heatmap(distances, folder / "heatmap.png", selections=selections(points)) if distances else None,
         "Angular distance d(x^(l), x^(l+n)) for every block; white dots: the optimal first layer l*(n); coloured "
         "markers on row n: every layer each criterion removes at that n (non-contiguous cuts included)"),
        (plot_selections(points, folder / "selections.png", distances.num_layers if distances else None),
         "The layers each criterion removes at each n of the sweep"),
        (plot_best_block(distances, folder / "best_block.png") if distances else None,
         "Optimal first layer l*(n) and its distance vs block size n"),
        (plot_cost(points, folder / "cost.png"),
         "Measured cost per number of layers (median and spread of interleaved rounds) vs a fixed part plus an equal "
         "part per layer" if timed_together(points) else
         "Measured cost of the unhealed models vs a fixed part plus an equal part per layer"),
    ]
    verdicts = collapse_points(points, sigmas)
    fits = cost_fits(points)
    full = _reference(points)
    full_header, full_rows = full_table(points)
    sizes = {t: sample_size(full, t) for t in accuracy_tasks(points)} if full else {}
    summary = {"sigmas": sigmas, "collapse_definition": collapse_definition(sigmas), "sample_sizes": sizes,
               "collapse": verdicts, "cost_fits": fits,
               "selections": {c: {str(n): ls for n, ls in by_n.items()} for c, by_n in selections(points).items()},
               "overlap_jaccard": [{"criteria": p["criteria"], "by_n": {str(n): v for n, v in p["by_n"].items()}}
                                   for p in overlap(points)]}
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    csv_text = to_csv(points)
    atomic_write_text(folder / "results.csv", csv_text)

    model = points[0]["details"]["evaluation"].get("model", "") if points else ""
    csv_uri = "data:text/csv;base64," + base64.b64encode(csv_text.encode()).decode()
    measured = _cost_points(points)
    speed_note = (f"medians of {_cost_timing(measured)['rounds']} interleaved rounds timed together at the end of the "
                  "sweep; their spread is under Measured cost" if timed_together(measured)
                  else "one timing each, so noisy")
    size_text = ", ".join(f"{task_title(t)} {n or '?'}" for t, n in sizes.items())
    largest = sorted({round(50 / math.sqrt(n), 1) for n in sizes.values() if n})  # the SE at p = 50 %
    worst = "" if not largest else f" (at p = 50 %: {largest[0]} points here)" if len(largest) == 1 else \
        f" (at p = 50 %: {largest[0]}–{largest[-1]} points here)"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>depthprune report: {html.escape(str(model))}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>depthprune sweep: {html.escape(str(model))}</h1>",
        _criteria_html(points),
        f"<p><strong>Sample sizes</strong> (questions per task): {html.escape(size_text)}. An accuracy p on n "
        f"questions has a standard error √(p(1−p)/n){worst}. Tables give accuracy "
        "± one standard error; figures draw Wilson 95 % intervals.</p>" if sizes else "",
        "<h2>Collapse points</h2>",
        f"<p>{html.escape(collapse_definition(sigmas))} The columns name the fractions measured on each curve.</p>",
        f"<div class='scroll'>{_collapse_html(verdicts, sigmas)}</div>",
        "<h2>Results</h2>",
        f"<p>Speed-ups are the full model's time per token over the cut model's ({speed_note}). "
        f"Every column: <a href='results.csv'>results.csv</a> beside this file, or "
        f"<a download='results.csv' href='{csv_uri}'>the copy embedded in this page</a>.</p>",
        f"<div class='scroll'>{_html_table(*main_table(points), table_id='main-table')}</div>",
        *_comparison_html(points),
        *[_image(path, caption) for path, caption in figures],
    ]
    if fits:
        over = (f"{next(iter(fits.values()))['num_points']} layer counts (the median of each)" if timed_together(points)
                else f"{next(iter(fits.values()))['num_points']} unhealed points")
        parts += ["<h2>Cost fits</h2><p>cost = fixed + per layer × layers kept, least squares over the "
                  f"{over}; drawn only when R² ≥ {MIN_R2}, the fixed "
                  "part ≥ 0 and the per-layer part > 0.</p>", f"<div class='scroll'>{_cost_html(fits)}</div>"]
    cost_header, cost_rows = cost_table(points)
    if cost_rows:
        parts += ["<h2>Measured cost</h2><p>Each number of layers timed at the end of the sweep, all in the same "
                  "interleaved rounds: the median, and in brackets the fastest and the slowest round.</p>",
                  f"<div class='scroll'>{_html_table(cost_header, cost_rows, table_id='cost-table')}</div>"]
    parts += [f"<details><summary>All {len(full_header)} columns of the {len(points)} points</summary>",
              f"<div class='scroll'>{_html_table(full_header, full_rows, table_id='full-table')}</div></details>",
              "</body></html>"]
    out = folder / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out
