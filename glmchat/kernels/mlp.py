"""The MLP's fast path on CPU: SwiGLU's activation in one pass (glmchat.kernels.cpu.swiglu) instead
of PyTorch's chunk, silu and product (two passes over the projection's output and a temporary);
`glmchat.kernels.install` swaps it in."""

from __future__ import annotations

import torch

from .. import model
from . import cpu


class CpuMLP(model.MLP):
    applies_to = staticmethod(cpu.on_cpu)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        y = cpu.swiglu(h)
        return y if y is not None else super().activation(h)
