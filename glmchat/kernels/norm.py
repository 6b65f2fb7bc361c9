"""RMSNorm's fast path on CPU: one pass over each row (glmchat.kernels.cpu.rmsnorm) instead of
PyTorch's seven ops (float copy, square, mean, add, rsqrt, two products, bf16 copy);
`glmchat.kernels.install` swaps it in."""

from __future__ import annotations

import torch

from .. import model
from . import cpu


class CpuRMSNorm(model.RMSNorm):
    applies_to = staticmethod(cpu.on_cpu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu.rmsnorm(x, self.weight, self.eps)
        return y if y is not None else super().forward(x)
