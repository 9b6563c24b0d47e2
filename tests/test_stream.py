"""Layer-streamed analysis equals the in-memory one, holds one layer at a time, and refuses bad input clearly."""

from __future__ import annotations

import functools
import gc
import json

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, tiny_model
from test_similarity import _sequences

from depthprune.data import batches
from depthprune.errors import DepthpruneError
from depthprune.measure.checkpoint import Checkpoint, local_checkpoint
from depthprune.measure.distances import measure_distances
from depthprune.measure.memory import StreamPlan, estimate_memory, parse_memory, plan_streaming
from depthprune.measure.stream import _Skeleton, stream_distances, stream_layers
from depthprune.model.load import decoder_layout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(arch)``: a tiny checkpoint of ``arch`` on disk (safetensors), written once, and the model read back
    from it the ordinary way (the in-memory reference)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch)
            tiny_model(arch).save_pretrained(path)
            cache[arch] = path, AutoModelForCausalLM.from_pretrained(path).eval()
        return cache[arch]

    return get


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("tokens", ["last", "all"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_equals_in_memory(saved, arch, tokens, padding_side):
    path, model = saved(arch)
    sequences = _sequences()  # 7 sequences of mixed lengths: padded batches of 3
    expected = measure_distances(model, sequences, batch_size=3, token_mode=tokens, padding_side=padding_side,
                                 progress=False)
    streamed = stream_distances(path, sequences, batch_size=3, token_mode=tokens, padding_side=padding_side,
                                progress=False)
    np.testing.assert_allclose(streamed.pairwise, expected.pairwise, atol=1e-6, rtol=0)
    np.testing.assert_allclose(streamed.block_influence, expected.block_influence, atol=1e-9, rtol=0)
    assert streamed.num_samples == 7 and streamed.token_mode == tokens
    assert streamed.block(1).min() > 1e-3  # not trivially zero: a wrong layer would show


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "opt"])
def test_every_layer_input_and_output_equal_the_model(saved, arch):
    """The generic callback sees exactly the hidden states the full model computes, at every real token."""
    path, model = saved(arch)
    batch_list = list(batches(_sequences(5), 5, pad_token_id=0, padding_side="left"))
    layers = decoder_layout(model).layers
    expected = {}
    handles = [layer.register_forward_hook(lambda m, a, kw, out, i=i: expected.__setitem__(i, (kw.get(
        "hidden_states", a[0] if a else None), out)), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        batch = batch_list[0]
        with torch.no_grad():
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **({} if arch == "opt" else {"position_ids": batch.position_ids}), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    seen = []
    real = batch.attention_mask.bool()

    def check(layer, b, inputs, output):
        seen.append(layer)
        assert torch.equal(inputs[real], expected[layer][0][real])
        assert torch.equal(output[real], expected[layer][1][real])

    stream_layers(path, batch_list, check, progress=False)
    assert seen == list(range(len(layers)))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_buffers_not_in_the_checkpoint_are_computed_as_the_model_does(saved, arch):
    path, model = saved(arch)
    skeleton = _Skeleton(Checkpoint(path), torch.float32, torch.device("cpu"))
    buffers = dict(skeleton.model.named_buffers())
    assert buffers.keys() == dict(model.named_buffers()).keys()
    for name, value in model.named_buffers():  # rotary inv_freq (local and global for Gemma 3), embed_scale
        assert torch.equal(buffers[name], value), name
    assert all(p.is_meta for p in skeleton.model.parameters())  # the skeleton holds no weights


def test_one_layer_in_memory_at_a_time(saved, monkeypatch):
    """While layer ℓ runs, the only real parameters alive anywhere are layer ℓ's and the small ones outside
    the layers; the embedding is read only at the rows of the token ids that occur, and freed before layer 0."""
    path, model = saved("gemma3")
    layout = decoder_layout(model)
    layer_size = sum(p.numel() for p in layout.layers[0].parameters())
    outside = sum(p.numel() for p in model.base_model.parameters()) - layer_size * len(layout.layers)
    vocabulary = model.get_input_embeddings().weight.numel()
    del model, layout
    rows_read = []
    original = Checkpoint.read_rows
    monkeypatch.setattr(Checkpoint, "read_rows", lambda self, name, rows, *a: rows_read.append(rows) or
                        original(self, name, rows, *a))
    sequences = _sequences()
    alive_per_layer = []

    def real_parameters() -> list[torch.nn.Parameter]:
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter) and not o.is_meta]

    before = {id(p) for p in real_parameters()}  # the reference models other tests keep

    def count(layer, b, inputs, output):
        alive_per_layer.append(sum(p.numel() for p in real_parameters() if id(p) not in before))

    stream_layers(path, list(batches(sequences, 3, 0)), count, progress=False)
    assert alive_per_layer and all(n == layer_size + outside - vocabulary for n in alive_per_layer)
    assert len(rows_read) == 1 and rows_read[0].tolist() == sorted({0} | {t for s in sequences for t in s})  # 0: padding


def test_sharded_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    sequences = _sequences()
    expected = measure_distances(model, sequences, batch_size=4, progress=False)
    np.testing.assert_allclose(stream_distances(tmp_path, sequences, batch_size=4, progress=False).pairwise,
                               expected.pairwise, atol=1e-6, rtol=0)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(DepthpruneError, match="missing"):
        Checkpoint(tmp_path)


def test_memory_estimate(saved):
    path, model = saved("llama")
    estimate = estimate_memory(path, [len(x) for x in _sequences()], batch_size=3)
    layers = decoder_layout(model).layers
    assert estimate.model == 4 * sum(p.numel() for p in model.parameters())
    assert estimate.layer == 4 * sum(p.numel() for p in layers[0].parameters())
    assert estimate.layer < estimate.streamed() < estimate.in_memory
    assert estimate.streamed(offload=True) == estimate.streamed() - estimate.residual


def test_streams_only_when_asked_or_over_budget(saved, tiny_corpus):
    path, _ = saved("llama")
    estimate = estimate_memory(path, [16] * 4)
    choose = functools.partial(plan_streaming, str(path), 4, 16)
    assert choose() is None and choose(max_memory=estimate.in_memory) is None
    assert choose(stream=True) == StreamPlan(str(path), path, "cpu", offload=False)
    assert choose(max_memory=estimate.in_memory - 1) is not None
    assert choose(max_memory=estimate.streamed(), device="cuda").offload is False
    assert choose(max_memory=estimate.streamed() - 1, device="cuda").offload is True  # the residual goes to CPU
    with pytest.raises(DepthpruneError, match="loaded model"):
        plan_streaming(tiny_model("llama"), 4, 16, stream=True)


@pytest.mark.parametrize("text, size", [("2GiB", 2 * 2**30), ("1.5 gb", 1_500_000_000), ("512MiB", 2**29),
                                        ("4096", 4096), (123, 123), ("2 KB", 2000)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["2 GiBs", "two GB", "-1GB", "0", "1e9", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(DepthpruneError, match="memory size"):
        parse_memory(text)


# --- bad input -----------------------------------------------------------------------------------------


def test_budget_smaller_than_one_layer(saved):
    path, _ = saved("llama")
    estimate = estimate_memory(path, [16] * 4)
    with pytest.raises(DepthpruneError, match=r"memory budget .* too small to stream this model: one layer"):
        plan_streaming(str(path), 4, 16, max_memory=estimate.layer)


def test_only_pickle_weights(saved, tmp_path):
    path, model = saved("llama")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(DepthpruneError, match="no .safetensors weights"):
        Checkpoint(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(DepthpruneError, match=r"only pickle weights \(pytorch_model.bin\): streaming reads"):
        stream_distances(tmp_path, _sequences(), progress=False)


def test_corrupt_safetensors(tmp_path, saved):
    path, _ = saved("llama")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(DepthpruneError, match="not a readable safetensors file"):
        Checkpoint(tmp_path)


def test_hub_id_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DepthpruneError, match="'nobody/not-here' is not downloaded and streaming reads local files"):
        local_checkpoint("nobody/not-here")


def test_missing_layer_tensor(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = saved("llama")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(DepthpruneError, match="no tensor 'model.layers.3.mlp.up_proj.weight'"):
        stream_distances(tmp_path, _sequences(), progress=False)


def test_more_layers_than_the_config(saved, tmp_path):
    path, _ = saved("llama")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(DepthpruneError, match="weights of 6 layers but its config.json says 4"):
        stream_distances(tmp_path, _sequences(), progress=False)


# --- the command line ---------------------------------------------------------------------------------


def test_cli_analyze_stream_equals_in_memory(tiny_checkpoint, tiny_corpus, tmp_path, capsys):
    from depthprune.cli.app import main
    from depthprune.measure.distances import load_distances

    # Few short samples: the tiny model's activations must stay below its weights for a budget to choose.
    common = [str(tiny_checkpoint), "--data", str(tiny_corpus), "--samples", "5", "--seq-len", "8",
              "--batch-size", "2", "--token-mode", "all"]
    estimate = estimate_memory(tiny_checkpoint, [8] * 5, batch_size=2, token_mode="all")
    assert estimate.streamed() < 200_000 < estimate.in_memory
    assert main(["analyze", *common, "--out", str(tmp_path / "memory")]) == 0
    assert main(["analyze", *common, "--stream", "--out", str(tmp_path / "stream")]) == 0
    assert main(["analyze", *common, "--max-memory", "200KB", "--out", str(tmp_path / "budget")]) == 0
    assert "streaming it one layer at a time" in capsys.readouterr().out
    expected = load_distances(tmp_path / "memory")
    for name in ("stream", "budget"):
        streamed = load_distances(tmp_path / name)
        np.testing.assert_allclose(streamed.pairwise, expected.pairwise, atol=1e-6, rtol=0)
        assert streamed.meta["streamed"] is True and streamed.meta["model_fingerprint"] == \
            expected.meta["model_fingerprint"]
    assert "streamed" not in expected.meta


def test_cli_prune_measures_streamed(tiny_checkpoint, tiny_corpus, tmp_path):
    from depthprune.cli.app import main
    from depthprune.model.record import read_record

    common = ["prune", str(tiny_checkpoint), "--data", str(tiny_corpus), "--samples", "8", "--seq-len", "24", "--n", "2"]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    assert main([*common, "--stream", "--out", str(tmp_path / "stream")]) == 0
    assert read_record(tmp_path / "stream")["removed_layers"] == read_record(tmp_path / "memory")["removed_layers"]
    influence = [*common, "--criterion", "block-influence", "--n", "3"]
    assert main([*influence, "--out", str(tmp_path / "bi-memory")]) == 0
    assert main([*influence, "--stream", "--out", str(tmp_path / "bi-stream")]) == 0
    assert read_record(tmp_path / "bi-stream")["removed_layers"] == read_record(tmp_path / "bi-memory")["removed_layers"]


@pytest.mark.parametrize("extra, message", [
    (["--max-memory", "1KiB"], "too small to stream this model: one layer"),
    (["--max-memory", "2 GiBs"], "memory size '2 GiBs' not understood"),
    (["--max-memory", "0"], "memory size must be positive"),
])
def test_cli_bad_budget(tiny_checkpoint, tiny_corpus, tmp_path, capsys, extra, message):
    from badinput import assert_clean_failure

    argv = ["analyze", tiny_checkpoint, "--data", tiny_corpus, "--samples", "4", "--seq-len", "16", *extra,
            "--out", tmp_path / "out"]
    assert_clean_failure(capsys, argv, message, watch=[tmp_path])


def test_cli_stream_needs_local_safetensors(saved, tiny_corpus, tmp_path, capsys, monkeypatch):
    from badinput import assert_clean_failure

    path, model = saved("llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    argv = ["analyze", pickled, "--data", tiny_corpus, "--seq-len", "16", "--stream", "--out", tmp_path / "out"]
    assert_clean_failure(capsys, argv, "safetensors", watch=[tmp_path])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["analyze", "nobody/not-here", "--data", tiny_corpus, "--stream", "--out", tmp_path / "out"]
    assert_clean_failure(capsys, argv, "is not downloaded and streaming reads local files only", watch=[tmp_path])


# --- the real model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma3_270m_streamed_equals_in_memory(shared_data):
    """Gemma 3: sliding and global attention, two rotary embeddings, a 262k-row embedding read by rows.
    The alias streams from its converted safetensors cache."""
    from depthprune import DataOptions, analyze

    data = DataOptions(str(shared_data / "c4" / "validation.jsonl"), samples=6, seq_len=96)
    expected = analyze("gemma3-270m", data, batch_size=4, token_mode="all", progress=False)
    streamed = analyze("gemma3-270m", data, batch_size=4, token_mode="all", stream=True, progress=False)
    np.testing.assert_allclose(streamed.pairwise, expected.pairwise, atol=1e-6, rtol=0)
    np.testing.assert_allclose(streamed.block_influence, expected.block_influence, atol=1e-9, rtol=0)
    assert streamed.meta["num_tokens"] == expected.meta["num_tokens"] and streamed.num_layers == 18
    assert streamed.meta["streamed"] is True and "streamed" not in expected.meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_rows_reads_those_rows_without_a_memory_map(tmp_path, monkeypatch, dtype):
    """Rows in runs and alone, from a tensor that is not first in its file, as they are stored; plain reads
    (a memory map would page in the table around every row read)."""
    import safetensors
    from safetensors.torch import save_file

    table = torch.randn(300, 7).to(dtype)
    save_file({"a_first": torch.randn(13, 3), "embed": table, "z_last": torch.randn(5)}, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path)
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("memory-mapped"))
    rows = torch.tensor([0, 1, 2, 5, 9, 10, 150, 298, 299])
    read = checkpoint.read_rows("embed", rows, torch.float32, torch.device("cpu"))
    assert read.dtype == torch.float32 and torch.equal(read, table[rows].to(torch.float32))
    assert torch.equal(checkpoint.read_rows("embed", torch.tensor([7]), dtype, torch.device("cpu")), table[7:8])
