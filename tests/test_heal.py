"""Healing: the loop trains, LoRA touches only its adapters, merging is exact, runs resume bit-for-bit,
distillation is zero against itself, and two data-parallel processes see the losses of one."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthprune import DepthpruneError
from depthprune import heal_model as heal
from depthprune.cli.app import main
from depthprune.heal.loss import distillation_loss
from depthprune.heal.methods.adapters import default_target_modules
from depthprune.heal.methods.qlora import dequantize_model
from depthprune.model.load import disable_cpu_repacking

SRC = Path(__file__).resolve().parents[1] / "src"
VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data) -> Path:
    """A tiny random Llama with a 512-token byte-level BPE trained here on C4 text (fast, and the text
    path works end to end)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from depthprune.data import load_texts

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(load_texts(str(shared_data / "c4" / "train_sample.jsonl"), 100), trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _documents(count: int, length: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (count, length), generator=g).tolist()


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "heal_log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _log(out) if "loss" in r]


SMALL = dict(batch_size=4, seq_len=32, rank=4, warmup=1, eval_every=100, save_every=100, progress=False)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_loss_falls_on_a_fixed_batch(tiny, tmp_path, method):
    # One document of exactly one batch: every step sees the same four sequences.
    data = _documents(1, 4 * 32)
    heal(str(tiny), data, tmp_path / "out", method=method, steps=20, lr=5e-2, dropout=0.0, **SMALL)
    losses = _losses(tmp_path / "out")
    assert len(losses) == 20
    # (Rank-4 LoRA on the MLP of a random 2-layer model has little to move: it falls by ~0.35 nats.)
    assert losses[-1] < losses[0] - 0.2, losses


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _logits(model_dir_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_lora_changes_only_the_adapted_mlp_and_merges_exactly(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    heal(str(tiny), _documents(8, 100), out, method="lora", steps=4, lr=1e-2, save_adapter=True, **SMALL)
    before, after = _load_state(tiny), _load_state(out)
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    mlp = {n for n in before if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))}
    assert changed == mlp  # attention, norms and embeddings untouched; every adapted layer moved
    for name in mlp:  # the update is LoRA's: rank at most 4
        assert torch.linalg.matrix_rank(after[name] - before[name]).item() <= 4
    record = json.loads((out / "depthprune.json").read_text())["healing"]
    assert record["method"] == "lora" and record["steps"] == 4 and record["tokens"] == 4 * 4 * 32
    assert record["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    # The merged checkpoint computes what the base + adapter computes.
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                                        out / "adapter")
    ids = torch.tensor(_documents(2, 16, seed=5))
    torch.testing.assert_close(_logits(out, ids), _logits(wrapped, ids), rtol=1e-5, atol=1e-5)
    assert not (out / "checkpoint").exists()


def test_qlora_merges_into_the_dequantized_base(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = tmp_path / "out"
    heal(str(tiny), _documents(8, 100), out, method="qlora", steps=3, lr=1e-2, save_adapter=True, **SMALL)

    def quantized():
        model = AutoModelForCausalLM.from_pretrained(
            tiny, dtype=torch.float32, device_map={"": "cpu"},
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32))
        disable_cpu_repacking(model)
        return model

    dequantized_base = dequantize_model(quantized()).state_dict()
    after = _load_state(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(t.dtype == torch.float32 for t in after.values())
    mlp = {n for n in after if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))}
    for name, tensor in after.items():
        if name in mlp:
            delta = tensor - dequantized_base[name]
            assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta).item() <= 4
        else:  # everything else is the de-quantized base (attention) or untouched (norms, embeddings)
            torch.testing.assert_close(tensor, dequantized_base[name], rtol=0, atol=0)
    wrapped = PeftModel.from_pretrained(quantized(), out / "adapter")
    ids = torch.tensor(_documents(2, 16, seed=5))
    torch.testing.assert_close(_logits(out, ids), _logits(wrapped, ids), rtol=1e-4, atol=1e-4)


def test_resumed_runs_end_with_the_same_weights(tiny, tmp_path, monkeypatch):
    recipe = importlib.import_module("depthprune.heal.train")

    data = _documents(20, 90)
    options = dict(SMALL, method="lora", steps=6, lr=5e-3, dropout=0.1, save_every=2)
    heal(str(tiny), data, tmp_path / "straight", **options)

    # Stopped on purpose after 1 step (a checkpoint is written), then killed during step 4 (the
    # checkpoint of step 2 survives), then finished.
    resumed = tmp_path / "resumed"
    assert heal(str(tiny), data, resumed, stop_after=1, **options) == {"stopped_at_step": 1, "steps": 6}
    real_loss, calls = recipe.compute_loss, []

    def dying_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # steps 2, 3 pass; step 4 dies
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(recipe, "compute_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        heal(str(tiny), data, resumed, **options)
    monkeypatch.setattr(recipe, "compute_loss", real_loss)
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["progress"]["step"] == 2
    heal(str(tiny), data, resumed, **options)

    straight_weights, resumed_weights = _load_state(tmp_path / "straight"), _load_state(resumed)
    for name in straight_weights:
        assert torch.equal(straight_weights[name], resumed_weights[name]), name
    assert [r["step"] for r in _log(resumed)] == [1, 2, 3, 4, 5, 6]
    assert _losses(resumed) == _losses(tmp_path / "straight")


def test_distillation_from_itself_is_zero(tiny, tmp_path):
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    p, q = other.softmax(-1), logits.log_softmax(-1)
    expected = (p * (p.log() - q)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(logits, other), expected)
    # At step 1 the LoRA student (B = 0) is the teacher: the KD term is zero, the LM term is not.
    out = tmp_path / "out"
    heal(str(tiny), _documents(8, 100), out, method="lora", teacher=str(tiny), kd_weight=0.5, steps=2, lr=1e-2,
         **SMALL)
    first = _log(out)[0]
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.5 * first["lm_loss"], rel=1e-5)
    assert json.loads((out / "depthprune.json").read_text())["healing"]["teacher"] == str(tiny)


def test_diverging_loss_stops_with_the_last_good_checkpoint(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DepthpruneError, match=r"the loss is (nan|inf).*last good checkpoint \(step \d+\)"):
        heal(str(tiny), _documents(8, 100), out, method="full", steps=20, lr=1e30, schedule="constant",
             **dict(SMALL, save_every=1, warmup=0))
    assert (out / "checkpoint" / "trainable.safetensors").is_file()


def test_validation_record_and_refusals(tiny, tmp_path, shared_data):
    out = tmp_path / "out"
    record = heal(str(tiny), str(shared_data / "c4" / "train_sample.jsonl"), out, method="lora", steps=4, lr=1e-2,
                  val_data=str(shared_data / "c4" / "validation.jsonl"), val_sequences=4,
                  **dict(SMALL, eval_every=2))
    assert [r["step"] for r in _log(out) if "val_loss" in r] == [0, 2, 4]
    assert record["val_loss_after"] < record["val_loss_before"]
    with pytest.raises(DepthpruneError, match="already holds a healed model"):
        heal(str(tiny), _documents(8, 100), out, steps=4, **SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(DepthpruneError, match="not a healing run"):
        heal(str(tiny), _documents(8, 100), other, steps=4, **SMALL)
    stopped = tmp_path / "stopped"
    heal(str(tiny), _documents(8, 100), stopped, method="lora", steps=4, stop_after=1, **SMALL)
    with pytest.raises(DepthpruneError, match=r"other settings \(lr\)"):
        heal(str(tiny), _documents(8, 100), stopped, method="lora", steps=4, lr=1.0, **SMALL)


def test_a_run_recorded_before_an_option_existed_resumes_at_its_default(tiny, tmp_path, monkeypatch):
    from depthprune.heal import recipe

    resumed = []
    monkeypatch.setattr(recipe, "resume", lambda run, state, real=recipe.resume: resumed.append(real(run, state)))
    stopped = tmp_path / "stopped"
    heal(str(tiny), _documents(8, 100), stopped, method="lora", steps=4, stop_after=1, **SMALL)
    config = json.loads((stopped / "heal_config.json").read_text())
    for newer in ("compile", "loss_chunk", "bf16_autocast"):  # as an older version recorded the run
        del config[newer]
    (stopped / "heal_config.json").write_text(json.dumps(config))
    with pytest.raises(DepthpruneError, match=r"other settings \(compile\)"):
        heal(str(tiny), _documents(8, 100), stopped, method="lora", steps=4, compile=True, **SMALL)
    assert not resumed
    heal(str(tiny), _documents(8, 100), stopped, method="lora", steps=4, **SMALL)
    assert len(resumed) == 1  # resumed, not started over


def test_default_target_modules_are_the_mlp():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert default_target_modules(llama) == ["down_proj", "gate_proj", "up_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert default_target_modules(gpt2) == ["c_fc", "mlp.c_proj"]  # not the attention's c_proj


def test_cli(tiny, tmp_path, shared_data, capsys):
    train = str(shared_data / "c4" / "train_sample.jsonl")
    code = main(["heal", str(tiny), "--data", train, "--out", str(tmp_path / "out"), "--preset", "cpu-small",
                 "--method", "lora", "--steps", "2", "--seq-len", "32", "--batch-size", "2"])
    assert code == 0
    assert "healed with lora: 2 steps, 128 tokens" in capsys.readouterr().out
    code = main(["heal", str(tiny), "--data", train, "--out", str(tmp_path / "bad"), "--batch-size", "3",
                 "--grad-accum", "2"])
    assert code == 2
    assert "must be divisible" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_two_processes_match_one(tiny, tmp_path, shared_data):
    # Same global batch of 4: one process with 2 micro-batches of 2, or two processes with 1 of 2 each.
    train = str(shared_data / "c4" / "train_sample.jsonl")
    common = [str(tiny), "--data", train, "--method", "lora", "--steps", "4", "--batch-size", "4",
              "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--warmup", "1", "--dropout", "0"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "depthprune.cli", "heal", *common, "--grad-accum", "2",
                    "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "depthprune.cli", "heal", *common, "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, timeout=300)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-5, abs=1e-5)
    assert json.loads((tmp_path / "two" / "depthprune.json").read_text())["healing"]["processes"] == 2
    torch.testing.assert_close(_load_state(tmp_path / "one"), _load_state(tmp_path / "two"), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_real_pruned_model_heals(tmp_path, shared_data):
    from depthprune import prune

    pruned = tmp_path / "p30"
    prune("smollm2-135m", pruned, fraction=0.3, criterion="deepest", progress=False)
    record = heal(str(pruned), str(shared_data / "c4" / "train_sample.jsonl"), tmp_path / "healed", method="lora",
                  val_data=str(shared_data / "c4" / "validation.jsonl"), steps=3, batch_size=2, seq_len=64,
                  rank=8, lr=2e-3, warmup=0, eval_every=3, save_every=3, val_sequences=4, progress=False)
    # The cut leaves SmolLM2 at ~23 nats/token on C4; three LoRA steps already recover a good part.
    assert record["val_loss_after"] < record["val_loss_before"] - 0.5
    saved = json.loads((tmp_path / "healed" / "depthprune.json").read_text())
    assert saved["removed_layers"] and saved["healing"]["method"] == "lora"


def test_options_presets_and_tokens():
    from depthprune.heal import resolve_options, total_steps

    paper = resolve_options()
    assert (paper.method, paper.steps, paper.batch_size, paper.seq_len, paper.rank, paper.dropout, paper.lr,
            paper.warmup, paper.schedule) == ("qlora", 5000, 16, 2048, 64, 0.05, 3e-4, 100, "cosine")
    small = resolve_options("cpu-small", rank=2)
    assert small.steps == 20 and small.rank == 2
    by_tokens = resolve_options("cpu-small", train_tokens=5000)
    assert by_tokens.steps is None and total_steps(by_tokens) == 10  # ceil(5000 / (4 * 128))
    with pytest.raises(DepthpruneError, match="not both"):
        resolve_options(steps=3, train_tokens=5000)
    with pytest.raises(DepthpruneError, match="unknown healing method 'magic'"):
        resolve_options(method="magic")
