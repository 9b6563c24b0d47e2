"""The self-contained HTML report of a sweep: every figure embedded as a PNG, the tables, the collapse
verdicts and cost fits, and the full results (as CSV too), written with ``summary.json`` into ``DIR/report/``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from ..errors import DepthpruneError
from ..measure.distances import AngularDistances, load_distances
from ..outputs import atomic_write_text
from ..sweep.store import UNPRUNED, load_points, to_csv
from .cost import COST_PANELS, MIN_R2, cost_fits, cost_points, cost_timing, timed_together
from .figures import (
    knows_parameters,
    plot_accuracy,
    plot_agreement,
    plot_best_block,
    plot_c4_loss,
    plot_cost,
    plot_heatmap,
    plot_retained,
    plot_selections,
)
from .stats import (
    PARAMETERS_DEFINITION,
    RETAINED_DEFINITION,
    accuracy_tasks,
    collapse_definition,
    collapse_points,
    curve_label,
    cut_name,
    overlap,
    reference,
    retained,
    sample_size,
    selections,
    task_title,
)
from .tables import accuracy_cell, cost_table, full_table, main_table, overlap_table, selection_table


def _html_table(header: list[str], rows: list[list[str]], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' id={table_id!r}' if table_id else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _collapse_html(verdicts: list[dict], sigmas: float) -> str:
    """One row per task: the full model and its baseline, then one cell per curve (or one uninformative cell)."""
    if not verdicts:
        return "<p>No accuracy was measured on the full model.</p>"
    curves = list(dict.fromkeys((cut_name(v), v["heal"]) for v in verdicts))
    measured = {(cut_name(v), v["heal"]): v["fractions"] for v in verdicts}
    header = ["task", "full model (%)", "baseline (%)"]
    header += [f"{curve_label(*c)} (at {', '.join(f'{f:.2f}' for f in measured[c])})" for c in curves]
    rows = []
    for task in dict.fromkeys(v["task"] for v in verdicts):
        mine = {(cut_name(v), v["heal"]): v for v in verdicts if v["task"] == task}
        first = next(iter(mine.values()))
        n, level = first["num_questions"], first["baseline"]
        cells = [f"{task_title(task)} ({n or '?'} questions)", accuracy_cell(first["full_accuracy"], n),
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
    """What each criterion and repair of the sweep does, from the registries (layers are 0-based, ranges
    inclusive)."""
    from ..repair import REPAIRS
    from ..select import CRITERIA

    used = [name for name in dict.fromkeys(p["criterion"] for p in points) if name != UNPRUNED]
    described = [f"<em>{html.escape(name)}</em>: {html.escape(CRITERIA.get(name).description)}"
                 + ("" if CRITERIA.get(name).contiguous else " (not one block)")
                 for name in used if name in CRITERIA]
    repairs = [name for name in dict.fromkeys(p.get("repair") or "none" for p in points) if name in REPAIRS]
    repaired = [f"<em>{html.escape(name)}</em>: {html.escape(REPAIRS.get(name).description)}" for name in repairs]
    text = "Layers are 0-based and ranges inclusive." + (" Criteria: " + "; ".join(described) + "." if described else "")
    if repaired:
        text += (" Repairs, fitted without training on the sweep's calibration text and folded into the last kept "
                 "layer before the cut (curves 'criterion + repair'): " + "; ".join(repaired) + ".")
    return f"<p>{text}</p>"


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
    figures = _draw_figures(points, distances, folder, sigmas)
    verdicts = collapse_points(points, sigmas)
    fits = cost_fits(points)
    full = reference(points)
    sizes = {t: sample_size(full, t) for t in accuracy_tasks(points)} if full else {}
    summary = _summary(points, sigmas, verdicts, fits, sizes)
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    csv_text = to_csv(points)
    atomic_write_text(folder / "results.csv", csv_text)
    parts = [*_introduction(points, sizes, verdicts, sigmas), *_results_html(points, csv_text),
             *_comparison_html(points), *[_image(path, caption) for path, caption in figures],
             *_cost_html_sections(points, fits), *_full_table_html(points), "</body></html>"]
    out = folder / "report.html"
    atomic_write_text(out, "\n".join(parts))
    return out


def _draw_figures(points: list[dict], distances: AngularDistances | None, folder: Path,
                  sigmas: float) -> list[tuple[Path | None, str]]:
    """Every figure of the report as (its PNG, or None where the sweep has nothing to draw, caption); the accuracy
    and C4 loss also against the fraction of parameters removed, where the points know it."""
    by_parameters = knows_parameters(points)
    return [
        (plot_accuracy(points, folder / "accuracy.png", sigmas),
         "Accuracy vs fraction of layers removed. Bars: Wilson 95 % intervals from the number of questions; dotted: "
         "chance (the majority class for BoolQ); grey band: within noise of it. Healed curves join only the healed "
         "fractions; the star is the full model."),
        (plot_c4_loss(points, folder / "c4_loss.png"), "C4 validation loss, normalised by ln(vocabulary size)"),
        (plot_accuracy(points, folder / "accuracy_parameters.png", sigmas, x="parameters") if by_parameters else None,
         f"Accuracy vs {PARAMETERS_DEFINITION}: cuts of whole layers and of sub-layers compared at equal parameters. "
         "Bars, dotted line and grey band as above."),
        (plot_c4_loss(points, folder / "c4_loss_parameters.png", x="parameters") if by_parameters else None,
         f"C4 validation loss vs {PARAMETERS_DEFINITION}"),
        (plot_agreement(points, folder / "agreement.png"),
         "Agreement with the full model vs fraction of layers removed: the share of each multiple-choice task's "
         "questions where the cut model picks the answer the full model (n = 0) picks, right or wrong. Bars: Wilson "
         "95 % intervals."),
        (plot_retained(points, folder / "retained.png"), RETAINED_DEFINITION),
        (plot_heatmap(distances, folder / "heatmap.png", selections=selections(points)) if distances else None,
         "Angular distance d(x^(l), x^(l+n)) for every block; white dots: the optimal first layer l*(n); coloured "
         "markers on row n: every layer each criterion removes at that n (non-contiguous cuts included; A / M: the "
         "layers whose attention / MLP a sub-layer cut of n removes)"),
        (plot_selections(points, folder / "selections.png", distances.num_layers if distances else None),
         "The layers each criterion removes at each n of the sweep (lettered A / M: only their attention / MLP)"),
        (plot_best_block(distances, folder / "best_block.png") if distances else None,
         "Optimal first layer l*(n) and its distance vs block size n"),
        (plot_cost(points, folder / "cost.png"),
         "Measured cost per number of layers (median and spread of interleaved rounds) vs a fixed part plus an equal "
         "part per layer" if timed_together(points) else
         "Measured cost of the unhealed models vs a fixed part plus an equal part per layer"),
    ]


def _summary(points: list[dict], sigmas: float, verdicts: list[dict], fits: dict, sizes: dict) -> dict:
    """summary.json: the collapse verdicts and their rule, the cost fits, the layers each criterion removes
    and the criteria's overlap (n as text: JSON keys), the % of the full model each point retains (by key)."""
    full, tasks = reference(points), accuracy_tasks(points)
    shares = {p["key"]: retained(p, full, tasks) for p in points}
    return {"sigmas": sigmas, "collapse_definition": collapse_definition(sigmas), "sample_sizes": sizes,
            "collapse": verdicts, "cost_fits": fits, "retained_definition": RETAINED_DEFINITION,
            "retained_percent": {key: round(100 * share, 2) for key, share in shares.items() if share is not None},
            "selections": {c: {str(n): ls for n, ls in by_n.items()} for c, by_n in selections(points).items()},
            "overlap_jaccard": [{"criteria": p["criteria"], "by_n": {str(n): v for n, v in p["by_n"].items()}}
                                for p in overlap(points)]}


def _introduction(points: list[dict], sizes: dict, verdicts: list[dict], sigmas: float) -> list[str]:
    """The page's head, the criteria, the sample sizes and the collapse points."""
    model = points[0]["details"]["evaluation"].get("model", "") if points else ""
    size_text = ", ".join(f"{task_title(t)} {n or '?'}" for t, n in sizes.items())
    largest = sorted({round(50 / math.sqrt(n), 1) for n in sizes.values() if n})  # the SE at p = 50 %
    worst = "" if not largest else f" (at p = 50 %: {largest[0]} points here)" if len(largest) == 1 else \
        f" (at p = 50 %: {largest[0]}–{largest[-1]} points here)"
    return [
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
    ]


def _results_html(points: list[dict], csv_text: str) -> list[str]:
    """The main table, how its speed-ups were timed, and the CSV of every column beside it and embedded."""
    csv_uri = "data:text/csv;base64," + base64.b64encode(csv_text.encode()).decode()
    measured = cost_points(points)
    speed_note = (f"medians of {cost_timing(measured)['rounds']} interleaved rounds timed together at the end of the "
                  "sweep; their spread is under Measured cost" if timed_together(measured)
                  else "one timing each, so noisy")
    return [
        "<h2>Results</h2>",
        f"<p>Speed-ups are the full model's time per token over the cut model's ({speed_note}). "
        f"{html.escape(RETAINED_DEFINITION)} Wall and CPU seconds (process CPU time, every thread) cover a point's "
        "cut, repair, healing and evaluation. "
        f"Every column: <a href='results.csv'>results.csv</a> beside this file, or "
        f"<a download='results.csv' href='{csv_uri}'>the copy embedded in this page</a>.</p>",
        f"<div class='scroll'>{_html_table(*main_table(points), table_id='main-table')}</div>",
    ]


def _cost_html_sections(points: list[dict], fits: dict) -> list[str]:
    """The cost fits (when there are enough layer counts) and the cost phase's timings (when it ran)."""
    parts = []
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
    return parts


def _full_table_html(points: list[dict]) -> list[str]:
    """Every column of every point, folded away under a summary line."""
    full_header, full_rows = full_table(points)
    return [f"<details><summary>All {len(full_header)} columns of the {len(points)} points</summary>",
            f"<div class='scroll'>{_html_table(full_header, full_rows, table_id='full-table')}</div></details>"]
