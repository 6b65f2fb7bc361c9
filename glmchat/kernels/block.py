"""A decode step's whole block in one C call on CPU (glmchat.kernels.cpu.decode_block, csrc/decode_block.h):
RMSNorm, the qkv product, rotary positions, the cache write, attention, the output product, the
residual add, and the same for the MLP, with the kernels the block's layers would call one by one,
so the same bits. `glmchat.kernels.install` swaps it in.

Why: each product streams its weights through the caches, and on this machine class the PyTorch
ops and Python between two products then run from memory: a full-size int4 decode step (ChatGLM3-6B,
Xeon, 2 threads) spent 17-27 ms of its 155-179 between its products. Prompts, padded batches,
hooked layers (tensor parallelism's all_reduce) and layers the kernels do not take keep the
block's own forward.
"""

from __future__ import annotations

import math

import torch

from .. import model
from . import cpu
from .attention import CpuAttention
from .mlp import CpuMLP
from .norm import CpuRMSNorm


class CpuBlock(model.Block):
    applies_to = staticmethod(cpu.on_cpu)

    def forward(self, x, rope, step, cache):
        if x.shape[1] == 1 and step.mask is None and hasattr(cache, "decode_slots") and not _grad_wanted(x):
            k, v, positions = cache.decode_slots(self.attn.layer_idx)
            operands = self._decode_operands(k, v, rope)
            if operands is not None:
                y = cpu.decode_block(x, rope, positions, operands)
                if y is not None:
                    return y
        return super().forward(x, rope, step, cache)

    def _decode_operands(self, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor) -> cpu.BlockOperands | None:
        """The block's weights and this layer's cache k, v for the one-call step; None where the
        kernels do not take them all, or where a layer is not the class whose arithmetic the call
        repeats or has hooks (which the call would skip)."""
        attn, mlp = self.attn, self.mlp
        norms = (self.attn_norm, self.mlp_norm, self.post_attn_norm, self.post_mlp_norm)
        if not (type(attn) is CpuAttention and type(mlp) is CpuMLP and _cache_takes(k, v)
                and all(n is None or type(n) is CpuRMSNorm and n.eps == self.attn_norm.eps for n in norms)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())):
            return None
        products = [getattr(m, "decode_operand", _none)() for m in (attn.qkv, attn.dense, mlp.gate_up, mlp.down)]
        weights = [None if n is None else n.weight for n in norms]
        if None in products or not all(w is None or w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights):
            return None
        D = attn.head_dim
        return cpu.BlockOperands(*(None if w is None else w.data_ptr() for w in weights), *products,
                                 k.data_ptr(), v.data_ptr(), k.shape[0], k.shape[2], k.stride(0), k.stride(1),
                                 attn.n_heads, attn.n_kv_heads, D, rope.shape[-2] * 2, self.attn_norm.eps, 1.0 / math.sqrt(D))


def _none():
    return None


def _cache_takes(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes a layer's cache [rows, kv_heads, slots, head_dim]: bf16 on the CPU,
    each head's slots contiguous, keys and values alike."""
    return (k.dtype == v.dtype == torch.bfloat16 and k.device.type == v.device.type == "cpu"
            and k.shape == v.shape and k.stride() == v.stride() and k.stride(3) == 1 and k.stride(2) == k.shape[3])


def _grad_wanted(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad
