"""The measured cost of a sweep's models: which timings describe each layer count, and the line
cost = fixed + per layer × layers kept fitted through them, with the reasons not to draw it.
"""

from __future__ import annotations

from ..measure.cost import linear_fit
from .stats import reference

MIN_R2 = 0.9  # below this the linear cost model explains too little of the timings to draw it as "ideal"
# (metric, what it is, unit, scale to that unit, the metric of one layer's own cost measured in the full model)
COST_PANELS = [("prefill_ms_per_token", "prefill time per token", "ms", 1.0, "layer_prefill_ms_per_token"),
               ("decode_ms_per_token", "decode time per token", "ms", 1.0, "layer_decode_ms_per_token"),
               ("weight_bytes", "weight memory", "MiB", 1 / 2**20, "layer_weight_bytes"),
               ("peak_memory_bytes", "peak memory", "MiB", 1 / 2**20, None)]


def timed_together(points: list[dict]) -> bool:
    """Whether the sweep's cost comes from its final cost phase: every layer count timed in the same
    interleaved rounds, one record per count with the median and spread (min, max) of the rounds. Older
    sweeps timed each point once, whenever it ran."""
    return any("spread" in (p["details"].get("cost") or {}) for p in points)


def cost_points(points: list[dict], sublayers: bool = False) -> list[dict]:
    """The points the cost figure and fits use: one per layer count timed in the cost phase (its cost is
    the same for every point with that count, healed or not); in older sweeps, every unhealed point. Cuts of
    whole layers only (the line is per layer kept), unless ``sublayers``: then one per cut size (n, granularity)
    of every granularity, as the cost table lists them."""
    measured = [p for p in points if p["metrics"].get("prefill_ms_per_token") is not None
                and (sublayers or (p.get("granularity") or "layer") == "layer" or p["n"] == 0)]
    if not timed_together(measured):
        # Unhealed models only, so a fit describes one condition: healed models are extra timings of the
        # same architectures, taken at other moments of the sweep.
        return [p for p in measured if p["heal"] == "none"]
    by_size: dict[tuple, dict] = {}
    for p in sorted(measured, key=lambda p: (p.get("granularity") != "layer", p["n"], p["heal"] != "none",
                                             p["criterion"])):
        granularity = "layer" if p["n"] == 0 else p.get("granularity") or "layer"
        by_size.setdefault((p["details"]["cost"]["num_layers"], granularity, p["n"] if granularity != "layer" else 0), p)
    return list(by_size.values())


def cost_timing(measured: list[dict]) -> dict:
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
    measured = cost_points(points)
    if len({p["n"] for p in measured}) < 3:
        return {}
    full = reference(measured)
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
    for p in cost_points(points):
        by_size.setdefault(p["details"]["cost"]["num_layers"], []).append(p["metrics"][metric])
    spreads = [(max(v) - min(v)) / min(v) for v in by_size.values() if len(v) > 1 and min(v) > 0]
    return max(spreads) if spreads else None
