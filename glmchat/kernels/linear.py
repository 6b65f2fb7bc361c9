"""The Linear layers' fast paths on CPU, as subclasses of the portable layers that
`glmchat.kernels.install` swaps into a model.

bf16 nn.Linear: for the few-row products of decoding, glmchat's C kernel (one row) or torch.mv,
and W @ xᵀ up to MAX_ROWS_TRANSPOSED rows. int8 / int4: glmchat's C kernels up to
cpu.MAX_ROWS_INT8 / MAX_ROWS_INT4 rows (chosen by the CPU's kind), PyTorch's weight-only ops up to
FAST_MAX_ROWS, the portable dequantize + GEMM beyond
(int4 dequantizing through the C kernel). Each path checks its input and falls back to the
portable one where it does not apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import Int4Linear, Int8Linear
from . import cpu

# bf16: up to this many rows W @ xᵀ beats F.linear. Measured with AMX (Xeon); without it (AMD EPYC,
# 2 threads, 8 rows) F.linear took 13.9 ms against 21.6 for the MLP's up projection and 2.7 against
# 13.4 for qkv, W @ xᵀ won only the down projection (6.8 against 8.4): F.linear from 2 rows on.
MAX_ROWS_TRANSPOSED = 128 if cpu.HAS_AMX else 1
FAST_MAX_ROWS = 16  # above this many rows, dequantize + GEMM beats the weight-only ops (measured)

_ops = torch.ops.aten
HAS_INT8_OP = hasattr(_ops, "_weight_int8pack_mm")
HAS_INT4_OP = hasattr(_ops, "_weight_int4pack_mm_for_cpu")


class CpuBf16Linear(nn.Linear):
    """nn.Linear with faster CPU kernels for the few-row products of decoding, in bfloat16.

    Measured at ChatGLM3-6B's shapes on AVX-512/AMX CPUs: one row through glmchat's C kernel
    (cpu.bf16_gemv, where it compiles) or else torch.mv runs ~1.5× F.linear's speed, and
    2-128 rows as W @ x^T 1.2-1.9× (batched decode steps, short prefills; with AMX only);
    from ~256 rows on F.linear is as fast or faster (0.7× at 512 rows for the MLP's up projection).
    float16 is the other way round (its mv is slower), so it keeps F.linear.
    """

    @staticmethod
    def applies_to(layer: nn.Linear) -> bool:
        return layer.weight.device.type == "cpu" and layer.weight.dtype == torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type != "cpu" or x.dtype != torch.bfloat16 or rows > MAX_ROWS_TRANSPOSED:
            return F.linear(x, self.weight, self.bias)
        return _cpu_bf16_linear(x, self.weight, self.bias)


@torch.compiler.disable  # under torch.compile, inductor's own matvec is ~2× slower than torch.mv
def _cpu_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if rows == 1:
        y = cpu.bf16_gemv(x, weight, bias)
        if y is not None:
            return y
        y = torch.mv(weight, x.reshape(-1))
    else:
        y = (weight @ x.reshape(rows, in_features).t()).t()
    if bias is not None:
        y = y + bias
    return y.contiguous().view(*x.shape[:-1], out_features)


class _FastQuantized:
    """The few-row paths of a quantized layer, before its portable dequantize + GEMM."""

    has_op: bool  # whether this PyTorch has the layer's CPU weight-only op

    @staticmethod
    def applies_to(layer) -> bool:
        return layer.qweight.device.type == "cpu"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = self._native(x)  # glmchat's C kernel, bias included; None where it does not apply (too many rows...)
            if y is not None:
                return y
        if x.shape[0] <= FAST_MAX_ROWS and self.has_op and x.device.type == "cpu":
            y = self._fast(x.contiguous())
            return y if self.bias is None else y + self.bias
        return super()._matmul(x)


class FastInt8Linear(_FastQuantized, Int8Linear):
    has_op = HAS_INT8_OP

    def _native(self, x):
        return cpu.int8_gemv(x, self.qweight, self.scales, self.bias)

    def _fast(self, x):
        return _ops._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))


class FastInt4Linear(_FastQuantized, Int4Linear):
    has_op = HAS_INT4_OP

    def _native(self, x):
        return cpu.int4_gemv(x, self.qweight, self.scales_zeros, self.group_size, self.bias)

    def _fast(self, x):
        return _ops._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales_zeros.to(x.dtype))

    def _dequantize_into(self, wt: torch.Tensor) -> torch.Tensor:
        if cpu.int4_dequantize_t(self.qweight, self.scales_zeros, self.group_size, wt) is not None:
            return wt
        return super()._dequantize_into(wt)
