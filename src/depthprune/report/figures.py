"""The report's figures, one PNG each: accuracy with Wilson intervals, C4 loss, agreement with the full model,
the % of the full model's accuracy retained, the heatmap with every criterion's removed layers, the layers each criterion removes, the optimal block, and
measured cost.

Criteria get colours and markers in registry order, so any number of them can be told apart; a repaired
cut keeps its criterion's colour, with its repair's own marker and a dash-dotted line when not healed; a
sub-layer cut keeps it too, with the letter of its kind as marker (A: attention, M: MLP) and a dotted line when
not healed. The accuracy and loss figures come twice where the points know their parameters: against the
fraction of layers removed and against the fraction of parameters removed (cuts of different granularity
compare at equal parameters there).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..measure import heatmap
from ..measure.distances import AngularDistances
from ..measure.heatmap import Markers, new_figure, save_png
from ..sweep.store import UNPRUNED
from .cost import COST_PANELS, MIN_R2, cost_fits, cost_points, cost_timing, timing_spread
from .stats import (
    accuracy_tasks,
    agreement_size,
    agreement_tasks,
    baseline,
    collapse_points,
    curve_label,
    curves,
    cut_granularity,
    metric_name,
    parameters_removed,
    reference,
    sample_size,
    selections,
    split_cut,
    standard_error,
    task_record,
    task_title,
    wilson_interval,
    with_retained,
)

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan")
MARKERS = ("o", "s", "D", "v", "^", "P", "X", "<", ">")
REPAIR_MARKERS = ("X", "P", "h", "d")  # by the repair's place in its registry
SUBLAYER_MARKERS = {"attention": "$A$", "mlp": "$M$"}  # a sub-layer cut's marker: the letter of its kind
X_AXES = {"fraction": "fraction of layers removed", "parameters": "fraction of parameters removed"}
# Healed curves, by the healing method's place in its registry (qlora and lora, full, dora, last-layers):
# solid, dash-dot, long dashes, dotted, so that two healings of one cut can be told apart.
HEAL_LINES = ("-", (0, (6, 1, 1, 1)), (0, (8, 2)), (0, (1, 1)))


def criterion_style(criterion: str) -> tuple[str, str]:
    """(colour, marker) of a criterion's curves: by its place in the registry; the full model is a black star."""
    from ..select import CRITERIA

    if criterion == UNPRUNED:
        return "black", "*"
    names = CRITERIA.names()
    if criterion not in names:  # a criterion of an older store, or of a plug-in not loaded now
        return "tab:gray", "^"
    i = names.index(criterion)
    return COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]


def curve_style(cut: str, heal: str) -> dict:
    """How a curve is drawn: its criterion's colour (a shade of it when repaired); its criterion's marker, its
    repair's, or its sub-layer kind's letter; dashed when not healed (dash-dotted when repaired, dotted at a
    sub-layer granularity); when healed, solid for the registry's first two methods (qlora, lora) and a line of
    the method's own for the others (:data:`HEAL_LINES`); hollow markers when not healed."""
    from matplotlib.colors import to_rgb

    from ..repair import REPAIRS

    criterion, repair = split_cut(cut)
    granularity = cut_granularity(cut)[1]
    color, marker = criterion_style(criterion)
    if granularity != "layer":
        return {"color": color, "marker": SUBLAYER_MARKERS.get(granularity, "$S$"), "markersize": 7,
                "linestyle": ":" if heal == "none" else _healed_line(heal)}
    if repair != "none":
        names = REPAIRS.names()
        i = names.index(repair) if repair in names else len(names)
        marker = REPAIR_MARKERS[i % len(REPAIR_MARKERS)]
        # the criterion's colour, darker for the first repair, lighter for the second, and so on
        rgb = np.array(to_rgb(color))
        color = tuple(rgb * 0.6) if i % 2 == 0 else tuple(rgb + (1 - rgb) * 0.45)
    if heal == "none":
        line = "--" if repair == "none" else "-."
    else:
        line = _healed_line(heal)
    return {"color": color, "marker": marker, "linestyle": line, "markerfacecolor": "white" if heal == "none" else color}


def _healed_line(heal: str):
    """The line of a curve healed by ``heal``: by the method's place in its registry (qlora and lora: solid)."""
    from ..heal.methods import HEAL_METHODS

    healings = HEAL_METHODS.names()
    place = max(0, healings.index(heal) - 1) if heal in healings else len(healings)
    return HEAL_LINES[place % len(HEAL_LINES)]


# --- which layers are removed ---------------------------------------------------------------------------


def plot_heatmap(distances: AngularDistances, path: str | Path, title: str | None = None,
                 selections: dict[str, dict[int, list[int]]] | None = None) -> Path:
    """The distance heatmap (block size n against first layer ℓ, ℓ*(n) marked) with every removed layer.

    ``selections`` (criterion -> n -> removed layers): each criterion's removed layers are drawn on row n
    as its own markers, one per removed layer, so a non-contiguous cut shows every layer it removes (a
    contiguous block ℓ..ℓ+n-1 is a run of markers starting at its ℓ); a sub-layer cut ('similarity@attention')
    marks each layer whose attention (A) or MLP (M) it removes, on the row of its count."""
    shown = {c: by_n for c, by_n in (selections or {}).items() if by_n}
    marked = []
    for i, (name, by_n) in enumerate(shown.items()):
        criterion, granularity = cut_granularity(name)
        color, marker = criterion_style(criterion)
        what = "removed layers" if granularity == "layer" else f"removed {granularity} of layers"
        marker = marker if granularity == "layer" else SUBLAYER_MARKERS.get(granularity, "$S$")
        offset = (i - (len(shown) - 1) / 2) * min(0.12, 0.8 / max(1, len(shown)))  # side by side on one row
        marked.append(Markers(f"{criterion}: {what}", color, marker,
                              layers=[layer for n in sorted(by_n) for layer in by_n[n]],
                              rows=[n + offset for n in sorted(by_n) for _ in by_n[n]]))
    return heatmap.plot_heatmap(distances, path, title, marked)


def plot_selections(points: list[dict], path: str | Path, total_layers: int | None = None) -> Path | None:
    """One panel per criterion (and per criterion at each sub-layer granularity): the layers it removes, or whose
    attention / MLP it removes, lettered A / M (columns), at each n of the sweep (rows)."""
    chosen = selections(points)
    if not chosen:
        return None
    total = total_layers or max(1 + max(layer for by_n in chosen.values() for ls in by_n.values() for layer in ls), 1)
    sizes = sorted({n for by_n in chosen.values() for n in by_n})
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    fig = new_figure(4.0 * cols, 0.45 * len(sizes) * rows + 1.3 * rows + 0.4)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, (name, by_n) in zip(axes, chosen.items(), strict=False):
        criterion, granularity = cut_granularity(name)
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
        if granularity != "layer":
            letter = SUBLAYER_MARKERS.get(granularity, "$S$").strip("$")
            for r, n in enumerate(sizes):
                for layer in by_n.get(n, []):
                    ax.text(layer, r, letter, ha="center", va="center", fontsize=6, color="white")
        ax.set_title(criterion if granularity == "layer" else f"{criterion}, {granularity} sub-layers", fontsize=9,
                     color=color)
        ax.set_xlabel("layer (0-based)", fontsize=8)
        ax.set_ylabel("n removed", fontsize=8)
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    fig.suptitle("Layers each criterion removes (filled; A / M: only their attention / MLP), per number removed",
                 fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)


def plot_best_block(distances: AngularDistances, path: str | Path) -> Path:
    """ℓ*(n) and its distance D[n][ℓ*(n)] against the block size n."""
    sizes = np.arange(1, distances.num_layers + 1)
    best = [distances.best(int(n)) for n in sizes]
    fig = new_figure(6.4, 5.2)
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
    return save_png(fig, path)


# --- accuracy and loss against the fraction removed ----------------------------------------------


def _draw_curves(ax, points: list[dict], metric: str, scale: float = 1.0, task: str | None = None,
                 size=sample_size, x: str = "fraction") -> None:
    """One line per (cut, healing), Wilson 95 % bars when ``task`` gives the sample sizes (``size(point,
    task)``), and the full model as a black star. Curves with bars are nudged sideways a little so the bars do
    not hide each other. ``x``: 'fraction' (of layers removed) or 'parameters' (fraction of parameters removed;
    points that do not know it are left out)."""
    full = reference(points)

    def where(p: dict) -> float | None:
        return p["fraction"] if x == "fraction" else parameters_removed(p, full)

    drawn = {c: kept for c, curve in curves(points, metric).items() if (kept := [p for p in curve if where(p) is not None])}
    for i, ((cut, heal), curve) in enumerate(drawn.items()):
        nudge = (i - (len(drawn) - 1) / 2) * 0.008 if task is not None else 0.0
        xs = [where(p) + (nudge if p["n"] else 0) for p in curve]
        ys = np.array([p["metrics"][metric] for p in curve])
        bars = None
        if task is not None:  # no bar on the full model's point: its star carries it
            sizes = [size(p, task) if p["n"] else None for p in curve]
            intervals = [wilson_interval(y, n) if n else (y, y) for y, n in zip(ys, sizes, strict=True)]
            bars = np.abs(np.array(intervals).T - ys) * scale
        style = {"markersize": 4, **curve_style(cut, heal)}
        ax.errorbar(xs, ys * scale, yerr=bars, capsize=2, elinewidth=0.8, linewidth=1.3, label=curve_label(cut, heal),
                    **style)
    if full is not None and full["metrics"].get(metric) is not None:
        y = full["metrics"][metric]
        n = sample_size(full, task) if task else None
        bar = np.abs(np.array(wilson_interval(y, n)) - y)[:, None] * scale if n else None
        ax.errorbar([0], [y * scale], yerr=bar, color="black", marker="*", markersize=10, capsize=2, linestyle="none",
                    label="full model (reference)", zorder=5)
    ax.grid(alpha=0.3)
    ax.set_xlabel(X_AXES[x])


def knows_parameters(points: list[dict]) -> bool:
    """Whether some cut of ``points`` knows the fraction of parameters it removes (the second x-axis)."""
    full = reference(points)
    return any(p["n"] > 0 and parameters_removed(p, full) is not None for p in points)


def _panels(count: int, legend_entries: int):
    """(figure, its ``count`` panels, the legend's columns, the share of the height below the panels for it):
    two panels a row, and room for a legend of ``legend_entries`` under them (two columns under one panel)."""
    cols = min(2, count)
    rows = (count + cols - 1) // cols
    ncol = 3 if cols > 1 else 2
    legend = max(0.5, 0.2 + 0.17 * math.ceil(legend_entries / ncol))  # inches
    fig = new_figure(max(5.4 * cols, 6.4), 3.6 * rows + legend)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count], ncol, legend / (3.6 * rows + legend)


def plot_accuracy(points: list[dict], path: str | Path, sigmas: float = 2.0, x: str = "fraction") -> Path | None:
    """Accuracy (%) against the fraction removed (``x``: of layers, or 'parameters'), one panel per task, with
    Wilson 95 % bars, the chance or majority level and its noise band; uninformative tasks are labelled as such."""
    from matplotlib.patches import Patch

    tasks = accuracy_tasks(points)
    if not tasks:
        return None
    # the legend: every curve, the full model and the noise band
    fig, axes, ncol, legend = _panels(len(tasks), max(len(curves(points, m)) for m in tasks.values()) + 2)
    full = reference(points)
    verdicts = collapse_points(points, sigmas)
    for ax, (task, metric) in zip(axes, tasks.items(), strict=False):
        level, kind = baseline(points, task)
        n = sample_size(full, task) if full else None
        if level is not None:
            ax.axhline(100 * level, color="black", linestyle=":", linewidth=1)
            if n:
                noise = 100 * sigmas * standard_error(level, n)
                ax.axhspan(100 * level - noise, 100 * level + noise, color="0.88", zorder=0, linewidth=0)
        _draw_curves(ax, points, metric, scale=100, task=task, x=x)
        ax.set_ylabel(f"{metric_name(points, task, metric)} (%)")
        title = f"{task_title(task)}: {n or '?'} questions"
        title += f", dotted: {kind} {100 * level:.1f} %" if level is not None else ""
        if any(v["task"] == task and v["status"] == "uninformative" for v in verdicts):  # in the title: hides no point
            ax.set_title(f"{title}\nuninformative: the full model is not above the {kind} by {sigmas:g} SE",
                         fontsize=9, color="firebrick")
        else:
            ax.set_title(title, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Patch(color="0.88"))
    labels.append(f"within {sigmas:g} SE of chance / majority (noise)")
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle(f"Accuracy vs {X_AXES[x].removeprefix('fraction of ')}; bars: Wilson 95 % intervals", fontsize=10)
    fig.tight_layout(rect=(0, legend, 1, 1))
    return save_png(fig, path)


def plot_c4_loss(points: list[dict], path: str | Path, x: str = "fraction") -> Path | None:
    """C4 validation loss / ln(vocabulary size) against the fraction removed (``x``: of layers, or 'parameters';
    the paper's normalisation), with nats on the right axis."""
    if not any("c4_loss_norm" in p["metrics"] for p in points):
        return None
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    _draw_curves(ax, points, "c4_loss_norm", x=x)
    ax.set_ylabel("C4 validation loss / ln(vocabulary size)")
    values = [p["metrics"]["c4_loss_norm"] for p in points if (p["metrics"].get("c4_loss_norm") or 0) > 0]
    # One collapsed cut (a loss many times the others) would flatten every other curve on a linear axis.
    wide = bool(values) and max(values) > 4 * min(values)
    if wide:
        ax.set_yscale("log")
    axes = [ax]
    vocab = next((task_record(p, "c4").get("vocab_size") for p in points if task_record(p, "c4").get("vocab_size")), None)
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
    return save_png(fig, path)


def plot_agreement(points: list[dict], path: str | Path) -> Path | None:
    """Agreement with the full model (%: the share of its questions where a cut picks the full model's answer)
    against the fraction removed, one panel per multiple-choice task, with Wilson 95 % bars; the full model
    agrees with itself (100 %, dotted)."""
    tasks = agreement_tasks(points)
    if not tasks:
        return None
    fig, axes, ncol, legend = _panels(len(tasks), max(len(curves(points, f"{task}_agreement")) for task in tasks))
    for ax, task in zip(axes, tasks, strict=True):
        ax.axhline(100, color="black", linestyle=":", linewidth=1)
        _draw_curves(ax, points, f"{task}_agreement", scale=100, task=task, size=agreement_size)
        ax.set_xlim(left=0)
        ax.set_ylabel("agreement with the full model (%)")
        sizes = {agreement_size(p, task) for p in points if p["metrics"].get(f"{task}_agreement") is not None}
        ax.set_title(f"{task_title(task)}: {'/'.join(str(n) for n in sorted(sizes - {None})) or '?'} questions",
                     fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("Agreement with the full model vs layers removed\ndotted: the full model itself; bars: Wilson 95 % "
                 "intervals", fontsize=10)
    fig.tight_layout(rect=(0, legend, 1, 1))
    return save_png(fig, path)


def plot_retained(points: list[dict], path: str | Path) -> Path | None:
    """% of the full model retained (the mean over the accuracy tasks of point / full-model accuracy) against
    the fraction removed, one line per (cut, healing); the full model retains 100 % (dotted)."""
    shared = with_retained(points)
    if not any(p["n"] > 0 and "retained" in p["metrics"] for p in shared):
        return None
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    ax.axhline(100, color="black", linestyle=":", linewidth=1)
    _draw_curves(ax, shared, "retained", scale=100)
    ax.set_ylabel("% of the full model retained")
    titles = ", ".join(task_title(t) for t in accuracy_tasks(points))
    ax.set_title(f"Mean of accuracy / full model's accuracy over {titles}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


# --- cost ---------------------------------------------------------------------------------------------


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
    measured = cost_points(points)
    total = max(p["details"]["cost"]["num_layers"] for p in measured)
    timing = cost_timing(measured)
    fig = new_figure(10.4, 7.4)
    for ax, (metric, label, unit, scale, _) in zip(fig.subplots(2, 2).flat, COST_PANELS, strict=True):
        if timing["together"]:
            ax.errorbar([p["fraction"] for p in measured], [p["metrics"][metric] * scale for p in measured],
                        yerr=_spread_bars(measured, metric, scale), color="tab:green", marker="o", markersize=4,
                        capsize=3, elinewidth=0.9, linestyle="none", zorder=3,
                        label=f"median of {timing['rounds']} rounds; bars: fastest–slowest")
            full = reference(measured)
            if full is not None:
                ax.scatter([0], [full["metrics"][metric] * scale], color="black", marker="*", s=60, zorder=4,
                           label="full model")
        # the full model first, then the criteria by name
        by_name = sorted({p["criterion"] for p in measured}, key=lambda name: (name != UNPRUNED, name))
        for criterion in [] if timing["together"] else by_name:
            color, marker = criterion_style(criterion)
            chosen = [p for p in measured if p["criterion"] == criterion]
            ax.scatter([p["fraction"] for p in chosen], [p["metrics"][metric] * scale for p in chosen], color=color,
                       marker=marker, s=60 if criterion == UNPRUNED else 24,
                       label="full model" if criterion == UNPRUNED else criterion,
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
    return save_png(fig, path)
