"""The paper's experiment in one call: evaluate the model with more and more of its layers removed.

One analysis feeds every point. A point is (n layers removed, strategy, healing). Unhealed points are
cut from the one loaded model in memory (``layers_removed``: no copy, no reload); healed points save the
cut checkpoint, heal it (resumable) and evaluate the merged result. Every finished point is one row of
``results.sqlite``; a rerun of the same command skips finished points and resumes an interrupted healing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .api import DataOptions, measure
from .errors import DepthpruneError
from .models import count_parameters, load_model, num_layers
from .outputs import atomic_write_text
from .select import STRATEGIES, choose_block
from .similarity import load_distances
from .store import connect, finished_keys, point_key, save_point
from .surgery import layers_removed, pruning_record, read_record, save_pruned

HEAL_METHODS = ("none", "qlora", "lora", "full")
NATIVE_TASKS = ("mmlu", "boolq", "c4", "arc_easy", "hellaswag")


@dataclass
class SweepConfig:
    """Every setting of a sweep; a YAML file with these keys (and CLI flags) fills it."""

    model: str = "smollm2-135m"
    out: str = "runs/sweep"
    device: str = "cpu"
    dtype: str = "float32"
    # calibration data for the angular distances
    data: str = ""
    data_config: str | None = None
    data_split: str = "train"
    text_field: str = "text"
    samples: int = 128
    seq_len: int = 256
    tokens: str = "last"
    seed: int = 0
    # points: fractions of the layers to remove (or explicit counts n), strategies, healing methods
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    n: list[int] | None = None
    strategies: list[str] = field(default_factory=lambda: ["similarity", "deepest"])
    heal: list[str] = field(default_factory=lambda: ["none"])
    heal_fractions: list[float] | None = None  # heal only the cuts of these fractions (None: every cut)
    # evaluation: native tasks (mmlu, boolq, c4, arc_easy, hellaswag) and lm-evaluation-harness tasks
    tasks: list[str] = field(default_factory=lambda: ["mmlu", "boolq", "c4"])
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: str | None = None
    lm_eval_data: str | None = None
    mmlu: str | None = None
    boolq: str | None = None
    c4: str | None = None
    arc_easy: str | None = None
    hellaswag: str | None = None
    shots: int = 5
    subjects: list[str] | None = None
    limit: int | None = None
    boolq_limit: int | None = None
    c4_sequences: int = 64
    c4_seq_len: int = 512
    batch_size: int = 8
    # healing: the data and any option of depthprune.heal (method comes from `heal` above)
    heal_data: str | None = None
    heal_val_data: str | None = None
    heal_preset: str | None = None
    heal_options: dict = field(default_factory=dict)
    # cost measurement
    cost: bool = True
    cost_prefill_len: int = 256
    cost_decode_tokens: int = 32
    cost_repeats: int = 3
    keep_models: bool = False


def _parse_fractions(value) -> list[float]:
    """'0:0.6:0.1' (start:stop:step, stop included), '0,0.25,0.5', or a list."""
    if isinstance(value, str):
        if ":" in value:
            parts = value.split(":")
            if len(parts) != 3:
                raise DepthpruneError(f"bad fractions '{value}': use start:stop:step, e.g. 0:0.6:0.1")
            start, stop, step = map(float, parts)
            if step <= 0:
                raise DepthpruneError(f"bad fractions '{value}': the step must be positive")
            count = int(round((stop - start) / step)) + 1
            return [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + 1e-9]
        value = value.split(",")
    return [float(v) for v in value]


def _as_list(value, kind=str) -> list:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [kind(v) for v in value]


def resolve_config(config_file: str | Path | None = None, **overrides) -> SweepConfig:
    """Defaults, then the YAML file, then ``overrides`` (None values ignored); checked for bad values."""
    settings: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise DepthpruneError(f"sweep config '{path}' not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DepthpruneError(f"sweep config '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise DepthpruneError(f"sweep config '{path}' must be a mapping of settings")
        settings.update(loaded)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise DepthpruneError(f"unknown sweep setting(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(known))}")
    for key in ("fractions", "heal_fractions"):
        if settings.get(key) is not None:
            settings[key] = _parse_fractions(settings[key])
    if settings.get("n") is not None:
        settings["n"] = _as_list(settings["n"], int)
    for key in ("strategies", "heal", "tasks", "lm_eval"):
        if key in settings:
            settings[key] = _as_list(settings[key])
    if settings.get("subjects") is not None:
        settings["subjects"] = _as_list(settings["subjects"])
    config = SweepConfig(**settings)
    _check(config)
    return config


def _check(c: SweepConfig) -> None:
    if not c.data:
        raise DepthpruneError("the sweep needs calibration data: pass --data SRC (or `data:` in the config)")
    bad = [f for f in c.fractions + (c.heal_fractions or []) if not 0 <= f < 1]
    if bad:
        raise DepthpruneError(f"fraction {bad[0]} out of range: fractions must be in [0, 1)")
    if c.n is not None and any(n < 0 for n in c.n):
        raise DepthpruneError("--n values must be 0 or more")
    for value, allowed, name in [(c.strategies, STRATEGIES, "strategy"), (c.heal, HEAL_METHODS, "healing method"),
                                 (c.tasks, NATIVE_TASKS, "task")]:
        wrong = [v for v in value if v not in allowed]
        if wrong:
            raise DepthpruneError(f"unknown {name} '{wrong[0]}': choose from {', '.join(allowed)}")
    if any(h != "none" for h in c.heal) and not c.heal_data:
        raise DepthpruneError("healing needs training text: pass --heal-data SRC (or `heal_data:` in the config)")


def block_sizes(c: SweepConfig, total_layers: int) -> list[int]:
    """The distinct n of the sweep, from explicit counts or fractions of the layers (0 = the full model)."""
    sizes = c.n if c.n is not None else [round(f * total_layers) for f in c.fractions]
    too_many = [n for n in sizes if n >= total_layers]
    if too_many:
        raise DepthpruneError(f"n={too_many[0]} out of range: the model has {total_layers} layers")
    return sorted(set(sizes))


def flatten_metrics(evaluation: dict, cost: dict | None, healing: dict | None) -> dict:
    """One flat name -> number mapping per point: what the results table and the report plot."""
    m: dict = {}
    for task, r in evaluation.get("tasks", {}).items():
        if task == "c4":
            m.update(c4_loss=r["loss"], c4_loss_norm=r["loss_over_log_vocab"], c4_ppl=r["perplexity"])
        else:
            m[f"{task}_acc"] = r["accuracy"]
            m[f"{task}_chance"] = r.get("chance", r.get("majority_baseline"))
    for task, r in evaluation.get("lm_eval", {}).get("tasks", {}).items():
        name = task.removesuffix("_local")
        accuracy = r.get("acc_norm", r.get("acc"))
        if accuracy is not None:
            m[f"{name}_acc"] = accuracy
            m[f"{name}_chance"] = CHANCE.get(name)
    if cost:
        m.update({k: cost[k] for k in ("parameters", "weight_bytes", "peak_memory_bytes", "prefill_tokens_per_s",
                                       "decode_tokens_per_s", "prefill_ms_per_token", "decode_ms_per_token",
                                       "layer_prefill_ms_per_token", "layer_decode_ms_per_token", "layer_weight_bytes")})
    if healing:
        m.update(heal_train_loss=healing.get("final_train_loss"), heal_val_loss_before=healing.get("val_loss_before"),
                 heal_val_loss=healing.get("val_loss_after"))
    return m


# Chance level of lm-eval multiple-choice tasks the report draws (4 choices each).
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25}


def _evaluate(model, tokenizer, c: SweepConfig) -> dict:
    from .evaluate import evaluate

    return evaluate(model, c.tasks or None, tokenizer=tokenizer, mmlu=c.mmlu, boolq=c.boolq, c4=c.c4, arc_easy=c.arc_easy,
                    hellaswag=c.hellaswag, shots=c.shots,
                    subjects=c.subjects, limit=c.limit, boolq_limit=c.boolq_limit, batch_size=c.batch_size, c4_sequences=c.c4_sequences,
                    c4_seq_len=c.c4_seq_len, seed=c.seed, lm_eval=c.lm_eval or None,
                    lm_eval_include=c.lm_eval_include, lm_eval_data=c.lm_eval_data, progress=False)


def _cost(model, c: SweepConfig) -> dict | None:
    from .cost import measure_cost

    if not c.cost:
        return None
    return measure_cost(model, prefill_len=c.cost_prefill_len, decode_tokens=c.cost_decode_tokens,
                        repeats=c.cost_repeats, seed=c.seed)


def _point_dir(out: Path, n: int, strategy: str, heal: str) -> Path:
    return out / "points" / f"n{n:03d}-{strategy}-{heal}"


def run_sweep(c: SweepConfig, log=print) -> Path:
    """Run every point of ``c`` not yet in ``results.sqlite``; returns the output directory."""
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "sweep.yaml"
    resolved = yaml.safe_dump(dataclasses.asdict(c), sort_keys=False)
    if saved.is_file() and saved.read_text() != resolved:
        raise DepthpruneError(f"'{out}' holds a sweep with other settings ({saved}): use another --out, or the "
                              "same settings to resume")
    atomic_write_text(saved, resolved)
    db = connect(out)
    done = finished_keys(db)

    model, tokenizer = load_model(c.model, device=c.device, dtype=c.dtype)
    total = num_layers(model)
    sizes = block_sizes(c, total)
    analysis = out / "analysis"
    if (analysis / "distances.json").is_file():
        distances = load_distances(analysis)
    else:
        log(f"measuring angular distances on {c.samples} samples of {c.data}")
        data = DataOptions(c.data, c.samples, c.seq_len, c.seed, c.text_field, c.data_config, c.data_split)
        distances = measure(model, tokenizer, data, batch_size=c.batch_size, tokens=c.tokens)
        from .report import plot_heatmap

        analysis.mkdir(exist_ok=True)
        distances.save(analysis)
        plot_heatmap(distances, analysis / "heatmap.png")

    healed_sizes = set(sizes) if c.heal_fractions is None else {round(f * total) for f in c.heal_fractions}
    points = [(0, "full", "none")] if 0 in sizes else []
    points += [(n, s, h) for n in sizes if n > 0 for s in c.strategies for h in c.heal
               if h == "none" or n in healed_sizes]
    todo = [p for p in points if point_key(*p) not in done]
    log(f"{len(points)} points, {len(points) - len(todo)} already finished")
    for index, (n, strategy, heal_method) in enumerate(todo, 1):
        start = time.perf_counter()
        selection = choose_block(strategy, n, total, distances) if n > 0 else None
        layers = selection.layers if selection else ()
        log(f"[{index}/{len(todo)}] {point_key(n, strategy, heal_method)}: removing layers "
            f"{list(layers) if layers else 'none'}")
        healing = None
        if heal_method == "none":
            with layers_removed(model, layers) as cut:
                evaluation = _evaluate(cut, tokenizer, c)
                cost = _cost(cut, c)
        else:
            healed_model, healing = _heal_point(model, tokenizer, c, out, n, strategy, heal_method, selection, total)
            evaluation = _evaluate(healed_model, tokenizer, c)
            cost = _cost(healed_model, c)
            del healed_model
        metrics = flatten_metrics(evaluation, cost, healing)
        save_point(db, n=n, fraction=n / total, strategy=strategy, heal=heal_method, removed_layers=layers,
                   distance=selection.distance if selection else None, metrics=metrics,
                   details={"evaluation": evaluation, "cost": cost, "healing": healing,
                            "seconds": round(time.perf_counter() - start, 1)})
        if heal_method != "none" and not c.keep_models:
            shutil.rmtree(_point_dir(out, n, strategy, heal_method), ignore_errors=True)
        log("    " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                if isinstance(v, float) and not k.endswith("_chance")))
    db.close()
    atomic_write_text(out / "summary.json", json.dumps({"model": c.model, "num_layers": total,
                                                        "points": len(points)}, indent=2) + "\n")
    return out


def _heal_point(model, tokenizer, c: SweepConfig, out: Path, n: int, strategy: str, method: str, selection,
                total: int):
    """Save the cut, heal it (resuming a killed healing) and load the merged result."""
    from .heal import heal

    folder = _point_dir(out, n, strategy, method)
    pruned, healed = folder / "pruned", folder / "healed"
    if not (pruned / "config.json").is_file():
        params_before = count_parameters(model)
        with layers_removed(model, selection.layers) as cut:
            record = pruning_record(c.model, total, params_before, cut, selection)
            save_pruned(cut, tokenizer, pruned, record, force=True)
    record = read_record(healed) if healed.is_dir() else None
    if record is not None and "healing" in record:
        healing = record["healing"]  # healed before the sweep was stopped, not yet evaluated
    else:
        options = {**c.heal_options, "method": method}
        healing = heal(str(pruned), c.heal_data, str(healed), val_data=c.heal_val_data, preset=c.heal_preset,
                       device=c.device, progress=False, **options)
    healed_model, _ = load_model(str(healed), device=c.device, dtype=c.dtype)
    return healed_model, healing
