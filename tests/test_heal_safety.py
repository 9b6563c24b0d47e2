"""Healing never loses a result, never executes a checkpoint, and fails with one clear line.

Bad inputs go through the CLI and the shared contract (``badinput.assert_clean_failure``): exit 2, one
``depthprune: error:`` line, nothing on disk changed. Kill tests stop a real ``heal`` process with
SIGKILL or SIGTERM at chosen points, rerun the same command and compare the weights bit for bit with an
uninterrupted run.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from badinput import assert_clean_failure, run, snapshot
from safetensors.torch import load_file

from depthprune import DepthpruneError
from depthprune import heal_model as heal
from depthprune.outputs import LOCK_SUFFIX, TEMP_MARK, output_lock

SRC = Path(__file__).resolve().parents[1] / "src"
# Dropout > 0, so a resumed run only matches if the RNG states were restored too.
OPTIONS = ["--method", "lora", "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--warmup", "1",
           "--save-every", "2", "--lr", "1e-2", "--dropout", "0.1"]


def heal_argv(model, data, out, *extra) -> list[str]:
    length = [] if any(e.startswith("--train-tokens") for e in extra) else ["--steps", "4"]
    return ["heal", str(model), "--data", str(data), "--out", str(out), *OPTIONS, *length, *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def leftovers(root: Path) -> list[Path]:
    """Temporaries, locks and work folders anywhere under ``root``."""
    return [p for p in root.rglob("*") if TEMP_MARK in p.name or p.name.endswith((LOCK_SUFFIX, ".unfinished"))]


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "heal_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tiny_corpus, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must match."""
    out = tmp_path_factory.mktemp("reference") / "healed"
    from depthprune.cli.app import main

    assert main(heal_argv(tiny_checkpoint, tiny_corpus, out)) == 0
    return out


@pytest.fixture(scope="module")
def unfinished(tiny_checkpoint, tiny_corpus, tmp_path_factory) -> Path:
    """The same run stopped after step 1: OUT holds its checkpoint, log and settings."""
    out = tmp_path_factory.mktemp("unfinished") / "healed"
    from depthprune.cli.app import main

    assert main(heal_argv(tiny_checkpoint, tiny_corpus, out, "--stop-after", "1")) == 0
    return out


# ------------------------------------------------------------------------------------ bad options

BAD_VALUES = [
    ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "inf"),
    ("--weight-decay", "-0.1"), ("--weight-decay", "nan"), ("--weight-decay", "inf"),
    ("--warmup", "-1"),
    ("--kd-weight", "nan"), ("--kd-weight", "1.5"), ("--kd-weight", "-inf"),
    ("--kd-temperature", "0"), ("--kd-temperature", "nan"), ("--kd-temperature", "inf"),
    ("--dropout", "1"), ("--dropout", "-0.1"), ("--dropout", "nan"),
    ("--alpha", "0"), ("--alpha", "inf"),
    ("--rank", "0"), ("--rank", "-2"),
    ("--seq-len", "1"), ("--seq-len", "-16"),
    ("--batch-size", "0"), ("--batch-size", "-2"),
    ("--grad-accum", "0"),
    ("--steps", "0"), ("--steps", "-3"),
    ("--train-tokens", "0"), ("--train-tokens", "-100"),
    ("--eval-every", "0"), ("--save-every", "0"), ("--val-sequences", "-1"),
    ("--seed", "-1"),
    ("--stop-after", "0"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_bad_option_values(capsys, tmp_path, tiny_checkpoint, tiny_corpus, flag, value):
    argv = heal_argv(tiny_checkpoint, tiny_corpus, tmp_path / "out", f"{flag}={value}")  # '=': values like -1
    assert_clean_failure(capsys, argv, f"{flag} must be", watch=[tiny_checkpoint, tiny_corpus, tmp_path])


@pytest.mark.parametrize(("option", "value"), [("max_grad_norm", float("nan")), ("max_grad_norm", 0.0),
                                               ("max_grad_norm", float("inf")), ("lr", "1e-3"), ("steps", 2.5),
                                               ("gradient_checkpointing", "yes"), ("target_modules", "up_proj")])
def test_bad_option_types_and_values_in_the_api(tmp_path, tiny_checkpoint, tiny_corpus, option, value):
    with pytest.raises(DepthpruneError, match="must be"):
        heal(str(tiny_checkpoint), str(tiny_corpus), tmp_path / "out", progress=False, **{option: value})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ bad inputs and outputs


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


BINARY = bytes(range(255, -1, -1)) * 8  # \xff and friends, from the first byte on: never UTF-8


def _case(name, t: Path, model: Path, data: Path):
    """(argv, expected message, extra folders to watch) of the bad-input case ``name``, built under ``t``."""
    out = t / "out"
    cases = {
        "missing data": lambda: (heal_argv(model, t / "missing.jsonl", out), "not found"),
        "binary data": lambda: (heal_argv(model, _write(t / "bin.jsonl", BINARY), out), "not UTF-8"),
        "empty data": lambda: (heal_argv(model, _write(t / "empty.jsonl", ""), out), "no non-empty"),
        "data without the field": lambda: (heal_argv(model, _write(t / "x.jsonl", '{"body": "w1 w2"}\n'), out),
                                           "no field 'text'"),
        "corrupt json data": lambda: (heal_argv(model, _write(t / "x.json", "[{"), out), "not valid JSON"),
        "data folder without texts": lambda: (heal_argv(model, _write(t / "d" / "a.csv", "x").parent, out),
                                              "holds no"),
        "missing val data": lambda: (heal_argv(model, data, out, "--val-data", str(t / "val.jsonl")), "not found"),
        "binary val data": lambda: (heal_argv(model, data, out, "--val-data", str(_write(t / "v.txt", BINARY))),
                                    "not UTF-8"),
        "missing model": lambda: (heal_argv(t / "nomodel", data, out), "not found"),
        "model without config": lambda: (heal_argv(_write(t / "m" / "x.txt", "").parent, data, out),
                                         "no config.json"),
        "corrupt model config": lambda: (heal_argv(_corrupt(model, t / "m", "config.json"), data, out),
                                         "not valid JSON"),
        "corrupt model record": lambda: (heal_argv(_corrupt(model, t / "m", "depthprune.json"), data, out),
                                         "not valid JSON"),
        "model without weights": lambda: (heal_argv(_without_weights(model, t / "m"), data, out),
                                          "holds no model.safetensors"),
        # Fails after taking OUT's lock, which made OUT's parent folders: they go again.
        "weights short of the config": lambda: (heal_argv(_more_layers(model, t / "m"), data, t / "new" / "out"),
                                                "do not match its config.json"),
        "missing teacher": lambda: (heal_argv(model, data, out, "--teacher", str(t / "noteacher")), "not found"),
        "out is the model": lambda: (heal_argv(model, data, model, "--force"), "overlaps the input"),
        "out inside the model": lambda: (heal_argv(model, data, model / "healed"), "overlaps the input"),
        "model inside out": lambda: (heal_argv(_copy_model(model, t / "p" / "m"), data, t / "p", "--force"),
                                     "overlaps the input"),
        "out is the data file": lambda: (heal_argv(model, data, data, "--force"), "not a directory"),
        "out inside the data file": lambda: (heal_argv(model, data, data / "out"), "overlaps the input"),
        "out inside a file": lambda: (heal_argv(model, data, _write(t / "f.txt", "x") / "out"), "which is a file"),
        "out holds other files": lambda: (heal_argv(model, data, _write(out / "notes.txt", "x").parent),
                                          "not a healing run"),
        "work folder is a file": lambda: (heal_argv(model, data, _work_folder_taken(t), "--force"), "in the way"),
    }
    return cases[name]()


def _corrupt(model: Path, target: Path, name: str) -> Path:
    _copy_model(model, target)
    (target / name).write_text('{"num_hidden_layers": 6,')
    return target


def _work_folder_taken(t: Path) -> Path:
    _write(t / "out.unfinished", "x")  # where a --force run over OUT would work
    return _write(t / "out" / "a.txt", "x").parent


def _more_layers(model: Path, target: Path) -> Path:
    _copy_model(model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 2}))
    return target


def _without_weights(model: Path, target: Path) -> Path:
    _copy_model(model, target)
    (target / "model.safetensors").unlink()
    return target


INPUT_CASES = ["missing data", "binary data", "empty data", "data without the field", "corrupt json data",
               "data folder without texts", "missing val data", "binary val data", "missing model",
               "model without config", "corrupt model config", "corrupt model record", "model without weights",
               "weights short of the config",
               "missing teacher", "out is the model", "out inside the model", "model inside out",
               "out is the data file", "out inside the data file", "out inside a file", "out holds other files",
               "work folder is a file"]


@pytest.mark.parametrize("name", INPUT_CASES)
def test_bad_inputs_and_outputs(capsys, tmp_path, tiny_checkpoint, tiny_corpus, name):
    data = shutil.copy(tiny_corpus, tmp_path / "docs.jsonl")  # a copy: some cases write beside it
    argv, message = _case(name, tmp_path, tiny_checkpoint, Path(data))
    assert_clean_failure(capsys, argv, message, watch=[tiny_checkpoint, tiny_corpus, tmp_path])


def test_out_is_the_current_directory_or_holds_it(capsys, tmp_path, tiny_checkpoint, tiny_corpus, monkeypatch):
    here = tmp_path / "a" / "b"
    _write(here / "precious.txt", "keep me")
    monkeypatch.chdir(here)
    watch = [tiny_checkpoint, tiny_corpus, tmp_path]
    assert_clean_failure(capsys, heal_argv(tiny_checkpoint, tiny_corpus, ".", "--force"), "current directory",
                         watch=watch)
    assert_clean_failure(capsys, heal_argv(tiny_checkpoint, tiny_corpus, tmp_path / "a", "--force"),
                         "current directory", watch=watch)


def test_out_in_a_read_only_place(capsys, tiny_checkpoint, tiny_corpus):
    # We run as root, so chmod cannot make a folder unwritable; /proc/sys is read-only even for root.
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here: no read-only folder to try")
    assert_clean_failure(capsys, heal_argv(tiny_checkpoint, tiny_corpus, "/proc/sys/healed"), "cannot be written",
                         watch=[tiny_checkpoint, tiny_corpus])


# ----------------------------------------------------------------------- what OUT holds already


def _state_case(name: str, out: Path) -> tuple[list[str], str]:
    """Damage or differ from the copied run in ``out``; returns (extra argv, expected message)."""
    checkpoint = out / "checkpoint"
    if name == "corrupt config of an unfinished run":
        (out / "heal_config.json").write_text('{"method": "lo')
        return [], "--restart"
    if name == "corrupt config of a finished result":
        (out / "heal_config.json").write_bytes(BINARY)
        return [], "--force"
    if name == "random bytes as checkpoint weights":
        (checkpoint / "trainable.safetensors").write_bytes(os.urandom(4096))
        return [], "checkpoint"
    if name == "truncated checkpoint weights":
        data = (checkpoint / "trainable.safetensors").read_bytes()
        (checkpoint / "trainable.safetensors").write_bytes(data[: len(data) // 2])
        return [], "checkpoint"
    if name == "random bytes as checkpoint tensors":
        (checkpoint / "state.safetensors").write_bytes(os.urandom(100))
        return [], "checkpoint"
    if name == "truncated checkpoint state":
        text = (checkpoint / "state.json").read_text()
        (checkpoint / "state.json").write_text(text[: len(text) // 2])
        return [], "checkpoint"
    if name == "checkpoint state of another shape":
        state = json.loads((checkpoint / "state.json").read_text())
        state["rng"] = [{"python": [3], "cuda": 0, "numpy": []}]
        (checkpoint / "state.json").write_text(json.dumps(state))
        return [], "checkpoint"
    if name == "checkpoint of a later format":
        state = json.loads((checkpoint / "state.json").read_text())
        (checkpoint / "state.json").write_text(json.dumps({**state, "format": 2}))
        return [], "format 2"
    if name == "checkpoint state without progress":
        state = json.loads((checkpoint / "state.json").read_text())
        del state["progress"]
        (checkpoint / "state.json").write_text(json.dumps(state))
        return [], "no entry 'progress'"
    if name == "pickled checkpoint of an older version":
        (checkpoint / "state.json").unlink()
        (checkpoint / "state.pt").write_bytes(b"\x80\x04K\x01.")  # would run code if unpickled
        return [], "--restart"
    if name == "unfinished run with other settings":
        return ["--lr", "0.5"], "other settings (lr)"
    if name == "finished result with other settings":
        return ["--seed", "7"], "already holds a healed model with other settings (seed)"
    if name == "restart over a finished result":
        return ["--restart"], "only discards unfinished runs"
    raise AssertionError(name)


STATE_CASES = {
    "corrupt config of an unfinished run": "unfinished", "corrupt config of a finished result": "reference",
    "random bytes as checkpoint weights": "unfinished", "truncated checkpoint weights": "unfinished",
    "random bytes as checkpoint tensors": "unfinished", "truncated checkpoint state": "unfinished",
    "checkpoint state of another shape": "unfinished", "checkpoint of a later format": "unfinished",
    "checkpoint state without progress": "unfinished", "pickled checkpoint of an older version": "unfinished",
    "unfinished run with other settings": "unfinished", "finished result with other settings": "reference",
    "restart over a finished result": "reference",
}


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_what_out_holds_is_checked(capsys, request, tmp_path, tiny_checkpoint, tiny_corpus, name):
    out = shutil.copytree(request.getfixturevalue(STATE_CASES[name]), tmp_path / "out")
    extra, message = _state_case(name, out)
    message = assert_clean_failure(capsys, heal_argv(tiny_checkpoint, tiny_corpus, out, *extra), message,
                                   watch=[tiny_checkpoint, tiny_corpus, tmp_path])
    if "checkpoint" in name:
        assert "--restart" in message


def test_force_with_bad_data_keeps_the_old_model(capsys, tmp_path, reference, tiny_checkpoint):
    out = shutil.copytree(reference, tmp_path / "out")
    assert_clean_failure(capsys, heal_argv(tiny_checkpoint, tmp_path / "typo.jsonl", out, "--force"), "not found",
                         watch=[tiny_checkpoint, tmp_path])


def test_a_second_run_into_the_same_out_is_refused(capsys, tmp_path, unfinished, tiny_checkpoint, tiny_corpus):
    out = shutil.copytree(unfinished, tmp_path / "out")
    with output_lock(out):  # flock: held per open file, so this process's second open is refused too
        assert_clean_failure(capsys, heal_argv(tiny_checkpoint, tiny_corpus, out), "another depthprune run",
                             watch=[tiny_checkpoint, tiny_corpus, out])


def test_a_finished_run_rerun_says_where_the_result_is(capsys, tmp_path, reference, tiny_checkpoint, tiny_corpus):
    out = shutil.copytree(reference, tmp_path / "out")
    before = snapshot(out)
    code, stdout, _ = run(capsys, *heal_argv(tiny_checkpoint, tiny_corpus, out))
    assert code == 0
    assert f"{out} already holds the healed model" in stdout
    assert snapshot(out) == before


# ------------------------------------------------------------------------------- recovering runs


def test_resume_accepts_the_same_paths_spelled_differently(capsys, tmp_path, reference, tiny_checkpoint,
                                                           tiny_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _copy_model(tiny_checkpoint, tmp_path / "model")
    shutil.copy(tiny_corpus, tmp_path / "docs.jsonl")
    spellings = [("model", "docs.jsonl", "out"), ("./model/", str(tmp_path / "docs.jsonl"), "out/"),
                 (str(tmp_path / "model"), "./docs.jsonl", str(tmp_path / "out"))]
    for model, data, out in spellings:
        code, stdout, err = run(capsys, *heal_argv(model, data, out, "--stop-after", "1"))
        assert code == 0, err
    assert "stopped after step 3 of 4" in stdout
    assert run(capsys, *heal_argv("model/", "docs.jsonl", "./out"))[0] == 0
    assert_same_weights(tmp_path / "out", reference)
    assert logged_steps(tmp_path / "out") == [1, 2, 3, 4]


def test_a_torn_last_log_line_is_dropped(capsys, tmp_path, reference, unfinished, tiny_checkpoint, tiny_corpus):
    out = shutil.copytree(unfinished, tmp_path / "out")
    with (out / "heal_log.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 3.1')  # the kill came in the middle of a write
    assert run(capsys, *heal_argv(tiny_checkpoint, tiny_corpus, out))[0] == 0
    assert logged_steps(out) == [1, 2, 3, 4]
    assert_same_weights(out, reference)


def test_restart_discards_a_damaged_run(capsys, tmp_path, reference, unfinished, tiny_checkpoint, tiny_corpus):
    out = shutil.copytree(unfinished, tmp_path / "out")
    (out / "checkpoint" / "trainable.safetensors").write_bytes(b"garbage")
    assert run(capsys, *heal_argv(tiny_checkpoint, tiny_corpus, out, "--restart"))[0] == 0
    assert_same_weights(out, reference)
    assert logged_steps(out) == [1, 2, 3, 4]
    assert leftovers(tmp_path) == []


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_corrected_one(
        capsys, tmp_path, reference, tiny_checkpoint, tiny_corpus):
    out = tmp_path / "out"
    diverging = heal_argv(tiny_checkpoint, tiny_corpus, out, "--method", "full", "--lr", "1e30", "--warmup", "0",
                          "--schedule", "constant", "--save-every", "100")
    code, _, err = run(capsys, *diverging)
    assert code == 2 and "no checkpoint was written yet" in err
    assert run(capsys, *heal_argv(tiny_checkpoint, tiny_corpus, out))[0] == 0
    assert_same_weights(out, reference)
    assert logged_steps(out) == [1, 2, 3, 4]


def test_force_keeps_the_old_result_until_the_new_one_is_complete(capsys, tmp_path, reference, tiny_checkpoint,
                                                                  tiny_corpus, monkeypatch):
    recipe = importlib.import_module("depthprune.heal.recipe")
    out = shutil.copytree(reference, tmp_path / "out")
    config = json.loads((out / "heal_config.json").read_text())
    (out / "heal_config.json").write_text(json.dumps({**config, "seed": 99}))  # an older result, other settings
    old = snapshot(out)
    real_finish = recipe.finish

    def interrupted_finish(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C as the new model is about to be saved

    monkeypatch.setattr(recipe, "finish", interrupted_finish)
    assert run(capsys, *heal_argv(tiny_checkpoint, tiny_corpus, out, "--force"))[0] == 130
    assert snapshot(out) == old
    work = tmp_path / "out.unfinished"
    assert json.loads((work / "checkpoint" / "state.json").read_text())["progress"]["step"] == 4
    monkeypatch.setattr(recipe, "finish", real_finish)
    assert run(capsys, *heal_argv(tiny_checkpoint, tiny_corpus, out, "--force"))[0] == 0
    assert_same_weights(out, reference)
    assert json.loads((out / "heal_config.json").read_text())["seed"] == 0
    assert not (out / "checkpoint").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ kill tests
#
# One driver process imports depthprune, torch, transformers and peft once, then for each scenario
# forks a child that runs the CLI's main() (what `python -m depthprune.cli` runs) with one pause point
# patched in, and kills it there. Forking from a process that has only imported keeps the five runs
# fast; each is still a real process that receives a real SIGKILL or SIGTERM.

DRIVER = r"""
import importlib, json, os, sys, time

from depthprune.cli.app import build_parser, main

build_parser()
heal_train = importlib.import_module("depthprune.heal.train")
heal_result = importlib.import_module("depthprune.heal.result")
report = {"bitsandbytes_before_heal": "bitsandbytes" in sys.modules, "runs": []}
from depthprune.model.load import quiet_bitsandbytes
quiet_bitsandbytes()  # as heal() does before transformers or peft import bitsandbytes
import peft, safetensors.torch, transformers  # noqa: E401,F401  (shared with the forked runs)

def pause_at(point, count, signal_pause):
    calls = []

    def hook(real, after):
        def hooked(*args, **kwargs):
            result = real(*args, **kwargs) if after else None
            calls.append(1)
            if len(calls) == count:
                signal_pause()
            return result if after else real(*args, **kwargs)
        return hooked

    if point == "checkpoint":  # once the count-th checkpoint is complete
        heal_train.save_checkpoint = hook(heal_train.save_checkpoint, after=True)
    elif point == "writing":  # a checkpoint half written: the count-th safetensors file in its temporary
        safetensors.torch.save_file = hook(safetensors.torch.save_file, after=True)
    elif point == "merge":  # the result's temporary folder beside OUT exists, the merge is about to start
        heal_result.merged_model = hook(heal_result.merged_model, after=False)

for run in json.loads(sys.argv[1]):
    paused_r, paused_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(paused_r)
        log = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        pause_at(run["point"], run["count"], lambda: (os.write(paused_w, b"P"), time.sleep(600)))
        code = 1
        try:
            code = main(run["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(paused_w)
    paused = os.read(paused_r, 1) == b"P"  # or EOF: the run ended without reaching the point
    if paused:
        os.kill(pid, run["signal"])
    _, status = os.waitpid(pid, 0)
    report["runs"].append({"paused": paused, "code": os.waitstatus_to_exitcode(status)})
print(json.dumps(report))
"""

KILLS = {"checkpoint-SIGKILL": ("checkpoint", 1, signal.SIGKILL), "writing-SIGKILL": ("writing", 3, signal.SIGKILL),
         "writing-SIGTERM": ("writing", 3, signal.SIGTERM), "merge-SIGKILL": ("merge", 1, signal.SIGKILL),
         "merge-SIGTERM": ("merge", 1, signal.SIGTERM)}


@pytest.fixture(scope="module")
def killed(tmp_path_factory, reference, tiny_checkpoint, tiny_corpus) -> dict[str, dict]:
    """Each scenario of KILLS run up to its point and killed there: folder, command, state before, outcome."""
    scenarios, runs = {}, []
    for name, (point, count, sig) in KILLS.items():
        root = tmp_path_factory.mktemp(name)
        out = root / "out"
        argv = heal_argv(tiny_checkpoint, tiny_corpus, out)
        if point == "merge":  # also: with --force over an older result, which must survive the kill
            shutil.copytree(reference, out)
            (out / "heal_config.json").write_text(json.dumps({"an": "older run"}))
            argv.append("--force")
        scenarios[name] = {"root": root, "out": out, "argv": argv, "before": snapshot(out), "signal": sig}
        runs.append({"point": point, "count": count, "signal": int(sig), "argv": argv, "log": str(root / "log.txt")})
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert driver.returncode == 0, driver.stderr
    report = json.loads(driver.stdout.strip().splitlines()[-1])
    assert not report["bitsandbytes_before_heal"]  # so heal() can filter its warning in time
    assert "kernels" not in driver.stderr, driver.stderr
    for scenario, outcome in zip(scenarios.values(), report["runs"], strict=True):
        scenario.update(outcome, log=(scenario["root"] / "log.txt").read_text())
    return scenarios


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name or p.name.endswith(LOCK_SUFFIX)]


@pytest.mark.parametrize("name", list(KILLS))
def test_killed_runs_end_with_the_same_weights(capsys, killed, reference, name):
    run_ = killed[name]
    root, out, point = run_["root"], run_["out"], KILLS[name][0]
    assert run_["paused"], run_["log"]
    if run_["signal"] == signal.SIGTERM:
        assert run_["code"] == 143 and run_["log"].strip().splitlines()[-1] == "depthprune: terminated", run_["log"]
        assert _temporaries(root) == []  # cleaned up on the way out
    else:
        assert run_["code"] == -signal.SIGKILL
        if point != "checkpoint":
            assert any(TEMP_MARK in p.name for p in _temporaries(root))  # the kill hit a half-written output
    if point == "merge":
        assert snapshot(out) == run_["before"]  # the old result survives; the new run waits beside it
        assert (root / "out.unfinished" / "checkpoint").is_dir()
    assert run(capsys, *run_["argv"])[0] == 0
    assert_same_weights(out, reference)
    assert logged_steps(out) == [1, 2, 3, 4]
    assert leftovers(root) == []


# ----------------------------------------------------------------------------------- no pickles


def test_nothing_is_unpickled(unfinished):
    for path in SRC.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
    from safetensors import safe_open

    files = list((unfinished / "checkpoint").iterdir())
    assert {f.name for f in files} == {"trainable.safetensors", "state.safetensors", "state.json"}
    for file in files:
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file} looks like a pickle or a torch.save archive"
        if file.suffix == ".json":
            json.loads(file.read_text())
        else:
            with safe_open(str(file), "pt") as f:
                assert list(f.keys())
