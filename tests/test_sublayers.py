"""Sub-layer cuts (issue 20): removing the attention or the MLP of chosen layers, exactly, in a standard checkpoint.

The reference is the original model with those sub-layers' outputs switched off by forward hooks. The saved
checkpoint must load in plain transformers and compute it; depthprune's loaded version (stand-ins that compute
nothing) must compute the same, with and without KV cache, and hold no KV cache for a removed attention.
"""

from __future__ import annotations

import json

import pytest
import torch
from badinput import assert_clean_failure, run
from conftest import ARCHITECTURES, tiny_model, tiny_tokenizer

import depthprune
from depthprune.cli.app import main
from depthprune.errors import DepthpruneError
from depthprune.model.layout import decoder_layout
from depthprune.model.load import load_model
from depthprune.model.record import read_record
from depthprune.model.sublayers import RemovedSublayer, remove_sublayers, sites_of, sublayers_removed

# Layer 0 among them: transformers reads the cached length from the first cache layer.
REMOVED = {"attention": [0, 2, 3], "mlp": [0, 2, 3]}
# Gemma 3's tiny layer types are [sliding, sliding, full] * 2: one of each type, both kept types in use.
GEMMA3_ATTENTION = [0, 2, 4]
CASES = [(arch, kind) for arch in ARCHITECTURES for kind in ("attention", "mlp") if not (arch == "opt" and kind == "mlp")]


def _removed(arch: str, kind: str) -> list[int]:
    return GEMMA3_ATTENTION if (arch, kind) == ("gemma3", "attention") else REMOVED[kind]


def _switched_off(model, kind: str, layers):
    """Forward hooks making the ``kind`` sub-layer of ``layers`` output zeros: the model the cut must equal."""
    attribute = sites_of(model.config, kind).modules[kind]

    def zero(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    return [getattr(decoder_layout(model).layers[i], attribute).register_forward_hook(zero) for i in layers]


def _greedy(model, ids, use_cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


def _cache_layers_filled(model, ids) -> int:
    output = model(ids, use_cache=True)
    cache = getattr(output, "past_key_values", None) or output.cache
    return sum(getattr(layer, "keys", None) is not None and layer.keys.numel() > 0 for layer in cache.layers)


@pytest.mark.parametrize("arch, kind", CASES)
def test_the_cut_is_the_original_with_those_sublayers_switched_off(arch, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model, removed = tiny_model(arch), _removed(arch, kind)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    record = depthprune.prune(model, tmp_path / "cut", layers=",".join(map(str, removed)), granularity=kind,
                              tokenizer=tiny_tokenizer(), progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "the loaded model passed in must be left as it was"
    hooks = _switched_off(model, kind, removed)
    with torch.no_grad():
        reference = model(ids).logits
    generated = _greedy(model, ids[:1], use_cache=True)
    for hook in hooks:
        hook.remove()
    assert record["granularity"] == kind and record["removed_layers"] == []
    assert record["removed_sublayers"] == {"attention": [], "mlp": [], kind: removed}
    assert read_record(tmp_path / "cut")["removed_sublayers"][kind] == removed

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", attn_implementation="eager").eval()
    assert not any(isinstance(m, RemovedSublayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, reference)
    fast, _ = load_model(str(tmp_path / "cut"))
    default = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()  # the attention implementation fast has
    assert sum(isinstance(m, RemovedSublayer) for m in fast.modules()) == len(removed)
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, default(ids).logits)
        assert torch.allclose(fast(ids).logits, reference, atol=1e-5)
    assert torch.equal(_greedy(fast, ids[:1], use_cache=True), _greedy(fast, ids[:1], use_cache=False))
    assert torch.equal(_greedy(fast, ids[:1], use_cache=True), generated)
    assert record["parameters_after"] < record["parameters_before"]
    kept_attention = 6 - len(removed) if kind == "attention" else 6
    with torch.no_grad():
        assert _cache_layers_filled(fast, ids) == kept_attention, "a removed attention must hold no KV cache"


def test_a_loaded_cut_saves_the_standard_checkpoint_again(tmp_path):
    """The stand-ins' state dict holds the zeros: save_pretrained (as healing does) writes a checkpoint plain
    transformers loads to the same model; loading that state dict back takes the zeros and refuses others."""
    from transformers import AutoModelForCausalLM

    depthprune.prune(tiny_model("llama"), tmp_path / "cut", layers="1,4", granularity="attention",
                     tokenizer=tiny_tokenizer(), progress=False)
    fast, _ = load_model(str(tmp_path / "cut"))
    fast.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, fast(ids).logits)
    state = again.state_dict()
    fast.load_state_dict(state)
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = 1.0
    with pytest.raises(RuntimeError, match="must be zeros"):
        fast.load_state_dict(state)


def test_sublayers_removed_puts_the_model_back_and_inplace_keeps_the_cut():
    model = tiny_model("gemma3")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    indices = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    with sublayers_removed(model, {"attention": [0, 2, 4]}) as cut:
        slots = [layer.self_attn.layer_idx for layer in decoder_layout(cut).layers
                 if not isinstance(layer.self_attn, RemovedSublayer)]
        assert slots == [0, 1, 2]  # two sliding layers on the first two sliding slots, the full one on slot 2
    assert [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)] == indices
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    remove_sublayers(model, {"mlp": [1]})
    with pytest.raises(DepthpruneError, match="already removed"):
        remove_sublayers(model, {"mlp": [1, 2]})


def test_whole_layers_cut_from_a_sublayer_cut_keep_it_exact(tmp_path):
    """A whole-layer cut of a loaded sub-layer cut re-packs the KV-cache slots and records where the removed
    sub-layers are now."""
    depthprune.prune(tiny_model("llama"), tmp_path / "sub", layers="0,3", granularity="attention",
                     tokenizer=tiny_tokenizer(), progress=False)
    record = depthprune.prune(str(tmp_path / "sub"), tmp_path / "both", layers="1", progress=False)
    assert record["removed_layers"] == [1] and record["removed_sublayers"]["attention"] == [0, 2]
    fast, _ = load_model(str(tmp_path / "both"))
    ids = torch.randint(3, 90, (1, 7))
    assert torch.equal(_greedy(fast, ids, use_cache=True), _greedy(fast, ids, use_cache=False))


@pytest.mark.parametrize("granularity", ["attention", "mlp"])
def test_prune_cli_deepest_sublayers(granularity, tiny_checkpoint, tmp_path, capsys):
    code, out, err = run(capsys, "prune", tiny_checkpoint, "--granularity", granularity, "--criterion", "deepest",
                         "--n", "3", "--out", tmp_path / "cut")
    assert code == 0, err
    assert f"removed the {granularity} of layers 2-4" in out
    record = json.loads((tmp_path / "cut" / "depthprune.json").read_text())
    assert record["removed_sublayers"][granularity] == [2, 3, 4] and record["layers_after"] == 6


def test_a_record_with_nonzero_removed_weights_is_refused(tmp_path):
    depthprune.prune(tiny_model("qwen2"), tmp_path / "cut", layers="2", granularity="mlp",
                     tokenizer=tiny_tokenizer(), progress=False)
    path = tmp_path / "cut" / "depthprune.json"
    record = json.loads(path.read_text())
    record["removed_sublayers"]["mlp"] = [2, 3]
    path.write_text(json.dumps(record))
    with pytest.raises(DepthpruneError, match="the mlp of layer 3 is removed, but its weights are not zero"):
        load_model(str(tmp_path / "cut"))
    record["removed_sublayers"] = {"mlp": "2"}
    path.write_text(json.dumps(record))
    with pytest.raises(DepthpruneError, match="damaged: removed_sublayers"):
        read_record(tmp_path / "cut")


def _phi_checkpoint(path):
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, max_position_embeddings=64)
    PhiForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


BAD = [
    (["--granularity", "attention", "--n", "6", "--criterion", "deepest"], "remove between 1 and 5 of the 6 attention sub-layers"),
    (["--granularity", "mlp", "--layers", "0-5"], "removes all 6 mlp sub-layers"),
    (["--granularity", "attention", "--layers", "7"], "out of range"),
    (["--granularity", "attention", "--n", "2", "--criterion", "perplexity-oneshot"],
     "criterion 'perplexity-oneshot' cannot choose attention sub-layers"),
    (["--granularity", "attention", "--n", "2", "--criterion", "deepest", "--repair", "linear"],
     "does not apply to --granularity attention"),
    (["--granularity", "mlp", "--n", "2", "--criterion", "deepest", "--format", "gguf"],
     "a GGUF output needs a .gguf file or an embedded alias"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_sublayer_requests_are_one_line_and_write_nothing(extra, message, tiny_checkpoint, tiny_corpus,
                                                               tmp_path, capsys):
    data = ["--data", tiny_corpus] if "--repair" in extra else []
    assert_clean_failure(capsys, ["prune", tiny_checkpoint, *extra, *data, "--out", tmp_path / "cut"], message,
                         watch=[tmp_path])


def test_an_architecture_it_cannot_cut_exactly_is_refused(tmp_path, capsys):
    phi = _phi_checkpoint(tmp_path / "phi")  # Phi-1/2 run attention and MLP in parallel on one norm
    assert_clean_failure(capsys, ["prune", phi, "--granularity", "attention", "--layers", "1", "--out",
                                  tmp_path / "cut"], "phi is not one", watch=[tmp_path])
    with pytest.raises(DepthpruneError, match="opt's mlp is not one module"):
        depthprune.prune(tiny_model("opt"), tmp_path / "opt", layers="1", granularity="mlp",
                         tokenizer=tiny_tokenizer(), progress=False)


def test_removing_the_attention_of_every_layer_of_the_first_type_is_refused(tmp_path):
    with pytest.raises(DepthpruneError, match="every sliding_attention layer"):
        depthprune.prune(tiny_model("gemma3"), tmp_path / "cut", layers="0,1,3,4", granularity="attention",
                         tokenizer=tiny_tokenizer(), progress=False)
    assert not (tmp_path / "cut").exists()


@pytest.mark.slow
@pytest.mark.parametrize("granularity, n", [("attention", 8), ("mlp", 4)])
def test_smollm2_sublayer_cut_loads_in_plain_transformers(granularity, n, tmp_path):
    from transformers import AutoModelForCausalLM

    assert main(["prune", "smollm2-135m", "--granularity", granularity, "--criterion", "deepest", "--n", str(n),
                 "--out", str(tmp_path / "cut")]) in (0, None)
    record = read_record(tmp_path / "cut")
    removed = record["removed_sublayers"][granularity]
    assert removed == list(range(29 - n, 29))
    original, tokenizer = load_model("smollm2-135m")
    ids = tokenizer("The deeper layers of a language model are", return_tensors="pt").input_ids
    hooks = _switched_off(original, granularity, removed)
    with torch.no_grad():
        reference = original(ids).logits
    generated = _greedy(original, ids, use_cache=True)
    for hook in hooks:
        hook.remove()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    fast, _ = load_model(str(tmp_path / "cut"))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, reference, atol=1e-4)
        assert torch.equal(fast(ids).logits, plain(ids).logits)
    assert torch.equal(_greedy(fast, ids, use_cache=True), generated)
    assert torch.equal(_greedy(fast, ids, use_cache=False), generated)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_a_healed_sublayer_cut_stays_a_standard_exact_cut(method, tmp_path):
    """Healing loads the cut through load_model (stand-ins: nothing of a removed sub-layer trains) and saves the
    merged model through its state dict (the zeros): the result still loads in plain transformers and as a cut."""
    from transformers import AutoModelForCausalLM

    depthprune.prune(tiny_model("llama"), tmp_path / "cut", layers="1,3", granularity="attention",
                     tokenizer=tiny_tokenizer(), progress=False)
    documents = torch.randint(3, 90, (8, 40), generator=torch.Generator().manual_seed(2)).tolist()
    depthprune.heal_model(str(tmp_path / "cut"), documents, tmp_path / "healed", method=method, steps=2, lr=1e-2,
                          batch_size=4, seq_len=32, rank=4, warmup=1, eval_every=100, save_every=100, progress=False)
    assert read_record(tmp_path / "healed")["removed_sublayers"]["attention"] == [1, 3]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    for layer in (1, 3):
        assert not any(p.any() for p in plain.model.layers[layer].self_attn.parameters())
    healed, _ = load_model(str(tmp_path / "healed"))
    ids = torch.randint(3, 90, (1, 9))
    with torch.no_grad():
        assert torch.equal(healed(ids).logits, plain(ids).logits)
