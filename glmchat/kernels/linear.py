"""The Linear layers' fast paths on CPU, as subclasses of the portable layers that
`glmchat.kernels.install` swaps in.

Decode steps (one new token per row, x [B, 1, K]) keep each row's arithmetic apart: a row's result
is bit for bit the same whatever the other rows are and however many there are, which is what makes
the server's batched greedy answers equal the ones each request gets alone. glmchat's C kernels do
this for any number of rows with the weights read once (glmchat.kernels.cpu); where they do not
apply (a CPU without AVX2, float16 / float32) the rows go one at a time.

Prompts take the fastest product for their size. bf16: W @ xᵀ up to MAX_ROWS_TRANSPOSED rows,
F.linear beyond; float32 (float32_linear) on CPUs without bf16 instructions. int8 / int4: glmchat's C kernels (8-bit x, the weights read tile by tile; decode
steps take the same kernel); where they do not apply, PyTorch's weight-only ops up to FAST_MAX_ROWS,
the portable dequantize + GEMM beyond.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import Int4Linear, Int8Linear, pack_int4
from . import cpu

# bf16 prompts: up to this many rows W @ xᵀ beats F.linear. Measured with AMX (Xeon); without it (AMD
# EPYC, 2 threads, 8 rows) F.linear took 13.9 ms against 21.6 for the MLP's up projection and 2.7
# against 13.4 for qkv, W @ xᵀ won only the down projection (6.8 against 8.4): F.linear from 2 rows on.
MAX_ROWS_TRANSPOSED = 128 if cpu.HAS_AMX else 1
FAST_MAX_ROWS = 16  # above this many rows, dequantize + GEMM beats the weight-only ops (measured)

_ops = torch.ops.aten


def _int4_op_reads_our_codes() -> bool:
    """Whether PyTorch's CPU int4 op takes glmchat's int4 layout (glmchat.quantize.pack_int4). The
    op's layout follows the vector width PyTorch dispatches to: blocks of 64 rows with AVX-512, as
    ours, but of 32 with AVX2 (torch 2.13), where it would return wrong sums for our codes."""
    if not hasattr(_ops, "_weight_int4pack_mm_for_cpu"):
        return False
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    return torch.equal(_ops._convert_weight_to_int4pack_for_cpu(codes, 1), pack_int4(codes.to(torch.uint8)))


HAS_INT8_OP = hasattr(_ops, "_weight_int8pack_mm")
HAS_INT4_OP = _int4_op_reads_our_codes()


def is_decode_step(x: torch.Tensor) -> bool:
    """x [B, 1, K]: one new token per row (a decode step), or a single row."""
    return x.dim() == 3 and x.shape[1] == 1 or x.numel() == x.shape[-1]


def one_row_at_a_time(x2: torch.Tensor, product) -> torch.Tensor:
    """product over the rows of x2 [M, K] one by one, each from its own fresh (aligned) copy, so
    that no row's result depends on the others (the fallback where no kernel keeps rows apart)."""
    if x2.shape[0] == 1:
        return product(x2)
    return torch.cat([product(x2[i : i + 1].clone()) for i in range(x2.shape[0])])


class CpuLinear(nn.Linear):
    """nn.Linear on the CPU (bf16, float16, float32): decode steps row by row, prompts by size.

    Measured at ChatGLM3-6B's shapes on an AMD EPYC (AVX512-BF16, 2 threads): glmchat's bf16 kernel
    takes 7.6 ms for the MLP's up projection with one row and 10.9 with eight (F.linear 16.3 / 15.2),
    the weights being read once per step. torch.mv is the one-row fallback for bf16 (~1.5× F.linear).
    """

    @staticmethod
    def applies_to(layer: nn.Linear) -> bool:
        return layer.weight.device.type == "cpu" and layer.weight.dtype in (torch.bfloat16, torch.float16, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if is_decode_step(x):
            return _rows_apart(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16 and cpu.SLOW_BF16_MATMUL and not torch.is_grad_enabled():
            return float32_linear(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16 and x.numel() // self.in_features <= MAX_ROWS_TRANSPOSED:
            return _transposed(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def decode_operand(self) -> cpu.Product | None:
        """This layer for glmchat.kernels.block's one-call decode step, where the bf16 kernel takes it."""
        w, b = self.weight, self.bias
        if w.dtype != torch.bfloat16 or not w.is_contiguous() or not (b is None or b.dtype == w.dtype and b.is_contiguous()):
            return None
        return cpu.Product.of(cpu.Product.BF16, w, None, b, self.out_features, self.in_features)


@torch.compiler.disable  # under torch.compile, inductor's own matvec is ~2× slower than torch.mv
def _rows_apart(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    y = cpu.bf16_gemv(x, weight, bias)
    if y is not None:
        return y
    x2 = x.reshape(-1, in_features)
    if x.dtype == torch.bfloat16:
        y = one_row_at_a_time(x2, lambda row: torch.mv(weight, row[0])[None])
        y = y if bias is None else y + bias
    else:
        y = one_row_at_a_time(x2, lambda row: F.linear(row, weight, bias))
    return y.view(*x.shape[:-1], out_features)


# float32_linear: weight rows converted per slice; 256 ran best over ChatGLM3-6B's shapes (Zen 3, 2 threads).
FLOAT32_SLICE = 256


@torch.compiler.disable
def float32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A bf16 prompt's product in float32, for CPUs without bf16 instructions, where PyTorch's bf16
    matrix products are slow: FLOAT32_SLICE weight rows at a time converted into a float32 buffer
    that stays in cache, then multiplied. ChatGLM3-6B's shapes, 2 threads on a Zen 3 EPYC (AVX2),
    in GFLOP/s against F.linear in bf16: 512 rows 156-160 against 22, 64 rows 111-115, 16 rows 53-56;
    converting each whole weight first reached 122-129, 42-48 and 8-16."""
    out_features, in_features = weight.shape
    x2 = x.reshape(-1, in_features).float()
    y = torch.empty(x2.shape[0], out_features)
    buffer = torch.empty(min(FLOAT32_SLICE, out_features), in_features)
    for n0 in range(0, out_features, FLOAT32_SLICE):
        w = buffer[: min(FLOAT32_SLICE, out_features - n0)]
        w.copy_(weight[n0 : n0 + FLOAT32_SLICE])
        torch.mm(x2, w.T, out=y[:, n0 : n0 + FLOAT32_SLICE])
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


@torch.compiler.disable
def _transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out_features, in_features = weight.shape
    y = (weight @ x.reshape(-1, in_features).t()).t()
    if bias is not None:
        y = y + bias
    return y.contiguous().view(*x.shape[:-1], out_features)


class _FastQuantized:
    """The quantized layers' CPU paths: decode steps and prompts through glmchat's C kernel (one
    arithmetic for every row count, each row alone), then PyTorch's ops where it does not apply.

    While such a class is swapped in, the codes (and int4's scales) are held in the C kernels'
    blocked layouts where the kernels take them (bf16 scales: cpu.block_int8 / block_int4, the
    operand of their integer products, read straight from memory; 8 int8 decode rows ~0.55× the
    time of the row-major layout), and in the portable layouts again once it is swapped out. The
    state dict holds the portable layouts either way."""

    has_op: bool  # whether this PyTorch has the layer's CPU weight-only op
    op_k_multiple = 1  # in_features the op takes: multiples of this

    @staticmethod
    def applies_to(layer) -> bool:
        return layer.qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not is_decode_step(x):
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features)
        y = self._kernel(x2)
        if y is None:
            y = one_row_at_a_time(x2, self._matmul)
        return y.view(*x.shape[:-1], self.out_features)

    def decode_operand(self) -> cpu.Product | None:
        """This layer for glmchat.kernels.block's one-call decode step, where its kernel takes it
        (blocked buffers, bf16 scales and bias)."""
        if not self.kernel_applies():
            return None
        return cpu.Product.of(self.kind, self.qweight, getattr(self, self._buffer_names[1]), self.bias,
                              self.out_features, self.in_features, getattr(self, "group_size", 0))

    def kernel_applies(self) -> bool:
        """Whether glmchat's C kernel takes this layer's products (blocked codes, bf16 scales and bias):
        then every row of x, prompt or decode step, comes out as if it were alone (finite x)."""
        b = self.bias
        return (self._blocked() and getattr(self, self._buffer_names[1]).dtype == torch.bfloat16
                and (b is None or b.dtype == torch.bfloat16 and b.is_contiguous()))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            y = self._kernel(x)  # bias included; None where it does not apply (shape, non-finite x...)
            if y is not None:
                return y
            if x.shape[0] <= FAST_MAX_ROWS and self.has_op and self.in_features % self.op_k_multiple == 0:
                y = self._fast(x.contiguous())
                return y if self.bias is None else y + self.bias
        return super()._matmul(x)

    def on_swap_in(self) -> None:
        """Block the buffers where the kernels will take them, unblock them where they no longer will
        (install calls it each time: the device or dtype may have changed since)."""
        scales = getattr(self, self._buffer_names[1])
        wanted = scales.dtype == torch.bfloat16 and self.qweight.device.type == "cpu"
        if wanted and not self._blocked():
            self._set_buffers(self._block() or {})
        elif not wanted:
            self.on_swap_out()

    def on_swap_out(self) -> None:
        self._set_buffers(self.portable())

    def _set_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, value in buffers.items():
            setattr(self, name, value)

    def _blocked(self) -> bool:
        return self.qweight.dim() == 3  # the portable codes have 2 dimensions

    def portable(self) -> dict[str, torch.Tensor]:
        return self._unblock() if self._blocked() else super().portable()

    def set_weight(self, weight: torch.Tensor) -> None:
        self.on_swap_out()  # quantized into the portable layout, then blocked again
        super().set_weight(weight)
        self.on_swap_in()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self.portable().items():
            destination[prefix + name] = value


class FastInt8Linear(_FastQuantized, Int8Linear):
    has_op = HAS_INT8_OP
    kind = cpu.Product.INT8
    op_k_multiple = 16  # torch 2.13's op returns wrong sums for K = 136 or 200 and crashes for K = 132

    def _block(self) -> dict[str, torch.Tensor] | None:
        codes = cpu.block_int8(self.qweight)
        return None if codes is None else {"qweight": codes}

    def _unblock(self) -> dict[str, torch.Tensor]:
        return {"qweight": cpu.unblock_int8(self.qweight, self.out_features, self.in_features), "scales": self.scales}

    def _kernel(self, x):
        return cpu.int8_gemm(x, self.qweight, self.scales, self.bias)

    def _fast(self, x):
        return _ops._weight_int8pack_mm(x, self.portable()["qweight"], self.scales.to(x.dtype))


class FastInt4Linear(_FastQuantized, Int4Linear):
    has_op = HAS_INT4_OP
    kind = cpu.Product.INT4

    def _block(self) -> dict[str, torch.Tensor] | None:
        codes = cpu.block_int4(self.qweight)
        return None if codes is None else {"qweight": codes, "scales_zeros": cpu.block_int4_scales(self.scales_zeros)}

    def _unblock(self) -> dict[str, torch.Tensor]:
        return {"qweight": cpu.unblock_int4(self.qweight), "scales_zeros": cpu.unblock_int4_scales(self.scales_zeros)}

    def _kernel(self, x):
        return cpu.int4_gemm(x, self.qweight, self.scales_zeros, self.group_size, self.bias)

    def _fast(self, x):
        buffers = self.portable()
        return _ops._weight_int4pack_mm_for_cpu(x, buffers["qweight"], self.group_size, buffers["scales_zeros"].to(x.dtype))
