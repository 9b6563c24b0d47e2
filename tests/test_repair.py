"""Training-free repair of a cut (ReplaceMe): the fold is exact, the least-squares map is the dense solution,
repair lowers the error it minimises, what cannot be repaired exactly is refused, and the result is a plain
checkpoint with the plain cut's layout."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, tiny_model

from depthprune.errors import DepthpruneError
from depthprune.model.load import decoder_layout, num_layers
from depthprune.model.surgery import remove_layers
from depthprune.repair import REPAIRS
from depthprune.repair.apply import repair_cut
from depthprune.repair.capture import capture
from depthprune.repair.least_squares import residual_sum, solve
from depthprune.repair.linear import LinearRepairOptions
from depthprune.repair.linear_cosine import CosineRepairOptions
from depthprune.repair.site import find_site

FOLD_ARCHITECTURES = ["llama", "qwen2", "mistral", "qwen3", "phi3", "gpt2", "gpt_neox", "opt"]
BATCH = 4


def _sequences(count: int = 12, shortest: int = 20, longest: int = 40, seed: int = 0) -> list[list[int]]:
    """Random token lists of different lengths (so batches are padded), ids clear of the special tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=generator).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def _least_squares_map(model, layers: list[int], sequences) -> torch.Tensor:
    """T as ``repair_cut`` fits it, from the building blocks, on the uncut ``model`` (left unchanged)."""
    site = find_site(model, layers[0] - 1)
    calibration = capture(model, site.projection, site.layer, layers[-1] + 1, sequences, hidden_size=site.hidden_size,
                          pad_token_id=0, batch_size=BATCH, sample_tokens=256,
                          norm_power=LinearRepairOptions().repair_norm_power, progress=False)
    return solve(calibration, 0.0)


def _cut_with_hook(model, layers: list[int], transform: torch.Tensor):
    """The plain cut of ``model`` with T applied to the kept layer's MLP output by a forward hook."""
    site = find_site(model, layers[0] - 1)
    remove_layers(model, layers)
    site.projection.register_forward_hook(
        lambda module, args, output: (output.double() @ transform).to(output.dtype))
    return model


def _prompt():
    ids = torch.tensor([[0, 0, 5, 17, 33, 8, 61, 12], [4, 9, 22, 40, 7, 3, 50, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def _repair(model, layers, method="linear", options=None, sequences=None) -> dict:
    return repair_cut(model, layers, _sequences() if sequences is None else sequences, method, options,
                      pad_token_id=0, batch_size=BATCH, progress=False)


@pytest.mark.parametrize("arch", FOLD_ARCHITECTURES)
def test_fold_equals_the_map_applied_by_a_hook(arch):
    model = tiny_model(arch)
    hooked = copy.deepcopy(model)
    layers = [2, 3]
    transform = _least_squares_map(hooked, layers, _sequences())
    record = _repair(model, layers)
    _cut_with_hook(hooked, layers, transform)
    assert num_layers(model) == num_layers(hooked) == 4 and record["layer"] == 1
    ids, mask = _prompt()
    with torch.no_grad():
        folded, reference = (m(input_ids=ids, attention_mask=mask).logits for m in (model, hooked))
    assert torch.allclose(folded, reference, atol=1e-5, rtol=0)
    for use_cache in (True, False):
        outputs = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
                   for m in (model, hooked)]
        assert torch.equal(outputs[0].sequences, outputs[1].sequences)
        for a, b in zip(outputs[0].logits, outputs[1].logits, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_fold_is_exact_when_the_block_ends_the_model():
    model = tiny_model("llama")
    hooked = copy.deepcopy(model)
    layers = [4, 5]  # the target is the last layer's output, the final norm's input
    transform = _least_squares_map(hooked, layers, _sequences())
    record = _repair(model, layers)
    _cut_with_hook(hooked, layers, transform)
    ids, mask = _prompt()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              hooked(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
    assert record["fit"]["after"]["residual_error"] < record["fit"]["before"]["residual_error"]


def _dense_activations(model, layers: list[int], sequences):
    """M, Y, L of every real token, stacked, from output_hidden_states and a hook (not the repair's capture)."""
    from depthprune.data import batches

    site = find_site(model, layers[0] - 1)
    mlp = []
    handle = site.projection.register_forward_hook(lambda module, args, output: mlp.append(output))
    parts = {"m": [], "y": [], "l": []}
    with torch.no_grad():
        for batch in batches(sequences, BATCH, 0):
            states = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, output_hidden_states=True).hidden_states
            real = batch.attention_mask.bool()
            m = mlp.pop()[real].double()
            parts["m"].append(m)
            parts["y"].append(states[layers[0]][real].double() - m)
            parts["l"].append(states[layers[-1] + 1][real].double())
    handle.remove()
    return (torch.cat(parts[k]) for k in "myl")


@pytest.mark.parametrize("norm_power", [0.0, 1.0])
def test_least_squares_map_equals_a_dense_solve(norm_power):
    model = tiny_model("llama")
    layers, sequences = [2, 3], _sequences()
    site = find_site(model, 1)
    calibration = capture(model, site.projection, 1, 4, sequences, hidden_size=32, pad_token_id=0, batch_size=BATCH,
                          sample_tokens=50, norm_power=norm_power, progress=False)
    assert calibration.tokens == sum(len(s) for s in sequences)  # padding excluded
    assert len(calibration.sample) == 50
    m, y, target = _dense_activations(model, layers, sequences)
    root = (target.norm(dim=1) ** -norm_power).sqrt()[:, None]  # weighted least squares: rows scaled by √w
    dense = torch.linalg.lstsq(m * root, (target - y) * root, driver="gelsd").solution
    transform = solve(calibration, 0.0)
    assert (transform - dense).abs().max() < 1e-8
    direct = (((target - y - m @ transform) * root) ** 2).sum()
    assert residual_sum(calibration, transform) == pytest.approx(float(direct), rel=1e-9)
    assert residual_sum(calibration, None) == pytest.approx(float((((target - y - m) * root) ** 2).sum()), rel=1e-9)


def test_ridge_is_relative_to_the_mean_eigenvalue():
    model = tiny_model("llama")
    site = find_site(model, 1)
    calibration = capture(model, site.projection, 1, 4, _sequences(), hidden_size=32, pad_token_id=0,
                          batch_size=BATCH, sample_tokens=50, progress=False)
    ridge = 0.5
    strength = ridge * float(torch.trace(calibration.gram)) / 32
    expected = torch.linalg.solve(calibration.gram + strength * torch.eye(32, dtype=torch.float64), calibration.cross)
    assert (solve(calibration, ridge) - expected).abs().max() < 1e-10


def test_repair_lowers_the_errors_it_minimises():
    linear = _repair(tiny_model("qwen2"), [2, 3])
    fit = linear["fit"]
    assert fit["after"]["residual_error"] < fit["before"]["residual_error"]
    assert fit["after"]["mse_per_token"] < fit["before"]["mse_per_token"]
    cosine = _repair(tiny_model("qwen2"), [2, 3], "linear-cosine", CosineRepairOptions(repair_steps=50, repair_lr=1e-3))
    refined = cosine["fit"]
    assert refined["least_squares"] == pytest.approx(fit["after"])
    assert refined["after"]["cosine_distance"] <= fit["after"]["cosine_distance"]
    assert refined["after"]["cosine_distance"] < refined["before"]["cosine_distance"]
    json.dumps(cosine)  # depthprune.json takes it as it is
    assert cosine["options"] == {"repair_ridge": 0.0, "repair_norm_power": 1.0, "repair_tokens": 4096,
                                 "repair_steps": 50, "repair_lr": 1e-3}



def _post_norm_opt():
    from transformers import AutoModelForCausalLM, OPTConfig

    # As OPT-350m: each layer norms the residual sum after the MLP output is added (do_layer_norm_before=False).
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, do_layer_norm_before=False)
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


BAD = {
    "layer 0": (lambda: tiny_model("llama"), [0, 1], "linear", None, None, "starting at layer 0"),
    "not contiguous": (lambda: tiny_model("llama"), [2, 4], "linear", None, None, "one contiguous block"),
    "gemma2": (lambda: tiny_model("gemma2"), [2, 3], "linear", None, None, "post_feedforward_layernorm"),
    "gemma3": (lambda: tiny_model("gemma3"), [2, 3], "linear", None, None, "post_feedforward_layernorm"),
    "post-norm opt": (_post_norm_opt, [2, 3], "linear", None, None, "does not reach the residual stream"),
    "too few tokens": (lambda: tiny_model("llama"), [2, 3], "linear", None, [[5, 6, 7, 8, 9]] * 2,
                       "needs at least 32"),
    "singular": (lambda: tiny_model("llama"), [2, 3], "linear", None, [[5] * 40] * 3, "--repair-ridge"),
    "unknown method": (lambda: tiny_model("llama"), [2, 3], "cubic", None, None, "unknown repair 'cubic'"),
    "bad option": (lambda: tiny_model("llama"), [2, 3], "linear", LinearRepairOptions(repair_ridge=-1.0), None,
                   "--repair-ridge must be at least 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_cannot_be_repaired_exactly_is_refused_in_one_line(case):
    make, layers, method, options, sequences, expected = BAD[case]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DepthpruneError, match=expected) as error:
        _repair(model, layers, method, options, sequences)
    assert "\n" not in str(error.value)
    assert num_layers(model) == 6 and len(decoder_layout(model).layers) == 6
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_ridge_makes_a_singular_calibration_repairable():
    record = _repair(tiny_model("llama"), [2, 3], options=LinearRepairOptions(repair_ridge=1e-4),
                     sequences=[[5] * 40] * 3)
    assert record["fit"]["after"]["residual_error"] <= record["fit"]["before"]["residual_error"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_repaired_checkpoint_has_the_plain_cut_layout(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plain = tiny_model(arch), remove_layers(tiny_model(arch), [2, 3])
    record = _repair(model, [2, 3])
    model.save_pretrained(tmp_path / "repaired")
    plain.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "repaired", attn_implementation="eager").eval()
    plain_reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    shapes = {k: v.shape for k, v in reloaded.state_dict().items()}
    assert shapes == {k: v.shape for k, v in plain_reloaded.state_dict().items()}
    changed = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, plain_reloaded.state_dict()[k])]
    assert changed and all(k.startswith(record["folded_into"]) for k in changed)
    ids, mask = _prompt()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_registry_lists_the_repairs_without_importing_torch():
    assert REPAIRS.names() == ("linear", "linear-cosine")
    code = "import sys, depthprune.repair; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
