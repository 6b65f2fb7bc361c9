"""Weight-only int8 / int4 quantization of the model's Linear layers.

int8: symmetric, one scale per output channel: w ≈ q · scale, q in -127..127.
int4: asymmetric, one (scale, zero) pair per group of `group_size` input channels:
w ≈ (q - 8) · scale + zero, q in 0..15.

The int4 codes are stored in the layout PyTorch's CPU kernel reads, so one stored format serves
both paths: output rows go in blocks of 64; byte (block, k, j) holds row 64·block + j in its low
nibble and row 64·block + 32 + j in its high one. scales_zeros is [K / group, N, 2].

The layers here compute through the portable path on any device: dequantize into a reused buffer,
then the 16-bit GEMM. The faster CPU paths for inputs of few rows (decode) live in glmchat.kernels,
which swaps them into a model (`glmchat.kernels.install`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
INT4_ROW_BLOCK = 64  # int4 rows are packed in blocks of 64


class QuantizationError(ValueError):
    """A quantization setting that cannot be applied (unknown method, bad group size)."""


def check_method(method: str | None, group_size: int = 128) -> None:
    if method is not None and method not in METHODS:
        raise QuantizationError(f"unknown quantization {method!r}; use one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")


# ---------------------------------------------------------------------------------------------
# Quantizing and dequantizing tensors

_QUANT_ROWS = 256  # rows quantized at a time: float temporaries stay in cache (~1.6× faster)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], scales [N] in dtype) for a float weight [N, K]."""
    lo, hi = torch.aminmax(w, dim=1)
    scales = (torch.maximum(-lo.float(), hi.float()) / 127).clamp(min=1e-10).to(dtype)
    s = scales.float()[:, None]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for r in range(0, w.shape[0], _QUANT_ROWS):
        rows = slice(r, r + _QUANT_ROWS)
        q[rows] = w[rows].to(torch.float32, copy=True).div_(s[rows]).round_().clamp_(-127, 127)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes [N, K/2] uint8, scales_zeros [K/group, N, 2] in dtype) for a float weight [N, K]."""
    N, K = w.shape
    wg = w.view(N, K // group_size, group_size)
    lo, hi = (t.float() for t in torch.aminmax(wg, dim=-1))
    scales = ((hi - lo) / 15).clamp(min=1e-10).to(dtype)
    zeros = (lo + 8 * scales.float()).to(dtype)  # round both first: the codes fit what is stored
    s, z = scales.float()[..., None], zeros.float()[..., None]
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    for r in range(0, N, _QUANT_ROWS):  # a multiple of the 64-row packing blocks
        rows = slice(r, r + _QUANT_ROWS)
        q = wg[rows].to(torch.float32, copy=True).sub_(z[rows]).div_(s[rows]).add_(8).round_().clamp_(0, 15)
        packed[rows] = pack_int4(q.to(torch.uint8).view(-1, K))
    return packed, torch.stack((scales.T, zeros.T), dim=-1).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> [N, K/2] uint8 in the CPU kernel's layout (see the module doc)."""
    N, K = q.shape
    blocks = q.view(N // INT4_ROW_BLOCK, 2, INT4_ROW_BLOCK // 2, K).transpose(2, 3)  # [N/64, 2, K, 32]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K/2] uint8 -> codes [N, K], written into `out` (any dtype) when given."""
    N, K = packed.shape[0], packed.shape[1] * 2
    if out is None:
        out = torch.empty(N, K, dtype=torch.uint8, device=packed.device)
    p = packed.view(N // INT4_ROW_BLOCK, K, INT4_ROW_BLOCK // 2)
    blocks = out.view(N // INT4_ROW_BLOCK, 2, INT4_ROW_BLOCK // 2, K)
    blocks[:, 0].copy_((p & 15).transpose(1, 2))
    blocks[:, 1].copy_((p >> 4).transpose(1, 2))
    return out


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % INT4_ROW_BLOCK == 0 and in_features % group_size == 0


# Prefill dequantizes each weight into this reused buffer (fresh allocations cost ~2× the time).
_workspaces: dict[tuple, torch.Tensor] = {}


def _workspace(shape, dtype, device) -> torch.Tensor:
    key = (dtype, torch.device(device))
    numel = shape[0] * shape[1]
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        _workspaces.pop(key, None)
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode alike
            buf = _workspaces[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def release_workspaces() -> None:
    _workspaces.clear()


# ---------------------------------------------------------------------------------------------
# The layers

class QuantizedLinear(nn.Module):
    """Base of the quantized layers: y = x Wᵀ + b with W stored as codes and scales (buffers)."""

    method: str

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x Wᵀ + b [M, N]."""
        y = self._dequantized_linear(x)
        return y if self.bias is None else y + self.bias

    def _dequantized_linear(self, x):
        return F.linear(x, self.dequantize(x.dtype, reuse_buffer=True))

    def portable(self) -> dict[str, torch.Tensor]:
        """The buffers (codes, scales) by name in this layer's portable layouts (int8 codes [out, in]
        row-major, int4 codes [out, in / 2] in PyTorch's CPU layout and scales_zeros [in / group,
        out, 2]), however a CPU kernel class holds them."""
        return {name: getattr(self, name) for name in self._buffer_names}

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight [out, in] into this layer's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.out_features}×{self.in_features} layer")
        for name, value in self.quantized(weight).items():
            getattr(self, name).copy_(value)

    def quantized(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffers (codes, scales) this layer's method gives a float weight of any shape, by name,
        without storing them (tensor parallelism keeps a share of a whole layer's)."""
        return dict(zip(self._buffer_names, self._quantize(weight.detach().to(self.qweight.device))))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    method = "int8"
    _buffer_names = ("qweight", "scales")

    def __init__(self, in_features, out_features, bias=False, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def _quantize(self, weight):
        return quantize_int8(weight, self.scales.dtype)

    def dequantize(self, dtype, reuse_buffer: bool = False) -> torch.Tensor:
        codes = self.portable()["qweight"]
        shape = tuple(codes.shape)
        w = _workspace(shape, dtype, codes.device) if reuse_buffer else torch.empty(shape, dtype=dtype, device=codes.device)
        return w.copy_(codes).mul_(self.scales.to(dtype)[:, None])

    def _dequantized_linear(self, x):
        if x.dtype == torch.float16:  # x·qᵀ can exceed fp16's range before scaling
            return super()._dequantized_linear(x)
        # (x · qᵀ) · s: the codes convert exactly and the scales apply to the small output (~2× faster)
        codes = self.portable()["qweight"]
        codes = _workspace(tuple(codes.shape), x.dtype, x.device).copy_(codes)
        return F.linear(x, codes).mul_(self.scales.to(x.dtype))


class Int4Linear(QuantizedLinear):
    method = "int4"
    _buffer_names = ("qweight", "scales_zeros")

    def __init__(self, in_features, out_features, bias=False, group_size=128, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        if not int4_supported(out_features, in_features, group_size):
            raise QuantizationError(
                f"int4 needs out_features divisible by {INT4_ROW_BLOCK} and in_features by the group size "
                f"{group_size}; got {out_features}×{in_features}"
            )
        self.group_size = group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    def _quantize(self, weight):
        return quantize_int4(weight, self.group_size, self.scales_zeros.dtype)

    def dequantize(self, dtype, reuse_buffer: bool = False) -> torch.Tensor:
        """The [N, K] weight as a transposed view of a [K, N] buffer: the packed layout unpacks into
        that in contiguous runs of 32 (into [N, K] it needs an element-wise transpose), and the
        [K/group, N] scales broadcast over it with unit stride (~3× faster than either alternative)."""
        N, K, device = self.out_features, self.in_features, self.qweight.device
        wt = _workspace((K, N), dtype, device) if reuse_buffer else torch.empty(K, N, dtype=dtype, device=device)
        return self._dequantize_into(wt).t()

    def _dequantize_into(self, wt: torch.Tensor) -> torch.Tensor:
        """The weight's transpose [K, N] written into wt."""
        N, K, g = self.out_features, self.in_features, self.group_size
        buffers = self.portable()
        packed = buffers["qweight"].view(N // INT4_ROW_BLOCK, K, INT4_ROW_BLOCK // 2)
        halves = wt.view(K, N // INT4_ROW_BLOCK, 2, INT4_ROW_BLOCK // 2)
        for half, codes in enumerate((packed & 15, packed >> 4)):
            halves[:, :, half].copy_(codes.view(torch.int8).sub_(8).transpose(0, 1))  # q - 8, exact
        scales, zeros = (t.contiguous()[:, None] for t in buffers["scales_zeros"].to(wt.dtype).unbind(-1))  # [K/g, 1, N]
        groups = wt.view(K // g, g, N)
        return torch.addcmul(zeros, groups, scales, out=groups).view(K, N)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


# ---------------------------------------------------------------------------------------------
# Whole models

def quantized_layer(linear: nn.Linear, method: str, group_size: int = 128) -> QuantizedLinear | None:
    """An empty quantized twin of `linear` (same device, its dtype for scales), or None if unsupported."""
    args = (linear.in_features, linear.out_features, linear.bias is not None)
    kw = dict(dtype=linear.weight.dtype, device=linear.weight.device)
    if method == "int8":
        return Int8Linear(*args, **kw)
    if not int4_supported(linear.out_features, linear.in_features, group_size):
        return None
    return Int4Linear(*args, group_size=group_size, **kw)


def quantize_model(model: nn.Module, method: str, group_size: int = 128) -> nn.Module:
    """Replace every nn.Linear by its quantized twin, in place.

    On a meta-device model this only changes the structure (the loader then fills the buffers);
    on a real one the weights are quantized layer by layer, so memory never holds two copies.
    Layers int4 cannot pack (rows not a multiple of 64) stay in 16-bit.
    """
    check_method(method, group_size)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            q = quantized_layer(child, method, group_size)
            if q is None:
                continue
            if child.weight.device.type != "meta":
                q.set_weight(child.weight.detach())
                if child.bias is not None:
                    q.bias.copy_(child.bias.detach())
            setattr(parent, name, q)
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """The config entry describing how `model` is quantized, or None for a float model."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    entry = {"method": layers[0].method}
    if isinstance(layers[0], Int4Linear):
        entry["group_size"] = layers[0].group_size
    return entry
