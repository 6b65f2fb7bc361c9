"""Weight-only int8/int4: kernels agree, quantized models stay close to float, checkpoints round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import quant_reference
from glmchat.checkpoint import CheckpointError
from glmchat.export import save_quantized
from glmchat.kernels import install
from glmchat.kernels.linear import HAS_INT4_OP, HAS_INT8_OP
from glmchat.loader import load_model, quantization_entry
from glmchat.quantize import (
    Int4Linear, Int8Linear, QuantizationError, QuantizedLinear, pack_int4, quantize_int4, quantize_int8,
    quantize_model, unpack_int4,
)


def _linear(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=True, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.05)
    return lin


def test_int4_packing_matches_pytorch_cpu_layout():
    q = torch.randint(0, 16, (192, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q.to(torch.uint8))
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))
    assert torch.equal(quant_reference.int4_codes(packed), q)  # the documented layout
    if HAS_INT4_OP:  # PyTorch's CPU op is used only where its own packing is ours (AVX-512, not AVX2)
        assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))


def test_quantize_dequantize_error_is_within_half_a_step():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    q8, s8 = quantize_int8(w, torch.float32)
    assert (quant_reference.int8_weight(q8, s8) - w).abs().le(s8[:, None] / 2 + 1e-6).all()
    layer = Int4Linear(256, 128, group_size=64, dtype=torch.float32)
    layer.set_weight(w)
    step = layer.scales_zeros[..., 0].T.repeat_interleave(64, dim=1)  # [N, K]
    reference = quant_reference.weight(layer)
    assert (reference - w).abs().le(step / 2 + 1e-5).all()
    torch.testing.assert_close(layer.dequantize(torch.float32), reference, atol=1e-6, rtol=1e-6)
    assert quantize_int4(w, 64, torch.float32)[0].shape == (128, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fast_kernel_equals_portable_path(method, group, dtype, rows):
    if not (HAS_INT8_OP if method == "int8" else HAS_INT4_OP):
        pytest.skip(f"this PyTorch's CPU {method} weight-only op is not used here (absent, or not glmchat's layout)")
    lin = _linear(192, 256, dtype)
    layer = Int8Linear(256, 192, bias=True, dtype=dtype) if method == "int8" else \
        Int4Linear(256, 192, bias=True, group_size=group, dtype=dtype)
    layer.set_weight(lin.weight)
    layer.bias.data.copy_(lin.bias)
    x = torch.randn(2, rows, 256, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(dtype)
    fast = install(layer)(x)
    portable = install(layer, enabled=False)(x)
    ref = quant_reference.linear(layer, x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # 16-bit: one rounding of the output
    torch.testing.assert_close(fast.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(portable.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_logits_close_to_float(tiny_ckpt, method):
    model, _ = load_model(tiny_ckpt, dtype="float32", progress=False)
    qmodel, info = load_model(tiny_ckpt, dtype="float32", quantize=method, group_size=32, progress=False)
    assert info.quantization["method"] == method
    assert all(isinstance(m, QuantizedLinear) for m in (qmodel.layers[0].attn.qkv, qmodel.layers[0].mlp.down, qmodel.output))
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = model(ids), qmodel(ids)
        install(qmodel, enabled=False)
        portable = qmodel(ids)
    scale = ref.abs().max()
    assert (got - ref).abs().max() < (0.02 if method == "int8" else 0.2) * scale
    torch.testing.assert_close(got, portable, atol=1e-4, rtol=1e-4)
    assert info.weight_bytes < sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_shard_by_shard_load_equals_quantizing_a_loaded_model(tiny_ckpt_bin, tiny_ckpt):
    """Quantizing while reading .bin shards gives exactly the buffers of quantizing afterwards."""
    streamed, _ = load_model(tiny_ckpt_bin, dtype="float32", quantize="int4", group_size=32, progress=False)
    model, _ = load_model(tiny_ckpt, dtype="float32", progress=False)
    after = quantize_model(model, "int4", 32)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method,group", [("int8", 128), ("int4", 32)])
def test_saved_quantized_checkpoint_round_trip(tiny_ckpt, tmp_path, method, group):
    out = save_quantized(tiny_ckpt, tmp_path / "q", method, group_size=group, dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == method
    assert (out / "tokenizer.model").exists()
    loaded, info = load_model(out, progress=False)
    direct, _ = load_model(tiny_ckpt, dtype="float32", quantize=method, group_size=group, progress=False)
    assert info.quantization == quantization_entry(method, group)
    a, b = loaded.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(out, quantize="int8" if method == "int4" else "int4", progress=False)
    with pytest.raises(QuantizationError, match="another directory"):
        save_quantized(out, out, method, group_size=group, progress=False)


def test_bad_settings_are_refused(tiny_ckpt, tmp_path):
    with pytest.raises(QuantizationError, match="unknown quantization"):
        load_model(tiny_ckpt, quantize="int3", progress=False)
    with pytest.raises(QuantizationError, match="group size"):
        load_model(tiny_ckpt, quantize="int4", group_size=48, progress=False)
    # a quantized checkpoint whose stored codes have the wrong shape
    out = tmp_path / "bad"
    out.mkdir()
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["quantization"] = {"method": "int8"}
    (out / "config.json").write_text(json.dumps(config))
    save_file({"transformer.output_layer.qweight": torch.zeros(3, 3, dtype=torch.int8)}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_model(out, progress=False)


def test_fp16_long_prompt_has_no_nan(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, dtype="float16", progress=False)
    ids = torch.randint(5, 1000, (1, model.config.seq_length), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = model(ids)
        cache = model.new_cache(1, model.config.seq_length)
        model(ids[:, :-1], cache=cache)
        last = model(ids[:, -1:], cache=cache)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(last[:, -1].float(), logits[:, -1].float(), atol=0.05, rtol=0.05)


def test_random_weights_are_seeded_and_quantize_like_the_float_model(tiny_ckpt):
    """A quantized random load holds the float random model's weights, quantized (same seed)."""
    float_model, _ = load_model(tiny_ckpt, dtype="float32", random_weights=True, seed=3, progress=False)
    again, _ = load_model(tiny_ckpt, dtype="float32", random_weights=True, seed=3, progress=False)
    other, _ = load_model(tiny_ckpt, dtype="float32", random_weights=True, seed=4, progress=False)
    w = float_model.layers[0].mlp.gate_up.weight
    assert torch.equal(w, again.layers[0].mlp.gate_up.weight)
    assert not torch.equal(w, other.layers[0].mlp.gate_up.weight)
    assert not torch.equal(w[0, :64], float_model.layers[1].mlp.gate_up.weight[0, :64])
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(float_model.norm.weight, torch.ones_like(float_model.norm.weight))
    quantized, _ = load_model(tiny_ckpt, dtype="float32", random_weights=True, seed=3, quantize="int4",
                              group_size=32, progress=False)
    expected = quantize_model(float_model, "int4", 32).state_dict()
    got = quantized.state_dict()
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_prompt_outside_inference_mode_after_one_inside(method):
    """The dequantization workspace is shared across calls: one made inside torch.inference_mode
    is written again under plain no_grad (an inference tensor would refuse the in-place write)."""
    from glmchat import quantize

    quantize.release_workspaces()
    layer = install(quantize_model(torch.nn.Sequential(_linear(64, 128, torch.float32)), method, group_size=32),
                    enabled=False)[0]
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        inside = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), inside)
