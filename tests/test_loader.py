"""Checkpoint formats, config validation, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmchat.config import ConfigError, GLMConfig
from glmchat.checkpoint import CheckpointError, weight_files
from glmchat.hub import resolve_checkpoint
from glmchat.loader import load_model
from glmchat.registry import KNOWN_CONFIGS


def _load(path, **kw):
    return load_model(path, progress=False, **kw)[0]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_all_formats_give_identical_models(tiny_ckpt, tiny_ckpt_bin, tiny_ckpt_sharded):
    sharded = tiny_ckpt_sharded
    assert len(weight_files(sharded)) == 3 and len(weight_files(tiny_ckpt_bin)) == 2
    reference = _load(tiny_ckpt)
    _same_weights(reference, _load(tiny_ckpt_bin))
    _same_weights(reference, _load(sharded))


def test_weights_land_where_the_names_say(tiny_ckpt):
    model = _load(tiny_ckpt)
    official = load_file(tiny_ckpt / "model.safetensors")
    qkv = official["transformer.encoder.layers.1.self_attention.query_key_value.bias"]
    assert torch.equal(model.layers[1].attn.qkv.bias, qkv)
    assert torch.equal(model.output.weight, official["transformer.output_layer.weight"])
    assert not torch.equal(model.output.weight, model.embed.weight)


def test_dtype_default_is_stored_dtype_and_conversion_on_load(tiny_ckpt_fp16):
    ckpt = tiny_ckpt_fp16
    assert _load(ckpt).dtype == torch.float16
    bf16 = _load(ckpt, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


@pytest.mark.parametrize("src,dst", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_chunked_16_bit_conversion_equals_pytorchs(src, dst):
    from glmchat.loader import _CONVERT_CHUNK, copy_converting

    x = (torch.randn(2 * _CONVERT_CHUNK + 17, generator=torch.Generator().manual_seed(0)) * 300).to(src)
    x[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-7])
    got = copy_converting(torch.empty(x.shape, dtype=dst), x)
    torch.testing.assert_close(got, x.to(dst), atol=0, rtol=0, equal_nan=True)


def test_aligned_safetensors_round_trip_and_load_in_place(tmp_path):
    from safetensors import safe_open

    from glmchat.checkpoint import save_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"odd": torch.randn(3, 5, generator=g).to(torch.bfloat16), "w": torch.randn(64, 32, generator=g),
               "codes": torch.randint(0, 255, (128, 16), dtype=torch.uint8, generator=g),
               "scalar": torch.tensor(7, dtype=torch.int64), "half": torch.randn(32, generator=g).half()}
    save_safetensors(tensors, tmp_path / "t.safetensors", {"format": "pt"})
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name
            if t.nbytes % 64 == 0:
                assert got.data_ptr() % 64 == 0, name


def test_aligned_checkpoint_in_the_loaded_dtype_is_used_in_place(tiny_ckpt, tmp_path):
    """No copy when the stored tensors can serve as the weights; the same model either way."""
    from glmchat.checkpoint import save_safetensors

    ckpt = _copy(tiny_ckpt, tmp_path)
    tensors = {name: t.clone() for name, t in load_file(ckpt / "model.safetensors").items()}  # unmapped
    save_safetensors(tensors, ckpt / "model.safetensors")
    in_place, copied = _load(ckpt), _load(ckpt, dtype="bfloat16")

    def in_file_mapping(t):
        if not Path("/proc/self/maps").exists():
            pytest.skip("needs Linux's /proc/self/maps")
        for fields in map(str.split, Path("/proc/self/maps").read_text().splitlines()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if fields[-1].endswith("model.safetensors") and lo <= t.data_ptr() < hi:
                return True
        return False

    assert in_file_mapping(in_place.layers[0].mlp.gate_up.weight)
    assert not in_file_mapping(copied.layers[0].mlp.gate_up.weight)
    _same_weights(in_place, _load(tiny_ckpt))


def test_random_weights_need_no_weight_files(tiny_ckpt, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_ckpt / "config.json", config_only)
    model, info = load_model(config_only, random_weights=True, dtype=torch.float32, progress=False)
    assert info.random_weights
    assert model.config == GLMConfig.from_file(tiny_ckpt / "config.json")
    c = model.config  # the fixture's shape, not just the same parse twice
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.kv_channels, c.multi_query_group_num,
            c.ffn_hidden_size, c.seq_length) == (64, 2, 4, 16, 2, 96, 512)
    assert model.embed.weight.shape == (c.padded_vocab_size, 64)
    assert model.layers[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)  # (heads + 2 groups) * kv_channels
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_known_hub_config_is_the_real_chatglm3_shape():
    config = GLMConfig.from_dict(KNOWN_CONFIGS["THUDM/chatglm3-6b"])
    assert (config.num_layers, config.qkv_size, config.padded_vocab_size) == (28, 4608, 65024)
    with torch.device("meta"):
        from glmchat.model import GLMTransformer
        n = sum(p.numel() for p in GLMTransformer(config).parameters())
    assert 6.2e9 < n < 6.3e9  # ChatGLM3-6B has 6.24 B parameters


# --- configs we refuse --------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("rmsnorm", False), ("add_bias_linear", True), ("post_layer_norm", False),
    ("apply_residual_connection_post_layernorm", True), ("pre_seq_len", 128),
])
def test_unsupported_variants_are_refused_by_name(tiny_ckpt, tmp_path, key, value):
    ckpt = _copy(tiny_ckpt, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw[key] = value
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=rf"{key}={value!r}"):
        _load(ckpt)


def test_other_model_types_and_bad_json_are_refused(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        _load(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _load(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="needs a config.json"):
        _load(ckpt)


# --- paths and the hub ---------------------------------------------------------------------------

def test_missing_directory_and_file_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory at"):
        _load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint directory at"):
        _load("./chatglm3-6b")
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        _load(a_file)


def test_unreachable_hub_names_the_id_and_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("THUDM/chatglm3-6b")
    message = str(err.value)
    assert "'THUDM/chatglm3-6b'" in message and "pass that directory" in message
    assert "--random-weights" in message
    assert time.perf_counter() - started < 10


def test_directory_without_weights(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "empty"
    ckpt.mkdir()
    shutil.copy(tiny_ckpt / "config.json", ckpt)
    with pytest.raises(CheckpointError, match="has no weights"):
        _load(ckpt)


# --- damaged weight files ------------------------------------------------------------------------

def test_missing_shard_is_named(tiny_ckpt_bin, tmp_path):
    ckpt = _copy(tiny_ckpt_bin, tmp_path)
    shard = weight_files(ckpt)[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard.name} listed in .* is missing"):
        _load(ckpt)


def test_truncated_safetensors_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        _load(ckpt)


def test_corrupt_safetensors_header_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        _load(ckpt)


def test_truncated_bin_shard_is_named(tiny_ckpt_bin, tmp_path):
    ckpt = _copy(tiny_ckpt_bin, tmp_path)
    shard = weight_files(ckpt)[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name} is corrupt or truncated"):
        _load(ckpt)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_bin_files_are_loaded_without_running_pickled_code(tiny_ckpt_bin, tmp_path, monkeypatch):
    ckpt = _copy(tiny_ckpt_bin, tmp_path)
    shard = weight_files(ckpt)[0]
    torch.save({"transformer.output_layer.weight": _Payload()}, shard)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=shard.name) as e:
        _load(ckpt)
    assert not (tmp_path / "PWNED").exists()
    # one short line that says what the file is, never torch's advice to retry with weights_only=False
    message = str(e.value)
    assert "is damaged or not a plain weights file" in message and "refers to posix.system" in message
    assert "weights_only" not in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("raw, message", [
    ({"hidden_size": "big"}, 'hidden_size="big" must be an integer'),
    ({"num_layers": True}, "num_layers=true must be an integer"),
    ({"seq_length": 8192.5}, "seq_length=8192.5 must be an integer"),
    ({"layernorm_epsilon": "1e-5"}, 'layernorm_epsilon="1e-5" must be a number'),
    ({"add_qkv_bias": "yes"}, 'add_qkv_bias="yes" must be true or false'),
    ({"torch_dtype": 16}, "torch_dtype=16 must be a string"),
    ({"multi_query_group_num": 0}, "multi_query_group_num=0 must be positive"),
    ({"num_attention_heads": None, "multi_query_attention": False}, None),  # null: the default
    ({"rope_ratio": 500}, None),  # an integer is a number (GLM-4's config says 500)
])
def test_wrongly_typed_config_values_are_named(raw, message):
    config = {"model_type": "chatglm", "multi_query_attention": True, **raw}
    if message is None:
        GLMConfig.from_dict(config)
        return
    with pytest.raises(ConfigError, match=re.escape(f"config.json: {message}")):
        GLMConfig.from_dict(config)


def _rewrite(ckpt: Path, edit) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(ckpt, lambda t: t.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(CheckpointError, match=r"missing from model\.safetensors: layers\.1\.mlp\.down\.weight"):
        _load(ckpt)


def test_misshaped_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    _rewrite(ckpt, lambda t: t.update({name: t[name][:-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape"):
        _load(ckpt)


def test_unexpected_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _rewrite(ckpt, lambda t: t.update({"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.prefix_encoder"):
        _load(ckpt)


def test_load_checkpoint_reads_config_json_once_and_returns_everything(tiny_ckpt, tmp_path, monkeypatch):
    from glmchat import loader

    reads = []
    read = loader.read_config_json
    monkeypatch.setattr(loader, "read_config_json", lambda path: reads.append(path) or read(path))
    loaded = loader.load_checkpoint(tiny_ckpt, dtype=torch.float32, progress=False)
    assert reads == [tiny_ckpt / "config.json"]
    assert loaded.directory == tiny_ckpt and loaded.family.name == "chatglm3"
    assert loaded.config == loaded.model.config == GLMConfig.from_file(tiny_ckpt / "config.json")
    assert loaded.tokenizer.encode("你好") and not loaded.info.random_weights
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_ckpt / "config.json", config_only)
    random = loader.load_checkpoint(config_only, random_weights=True, progress=False)
    assert random.tokenizer is None and random.info.random_weights and random.directory == config_only
