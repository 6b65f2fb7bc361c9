"""glmchat's C decode kernels (glmchat/kernels/) equal the documented formats' dequantization and the
portable path, and never break a run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import quant_reference
from glmchat.kernels import cpu as cpu_kernels
from glmchat.kernels import install
from glmchat.kernels.linear import HAS_INT4_OP, CpuLinear, FastInt4Linear, FastInt8Linear
from glmchat.quantize import Int4Linear, Int8Linear

REASON = cpu_kernels.unavailable_reason() if cpu_kernels.enabled else None
needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"glmchat CPU kernels unavailable here: {REASON}")


def needs_kernel(name: str):
    """A kernel the CPU's source has (both have every one now; a guard for what each build provides)."""
    return pytest.mark.skipif(not cpu_kernels.provides(name),
                              reason=f"{name} is not in this CPU's kernels ({cpu_kernels.kernel_source() or REASON})")


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _layer(method, n, k, group=128, bias=True, seed=0):
    cls_kw = dict(group_size=group) if method == "int4" else {}
    layer = (Int4Linear if method == "int4" else Int8Linear)(k, n, bias=bias, dtype=torch.bfloat16, **cls_kw)
    layer.set_weight(_randn(n, k, seed=seed, scale=0.05))
    if bias:
        layer.bias.data.copy_(_randn(n, seed=seed + 1, scale=0.05))
    return install(layer)  # the fast paths, as a loaded model has them


def _portable_reference(layer, x):
    """The documented format's dequantization (written in the tests), then F.linear in float32."""
    return quant_reference.linear(layer, x)


def _assert_bf16_close(got, ref):
    # one bf16 rounding of the output (relative 2^-9), plus float32 summation-order noise
    torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=1e-3 * float(ref.abs().max()) + 1e-6)


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (3, 31), (7, 33), (130, 1000), (64, 4096), (257, 200)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_gemv_equals_float_linear(n, k, bias):
    w = _randn(n, k, scale=0.05).bfloat16()
    b = _randn(n, seed=1).bfloat16() if bias else None
    x = _randn(k, seed=2).bfloat16()
    y = cpu_kernels.bf16_gemv(x, w, b)
    assert y is not None and y.dtype == torch.bfloat16 and y.shape == (n,)
    _assert_bf16_close(y, F.linear(x.float(), w.float(), None if b is None else b.float()))
    assert torch.equal(cpu_kernels.bf16_gemv(x[None, None], w, b), y[None, None])  # [1, 1, K] -> [1, 1, N]


@needs_kernels
def test_bf16_gemv_passes_non_finite_inputs_on_like_float_linear():
    w = _randn(64, 128, scale=0.05).bfloat16()
    x = _randn(3, 128, seed=2).bfloat16()
    x[0, 3], x[1, 7] = float("inf"), float("nan")
    y, ref = cpu_kernels.bf16_gemv(x, w).float(), F.linear(x.float(), w.float())
    assert ref[0].isinf().all() and ref[1].isnan().all()
    assert torch.equal(y[0], ref[0]) and y[1].isnan().all()  # the same infinities (signs included), NaNs
    _assert_bf16_close(y[2], ref[2])


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (5, 17), (64, 6), (130, 1000), (257, 4096)])
def test_int8_blocked_layout_is_the_documented_one(n, k):
    """block_int8 lays the codes out as csrc/gemv.c documents (written here from that text), past N
    and K padded with code 0, and unblock_int8 gives the row-major codes back."""
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n + k))
    blocks, steps = -(-n // 64), -(-k // 4)
    padded = torch.zeros(blocks * 64, steps * 4, dtype=torch.int16)
    padded[:n, :k] = codes
    expected = torch.empty(blocks, steps, 256, dtype=torch.uint8)
    for b in range(blocks):  # byte (b, t, 4r + j) = q[64b + r, 4t + j] + 128
        for t in range(steps):
            expected[b, t] = (padded[64 * b : 64 * b + 64, 4 * t : 4 * t + 4] + 128).to(torch.uint8).flatten()
    blocked = cpu_kernels.block_int8(codes)
    assert torch.equal(blocked, expected)
    assert torch.equal(cpu_kernels.unblock_int8(blocked, n, k), codes)


@needs_kernels
@pytest.mark.parametrize("n,k", [(64, 4), (128, 64), (192, 4096)])
def test_int4_blocked_layout_is_the_documented_one(n, k):
    """block_int4 lays the codes out as csrc/gemv.c documents (written here from that text, from the
    codes themselves), and unblock_int4 gives PyTorch's layout back."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    packed = torch.empty(n // 64, k, 32, dtype=torch.uint8)  # PyTorch's: byte (b, k, j) = rows 64b+j | 64b+32+j
    for b in range(n // 64):
        packed[b] = codes[64 * b : 64 * b + 32].T | (codes[64 * b + 32 : 64 * b + 64].T << 4)
    packed = packed.view(n, k // 2)
    assert torch.equal(quant_reference.int4_codes(packed), codes.int())  # the tests' own reading of it
    expected = torch.empty(n // 64, k // 4, 128, dtype=torch.uint8)
    for b in range(n // 64):  # byte (b, t, 64i + 4j + c): row 64b+16i+j, column 4t+c | row 64b+32+16i+j << 4
        for i in range(2):
            for j in range(16):
                for c in range(4):
                    r = 64 * b + 16 * i + j
                    expected[b, :, 64 * i + 4 * j + c] = codes[r, c::4] | (codes[r + 32, c::4] << 4)
    blocked = cpu_kernels.block_int4(packed)
    assert torch.equal(blocked, expected)
    assert torch.equal(cpu_kernels.unblock_int4(blocked), packed)


@pytest.mark.parametrize("n,groups", [(64, 1), (192, 3), (128, 32)])
def test_int4_blocked_scales_are_the_documented_ones(n, groups):
    """block_int4_scales puts (scale, zero) of row 64b + r, group g at [b, g, r] (csrc/gemv.c), and
    unblock_int4_scales gives the [K/group, N, 2] layout back."""
    scales_zeros = torch.randn(groups, n, 2, generator=torch.Generator().manual_seed(n + groups)).bfloat16()
    expected = torch.empty(n // 64, groups, 64, 2, dtype=torch.bfloat16)
    for b in range(n // 64):
        for g in range(groups):
            for r in range(64):
                expected[b, g, r] = scales_zeros[g, 64 * b + r]
    blocked = cpu_kernels.block_int4_scales(scales_zeros)
    assert torch.equal(blocked, expected)
    assert torch.equal(cpu_kernels.unblock_int4_scales(blocked), scales_zeros)


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_new_weight_set_into_a_blocked_layer_is_blocked_too(method):
    n, k = (96, 200) if method == "int8" else (128, 256)
    layer, fresh = _layer(method, n, k, group=64, bias=False, seed=1), _layer(method, n, k, group=64, bias=False, seed=2)
    layer.set_weight(_randn(n, k, seed=2, scale=0.05))  # the weight `fresh` was made with
    assert layer.qweight.dim() == 3  # still blocked
    assert all(torch.equal(getattr(layer, name), getattr(fresh, name)) for name in layer._buffer_names)
    x = _randn(3, k, seed=4).bfloat16()
    assert torch.equal(layer(x), fresh(x))


@needs_kernels
@pytest.mark.parametrize("n,k", [(1, 1), (5, 17), (130, 1000), (257, 4096)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_decode_step_equals_the_documented_product_within_8bit_x(n, k, bias):
    """Any shape (K past the last whole group of 128, weight rows not in blocks of 64): x in 8 bits
    per group of 128 columns."""
    layer = _layer("int8", n, k, bias=bias)
    x = _randn(1, k, seed=3).bfloat16()
    y = cpu_kernels.int8_gemm(x, layer.qweight, layer.scales, layer.bias)
    assert y is not None and y.shape == (1, n)
    _assert_within_8bit_x(y, layer, x, 128)
    assert torch.equal(layer(x), y)  # the layer takes this path for one bf16 row


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k_groups", [(64, 1), (192, 3), (128, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_decode_step_takes_the_8bit_kernel(group, n, k_groups, bias):
    """int4 decode steps go through the same 8-bit-x kernel as prompts (int4_gemm)."""
    k = group * k_groups
    layer = _layer("int4", n, k, group=group, bias=bias)
    x = _randn(1, 1, k, seed=4).bfloat16()
    y = cpu_kernels.int4_gemm(x, layer.qweight, layer.scales_zeros, group, layer.bias)
    assert y is not None and y.shape == (1, 1, n)
    _assert_within_8bit_x(y, layer, x, group)
    assert torch.equal(layer(x), y)
    install(layer, enabled=False)  # the portable path rounds the dequantized weight to bf16 too
    torch.testing.assert_close(layer(x).float(), _portable_reference(layer, x), rtol=3e-2, atol=3e-2)


@needs_kernels
@pytest.mark.parametrize("group", [32, 64, 128])
def test_a_blocked_int4_layer_dequantizes_as_documented(group):
    layer = _layer("int4", 192, 4 * group, group=group, bias=False)
    assert layer.qweight.dim() == 3  # the kernels' layout
    torch.testing.assert_close(layer.dequantize(torch.bfloat16).float(), quant_reference.weight(layer),
                               rtol=8e-3, atol=1e-6)  # one bf16 rounding


# ---- prompt kernels (many rows, x in 8 bits) ------------------------------------------------------

def _assert_within_8bit_x(got, layer, x, group):
    """The prompt kernels round each x entry to 8 bits per group of `group` columns: off by at most
    max|x_g| / 254. So y[m, n] may move by Σ_g max|x[m, g]| / 254 · Σ_(k in g) |W[n, k]| from the
    exact product (W dequantized as documented), plus the output's bf16 rounding."""
    x = x.float().reshape(-1, x.shape[-1])
    w = quant_reference.weight(layer).abs()
    K = x.shape[1]
    bound = torch.zeros(x.shape[0], w.shape[0])
    for k0 in range(0, K, group):
        top = x[:, k0 : k0 + group].abs().amax(dim=1, keepdim=True)  # [M, 1]
        bound += top / 254 * w[:, k0 : k0 + group].sum(dim=1)  # [M, N]
    ref = quant_reference.linear(layer, x)
    slack = bound * 1.001 + ref.abs() * 2**-8 + 1e-6  # bf16 output rounding: 2^-9 relative
    assert got.shape[-1] == ref.shape[-1]
    excess = (got.float().reshape(ref.shape) - ref).abs() - slack
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond the 8-bit bound"
    # and the bound is not loose to the point of meaning nothing: the error is mostly far inside it
    assert ((got.float().reshape(ref.shape) - ref).abs() <= slack / 2).float().mean() > 0.9


def _assert_within_bf16_weights(got, layer, x):
    """Without the kernels and PyTorch's int4 op (AVX2), the portable path dequantizes W into bf16:
    each weight off by up to 2^-9 of itself, so y[m, n] by Σ_k |W[n, k] x[m, k]| / 512, plus the
    output's bf16 rounding."""
    x = x.float().reshape(-1, x.shape[-1])
    w = quant_reference.weight(layer)
    ref = quant_reference.linear(layer, x)
    slack = (x.abs() @ w.abs().T) * 2**-9 * 1.001 + ref.abs() * 2**-8 + 1e-6
    assert ((got.float().reshape(ref.shape) - ref).abs() - slack).max() <= 0


def _prompt_kernel(layer):
    if layer.method == "int8":
        return lambda x: cpu_kernels.int8_gemm(x, layer.qweight, layer.scales, layer.bias)
    return lambda x: cpu_kernels.int4_gemm(x, layer.qweight, layer.scales_zeros, layer.group_size, layer.bias)


@needs_kernels
@pytest.mark.parametrize("method,group,n,k", [
    ("int4", 32, 64, 32), ("int4", 64, 192, 320), ("int4", 128, 128, 1024), ("int4", 32, 64, 4096),
    ("int4", 96, 64, 192),  # AMX: a group in two pieces of 48 columns
    ("int8", None, 64, 4), ("int8", None, 128, 100), ("int8", None, 192, 1028), ("int8", None, 64, 4096),
    ("int8", None, 96, 130), ("int8", None, 5, 17), ("int8", None, 96, 256),  # AMX over a block past N
])
@pytest.mark.parametrize("rows", [2, 5, 37, 70])  # int4: codes unpacked in registers up to 48 rows, then a panel
@pytest.mark.parametrize("bias", [True, False])
def test_prompt_kernels_equal_the_documented_product_within_8bit_x(method, group, n, k, rows, bias):
    """Odd row counts, K past the last whole group (int8 groups x by 128; any N and K), every int4
    group size; the layer's prompt path is the kernel."""
    layer = _layer(method, n, k, group=group or 128, bias=bias, seed=rows)
    x = _randn(rows, k, seed=rows + k).bfloat16()
    y = _prompt_kernel(layer)(x)
    assert y is not None and y.dtype == torch.bfloat16
    _assert_within_8bit_x(y, layer, x, group or 128)
    assert torch.equal(layer(x), y)


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prompt_kernel_rows_are_computed_alone(method):
    """A prompt row comes out bit for bit the same whatever rows share the call: chunked prefill
    and the prefix cache give the same keys as one prefill. On a CPU with AMX, int4 products of 8
    rows or more (int8: 12) go through AMX's tiles and fewer through vpdpbusd, so the subsets
    below compare the two."""
    layer = _layer(method, 128, 512, group=64)
    kernel = _prompt_kernel(layer)
    x = _randn(70, 512, seed=3).bfloat16()  # int4: 70 rows through a panel, up to 48 unpacked in registers
    y = kernel(x)
    for rows in (2, 3, 4, 5, 9, 16, 48, 49):
        for start in (0, 6, 70 - rows):
            assert torch.equal(kernel(x[start : start + rows]), y[start : start + rows]), (rows, start)


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_integer_kernels_with_activation_outliers(method):
    """An entry 300x the others takes its group's 8-bit range: the rest of that group rounds coarsely,
    within the bound, and the other groups keep their precision."""
    layer = _layer(method, 128, 4096, group=128)
    x = _randn(3, 4096, seed=8)
    x[:, ::97] *= 300
    x = x.bfloat16()
    _assert_within_8bit_x(_prompt_kernel(layer)(x), layer, x, 128)


@needs_kernels
@pytest.mark.parametrize("rows", [3, 40], ids=["weight-only-op", "dequantize-gemm"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_prompt_kernels_decline_what_they_do_not_take(method, rows):
    """Non-finite x: None, and the layer answers through PyTorch's ops instead (from the blocked
    codes, unblocked for the occasion): its weight-only op for a few rows, dequantize + GEMM beyond."""
    layer = _layer(method, 64, 128, group=32)
    x = _randn(rows, 128, seed=7).bfloat16()
    x[1, 5] = float("inf")
    assert _prompt_kernel(layer)(x) is None
    y = layer(x)
    assert not torch.isfinite(y[1]).all() and torch.isfinite(y[0]).all()
    finite = [0] + list(range(2, rows))
    if rows == 3:
        _assert_bf16_close(y[finite], _portable_reference(layer, x[finite]))
    else:  # the dequantized weight is rounded to bf16 too
        torch.testing.assert_close(y[finite].float(), _portable_reference(layer, x[finite]), rtol=3e-2, atol=3e-2)


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_non_contiguous_input(method):
    layer = _layer(method, 128, 256, group=64)
    wide = _randn(1, 512, seed=5).bfloat16()
    x = wide[:, ::2]
    assert not x.is_contiguous()
    y = layer(x)
    assert torch.equal(y, layer(x.contiguous()))
    _assert_within_8bit_x(y, layer, x, 64 if method == "int4" else 128)
    w = _randn(96, 256, scale=0.05).bfloat16()
    _assert_bf16_close(cpu_kernels.bf16_gemv(x, w), F.linear(x.float(), w.float()))


@pytest.mark.parametrize("n,k", [(1, 3), (300, 1000), (513, 64)])
def test_bf16_prompts_in_float32_where_the_cpu_has_no_bf16_instructions(n, k):
    """float32_linear (weight slices converted to float32) gives F.linear's float result rounded to
    bf16; CpuLinear takes it for bf16 prompts on CPUs without bf16 instructions (AVX2)."""
    from glmchat.kernels.linear import float32_linear

    layer = install(torch.nn.Linear(k, n, dtype=torch.bfloat16))
    x = _randn(2, 9, k, seed=3).bfloat16()
    with torch.inference_mode():  # as a model runs (with gradients wanted, PyTorch's product)
        y, fast = float32_linear(x, layer.weight, layer.bias), layer(x)
    _assert_bf16_close(y, F.linear(x.float(), layer.weight.float(), layer.bias.float()).detach())
    if cpu_kernels.SLOW_BF16_MATMUL:
        assert torch.equal(fast, y)


@needs_kernels
@pytest.mark.parametrize("n,k", [(5, 17), (130, 1000), (257, 4096)])
def test_kernel_rows_are_computed_alone(n, k):
    """Each row of x comes out bit for bit as when it is alone, whatever rows share the call (the
    server's batch invariance rests on this), and the rows are right."""
    w = _randn(n, k, scale=0.05).bfloat16()
    int8, int4 = _layer("int8", n, k), _layer("int4", 64 * (n // 64 + 1), 64 * (k // 64 + 1), group=64)
    kernels = {
        "bf16": (lambda x: cpu_kernels.bf16_gemv(x, w), k,
                 lambda y, x: _assert_bf16_close(y, F.linear(x.float(), w.float()))),
        "int8": (lambda x: cpu_kernels.int8_gemm(x, int8.qweight, int8.scales, int8.bias), k,
                 lambda y, x: _assert_within_8bit_x(y, int8, x, 128)),
        "int4": (lambda x: cpu_kernels.int4_gemm(x, int4.qweight, int4.scales_zeros, 64, int4.bias),
                 int4.in_features, lambda y, x: _assert_within_8bit_x(y, int4, x, 64)),
    }
    for name, (kernel, width, check) in kernels.items():
        x = _randn(40, width, seed=11).bfloat16()
        y = kernel(x)
        check(y, x)
        for rows in (1, 2, 3, 5, 8, 13):
            for start in (0, 7, 40 - rows):
                assert torch.equal(kernel(x[start : start + rows]), y[start : start + rows]), (name, rows, start)


@needs_kernels
def test_other_dtypes_fall_back():
    layer = _layer("int8", 64, 128)
    w = _randn(64, 128).bfloat16()
    assert cpu_kernels.bf16_gemv(_randn(128).half(), w) is None
    assert cpu_kernels.bf16_gemv(_randn(2, 128), w.float()) is None
    assert cpu_kernels.int8_gemm(_randn(1, 128), layer.qweight, layer.scales) is None
    for x in (_randn(1, 128).half(), _randn(1, 128), _randn(3, 128).bfloat16()):
        torch.testing.assert_close(layer(x).float(), _portable_reference(layer, x), rtol=3e-2, atol=3e-2)


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_integer_kernels_leave_non_finite_inputs_to_pytorch(method):
    layer = _layer(method, 64, 128, group=32)
    x = _randn(1, 128, seed=7).bfloat16()
    x[0, 5] = float("nan")
    if method == "int4":
        assert cpu_kernels.int4_gemm(x, layer.qweight, layer.scales_zeros, 32) is None
    else:
        assert cpu_kernels.int8_gemm(x, layer.qweight, layer.scales) is None
    assert layer(x).isnan().all()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_switched_off_kernels_leave_the_layers_working(monkeypatch, method):
    layer = _layer(method, 128, 256, group=32)
    x = _randn(1, 256, seed=6).bfloat16()
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert not cpu_kernels.available()
    assert cpu_kernels.bf16_gemv(x, _randn(8, 256).bfloat16()) is None
    torch.testing.assert_close(layer(x).float(), _portable_reference(layer, x), rtol=3e-2, atol=3e-2)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


_AVX2_PRODUCTS = """
    import os, torch
    from glmchat.kernels import cpu, install
    from glmchat.quantize import Int4Linear, Int8Linear
    assert cpu.kernel_source() == "gemv_avx2.c", cpu.unavailable_reason()
    cases = torch.load(os.environ["CASES"])
    w, x = cases["bf16"]
    out = {"bf16": [cpu.bf16_gemv(x, w)] + [cpu.bf16_gemv(x[i : i + 1], w) for i in range(len(x))]}
    for name, (state, kw, x) in cases["layers"].items():
        layer = (Int4Linear if name == "int4" else Int8Linear)(**kw)
        layer.load_state_dict(state)
        install(layer)
        assert layer.qweight.dim() == 3  # the kernels' blocked layout
        out[name] = [layer(x)] + [layer(x[i : i + 1]) for i in range(len(x))]
    h, x, w = cases["small"]
    out["small"] = (cpu.swiglu(h), cpu.rmsnorm(x, w, 1e-5))
    torch.save(out, os.environ["OUT"])
"""


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_kernels._FLAGS, reason="this CPU has no AVX2/FMA")
def test_avx2_products_on_any_avx2_cpu(tmp_path):
    """gemv_avx2.c, compiled and run on AVX-512 CPUs too (GLMCHAT_KERNELS=avx2): each product within
    its bound of the reference, each row as when alone (11 rows: int4 takes them 3 at a time), and
    int4 bit for bit what gemv.c gives where this CPU runs both; SwiGLU and RMSNorm PyTorch's bits
    but where an exponential or a sum rounds across a bf16 boundary."""
    from glmchat.model import RMSNorm

    h = _randn(3, 2 * 1003, seed=5, scale=4).bfloat16()
    h[0, :6] = torch.tensor([100.0, -100.0, float("inf"), float("-inf"), float("nan"), 0.0])
    norm = RMSNorm(1003, 1e-5).bfloat16().requires_grad_(False)
    norm.weight.copy_(_randn(1003, seed=6))
    x_norm = _randn(5, 1, 1003, seed=7, scale=20).bfloat16()
    w = _randn(130, 1000, scale=0.05).bfloat16()
    layers = {"int8": (_layer("int8", 130, 1000), 128), "int4": (_layer("int4", 192, 1024, group=64), 64)}
    xs = {"bf16": _randn(11, 1000, seed=11).bfloat16(), "int8": _randn(11, 1000, seed=12).bfloat16(),
          "int4": _randn(11, 1024, seed=13).bfloat16()}
    cases = {"bf16": (w, xs["bf16"]), "layers": {
        name: (layer.state_dict(), dict(in_features=layer.in_features, out_features=layer.out_features, bias=True,
                                        dtype=torch.bfloat16, **({"group_size": 64} if name == "int4" else {})),
               xs[name]) for name, (layer, _) in layers.items()}, "small": (h, x_norm, norm.weight)}
    torch.save(cases, tmp_path / "cases.pt")
    result = _python(_AVX2_PRODUCTS, GLMCHAT_KERNELS="avx2", CASES=str(tmp_path / "cases.pt"),
                     OUT=str(tmp_path / "out.pt"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    swiglu, rmsnorm = out.pop("small")
    for got, expected in ((swiglu, F.silu(h[:, :1003]) * h[:, 1003:]), (rmsnorm, RMSNorm.forward(norm, x_norm))):
        same = (got == expected) | (got.isnan() & expected.isnan())
        assert same.float().mean() > 0.99
        torch.testing.assert_close(got.float()[~same], expected.float()[~same], rtol=2**-7, atol=0)
    _assert_bf16_close(out["bf16"][0], F.linear(xs["bf16"].float(), w.float()))
    for name, (layer, group) in layers.items():
        _assert_within_8bit_x(out[name][0], layer, xs[name], group)
    for name, (y, *rows) in out.items():
        assert all(torch.equal(row, y[i : i + 1]) for i, row in enumerate(rows)), name
    if cpu_kernels.kernel_source() == "gemv.c":
        assert torch.equal(out["int4"][0], layers["int4"][0](xs["int4"]))


_FALLBACK_CHECK = """
    import torch
    from glmchat.kernels import cpu, install
    from glmchat.quantize import Int4Linear
    assert not cpu.available(), "kernels should be unavailable"
    layer = install(Int4Linear(128, 64, group_size=32, dtype=torch.bfloat16))
    layer.set_weight(torch.randn(64, 128))
    y = layer(torch.randn(1, 128).bfloat16())
    assert y.shape == (1, 64) and torch.isfinite(y.float()).all()
    print("ok")
"""


def test_env_switch_disables_kernels():
    result = _python(_FALLBACK_CHECK, GLMCHAT_NO_KERNELS="1")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("compiler", ["fails", "missing"])
def test_no_working_compiler_means_silent_fallback(tmp_path, compiler):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    if compiler == "fails":
        cc = tmp_path / "cc"
        cc.write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
        cc.chmod(0o755)
        env["CC"] = str(cc)
    else:
        env.update(CC="", PATH=str(tmp_path))
    result = _python(_FALLBACK_CHECK, **env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert result.stderr == ""


@needs_kernels
def test_integer_products_and_torchs_bf16_products_interleave_on_one_thread():
    """On a CPU with AMX both sides use its tiles from the same threads: PyTorch's bf16 GEMM and
    attention (oneDNN's AMX matmul and its brgemm kernel, as its verbose log shows on a Xeon) and
    glmchat's int8/int4 products, each of which configures the tiles and releases them. Neither may
    find the other's configuration: every result stays what it was before the two took turns, and
    the products stay within their bound of the reference."""
    l8, l4 = _layer("int8", 256, 512), _layer("int4", 256, 512, group=64)
    x, w = _randn(64, 512, seed=1).bfloat16(), _randn(1024, 512, seed=2).bfloat16()
    q, k, v = (_randn(1, 8, 64, 64, seed=s).bfloat16() for s in (3, 4, 5))
    runs = {"linear": lambda: F.linear(x, w), "attention": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "int8": lambda: _prompt_kernel(l8)(x), "int4": lambda: _prompt_kernel(l4)(x[:9])}
    first = {name: run() for name, run in runs.items()}
    _assert_within_8bit_x(first["int8"], l8, x, 128)
    _assert_within_8bit_x(first["int4"], l4, x[:9], 64)
    for _ in range(20):
        for name, run in runs.items():
            assert torch.equal(run(), first[name]), name


@needs_kernels
def test_kernels_and_torch_ops_alternate_without_deadlock_on_torchs_openmp_runtime():
    code = """
        import torch
        from glmchat.kernels import cpu as cpu_kernels

        def runtimes():
            return {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}

        torch.randn(64, 64) @ torch.randn(64, 64)
        before = runtimes()
        w = torch.randn(512, 1024).bfloat16()
        a = torch.randn(256, 256)
        x = torch.randn(1024).bfloat16()
        for _ in range(300):
            assert cpu_kernels.bf16_gemv(x, w) is not None
            a = torch.tanh(a @ a)  # OpenMP-parallel torch ops in between
        print("added:", sorted(runtimes() - before))
    """
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "added: []", "the kernels brought their own OpenMP runtime"


@needs_kernels
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_bf16_prefill_and_decode_use_kernels_and_match_the_portable_path(tiny_ckpt, monkeypatch, method):
    from glmchat.loader import load_model

    model, _ = load_model(tiny_ckpt, dtype="bfloat16", quantize=method, group_size=32, progress=False)
    calls = set()  # (kernel, rows)
    kernel = getattr(cpu_kernels, f"{method}_gemm")
    monkeypatch.setattr(cpu_kernels, f"{method}_gemm", lambda x, *a: calls.add(x.numel() // x.shape[-1]) or kernel(x, *a))
    ids = torch.randint(5, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.inference_mode():
        for fast in (True, False):
            install(model, enabled=fast)
            cache = model.new_cache(1, 16)
            prefill = model(ids[:, :5], cache=cache).float()
            logits[fast] = torch.cat([prefill, model.decode(ids[:, 5:], cache).float()], dim=1)
    assert {5, 1} <= calls, calls  # the 5-token prompt and the decode step through the one kernel
    scale = float(logits[False].abs().max())
    # both round to bf16 along the way (the portable path its dequantized weights, the prompt kernels
    # x to 8 bits): ~1% of the scale
    torch.testing.assert_close(logits[True], logits[False], rtol=0.03, atol=0.03 * scale)


def test_install_swaps_the_fast_paths_in_where_they_apply_and_back(tiny_ckpt):
    """The loader installs them for the model's device and dtype; enabled=False restores the portable
    classes; the parameters and the state dict stay the same objects either way."""
    from glmchat.loader import load_model

    bf16, _ = load_model(tiny_ckpt, dtype="bfloat16", progress=False)
    fp32, _ = load_model(tiny_ckpt, dtype="float32", progress=False)
    int4, _ = load_model(tiny_ckpt, dtype="float32", quantize="int4", group_size=32, progress=False)
    int8, _ = load_model(tiny_ckpt, dtype="bfloat16", quantize="int8", progress=False)
    int4_bf16, _ = load_model(tiny_ckpt, dtype="bfloat16", quantize="int4", group_size=32, progress=False)
    assert type(bf16.layers[0].attn.qkv) is CpuLinear and type(bf16.output) is CpuLinear
    assert type(fp32.layers[0].mlp.down) is CpuLinear  # decode steps row by row in every dtype
    assert type(int4.layers[0].mlp.gate_up) is FastInt4Linear and type(int8.output) is FastInt8Linear
    weight, keys = bf16.output.weight, list(bf16.state_dict())
    int8_buffers = {name: t.clone() for name, t in int8.state_dict().items()}
    int4_buffers = {name: t.clone() for name, t in int4_bf16.state_dict().items()}
    assert int4.layers[0].mlp.gate_up.qweight.dim() == 2  # float32 scales: the kernels do not take them
    assert int4_bf16.layers[0].mlp.gate_up.qweight.dim() == 3 and int8.output.qweight.dim() == 3  # blocked
    install(bf16, enabled=False)
    install(int8, enabled=False)
    install(int4_bf16, enabled=False)
    assert type(bf16.output) is torch.nn.Linear and type(int8.output) is Int8Linear
    assert bf16.output.weight is weight and list(bf16.state_dict()) == keys
    # the codes come back in the portable layouts from the kernels' blocked ones: the same state dict either way
    assert int8.output.qweight.shape == (int8.output.out_features, int8.output.in_features)
    gate_up = int4_bf16.layers[0].mlp.gate_up
    assert gate_up.qweight.shape == (gate_up.out_features, gate_up.in_features // 2)
    assert all(torch.equal(t, int8_buffers[name]) for name, t in int8.state_dict().items())
    assert all(torch.equal(t, int4_buffers[name]) for name, t in int4_bf16.state_dict().items())
    install(bf16.to(torch.float64))  # moved to a dtype it does not take: the portable class
    assert type(bf16.output) is torch.nn.Linear
    install(bf16.bfloat16())
    assert type(bf16.output) is CpuLinear
    install(int8)
    install(int8.float())  # float32 scales, which the kernels do not take: the codes row-major again
    assert int8.output.qweight.shape == (int8.output.out_features, int8.output.in_features)
    assert all(torch.equal(t, int8_buffers[name].to(t.dtype)) for name, t in int8.state_dict().items())


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
@pytest.mark.parametrize("kind", ["bfloat16", "float16", "float32", "int8", "int4"])
def test_decode_steps_keep_rows_apart(monkeypatch, kind, kernels):
    """A decode step's input [B, 1, K]: row b's output is bit for bit the layer's output for row b
    alone, with glmchat's kernels or without them (then the rows go one at a time)."""
    if kernels and not cpu_kernels.available():
        pytest.skip(f"glmchat CPU kernels unavailable here: {REASON}")
    monkeypatch.setattr(cpu_kernels, "enabled", kernels)
    if kind in ("int8", "int4"):
        layer = _layer(kind, 192, 256, group=64)
        x = _randn(9, 1, 256, seed=12).bfloat16()
        reference = _portable_reference(layer, x)
    else:
        dtype = getattr(torch, kind)
        layer = install(torch.nn.Linear(256, 190, dtype=dtype))
        assert type(layer) is CpuLinear
        x = _randn(9, 1, 256, seed=12).to(dtype)
        reference = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    with torch.inference_mode():
        y = layer(x)
        if kind in ("int8", "int4") and kernels:  # the 8-bit-x kernels (int8 groups x by 128)
            _assert_within_8bit_x(y, layer, x, 64 if kind == "int4" else 128)
        elif kind == "int4" and not HAS_INT4_OP:
            _assert_within_bf16_weights(y, layer, x)
        else:
            _assert_bf16_close(y, reference)
        for b in range(9):
            assert torch.equal(layer(x[b : b + 1]), y[b : b + 1]), b
            assert torch.equal(layer(x[b:]), y[b:]), b


# ---- attention's decode path (glmchat.kernels.attention) ----------------------------------------


def _naive_attention(q, k, v, key_mask=None):
    """softmax(q·kᵀ/√d)·v in float64, each KV head repeated for its adjacent query heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, dim=1), v.double().repeat_interleave(rep, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cached", [1, 7, 300])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_equals_naive_attention(dtype, tol, cached, padded):
    from glmchat.config import GLMConfig
    from glmchat.kernels.attention import CpuAttention
    from glmchat.model import Attention, Step

    config = GLMConfig(hidden_size=64, num_attention_heads=8, kv_channels=16, multi_query_group_num=2)
    layer = install(Attention(config, 0).to(dtype))
    assert isinstance(layer, CpuAttention)
    B, S = 3, cached
    q = _randn(B, 8, 1, 16, seed=1).to(dtype)
    k, v = _randn(B, 2, S, 16, seed=2).to(dtype), _randn(B, 2, S, 16, seed=3).to(dtype)
    key_mask = None
    if padded:  # left padding: row 1 has 1 pad slot, row 2 has S // 2 (at least one real slot stays)
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1, :min(1, S - 1)] = False
        key_mask[2, :S // 2] = False
    step = Step(torch.zeros(B, 1, dtype=torch.long), None if key_mask is None else key_mask[:, None, None, :], False)
    out = layer.attend(q, k, v, step)
    assert out.dtype == dtype and out.shape == (B, 8, 1, 16)
    torch.testing.assert_close(out.double(), _naive_attention(q, k, v, key_mask), atol=tol, rtol=tol)


@needs_kernel("glm_decode_attention")
@pytest.mark.parametrize("heads, groups, dim", [(32, 2, 128), (6, 2, 64), (3, 3, 32), (5, 1, 128)])
def test_decode_attention_kernel_takes_each_row_over_its_own_keys(heads, groups, dim):
    """The server's slots: rows of a decode step at their own lengths, the keys a view of a bigger
    cache (rows and heads at a stride). Each row equals naive attention over its first keys, and
    comes out bit for bit the same alone as beside the other rows."""
    cache_k, cache_v = _randn(5, groups, 40, dim, seed=1).bfloat16(), _randn(5, groups, 40, dim, seed=2).bfloat16()
    k, v = cache_k[:4, :, :33], cache_v[:4, :, :33]
    lengths = [1, 33, 17, 30]
    q = _randn(4, heads, 1, dim, seed=3).bfloat16()
    out = cpu_kernels.decode_attention(q, k, v, lengths, dim**-0.5)
    assert out is not None and out.shape == q.shape and out.dtype == torch.bfloat16
    for b, n in enumerate(lengths):
        expected = _naive_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n])
        torch.testing.assert_close(out[b : b + 1].double(), expected, atol=2e-3, rtol=8e-3)  # one bf16 rounding
        assert torch.equal(cpu_kernels.decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], [n], dim**-0.5),
                           out[b : b + 1])


@needs_kernel("glm_decode_attention")
def test_decode_attention_kernel_declines_what_it_does_not_take():
    q, k = _randn(2, 4, 1, 64).bfloat16(), _randn(2, 2, 8, 64).bfloat16()
    assert cpu_kernels.decode_attention(q, k, k, [3, 0], 0.125) is None  # a row with no keys
    assert cpu_kernels.decode_attention(q, k, k, [3, 9], 0.125) is None  # more keys than the cache holds
    assert cpu_kernels.decode_attention(q.float(), k.float(), k.float(), [3, 8], 0.125) is None
    for dim in (256, 48):  # head_dim past 128, or not a multiple of 32
        kv = _randn(2, 2, 3, dim).bfloat16()
        assert cpu_kernels.decode_attention(kv[:, :, :1], kv, kv, [3, 3], 1.0) is None


@needs_kernel("glm_rotary_heads")
@pytest.mark.parametrize("heads, groups, dim, rotary_dim", [(32, 2, 128, 64), (6, 2, 64, 64), (4, 4, 32, 8)])
def test_decode_heads_split_and_rotated_bit_for_bit_as_pytorch(heads, groups, dim, rotary_dim):
    """A decode step's q, k, v out of the fused projection, q and k rotated: the one-pass kernel
    gives PyTorch's bf16 ops' bits (the network's own path), for half or all channels rotated."""
    from glmchat.config import GLMConfig
    from glmchat.kernels.attention import CpuAttention
    from glmchat.model import Attention, rotary_table

    config = GLMConfig(hidden_size=heads * dim, num_attention_heads=heads, kv_channels=dim,
                       multi_query_group_num=groups, partial_rotary_factor=rotary_dim / dim, seq_length=64)
    assert config.rotary_dim == rotary_dim
    layer = install(Attention(config, 0).bfloat16())
    assert isinstance(layer, CpuAttention)
    qkv = _randn(5, 1, (heads + 2 * groups) * dim, seed=4, scale=3).bfloat16()
    rope = rotary_table(config)[torch.tensor([[0], [3], [17], [40], [63]])].bfloat16()  # [B, 1, rot/2, 2]
    assert cpu_kernels.rotary_heads(qkv, rope, heads, groups, dim) is not None  # the kernel takes it
    fast = layer.heads(qkv, rope)
    portable = Attention.heads(layer, qkv, rope)
    for got, expected in zip(fast, portable):
        assert got.shape == expected.shape and torch.equal(got, expected)


@needs_kernel("glm_swiglu")
def test_swiglu_kernel_equals_silu_times_up():
    """silu(gate) * up in one pass: PyTorch's bits but where its silu's exponential and ours round a
    float apart across a bf16 boundary (then one bf16 step); widths not a multiple of 16, large and
    non-finite entries."""
    from glmchat.config import GLMConfig
    from glmchat.kernels.mlp import CpuMLP
    from glmchat.model import MLP

    h = _randn(7, 2 * 1003, seed=5, scale=4).bfloat16()
    h[0, :6] = torch.tensor([100.0, -100.0, float("inf"), float("-inf"), float("nan"), 0.0])
    got = cpu_kernels.swiglu(h)
    expected = F.silu(h[:, :1003]) * h[:, 1003:]
    assert got.shape == expected.shape
    same = (got == expected) | (got.isnan() & expected.isnan())
    assert same.float().mean() > 0.999
    torch.testing.assert_close(got.float()[~same], expected.float()[~same], rtol=2**-7, atol=0)
    mlp = install(MLP(GLMConfig(hidden_size=32, ffn_hidden_size=48)).bfloat16())
    assert isinstance(mlp, CpuMLP)
    assert torch.equal(mlp.activation(h[1:, :96]), cpu_kernels.swiglu(h[1:, :96]))


@needs_kernel("glm_rmsnorm")
@pytest.mark.parametrize("rows, dim", [(1, 4096), (40, 1003), (3, 8)])
def test_rmsnorm_kernel_equals_the_networks_rmsnorm(rows, dim):
    """RMSNorm in one pass: the network's float32 arithmetic in the same order, so its bits but where
    the sum of squares, added in another order, moves a result across a bf16 boundary."""
    from glmchat.kernels.norm import CpuRMSNorm
    from glmchat.model import RMSNorm

    norm = install(RMSNorm(dim, 1e-5).bfloat16())
    assert isinstance(norm, CpuRMSNorm)
    norm.weight.data.copy_(_randn(dim, seed=6))
    x = _randn(rows, 1, dim, seed=7, scale=20).bfloat16()
    x[0, 0, :3] = torch.tensor([1e4, -1e-3, 0.0])[:min(3, dim)]
    got, expected = norm(x), RMSNorm.forward(norm, x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    same = got == expected
    assert same.float().mean() > 0.99
    torch.testing.assert_close(got.float()[~same], expected.float()[~same], rtol=2**-7, atol=0)


@needs_kernels
def test_small_kernels_leave_autograd_to_pytorch():
    """With gradients wanted, the one-pass kernels step aside and the results can be differentiated."""
    from glmchat.config import GLMConfig
    from glmchat.model import MLP, Attention, RMSNorm, Step

    config = GLMConfig(hidden_size=64, num_attention_heads=2, kv_channels=32, multi_query_group_num=1,
                       ffn_hidden_size=48, seq_length=16)
    norm, mlp = install(RMSNorm(64, 1e-5).bfloat16()), install(MLP(config).bfloat16())
    attention = install(Attention(config, 0).bfloat16())
    x = _randn(2, 1, 64, seed=9).bfloat16().requires_grad_()
    rope = torch.ones(2, 1, 8, 2, dtype=torch.bfloat16)
    y = attention(mlp(norm(x)), rope, Step(torch.zeros(2, 1, dtype=torch.long), None, False), None)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_prompt_attention_keeps_sdpa():
    from glmchat.config import GLMConfig
    from glmchat.model import Attention, Step

    config = GLMConfig(hidden_size=64, num_attention_heads=8, kv_channels=16, multi_query_group_num=2)
    layer = install(Attention(config, 0))
    q, k, v = _randn(2, 8, 5, 16, seed=1), _randn(2, 2, 5, 16, seed=2), _randn(2, 2, 5, 16, seed=3)
    out = layer.attend(q, k, v, Step(torch.arange(5)[None], None, True))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


# ---- a decode step's whole block in one call (glmchat.kernels.block) ----------------------------


def _block_model(method, sandwich=False):
    """A 2-layer model whose heads the decode kernels take (head_dim 64: the tiny checkpoints' 16 is
    below attention's multiple of 32), random weights, fast paths installed."""
    from glmchat.config import GLMConfig
    from glmchat.loader import empty_model
    from glmchat.random_weights import init_random_weights

    config = GLMConfig(hidden_size=256, num_layers=2, num_attention_heads=4, kv_channels=64, multi_query_group_num=2,
                       ffn_hidden_size=320, padded_vocab_size=512, seq_length=128, sandwich_norms=sandwich)
    quant = {"method": method, "group_size": 64} if method else None
    model = empty_model(config, torch.bfloat16, "cpu", quant)
    init_random_weights(model, seed=3)
    return install(model)


def _count_one_call_steps(monkeypatch) -> list:
    """A list that gets an entry for each block step the one call takes (not the ones it declines)."""
    calls, one_call = [], cpu_kernels.decode_block

    def counted(*args):
        y = one_call(*args)
        if y is not None:
            calls.append(1)
        return y

    monkeypatch.setattr(cpu_kernels, "decode_block", counted)
    return calls


def _decode_logits(model, ids):
    """Prompt, then decode steps over a KVCache (1 row) and over the server's slot cache (3 rows at
    their own lengths, growing past its first capacity): every logits row."""
    from glmchat.server.engine import SlotCache

    out = []
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        out.append(model(ids[:1, :5], cache=cache))
        out += [model.decode(ids[:1, t : t + 1], cache) for t in range(5, 9)]
        slots = SlotCache(model, 4, capacity=8)
        for row, n in enumerate((3, 6, 4)):
            prompt = model.new_cache(1, 16)
            model(ids[row : row + 1, :n], cache=prompt)
            slots.add(prompt)
        out += [model.decode(ids[:3, 6 + t % 5 : 7 + t % 5], slots) for t in range(7)]
    return [t.float() for t in out]


@needs_kernel("glm_decode_block")
@pytest.mark.parametrize("method, sandwich", [(None, False), ("int8", False), ("int4", False), ("int4", True)],
                         ids=["bf16", "int8", "int4", "int4-sandwich"])
def test_one_call_decode_block_equals_the_blocks_kernels_one_by_one(monkeypatch, method, sandwich):
    """The one-call block gives bit for bit what the same kernels give called one by one from the
    block's own forward, over a KVCache and the server's slot cache, and stays within bf16 of the
    portable path."""
    model = _block_model(method, sandwich)
    ids = torch.randint(5, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    calls = _count_one_call_steps(monkeypatch)
    fused = _decode_logits(model, ids)
    assert len(calls) == 2 * (4 + 7)  # every decode step of both layers went through it
    monkeypatch.setattr(cpu_kernels, "decode_block", lambda *a: None)
    one_by_one = _decode_logits(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(fused, one_by_one))
    install(model, enabled=False)
    portable = _decode_logits(model, ids)
    for a, b in zip(fused, portable):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))


@needs_kernel("glm_decode_block")
def test_one_call_decode_block_leaves_hooked_and_unsupported_blocks_to_their_forward(monkeypatch):
    """A hook on a layer (tensor parallelism's all_reduce), a batch sharing one rope row, or float32
    weights: the block's own forward, which runs the hook."""
    model = _block_model(None)
    calls = _count_one_call_steps(monkeypatch)
    seen = []
    handle = model.layers[1].mlp.down.register_forward_hook(lambda *a: seen.append(1))
    ids = torch.randint(5, 500, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = model.new_cache(1, 8)
        model(ids[:1, :5], cache=cache)
        model.decode(ids[:1, 5:], cache)
        assert len(calls) == 1 and len(seen) == 2  # layer 0 in one call; layer 1 (hooked) its own way, prompt and step
        handle.remove()
        cache = model.new_cache(2, 8)  # two rows of one length: the rope row is shared
        model(ids[:, :5], cache=cache)
        model.decode(ids[:, 5:], cache)
        assert len(calls) == 1
        install(model.float())
        cache = model.new_cache(1, 8)
        model(ids[:1, :5], cache=cache)
        model.decode(ids[:1, 5:], cache)
    assert len(calls) == 1


@needs_kernel("glm_decode_block")
def test_one_call_decode_block_follows_changes_made_between_steps(monkeypatch):
    """The one-call block follows a weight set anew, a norm weight moved to other memory, a hook added
    and a layer given back its portable class between the steps over one cache (as any caching of its
    operands would have to): each step equals the blocks' own forward on a model given the same changes."""
    from glmchat import model as model_module

    ids = torch.randint(5, 500, (1, 13), generator=torch.Generator().manual_seed(3))
    seen = []

    def set_down_weight(model):
        down = model.layers[0].mlp.down
        down.set_weight(_randn(down.out_features, down.in_features, seed=9, scale=0.05))

    def move_norm_weight(model):
        norm = model.layers[1].attn_norm
        norm.weight.data = norm.weight.data * 2  # new memory; the old is freed

    def add_hook(model):
        model.layers[0].attn.qkv.register_forward_hook(lambda *a: seen.append(1))

    def portable_mlp(model):
        model.layers[1].mlp.__class__ = model_module.MLP  # same tensors; the one call no longer applies

    def steps(model):
        out = []
        with torch.inference_mode():
            cache = model.new_cache(1, 16)
            model(ids[:, :5], cache=cache)
            changes = (None, set_down_weight, None, move_norm_weight, None, add_hook, portable_mlp, None)
            for t, change in zip(range(5, 13), changes):
                out.append(model.decode(ids[:, t : t + 1], cache).float())
                if change:
                    change(model)
        return out

    calls = _count_one_call_steps(monkeypatch)
    fused = steps(_block_model("int4"))
    assert len(calls) == 6 + 7  # layer 0 its own way after the hook, layer 1 after its MLP's class
    monkeypatch.setattr(cpu_kernels, "decode_block", lambda *a: None)
    own = steps(_block_model("int4"))
    assert all(torch.equal(a, b) for a, b in zip(fused, own)) and seen


@needs_kernel("glm_decode_block")
def test_one_call_decode_block_declines_a_slot_outside_the_cache():
    """A position past the cache's slots (or before them), or more rows than it has: no write, None."""
    model = _block_model(None)
    block = model.layers[0]
    cache = model.new_cache(1, 8)
    k, v, _ = cache.decode_slots(0)
    rope = model.rope[:1][None].bfloat16()
    operands = block._decode_operands(k, v, rope)
    x = torch.randn(1, 1, 256).bfloat16()
    before = k.clone()
    for position in (8, 100, -1):
        assert cpu_kernels.decode_block(x, rope, torch.tensor([position]), operands) is None
    assert cpu_kernels.decode_block(x.expand(2, 1, 256).contiguous(), rope.expand(2, 1, -1, -1).contiguous(),
                                    torch.tensor([0, 0]), operands) is None
    assert torch.equal(k, before)
    assert cpu_kernels.decode_block(x, rope, torch.tensor([7]), operands) is not None  # the last slot


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_kernels._FLAGS or os.environ.get("GLMCHAT_KERNELS") == "avx2",
                    reason="this CPU has no AVX2/FMA, or this run is on gemv_avx2.c already")
def test_avx2_kernels_pass_the_attention_and_one_call_block_tests(tmp_path):
    """The decode attention and one-call block tests above, run again on gemv_avx2.c (compiled and run
    on AVX-512 CPUs too, GLMCHAT_KERNELS=avx2): none of them skipped."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__, "-k",
         "decode_attention or one_call_decode_block"],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)),
        env={**os.environ, "GLMCHAT_KERNELS": "avx2", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and " passed" in summary and "skipped" not in summary, result.stdout[-3000:]
