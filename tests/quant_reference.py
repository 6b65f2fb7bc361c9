"""Dequantization written from the documented formats (glmchat.quantize's module doc), independent
of the layers' own code: what the quantized layers and kernels are checked against."""

from __future__ import annotations

import torch

ROW_BLOCK = 64


def int8_weight(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[n, k] = q[n, k] · scale[n], in float32."""
    return qweight.float() * scales.float()[:, None]


def int4_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] from the packed [N, K/2] bytes: viewed as [N/64, K, 32], byte (b, k, j) holds
    row 64b+j in its low nibble and row 64b+32+j in its high one."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    codes = torch.empty(N, K, dtype=torch.int32)
    packed = qweight.view(N // ROW_BLOCK, K, ROW_BLOCK // 2).to(torch.int32)
    for b in range(N // ROW_BLOCK):
        for j in range(ROW_BLOCK // 2):
            codes[ROW_BLOCK * b + j] = packed[b, :, j] & 15
            codes[ROW_BLOCK * b + ROW_BLOCK // 2 + j] = packed[b, :, j] >> 4
    return codes


def int4_weight(qweight: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W[n, k] = (q[n, k] - 8) · scale + zero, (scale, zero) = scales_zeros[k // group, n], in float32."""
    q = int4_codes(qweight).float()
    scale = scales_zeros[..., 0].float().T.repeat_interleave(group_size, dim=1)  # [N, K]
    zero = scales_zeros[..., 1].float().T.repeat_interleave(group_size, dim=1)
    return (q - 8) * scale + zero


def weight(layer) -> torch.Tensor:
    """The float32 weight [N, K] a quantized layer's buffers stand for, read from its state dict (the
    documented formats, whatever layout a kernel class holds them in)."""
    buffers = layer.state_dict()
    if layer.method == "int8":
        return int8_weight(buffers["qweight"], buffers["scales"])
    return int4_weight(buffers["qweight"], buffers["scales_zeros"], layer.group_size)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """x · Wᵀ + b in float32 from the documented dequantization, then F.linear."""
    bias = None if layer.bias is None else layer.bias.float()
    return torch.nn.functional.linear(x.float(), weight(layer), bias)
