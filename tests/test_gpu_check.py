"""The GPU check and benchmark, on a machine without a GPU: benchmarks/gpu_check.sh stops at once (exit 2)
without one and its step runner reports PASS, FAIL and FAIL (timeout), killing a timed-out step's children;
benchmarks/make_checkpoint.py writes loadable random-weight checkpoints of the named shapes; and
benchmarks/gpu_bench.py runs end to end on the CPU at a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
CHECK = BENCH / "gpu_check.sh"
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402
import make_checkpoint  # noqa: E402


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "WORK", "CARRY", "STEP_TIMEOUT")}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _without_nvidia_smi() -> str:
    """PATH minus every directory holding an nvidia-smi."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())


def _check(env: dict, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(["bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


# ------------------------------------------------------------------------------------------- gpu_check.sh


def test_gpu_check_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0


def test_gpu_check_without_nvidia_smi_exits_2_at_once(shared_data, tmp_path):
    done, seconds = _check(_env(PATH=_without_nvidia_smi(), PYTHON=sys.executable, DATA=str(shared_data),
                                TMPDIR=str(tmp_path)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "nvidia-smi not found" in done.stderr and seconds < 5
    assert not list(tmp_path.iterdir()), "it must stop before making its work folder"


def test_gpu_check_with_a_cpu_torch_exits_2_at_once(shared_data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "NVIDIA H200, 143771 MiB, 580.159.03"\n')
    (fake / "nvidia-smi").chmod(0o755)
    work = tmp_path / "tmp"
    work.mkdir()
    done, seconds = _check(_env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
                                DATA=str(shared_data), TMPDIR=str(work)))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torch sees no CUDA GPU" in done.stderr, done.stderr
    assert seconds < 15 and not list(work.iterdir()) and "PASS" not in done.stdout


def _state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie, which runs nothing), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_step_runner_reports_pass_fail_and_timeout_and_kills_the_children(tmp_path):
    work = tmp_path / "work"
    done, seconds = _check(_env(GPU_CHECK_SELFTEST="1", STEP_TIMEOUT="1", KILL_GRACE="2", WORK=str(work)))
    out = done.stdout
    assert done.returncode == 1, out + done.stderr  # a step failed
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("selftest-")}
    assert " PASS " in lines["selftest-pass"]
    assert " FAIL " in lines["selftest-fail"] and "exit 3" in lines["selftest-fail"]
    assert "FAIL (timeout" in lines["selftest-timeout"]
    assert "failing on purpose" in out  # a failed step's log tail is shown
    assert "1 passed, 2 failed, 0 skipped" in out
    assert seconds < 10, f"the 300 s sleep was not cut short ({seconds:.0f} s)"
    children = [int(p) for p in (work / "selftest-children.pid").read_text().split()]
    assert children
    deadline = time.monotonic() + 5
    while any(_state(p) not in (None, "Z") for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_state(p) in (None, "Z") for p in children), \
        f"children of the timed-out step still run: {[(p, _state(p)) for p in children]}"


# ------------------------------------------------------------------------------------- make_checkpoint.py


def test_shapes_are_the_published_ones():
    c = make_checkpoint.llama_config("smollm2-135m")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings, c.max_position_embeddings) == (576, 30, 9, 3, 1536, 49152, True, 8192)
    c = make_checkpoint.llama_config("llama2-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings) == (4096, 32, 32, 32, 11008, 49152, False)
    c = make_checkpoint.llama_config("llama3-8b", layers=4)
    assert (c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (4, 8, 14336, 49152)
    thetas = {s: make_checkpoint.llama_config(s).rope_parameters["rope_theta"] for s in make_checkpoint.SHAPES}
    assert thetas == {"smollm2-135m": 100000.0, "llama2-7b": 10000.0, "llama3-8b": 500000.0}
    # Llama-2-7B's decoder layers: 32 x (4 x 4096^2 + 3 x 4096 x 11008) matmul weights
    assert gpu_bench.matmul_params(make_checkpoint.llama_config("llama2-7b")) == (6_476_005_376, 49152 * 4096)


@pytest.mark.parametrize("argv, message", [
    (["--shape", "llama-9b", "--out", "x"], "unknown shape 'llama-9b': choose one of smollm2-135m, llama2-7b, llama3-8b"),
    (["--shape", "llama2-7b", "--out", "x", "--layers", "0"], "at least 1 layer"),
    (["--shape", "llama2-7b", "--out", "x", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["--shape", "llama2-7b", "--out", "x", "--device", "tpu"], "unknown device 'tpu'"),
    (["--out", "x"], "--shape and --out are required"),
    (["--shape", "llama2-7b", "--out", "x", "--tokenizer", "/nonexistent"], "no tokenizer_config.json"),
])
def test_make_checkpoint_refuses_bad_input_on_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert make_checkpoint.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer saved as gpu_carry.sh saves it (read from the embedded GGUF once)."""
    out = tmp_path_factory.mktemp("carry") / "tokenizer"
    assert make_checkpoint.main(["--save-tokenizer", str(out)]) == 0
    return out


def test_random_checkpoint_loads_as_a_local_model(tokenizer_dir, tmp_path):
    import torch

    import depthprune

    out = tmp_path / "tiny"
    assert make_checkpoint.main(["--shape", "smollm2-135m", "--layers", "2", "--out", str(out),
                                 "--tokenizer", str(tokenizer_dir)]) == 0
    assert {p.name for p in tokenizer_dir.iterdir()} <= {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").is_file()
    record = json.loads((out / "depthprune-random.json").read_text())
    assert record["shape"] == "smollm2-135m" and record["num_hidden_layers"] == 2
    model, tokenizer = depthprune.load_model(str(out))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (2, 576, 49152)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert len(tokenizer) == 49152 and tokenizer("The quick brown fox").input_ids
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    weights = model.model.layers[1].mlp.down_proj.weight.float()
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert depthprune.num_layers(model) == 2
    # the same seed gives the same weights; an existing --out is refused without --force
    again = tmp_path / "again"
    assert make_checkpoint.main(["--shape", "smollm2-135m", "--layers", "2", "--out", str(again),
                                 "--tokenizer", str(tokenizer_dir)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert make_checkpoint.main(["--shape", "smollm2-135m", "--layers", "2", "--out", str(out),
                                 "--tokenizer", str(tokenizer_dir)]) == 2


# ------------------------------------------------------------------------------------------- gpu_bench.py


def test_train_configurations_parse_and_refuse():
    assert gpu_bench.parse_train("1:ckpt, 4x512,4", 2048, 16) == [
        gpu_bench.TrainConfig(1, 2048, True), gpu_bench.TrainConfig(4, 512, False),
        gpu_bench.TrainConfig(4, 2048, False)]
    for bad, message in (("3", "does not divide"), ("a", "expected MICRO_BATCH"), ("4:fast", "suffix"),
                         ("0", "at least 1")):
        with pytest.raises(gpu_bench.UsageError, match=message):
            gpu_bench.parse_train(bad, 2048, 16)


def test_flop_counts_follow_the_stated_formulas():
    import torch

    config = make_checkpoint.llama_config("smollm2-135m", layers=2)
    model = make_checkpoint.build_model(config, "cpu", "float32")
    linear = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_layers, n_head = gpu_bench.matmul_params(config)
    assert n_head == linear.pop("lm_head") and n_layers == sum(linear.values())
    T, attention = 64, 4 * 2 * 64 * 576  # 4 L T d_attn
    n = n_layers + n_head
    assert gpu_bench.flops_per_token("analysis", config, T) == (2 * n_layers + attention,) * 2
    assert gpu_bench.flops_per_token("forward", config, T) == (2 * n + attention,) * 2
    model_flops, hardware = gpu_bench.flops_per_token("train", config, T, n_lora=1000, checkpointing=True)
    assert model_flops == 4 * n + 6 * 1000 + 3 * attention
    assert hardware == model_flops + 2 * n + 2 * 1000 + attention
    assert gpu_bench.flops_per_token("train", config, T, n_lora=1000) == (model_flops, model_flops)


def test_gpu_bench_refuses_bad_input_on_one_line(capsys):
    assert gpu_bench.main(["--shape", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown shape 'gpt-5': choose one of smollm2-135m, llama2-7b, llama3-8b" in err and err.count("\n") == 1
    assert gpu_bench.main(["--train", "3"]) == 2
    assert "does not divide --global-batch 16" in capsys.readouterr().err


def test_gpu_bench_runs_on_the_cpu_at_a_tiny_shape(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--shape", "smollm2-135m", "--layers", "2", "--seq-len", "64", "--steps", "2", "--device", "cpu",
            # smaller than the defaults, so that it takes seconds on two CPU cores
            "--dtype", "float32", "--samples", "4", "--batch-size", "4", "--global-batch", "1", "--train", "1:ckpt,1",
            "--warmup", "0", "--json", str(out)]
    # One thread: on a busy 2-core machine two OpenMP threads spin against each other, several times slower.
    done = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), *argv], env=_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "analysis / forward:" in text and "4 N + 6 N_lora + 12 L T d_attn" in text and "989" in text
    result = json.loads(out.read_text())
    rows = {(r["kind"], r.get("config")): r for r in result["rows"]}
    assert {"analysis", "forward"} <= {kind for kind, _ in rows}
    for kind in ("analysis", "forward"):
        row = rows[(kind, None)]
        assert row["tokens"] == 4 * 64 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    try:
        import bitsandbytes  # noqa: F401
        methods = ("lora", "qlora")
    except ImportError:
        methods = ("lora",)
        assert rows[("qlora", None)]["skipped"]
    for method in methods:
        for config, checkpointing in (("1x64:ckpt", True), ("1x64", False)):
            row = rows[(method, config)]
            assert (row["accumulation"], row["checkpointing"], row["tokens"]) == (1, checkpointing, 2 * 1 * 64)
            assert row["tokens_per_s"] > 0 and row["n_lora"] > 0 and 9 < row["loss"] < 12  # about log(49152)
            assert row["hfu"] >= row["mfu"] > 0
            assert (row["hfu"] > row["mfu"]) == checkpointing
