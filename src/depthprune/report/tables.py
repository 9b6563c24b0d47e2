"""The report's tables as header and rows of text: the columns people compare (the repair and the agreement
with the full model among them, where the sweep has them), every column of the store, the layers each
criterion removes and how much the criteria agree, and the cost of each layer count.
"""

from __future__ import annotations

import numpy as np

from ..sweep.store import LAYER, NO_REPAIR, is_repaired, is_sublayer, table
from .cost import cost_points, timed_together
from .stats import (
    accuracy_tasks,
    agreement_size,
    agreement_tasks,
    metric_name,
    overlap,
    parameters_removed,
    reference,
    retained,
    sample_size,
    selections,
    standard_error,
    task_title,
)


def accuracy_cell(value: float, n: int | None) -> str:
    """'70.0 ± 4.6': an accuracy in % with its standard error on ``n`` questions (alone when n is unknown)."""
    return f"{100 * value:.1f}" if n is None else f"{100 * value:.1f} ± {100 * standard_error(value, n):.1f}"


def _layers(removed: list[int]) -> str:
    """'4: 20-23' or '4: 3,7,9-10': the count, then compact inclusive ranges (non-contiguous cuts as they are)."""
    from ..select import format_layers

    return f"{len(removed)}: {format_layers(removed)}" if removed else "–"


def main_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The columns people compare, formatted: fraction, layers, criterion, repair (in a sweep with one), healing,
    each task's headline accuracy ± SE (%), each multiple-choice task's agreement with the full model ± SE (%,
    where measured), the % of the full model retained (:data:`~depthprune.report.stats.RETAINED_DEFINITION`),
    C4 loss (nats), speed-ups against the full model, weight memory (MiB), and the point's wall and CPU seconds
    (where the store has them). A sweep with sub-layer cuts also has the granularity (what the layers listed
    lose) after the fraction; every point the % of parameters removed where known."""
    tasks = accuracy_tasks(points)
    agreed = agreement_tasks(points)
    repaired, finer = is_repaired(points), is_sublayer(points)
    full = reference(points)
    timed = [key for key in ("wall_s", "cpu_s") if any(p["metrics"].get(key) is not None for p in points)]
    shares = [parameters_removed(p, full) for p in points]
    header = ["removed", *["granularity"] * finer, "layers (0-based)", "criterion", *["repair"] * repaired, "healing"]
    header += ["parameters removed (%)"] * any(share is not None for share in shares)
    header += [f"{task_title(t)} {metric_name(points, t, m)} (%)" for t, m in tasks.items()]
    header += [f"{task_title(t)} agreement (%)" for t in agreed]
    header += ["retained (%)"] * bool(full and tasks)
    header += ["C4 loss (nats)", "prefill speed-up", "decode speed-up", "weights (MiB)"]
    header += [{"wall_s": "wall (s)", "cpu_s": "CPU (s)"}[key] for key in timed]
    rows = []
    for p, share in zip(points, shares, strict=True):
        m = p["metrics"]
        row = [f"{p['fraction']:.2f}", *[p.get("granularity", LAYER)] * finer, _layers(p["removed_layers"]),
               p["criterion"], *[p.get("repair", NO_REPAIR)] * repaired, p["heal"]]
        row += [("" if share is None else f"{100 * share:.1f}")] * ("parameters removed (%)" in header)
        row += ["" if m.get(k) is None else accuracy_cell(m[k], sample_size(p, t)) for t, k in tasks.items()]
        row += ["" if m.get(f"{t}_agreement") is None else accuracy_cell(m[f"{t}_agreement"], agreement_size(p, t))
                for t in agreed]
        if full and tasks:
            share = retained(p, full, tasks)
            row.append("" if share is None else f"{100 * share:.1f}")
        row.append("" if m.get("c4_loss") is None else f"{m['c4_loss']:.2f}")
        for key in ("prefill_ms_per_token", "decode_ms_per_token"):
            base = full["metrics"].get(key) if full else None
            row.append(f"{base / m[key]:.2f}×" if base and m.get(key) else "")
        row.append("" if m.get("weight_bytes") is None else f"{m['weight_bytes'] / 2**20:,.1f}")
        row += ["" if m.get(key) is None else f"{m[key]:,.0f}" for key in timed]
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
    agreed = {h: h.removesuffix("_agreement") for h in header if h.endswith("_agreement")}
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in header]
    formats = [_formatter(h, list(c)) for h, c in zip(header, columns, strict=True)]
    cells = []
    for p, row in zip(points, rows, strict=True):
        cells.append([accuracy_cell(v, sample_size(p, task[h])) if h in task and v is not None else
                      accuracy_cell(v, agreement_size(p, agreed[h])) if h in agreed and v is not None else f(v)
                      for h, v, f in zip(header, row, formats, strict=True)])
    units = {h: " (MiB)" if h.endswith("_bytes") else " (% ± SE)" if h in task or h in agreed else
             " (%)" if h.endswith("_chance") else "" for h in header}
    return [h + units[h] for h in header], cells


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


def cost_table(points: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per cut size timed in the cost phase (layer count, or count of sub-layers of a kind: '8 attention'):
    medians and [fastest–slowest round], and the KV cache per token where measured ([] for older sweeps)."""
    measured = cost_points(points, sublayers=True)
    if not timed_together(measured):
        return [], []
    kv = any(p["metrics"].get("kv_bytes_per_token") is not None for p in measured)
    header = ["removed (n)", "layers kept", "prefill (ms/token)", "decode (ms/token)", "weights (MiB)",
              "peak memory (MiB)", "one layer, prefill (ms/token)", *["KV cache (KiB/token)"] * kv]

    def cell(p: dict, metric: str, scale: float = 1.0, digits: int = 4) -> str:
        value, (low, high) = p["metrics"][metric], p["details"]["cost"]["spread"][metric]
        return f"{value * scale:,.{digits}g} [{low * scale:,.{digits}g}–{high * scale:,.{digits}g}]"

    def removed(p: dict) -> str:
        granularity = p.get("granularity") or LAYER
        return str(p["n"]) if granularity == LAYER or p["n"] == 0 else f"{p['n']} {granularity}"

    def kv_cell(p: dict) -> str:
        value = p["metrics"].get("kv_bytes_per_token")
        return "" if value is None else f"{value / 2**10:,.2f}"

    rows = [[removed(p), str(p["details"]["cost"]["num_layers"]), cell(p, "prefill_ms_per_token"),
             cell(p, "decode_ms_per_token"), f"{p['metrics']['weight_bytes'] / 2**20:,.1f}",
             cell(p, "peak_memory_bytes", 1 / 2**20), cell(p, "layer_prefill_ms_per_token"), *[kv_cell(p)] * kv]
            for p in measured]
    return header, rows
