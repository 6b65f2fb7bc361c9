"""Device-specific compute, swapped into a model from outside (the model itself is plain PyTorch).

`install(model)` gives each Linear layer the fast-path class that fits its device and dtype
(glmchat.kernels.linear: nn.Linear and the int8/int4 layers on CPU), each attention layer its
CPU decode path (glmchat.kernels.attention), each MLP and RMSNorm its one-pass CPU kernel
(glmchat.kernels.mlp, .norm), each block its one-call decode step (glmchat.kernels.block), and the
portable class
everywhere else; `install(model, enabled=False)` puts the portable classes back (tests compare
the two). The loader calls it once the weights are in place; call it again after moving a model
to another device or dtype. On the CPU it also attaches glmchat.kernels.threads' governor, which
runs the model on the cores other programs leave free. glmchat.kernels.cpu builds and loads the C
kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import model, model_v1
from ..quantize import Int4Linear, Int8Linear
from . import cpu, threads
from .attention import CpuAttention, CpuAttentionV1
from .block import CpuBlock
from .linear import CpuLinear, FastInt4Linear, FastInt8Linear
from .mlp import CpuMLP
from .norm import CpuRMSNorm

_FAST = {nn.Linear: CpuLinear, Int8Linear: FastInt8Linear, Int4Linear: FastInt4Linear, model.Attention: CpuAttention,
         model_v1.Attention: CpuAttentionV1, model.MLP: CpuMLP,
         model.RMSNorm: CpuRMSNorm, model.Block: CpuBlock}
_PORTABLE = {fast: portable for portable, fast in _FAST.items()}


def install(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Swap the fast paths into `model`'s layers (in place: the same modules, parameters and
    state dict; only their class changes, and a kernel's own layout of a buffer where it has one)
    where they apply, the portable ones elsewhere."""
    bf16_fast = False
    for layer in model.modules():
        portable = _PORTABLE.get(type(layer), type(layer))
        fast = _FAST.get(portable)
        if fast is None:
            continue
        use = enabled and fast.applies_to(layer)
        new = fast if use else portable
        if type(layer) is not new and hasattr(layer, "on_swap_out"):
            layer.on_swap_out()  # the portable layout back
        layer.__class__ = new
        if hasattr(layer, "on_swap_in"):
            layer.on_swap_in()  # a kernel's own layout (FastInt8Linear's blocked codes)
        bf16_fast |= use and _float_dtype(layer) == torch.bfloat16
    if bf16_fast:  # the only dtype the C kernels take
        cpu.available()  # compiles them on first use (seconds), here rather than in the first answer
    threads.govern(model, enabled)
    return model


def keeps_rows_apart(model: nn.Module) -> bool:
    """Whether every product in `model` computes each row of a decode step as if it were alone (the
    CPU paths of glmchat.kernels.linear). Elsewhere (cuBLAS / rocBLAS choose their kernels by the
    number of rows) a caller that needs batch invariance runs its decode steps at a fixed number of rows."""
    products = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))]
    return all(type(m) in (CpuLinear, FastInt8Linear, FastInt4Linear) for m in products)


def prompts_keep_rows_apart(model: nn.Module) -> bool:
    """Whether every product in `model`'s blocks computes each row of a prompt as if it were alone
    (glmchat's int8/int4 C kernels), and its output layer each row of a decode step: then prompts
    can be prefilled together (glmchat.model.PromptPieces) with the bits each gets alone. bf16 prompts
    take PyTorch's matrix products, whose sums depend on how many rows there are."""
    blocks = [m for m in model.layers.modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))]
    return keeps_rows_apart(model) and all(isinstance(m, (FastInt8Linear, FastInt4Linear)) and m.kernel_applies()
                                           for m in blocks)


def _float_dtype(layer: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()), None)
