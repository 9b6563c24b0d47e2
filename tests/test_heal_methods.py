"""Every registered healing method: prepare -> a training step -> merge gives a plain model computing what the
trained adapted model computes. DoRA (added as one module) heals end to end; in-memory healing equals healing
the same checkpoint from disk; healed files follow the umask; a progress hook sees every step."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from depthprune import heal_model as heal
from depthprune.heal import HEAL_METHODS, resolve_options
from depthprune.heal.loss import compute_loss
from depthprune.model.load import load_model


def _ids(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits


def _plain(model) -> None:
    """An ordinary transformers model: no peft wrapper or layer, no 4-bit layer, no quantization config."""
    from transformers import PreTrainedModel

    assert isinstance(model, PreTrainedModel) and not hasattr(model, "peft_config")
    kinds = {type(m).__module__.split(".")[0] for m in model.modules()}
    assert not kinds & {"peft", "bitsandbytes"}, kinds
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", HEAL_METHODS.names())
def test_every_method_trains_and_merges_exactly(tiny_checkpoint, name):
    entry = HEAL_METHODS.get(name)
    model, _ = load_model(str(tiny_checkpoint), quantize="nf4" if entry.quantized_base else None)
    o = resolve_options(method=name, rank=4, dropout=0.0, steps=1)
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    torch.manual_seed(0)
    net = entry.prepare(model, o)
    params = [p for p in net.parameters() if p.requires_grad]
    assert params, "nothing to train"
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):  # two steps: LoRA's B is zero at first, so the second moves the function
        net.train()
        loss, _, _ = compute_loss(net, None, ids, o)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted = _logits(net, ids)
    assert not torch.allclose(adapted, before, atol=1e-4), "the steps did not change the model"
    merged = entry.merge(net, o)
    _plain(merged)
    tolerance = 1e-4 if entry.quantized_base else 1e-5
    torch.testing.assert_close(_logits(merged, ids), adapted, rtol=tolerance, atol=tolerance)


def test_method_choices_come_from_the_registry():
    from depthprune.cli.app import build_parser
    from depthprune.sweep.config import heal_choices as heal_methods

    assert heal_methods() == ("none", *HEAL_METHODS.names()) and "dora" in heal_methods()
    heal_parser = build_parser()._subparsers._group_actions[0].choices["heal"]
    method = next(a for a in heal_parser._actions if a.dest == "method")
    assert tuple(method.choices) == HEAL_METHODS.names()
    assert all(entry.description in method.help for entry in HEAL_METHODS)


def test_dora_heals_and_merges_exactly(tiny_checkpoint, tiny_corpus, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    record = heal(str(tiny_checkpoint), str(tiny_corpus), out, method="dora", steps=3, batch_size=2, seq_len=16,
                  rank=2, lr=1e-2, warmup=0, save_adapter=True, progress=False)
    assert record["method"] == "dora" and record["rank"] == 2
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
    base, _ = load_model(str(tiny_checkpoint))
    original = load_file(str(tiny_checkpoint / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    mlp = {n for n in original if n.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))}
    assert {n for n in original if not torch.equal(original[n], merged[n])} == mlp
    wrapped = PeftModel.from_pretrained(base, out / "adapter")
    healed, _ = load_model(str(out))
    ids = _ids(healed.config.vocab_size)
    torch.testing.assert_close(_logits(healed, ids), _logits(wrapped, ids), rtol=1e-5, atol=1e-5)


def test_in_memory_healing_equals_healing_from_disk(tiny_checkpoint, tiny_corpus, tmp_path):
    from depthprune.heal import heal_loaded

    options = dict(method="lora", steps=3, batch_size=2, seq_len=16, rank=2, lr=1e-2, warmup=0, dropout=0.1,
                   save_every=1)
    heal(str(tiny_checkpoint), str(tiny_corpus), tmp_path / "disk", progress=False, **options)
    model, tokenizer = load_model(str(tiny_checkpoint))
    kept = copy.deepcopy(model.state_dict())
    seen = []
    healed = heal_loaded(copy.deepcopy(model), str(tiny_corpus), tmp_path / "memory", tokenizer=tokenizer,
                         record={"note": "a cut"}, progress=seen.append, **options)
    assert [r["step"] for r in seen] == [1, 2, 3] and {r["total_steps"] for r in seen} == {3}
    assert all(torch.equal(kept[n], t) for n, t in model.state_dict().items())  # the copy trained, not the model
    disk, memory = load_file(str(tmp_path / "disk" / "model.safetensors")), load_file(
        str(tmp_path / "memory" / "model.safetensors"))
    assert all(torch.equal(disk[n], memory[n]) for n in disk)
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(healed.model, ids), _logits(load_model(str(tmp_path / "disk"))[0], ids))
    saved = json.loads((tmp_path / "memory" / "depthprune.json").read_text())
    assert saved["note"] == "a cut" and saved["healing"]["method"] == "lora"
    identity = json.loads((tmp_path / "memory" / "heal_config.json").read_text())["model"]
    assert identity.startswith("in-memory LlamaForCausalLM sha256:")
    # Rerunning: the finished result, read back.
    again = heal_loaded(copy.deepcopy(model), str(tiny_corpus), tmp_path / "memory", tokenizer=tokenizer,
                        progress=False, **options)
    assert again.record["already_healed"] and again.model is not None


def test_healed_files_follow_the_umask(tiny_checkpoint, tiny_corpus, tmp_path):
    previous = os.umask(0o022)
    try:
        heal(str(tiny_checkpoint), str(tiny_corpus), tmp_path / "out", method="lora", steps=1, batch_size=2,
             seq_len=16, rank=2, warmup=0, progress=False)
    finally:
        os.umask(previous)
    for path in (tmp_path / "out").rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
