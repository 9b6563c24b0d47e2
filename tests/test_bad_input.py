"""Bad input to analyze, prune and eval (and the Python API behind them): one clean line, exit 2, nothing written.

Every CLI case runs through :func:`badinput.assert_clean_failure`, which also checks that nothing under the
watched folders (the models, the data, the outputs) changed or appeared. The broken files are made once per
session from the tiny checkpoint; almost every case fails before a model loads, so the whole file takes seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from badinput import assert_clean_failure
from conftest import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import depthprune
from depthprune import DataOptions, DepthpruneError
from depthprune.evaluate import suite
from depthprune.measure.distances import AngularDistances
from depthprune.model.load import num_layers

ROOT_CANNOT_BE_REFUSED = pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
BINARY = b"\xff\xfe\x00\x81" + random.Random(0).randbytes(2000)
FINGERPRINT = {"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 32, "vocab_size": 96}


def _checkpoint_variant(root, ckpt, name, config=None, weights=None, files=None):
    """A copy of the tiny checkpoint with its config edited, its weights replaced, or extra files."""
    path = root / name
    shutil.copytree(ckpt, path)
    if config is not None:
        (path / "config.json").write_text(config(json.loads((ckpt / "config.json").read_text())))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights((ckpt / "model.safetensors").read_bytes()))
    for file, content in (files or {}).items():
        (path / file).write_text(content)
    return path


def _with(raw: dict, **changes) -> str:
    return json.dumps({**raw, **changes})


def _distances_variants(root) -> dict:
    pairwise = np.abs(np.subtract.outer(np.arange(7), np.arange(7))) / 10
    good = AngularDistances(pairwise, 10, "last", {"model_fingerprint": FINGERPRINT})
    raw = good.to_json()
    other = AngularDistances(np.abs(np.subtract.outer(np.arange(9), np.arange(9))) / 10, 10, "last",
                             {"model_fingerprint": {**FINGERPRINT, "num_hidden_layers": 8}}).to_json()
    texts = {
        "good": json.dumps(raw),
        "not_json": "this is not JSON",
        "truncated": json.dumps(raw)[:200],
        "no_format": _with(raw, format=None),
        "a_list": "[1, 2, 3]",
        "not_square": _with(raw, pairwise=[[0.0, 0.1], [0.1, 0.0], [0.2, 0.3]], num_layers=None),
        "strings": _with(raw, pairwise=[["a", "b"], ["c", "d"]]),
        "nan": _with(raw, pairwise=np.where(pairwise == 0.1, np.nan, pairwise).tolist()),
        "above_one": _with(raw, pairwise=(pairwise * 20).tolist()),
        "bad_samples": _with(raw, num_samples="ten"),
        "bad_token_mode": _with(raw, token_mode="first"),
        "bad_tokens": _with({k: v for k, v in raw.items() if k != "token_mode"}, tokens="first"),  # before issue 18
        "bad_layers": _with(raw, num_layers=4),
        "bad_fingerprint": _with(raw, model_fingerprint=[1, 2]),
        "eight_layers": json.dumps(other),
        "other_width": _with(raw, model_fingerprint={**FINGERPRINT, "hidden_size": 64}),
    }
    out = {}
    for name, text in texts.items():
        (root / f"dist_{name}").mkdir()
        (root / f"dist_{name}" / "distances.json").write_text(text)
        out[f"dist_{name}"] = root / f"dist_{name}"
    return out


def _mmlu(root, name, test_bytes=None):
    rows = [f"Question {i}?,a,b,c,d,{'ABCD'[i % 4]}\n" for i in range(5)]
    for split in ("dev", "test"):
        (root / name / split).mkdir(parents=True)
        (root / name / split / f"astronomy_{split}.csv").write_text("".join(rows))
    if test_bytes is not None:
        (root / name / "test" / "astronomy_test.csv").write_bytes(test_bytes)
    return root / name


@pytest.fixture(scope="session")
def bad(tmp_path_factory, tiny_checkpoint, tiny_corpus) -> dict:
    """Every broken input, made once: data files, checkpoints, distances, task data; keyed by name."""
    root = tmp_path_factory.mktemp("bad-inputs")
    boolq_row = json.dumps({"passage": "w1 w2", "question": "w3", "label": True})
    arc_row = json.dumps({"id": "1", "question": {"stem": "w1", "choices": [{"text": "w2", "label": "A"},
                                                                           {"text": "w3", "label": "B"}]},
                          "answerKey": "A"})
    hs_row = json.dumps({"activity_label": "w1", "ctx_a": "w2", "ctx_b": "w3", "endings": ["w4", "w5"], "label": 0})
    files = {
        "binary.jsonl": BINARY, "binary.txt": BINARY, "garbage.parquet": BINARY,
        "truncated.jsonl": b'{"text": "w1 w2"}\n{"text": "w3',
        "truncated.json": b'[{"text": "w1 w2"}, {"te',
        "latin1.txt": "caf\xe9 w1 w2\n".encode("latin-1"),
        "boolq.jsonl": (boolq_row + "\n").encode(), "boolq_truncated.jsonl": (boolq_row + "\n" + boolq_row[:20]).encode(),
        "boolq_truncated.json": ("[" + boolq_row + ", {").encode(), "boolq_binary.jsonl": BINARY,
        "arc_binary.jsonl": BINARY, "arc_truncated.jsonl": (arc_row + "\n" + arc_row[:30]).encode(),
        "hs_binary.jsonl": BINARY, "hs_truncated.jsonl": (hs_row + "\n" + hs_row[:30]).encode(),
    }
    paths = {}
    for name, content in files.items():
        (root / name).write_bytes(content)
        paths[name.replace(".", "_")] = root / name
    (root / "datadir").mkdir()
    shutil.copy(tiny_corpus, root / "datadir" / "good.jsonl")
    (root / "datadir" / "broken.jsonl").write_bytes(BINARY)
    (root / "a_file").write_text("a file, not a folder")
    (root / "cwd").mkdir()
    ckpt = tiny_checkpoint
    variants = {
        "truncated_weights": dict(weights=lambda b: b[: len(b) // 2]),
        "random_weights": dict(weights=lambda b: BINARY),
        "config_list": dict(config=lambda c: json.dumps([c])),
        "config_string": dict(config=lambda c: json.dumps("llama")),
        "config_garbage": dict(config=lambda c: "{model_type: llama"),
        "config_unknown_type": dict(config=lambda c: _with(c, model_type="no-such-model")),
        "config_8_layers": dict(config=lambda c: _with(c, num_hidden_layers=8)),
        "config_4_layers": dict(config=lambda c: _with(c, num_hidden_layers=4)),
        "record_garbage": dict(files={"depthprune.json": '{"removed_layers": [1, 2'}),
        "record_list": dict(files={"depthprune.json": "[1, 2]"}),
        "record_bad_layers": dict(files={"depthprune.json": '{"removed_layers": "2-3"}'}),
    }
    for name, change in variants.items():
        paths[name] = _checkpoint_variant(root, ckpt, name, **change)
    (root / "no_weights").mkdir()
    shutil.copy(ckpt / "config.json", root / "no_weights" / "config.json")
    paths["no_weights"] = root / "no_weights"
    paths.update(_distances_variants(root))
    paths.update(mmlu=_mmlu(root, "mmlu"), mmlu_binary=_mmlu(root, "mmlu_binary", BINARY),
                 mmlu_truncated=_mmlu(root, "mmlu_truncated", b"Question 1?,a,b,c,d,A\nQuestion 2?,a,b"))
    return dict(paths, root=root, ckpt=ckpt, corpus=tiny_corpus, datadir=root / "datadir", a_file=root / "a_file",
                cwd=root / "cwd", out=root / "out", out_file=root / "results.json")


def _argv(command: str, defaults: dict, model: str = "{ckpt}", **options) -> list[str]:
    """``command MODEL --option value ...``; an option set to None is left out, True is a flag."""
    argv = [command, model]
    for name, value in {**defaults, **options}.items():
        if value is None:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def analyze(**options):
    return _argv("analyze", {"data": "{corpus}", "seq_len": 16, "samples": 4, "out": "{out}"}, **options)


def prune(**options):
    return _argv("prune", {"n": 2, "criterion": "deepest", "out": "{out}"}, **options)


def evaluate(**options):
    return _argv("eval", {"boolq": "{boolq_jsonl}", "limit": 2, "out": "{out_file}"}, **options)


CASES = [
    # analyze: calibration data
    ("analyze binary jsonl", analyze(data="{binary_jsonl}"), "binary.jsonl:1: not UTF-8"),
    ("analyze binary txt", analyze(data="{binary_txt}"), "binary.txt:1: not UTF-8"),
    ("analyze latin-1 txt", analyze(data="{latin1_txt}"), "latin1.txt:1: not UTF-8"),
    ("analyze truncated json", analyze(data="{truncated_json}"), "truncated.json:1:22: not valid JSON (Unterminated string starting at); the file ends early"),
    ("analyze truncated jsonl", analyze(data="{truncated_jsonl}"), "truncated.jsonl:2: not valid JSON"),
    ("analyze garbage parquet", analyze(data="{garbage_parquet}"), "not a readable parquet file"),
    ("analyze broken file in a data dir", analyze(data="{datadir}"), "broken.jsonl:1: not UTF-8"),
    # analyze: options
    ("analyze seq-len beyond positions", analyze(seq_len=100000), "--seq-len 100000 is longer than the model's 128"),
    ("analyze seq-len 1", analyze(seq_len=1), "--seq-len must be at least 2"),
    ("analyze batch-size 0", analyze(batch_size=0), "--batch-size must be at least 1"),
    ("analyze samples 0", analyze(samples=0), "--samples must be at least 1"),
    ("analyze samples negative", analyze(samples=-5), "--samples must be at least 1"),
    ("analyze data dir without texts", analyze(data="{cwd}"), "holds no .jsonl/.json/.txt/.parquet files"),
    # analyze: outputs
    ("analyze out is the model dir", analyze(out="{ckpt}"), "overlaps the input"),
    ("analyze out inside the model dir", analyze(out="{ckpt}/analysis"), "overlaps the input"),
    ("analyze out contains the data", analyze(data="{datadir}/good.jsonl", out="{datadir}"), "overlaps the input"),
    ("analyze out inside a file", analyze(out="{a_file}/analysis"), "which is a file"),
    ("analyze out is a file", analyze(out="{a_file}"), "not a directory"),
    ("analyze out is the cwd", analyze(out="."), "current directory"),
    # analyze: the model's files
    ("analyze truncated weights", analyze(model="{truncated_weights}"), "not a readable safetensors file"),
    ("analyze random weights", analyze(model="{random_weights}"), "not a readable safetensors file"),
    ("analyze no weights", analyze(model="{no_weights}"), "holds no model.safetensors"),
    ("analyze config a list", analyze(model="{config_list}"), "expected a JSON object, found a list"),
    ("analyze config a string", analyze(model="{config_string}"), "expected a JSON object, found a str"),
    ("analyze config garbage", analyze(model="{config_garbage}"), "config.json:1:2: not valid JSON"),
    ("analyze config unknown type", analyze(model="{config_unknown_type}"), "not a usable model config"),
    ("analyze config 8 layers, weights 6", analyze(model="{config_8_layers}"), "do not match its config.json"),
    ("analyze damaged depthprune.json", analyze(model="{record_garbage}"), "depthprune.json:1:"),
    # prune: outputs
    ("prune out is the model dir", prune(out="{ckpt}", force=True), "overlaps the input"),
    ("prune out is the cwd", prune(out="."), "current directory"),
    ("prune out is the distances dir", prune(distances="{dist_good}", out="{dist_good}", force=True),
     "overlaps the input"),
    ("prune out inside a file", prune(out="{a_file}/pruned"), "which is a file"),
    # prune: which layers
    ("prune layers huge range", prune(n=None, layers="0-3000000000"), "layer 3000000000 out of range"),
    ("prune layers reversed", prune(n=None, layers="5-3"), "must not exceed"),
    ("prune layers garbage", prune(n=None, layers="two-three"), "bad layer spec"),
    ("prune n 0", prune(n=0), "out of range"),
    ("prune n all layers", prune(n=6), "out of range"),
    ("prune fraction above 1", prune(n=None, fraction=1.5), "out of range"),
    ("prune fraction rounds to 0", prune(n=None, fraction=0.01), "rounds to 0"),
    # prune: damaged distances
    ("distances not JSON", prune(criterion="similarity", distances="{dist_not_json}"), "not valid JSON"),
    ("distances truncated", prune(criterion="similarity", distances="{dist_truncated}"), "is it truncated?"),
    ("distances without format", prune(criterion="similarity", distances="{dist_no_format}"),
     "not a depthprune distances file"),
    ("distances a list", prune(criterion="similarity", distances="{dist_a_list}"), "not a depthprune distances file"),
    ("distances not square", prune(criterion="similarity", distances="{dist_not_square}"), "square matrix"),
    ("distances strings", prune(criterion="similarity", distances="{dist_strings}"), "not a matrix of numbers"),
    ("distances NaN", prune(criterion="similarity", distances="{dist_nan}"), "NaN"),
    ("distances above 1", prune(criterion="similarity", distances="{dist_above_one}"), "between 0 and 1"),
    ("distances sample count", prune(criterion="similarity", distances="{dist_bad_samples}"), "num_samples is 'ten'"),
    ("distances token mode", prune(criterion="similarity", distances="{dist_bad_token_mode}"), "token_mode is 'first'"),
    ("distances old token mode", prune(criterion="similarity", distances="{dist_bad_tokens}"), "tokens is 'first'"),
    ("distances layer count", prune(criterion="similarity", distances="{dist_bad_layers}"), "num_layers 4"),
    ("distances fingerprint", prune(criterion="similarity", distances="{dist_bad_fingerprint}"), "model_fingerprint"),
    # prune: distances of another model, for every criterion
    ("8-layer distances, similarity", prune(criterion="similarity", distances="{dist_eight_layers}"),
     "measured on a 8-layer model but this one has 6"),
    ("8-layer distances, deepest", prune(distances="{dist_eight_layers}"), "measured on a 8-layer model"),
    ("8-layer distances, explicit", prune(n=None, layers="1-2", distances="{dist_eight_layers}"),
     "measured on a 8-layer model"),
    ("other-width distances, similarity", prune(criterion="similarity", distances="{dist_other_width}"),
     "hidden_size 64 there, 32 here"),
    ("other-width distances, deepest", prune(distances="{dist_other_width}"), "measured on another model"),
    ("other-width distances, explicit", prune(n=None, layers="1-2", distances="{dist_other_width}"),
     "measured on another model"),
    # prune: measuring now, and the model's files
    ("prune data seq-len beyond positions", prune(criterion="similarity", data="{corpus}", seq_len=100000),
     "longer than the model's 128"),
    ("prune data binary", prune(criterion="similarity", data="{binary_jsonl}", seq_len=16), "not UTF-8"),
    ("prune data samples 0", prune(criterion="similarity", data="{corpus}", samples=0), "--samples must be at least 1"),
    ("prune data batch-size 0", prune(criterion="similarity", data="{corpus}", batch_size=0), "--batch-size"),
    ("prune similarity without distances", prune(criterion="similarity"), "needs --distances"),
    ("prune truncated weights", prune(model="{truncated_weights}"), "not a readable safetensors file"),
    ("prune config 8 layers, weights 6", prune(model="{config_8_layers}"), "weights the config needs are missing"),
    ("prune config 4 layers, weights 6", prune(model="{config_4_layers}"), "not in the config's model"),
    ("prune damaged depthprune.json", prune(model="{record_list}"), "expected a JSON object"),
    # eval: outputs
    ("eval out is the model dir", evaluate(out="{ckpt}"), "is a directory"),
    ("eval out is the data file", evaluate(out="{boolq_jsonl}"), "overlaps the input"),
    ("eval out inside the model dir", evaluate(out="{ckpt}/config.json"), "overlaps the input"),
    ("eval out inside a file", evaluate(out="{a_file}/r.json"), "which is a file"),
    # eval: options
    ("eval shots -1", evaluate(boolq=None, mmlu="{mmlu}", shots=-1), "--shots must be at least 0"),
    ("eval more shots than dev examples", evaluate(boolq=None, mmlu="{mmlu}", shots=10), "fewer than 10 shots"),
    ("eval unknown subject", evaluate(boolq=None, mmlu="{mmlu}", subjects="astrology"), "unknown MMLU subject"),
    ("eval batch-size 0", evaluate(batch_size=0), "--batch-size must be at least 1"),
    ("eval max-length beyond positions", evaluate(max_length=100000), "--max-length 100000 is longer"),
    ("eval max-length 1", evaluate(max_length=1), "--max-length must be at least 2"),
    ("eval c4-seq-len 0", evaluate(boolq=None, c4="{corpus}", c4_seq_len=0), "--c4-seq-len must be at least 2"),
    ("eval c4-seq-len 1", evaluate(boolq=None, c4="{corpus}", c4_seq_len=1), "--c4-seq-len must be at least 2"),
    ("eval c4-seq-len beyond positions", evaluate(boolq=None, c4="{corpus}", c4_seq_len=100000), "longer than"),
    ("eval c4-sequences 0", evaluate(boolq=None, c4="{corpus}", c4_sequences=0), "--c4-sequences must be at least 1"),
    ("eval limit 0", evaluate(limit=0), "--limit must be at least 1"),
    ("eval boolq-limit 0", evaluate(boolq_limit=0), "--boolq-limit must be at least 1"),
    ("eval lm-eval-fewshot -1", evaluate(lm_eval_fewshot=-1), "--lm-eval-fewshot must be at least 0"),
    # eval: task data
    ("eval mmlu binary csv", evaluate(boolq=None, mmlu="{mmlu_binary}"), "astronomy_test.csv:1: not UTF-8"),
    ("eval mmlu truncated csv", evaluate(boolq=None, mmlu="{mmlu_truncated}"), "row 2 has 3 columns"),
    ("eval boolq binary", evaluate(boolq="{boolq_binary_jsonl}"), "boolq_binary.jsonl:1: not UTF-8"),
    ("eval boolq truncated jsonl", evaluate(boolq="{boolq_truncated_jsonl}"), "boolq_truncated.jsonl:2: not valid"),
    ("eval boolq truncated json", evaluate(boolq="{boolq_truncated_json}"), "is it truncated?"),
    ("eval arc binary", evaluate(boolq=None, arc_easy="{arc_binary_jsonl}"), "arc_binary.jsonl:1: not UTF-8"),
    ("eval arc truncated", evaluate(boolq=None, arc_easy="{arc_truncated_jsonl}"), "arc_truncated.jsonl:2: not valid"),
    ("eval hellaswag binary", evaluate(boolq=None, hellaswag="{hs_binary_jsonl}"), "hs_binary.jsonl:1: not UTF-8"),
    ("eval hellaswag truncated", evaluate(boolq=None, hellaswag="{hs_truncated_jsonl}"), "hs_truncated.jsonl:2:"),
    ("eval c4 binary", evaluate(boolq=None, c4="{binary_jsonl}", c4_seq_len=16), "binary.jsonl:1: not UTF-8"),
    ("eval c4 garbage parquet", evaluate(boolq=None, c4="{garbage_parquet}", c4_seq_len=16), "not a readable parquet file"),
    # eval: the model's files
    ("eval truncated weights", evaluate(model="{truncated_weights}"), "not a readable safetensors file"),
    ("eval config a list", evaluate(model="{config_list}"), "expected a JSON object"),
    ("eval config 8 layers, weights 6", evaluate(model="{config_8_layers}"), "do not match its config.json"),
    ("eval damaged depthprune.json", evaluate(model="{record_garbage}"), "depthprune.json:1:"),
    ("eval depthprune.json of wrong types", evaluate(model="{record_bad_layers}"), "removed_layers is '2-3'"),
]


@pytest.mark.parametrize(("argv", "message"), [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_cli_refuses_cleanly(argv, message, bad, capsys, monkeypatch):
    monkeypatch.chdir(bad["cwd"])
    filled = [arg.format(**bad) for arg in argv]
    assert_clean_failure(capsys, filled, message, watch=[bad["root"], bad["ckpt"], bad["corpus"]])


@ROOT_CANNOT_BE_REFUSED
@pytest.mark.parametrize("argv", [analyze(out="{ro}/analysis"), prune(out="{ro}/pruned"), evaluate(out="{ro}/r.json")],
                         ids=["analyze", "prune", "eval"])
def test_read_only_output_is_refused_first(argv, bad, capsys, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    filled = [arg.format(ro=read_only, **bad) for arg in argv]
    assert_clean_failure(capsys, filled, "not writable", watch=[bad["root"], read_only])


def test_missing_lm_eval_is_named_before_the_model_loads(bad, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail as if not installed
    monkeypatch.setattr(suite, "load_model", lambda *a, **k: pytest.fail("the model loaded before lm-eval was checked"))
    assert_clean_failure(capsys, evaluate(model=str(bad["ckpt"]), boolq=None, lm_eval="arc_easy_local",
                                          out=str(bad["out_file"])), "lm-evaluation-harness, which is not installed",
                         watch=[bad["root"]])


# The Python API raises DepthpruneError with the same messages.

def _data(bad, **options) -> DataOptions:
    return DataOptions(str(bad["corpus"]), **{"samples": 4, "seq_len": 16, **options})


API_CASES = {
    "samples 0": (lambda b, out: _data(b, samples=0), "--samples must be at least 1"),
    "seq_len a string": (lambda b, out: _data(b, seq_len="16"), "--seq-len must be a whole number"),
    "seed a float": (lambda b, out: _data(b, seed=0.5), "--seed must be a whole number"),
    "analyze seq_len beyond positions": (lambda b, out: depthprune.analyze(str(b["ckpt"]), _data(b, seq_len=4096)),
                                         "longer than the model's 128 positions"),
    "analyze out is the model": (lambda b, out: depthprune.analyze(str(b["ckpt"]), _data(b), b["ckpt"], force=True),
                                 "overlaps the input"),
    "analyze batch_size 0": (lambda b, out: depthprune.analyze(str(b["ckpt"]), _data(b), batch_size=0),
                             "--batch-size must be at least 1"),
    "analyze unknown token mode": (lambda b, out: depthprune.analyze(str(b["ckpt"]), _data(b), token_mode="first"),
                                   "--token-mode: unknown value 'first'"),
    "prune n a float": (lambda b, out: depthprune.prune(str(b["ckpt"]), out, n=2.5), "not a whole number"),
    "prune huge layer range": (lambda b, out: depthprune.prune(str(b["ckpt"]), out, layers="0-3000000000"),
                               "out of range"),
    "prune unknown criterion": (lambda b, out: depthprune.prune(str(b["ckpt"]), out, n=2, criterion="random"),
                                "unknown criterion"),
    "prune distances of another model": (lambda b, out: depthprune.prune(str(b["ckpt"]), out, n=2, criterion="deepest",
                                                                         distances=b["dist_other_width"]),
                                         "measured on another model"),
    "evaluate binary boolq": (lambda b, out: depthprune.evaluate_model(str(b["ckpt"]), boolq=str(b["boolq_binary_jsonl"])),
                              "not UTF-8"),
    "evaluate shots -1": (lambda b, out: depthprune.evaluate_model(str(b["ckpt"]), mmlu=str(b["mmlu"]), shots=-1),
                          "--shots must be at least 0"),
    "evaluate c4_seq_len 1": (lambda b, out: depthprune.evaluate_model(str(b["ckpt"]), c4=str(b["corpus"]), c4_seq_len=1),
                              "--c4-seq-len must be at least 2"),
    "evaluate out is the model": (lambda b, out: depthprune.evaluate_model(str(b["ckpt"]), boolq=str(b["boolq_jsonl"]),
                                                                     out=b["ckpt"]), "is a directory"),
    "load_model truncated weights": (lambda b, out: depthprune.load_model(str(b["truncated_weights"])),
                                     "not a readable safetensors file"),
    "load_model config and weights differ": (lambda b, out: depthprune.load_model(str(b["config_8_layers"])),
                                             "do not match its config.json"),
    "load_texts binary": (lambda b, out: depthprune.load_texts(str(b["binary_jsonl"])), "not UTF-8"),
    "load_texts count 0": (lambda b, out: depthprune.load_texts(str(b["corpus"]), count=0), "at least 1"),
    "load_distances NaN": (lambda b, out: depthprune.load_distances(b["dist_nan"]), "NaN"),
    "read_record damaged": (lambda b, out: depthprune.read_record(b["record_garbage"]), "not valid JSON"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_api_raises_the_same_messages(case, bad, tmp_path):
    call, message = API_CASES[case]
    with pytest.raises(DepthpruneError, match=message.replace("(", r"\(")):
        call(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_api_missing_lm_eval(bad, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(DepthpruneError, match="not installed"):
        depthprune.evaluate_model(str(bad["ckpt"]), lm_eval="arc_easy_local")


# The silent wrong results of before, each refused or fixed.

def test_prune_leaves_the_callers_model_intact(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
    record = depthprune.prune(model, tmp_path / "cut", n=2, criterion="deepest", tokenizer=tokenizer)
    assert record["layers_after"] == 4 and num_layers(model) == 6
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cut").config.num_hidden_layers == 4
    depthprune.prune(model, tmp_path / "cut-inplace", n=2, criterion="deepest", tokenizer=tokenizer, inplace=True)
    assert num_layers(model) == 4


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_pruned_checkpoint_follows_the_umask(umask, tiny_checkpoint, tmp_path):
    previous = os.umask(umask)
    try:
        depthprune.prune(str(tiny_checkpoint), tmp_path / "cut", n=1, criterion="deepest", progress=False)
    finally:
        os.umask(previous)
    out = tmp_path / "cut"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_distances_record_the_model_and_refuse_another(tiny_checkpoint, tiny_corpus, tmp_path):
    data = DataOptions(str(tiny_corpus), samples=4, seq_len=16)
    depthprune.analyze(str(tiny_checkpoint), data, tmp_path / "analysis", progress=False)
    saved = json.loads((tmp_path / "analysis" / "distances.json").read_text())
    assert saved["model_fingerprint"] == FINGERPRINT
    other = tiny_model("qwen2")  # same layers, width and vocabulary; another architecture
    with pytest.raises(DepthpruneError, match="model_type 'llama' there, 'qwen2' here"):
        depthprune.prune(other, tmp_path / "cut", layers="2-3", distances=tmp_path / "analysis",
                         tokenizer=tiny_tokenizer())
    assert not (tmp_path / "cut").exists()
