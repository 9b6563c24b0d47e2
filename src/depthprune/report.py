"""Figures and the HTML report: the paper's curves, heatmap, optimal block, and measured cost.

Every figure is a PNG of its own; ``write_report`` embeds them in one self-contained HTML file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from .cost import linear_fit
from .similarity import AngularDistances, load_distances
from .store import load_points, table

STRATEGY_STYLE = {"similarity": ("tab:blue", "o"), "deepest": ("tab:orange", "s")}
HEAL_LINE = {"none": "--"}  # healed curves are solid
TASK_TITLES = {"mmlu": "MMLU (5-shot)", "boolq": "BoolQ (0-shot)", "arc_easy": "ARC-Easy", "hellaswag": "HellaSwag",
               "arc_challenge": "ARC-Challenge"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_heatmap(distances: AngularDistances, path: str | Path, title: str | None = None) -> Path:
    """Block size n (rows) against starting layer ℓ (columns), colour = D[n][ℓ], with ℓ*(n) marked."""
    plt = _pyplot()
    L = distances.num_layers
    grid = np.full((L, L), np.nan)  # row n-1, column ℓ; blocks running past the last layer stay blank
    for n in range(1, L + 1):
        grid[n - 1, : L - n + 1] = distances.block(n)
    best = [distances.best(n)[0] for n in range(1, L + 1)]

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                      extent=(-0.5, L - 0.5, 0.5, L + 0.5))
    ax.plot(best, np.arange(1, L + 1), linestyle="none", marker="o", markersize=3.5, markerfacecolor="white",
            markeredgecolor="black", markeredgewidth=0.6, label=r"$\ell^*(n)$ = argmin$_\ell$ d")
    fig.colorbar(image, ax=ax, label=r"angular distance $d(x^{(\ell)}, x^{(\ell+n)})$")
    ax.set_xlabel(r"first layer of the block, $\ell$ (0-based)")
    ax.set_ylabel("block size $n$ (layers)")
    model = distances.meta.get("model", "")
    ax.set_title(title or f"{model}: {distances.num_samples} samples, {'last token' if distances.tokens == 'last' else 'all tokens'}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


def plot_best_block(distances: AngularDistances, path: str | Path) -> Path:
    """ℓ*(n) and its distance D[n][ℓ*(n)] against the block size n."""
    plt = _pyplot()
    sizes = np.arange(1, distances.num_layers + 1)
    best = [distances.best(int(n)) for n in sizes]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
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


def _curves(points: list[dict], metric: str) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(strategy, heal) -> (fractions, values); the full model (n = 0) starts every curve."""
    full = [p for p in points if p["n"] == 0 and p["metrics"].get(metric) is not None]
    curves: dict = {}
    for p in sorted(points, key=lambda p: p["fraction"]):
        if p["n"] == 0 or p["metrics"].get(metric) is None:
            continue
        xs, ys = curves.setdefault((p["strategy"], p["heal"]), ([], []))
        xs.append(p["fraction"])
        ys.append(p["metrics"][metric])
    for xs, ys in curves.values():
        if full:
            xs.insert(0, 0.0)
            ys.insert(0, full[0]["metrics"][metric])
    return curves


def _draw_curves(ax, points: list[dict], metric: str) -> None:
    for (strategy, heal), (xs, ys) in sorted(_curves(points, metric).items()):
        color, marker = STRATEGY_STYLE.get(strategy, ("tab:gray", "^"))
        label = f"{strategy}, {'no healing' if heal == 'none' else heal + ' healing'}"
        ax.plot(xs, ys, color=color, marker=marker, markersize=4, linestyle=HEAL_LINE.get(heal, "-"), label=label)
    ax.grid(alpha=0.3)
    ax.set_xlabel("fraction of layers dropped")


def accuracy_tasks(points: list[dict]) -> list[str]:
    tasks = []
    for p in points:
        tasks += [k.removesuffix("_acc") for k in p["metrics"] if k.endswith("_acc") and k[:-4] not in tasks]
    return tasks


def plot_accuracy(points: list[dict], path: str | Path) -> Path | None:
    """Accuracy against the fraction of layers dropped, one panel per task, chance level dashed."""
    tasks = accuracy_tasks(points)
    if not tasks:
        return None
    plt = _pyplot()
    cols = min(2, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        _draw_curves(ax, points, f"{task}_acc")
        chance = next((p["metrics"].get(f"{task}_chance") for p in points if p["metrics"].get(f"{task}_chance")), None)
        if chance is not None:
            name = "majority class" if task == "boolq" else "chance"
            ax.axhline(chance, color="black", linestyle=":", linewidth=1, label=f"{name} ({chance:.2f})")
        ax.set_ylabel("accuracy")
        ax.set_title(TASK_TITLES.get(task, task), fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_c4_loss(points: list[dict], path: str | Path) -> Path | None:
    """C4 validation loss / log(vocabulary size) against the fraction dropped (the paper's normalisation)."""
    if not any("c4_loss_norm" in p["metrics"] for p in points):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    _draw_curves(ax, points, "c4_loss_norm")
    ax.set_ylabel("C4 validation loss / ln(vocabulary size)")
    ax.set_title("C4 validation loss", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


COST_PANELS = [("prefill_ms_per_token", "prefill time per token (ms)", "layer_prefill_ms_per_token"),
               ("decode_ms_per_token", "decode time per token (ms)", "layer_decode_ms_per_token"),
               ("weight_bytes", "weight memory (MiB)", "layer_weight_bytes"),
               ("peak_memory_bytes", "peak memory (MiB)", None)]


def cost_fits(points: list[dict]) -> dict:
    """For each cost, the fit cost = fixed + per_layer × layers kept over all measured points, with R², and
    (where measured directly) one layer's own cost from the full model, to compare with the fitted slope."""
    measured = [p for p in points if p["metrics"].get("prefill_ms_per_token") is not None]
    if len({p["n"] for p in measured}) < 3:
        return {}
    full = next((p for p in measured if p["n"] == 0), None)
    total = full["details"]["cost"]["num_layers"] if full else None
    fits = {}
    for metric, _, layer_metric in COST_PANELS:
        kept = [p["details"]["cost"]["num_layers"] for p in measured]
        fit = linear_fit(kept, [p["metrics"][metric] for p in measured])
        one_layer = full["metrics"].get(layer_metric) if layer_metric and full else None
        if one_layer:
            fit["one_layer_measured"] = one_layer
            fit["slope_over_measured"] = fit["per_unit"] / one_layer
        fit["num_layers_full"] = total
        fits[metric] = fit
    return fits


def plot_cost(points: list[dict], path: str | Path) -> Path | None:
    """Measured cost against the fraction dropped, beside the ideal line fixed + per-layer × layers kept."""
    fits = cost_fits(points)
    if not fits:
        return None
    plt = _pyplot()
    measured = [p for p in points if p["metrics"].get("prefill_ms_per_token") is not None]
    total = max(p["details"]["cost"]["num_layers"] for p in measured)
    fig, axes = plt.subplots(2, 2, figsize=(10.4, 7.2))
    for ax, (metric, label, _) in zip(axes.flat, COST_PANELS, strict=True):
        scale = 1 / 2**20 if metric.endswith("bytes") else 1.0
        for strategy, (color, marker) in STRATEGY_STYLE.items():
            chosen = [p for p in measured if p["strategy"] in (strategy, "full")]
            ax.scatter([p["fraction"] for p in chosen], [p["metrics"][metric] * scale for p in chosen], color=color,
                       marker=marker, s=22, label=f"measured ({strategy})", alpha=0.8)
        fit = fits[metric]
        fractions = np.linspace(0, max(p["fraction"] for p in measured), 50)
        ideal = (fit["fixed"] + fit["per_unit"] * total * (1 - fractions)) * scale
        ax.plot(fractions, ideal, color="black", linewidth=1,
                label=f"fixed {fit['fixed'] * scale:.3g} + {fit['per_unit'] * scale:.3g}/layer, R²={fit['r2']:.3f}")
        ax.set_xlabel("fraction of layers dropped")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("measured cost vs the ideal: a fixed part (embeddings, LM head) plus an equal part per layer",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def collapse_point(fractions, scores, full_score: float, tolerance: float) -> float:
    """The largest fraction up to which every score stays within ``tolerance`` of the full model's."""
    last_good = 0.0
    for fraction, score in sorted(zip(fractions, scores, strict=True)):
        if score < full_score - tolerance:
            break
        last_good = fraction
    return last_good


def collapse_points(points: list[dict], tolerance: float) -> list[dict]:
    """The collapse point of every (task, strategy, healing) curve."""
    found = []
    for task in accuracy_tasks(points):
        full = next((p["metrics"][f"{task}_acc"] for p in points if p["n"] == 0 and f"{task}_acc" in p["metrics"]), None)
        if full is None:
            continue
        for (strategy, heal), (xs, ys) in sorted(_curves(points, f"{task}_acc").items()):
            found.append({"task": task, "strategy": strategy, "heal": heal, "full_accuracy": full,
                          "collapse_fraction": collapse_point(xs, ys, full, tolerance)})
    return found


def _image(path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return html.escape("" if value is None else str(value))


def write_report(directory: str | Path, tolerance: float = 0.02) -> Path:
    """Draw every figure of a sweep directory into ``DIR/report/`` and write ``DIR/report/report.html``."""
    directory = Path(directory)
    points = load_points(directory)
    folder = directory / "report"
    folder.mkdir(exist_ok=True)
    distances = load_distances(directory / "analysis") if (directory / "analysis" / "distances.json").is_file() else None
    figures = [
        (plot_accuracy(points, folder / "accuracy.png"), "Accuracy vs fraction of layers dropped (dotted: chance, or the majority class for BoolQ)"),
        (plot_c4_loss(points, folder / "c4_loss.png"), "C4 validation loss, normalised by ln(vocabulary size)"),
        (plot_heatmap(distances, folder / "heatmap.png") if distances else None,
         "Angular distance d(x^(l), x^(l+n)) for every block; dots: the optimal first layer l*(n)"),
        (plot_best_block(distances, folder / "best_block.png") if distances else None,
         "Optimal first layer l*(n) and its distance vs block size n"),
        (plot_cost(points, folder / "cost.png"), "Measured cost vs the ideal linear model"),
    ]
    header, rows = table(points)
    collapses = collapse_points(points, tolerance)
    fits = cost_fits(points)
    summary = {"tolerance": tolerance, "collapse": collapses, "cost_fits": fits}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    model = points[0]["details"]["evaluation"].get("model", "") if points else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>depthprune report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}"
        "table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#f3f3f3}",
        "</style></head><body>",
        f"<h1>depthprune sweep: {html.escape(str(model))}</h1>",
        "<p>Layers are removed as one contiguous block (0-based, inclusive ranges). <em>similarity</em>: the block"
        " with the smallest angular distance between its input and output; <em>deepest</em>: the layers just"
        " before the final one.</p>",
        "<h2>Collapse points</h2>",
        f"<p>The largest fraction dropped whose accuracy stays within {tolerance:.2f} of the full model's.</p>",
        "<table><tr><th>task</th><th>strategy</th><th>healing</th><th>full model</th><th>collapse at</th></tr>",
        *[f"<tr><td>{c['task']}</td><td>{c['strategy']}</td><td>{c['heal']}</td><td>{c['full_accuracy']:.3f}</td>"
          f"<td>{c['collapse_fraction']:.2f}</td></tr>" for c in collapses],
        "</table>",
        *[_image(path, caption) for path, caption in figures],
    ]
    if fits:
        parts += ["<h2>Cost fits</h2><table><tr><th>cost</th><th>fixed</th><th>per layer</th><th>R²</th>"
                  "<th>one layer measured</th><th>per layer / measured</th></tr>"]
        parts += [f"<tr><td>{name}</td><td>{_format(f['fixed'])}</td><td>{_format(f['per_unit'])}</td>"
                  f"<td>{f['r2']:.4f}</td><td>{_format(f.get('one_layer_measured'))}</td>"
                  f"<td>{_format(f.get('slope_over_measured'))}</td></tr>" for name, f in fits.items()]
        parts.append("</table>")
    parts += ["<h2>All points</h2><table><tr>", *[f"<th>{html.escape(h)}</th>" for h in header], "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{_format(v)}</td>" for v in row) + "</tr>" for row in rows]
    parts.append("</table></body></html>")
    out = folder / "report.html"
    tmp = folder / ".report.html.tmp"
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out
