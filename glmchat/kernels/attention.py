"""Attention's fast path on CPU: subclasses of the networks' Attention classes that
`glmchat.kernels.install` swaps in (their `attention`, the product for given keys and mask).

For a decode step (one new token per row) PyTorch's CPU scaled_dot_product_attention is slow:
at ChatGLM3-6B's shapes (32 query heads over 2 KV heads, bf16, 2 threads) it took 0.39 ms per
layer over 80 cached tokens, 3.2 ms over 600 and 9.5 ms over 2000 — over 28 layers, more than
streaming the int4 weights. Two grouped matrix products in float32 (each KV head with its 16 query
heads as rows) take 0.06, 0.15 and 0.6 ms. Prompts (several new tokens per row) keep SDPA.

In bf16 a decode step goes through glmchat's C kernel instead (glmchat.kernels.cpu.decode_attention):
one call per layer for every row, each over its own first keys. The server's rows at their own
lengths took a loop of small PyTorch ops per row; with the kernel the glue around the products of
an 8-row int4 step (ChatGLM3-6B, EPYC, 2 threads) fell from 40 to 15 ms, of a 1-row step from 12
to 7 ms.
"""

from __future__ import annotations

import math

import torch

from .. import model, model_v1
from . import cpu


class CpuDecodeAttention:
    """The fast decode product, for any attention class whose `attention(q, k, v, mask, is_causal)`
    is the model's (the GLM network's and ChatGLM-6B's)."""

    applies_to = staticmethod(cpu.on_cpu)

    def attend(self, q, k, v, step) -> torch.Tensor:
        if q.shape[2] == 1 and step.mask is None:  # every row over all its keys, or its own first ones
            lengths = step.key_lengths or [k.shape[2]] * q.shape[0]
            out = cpu.decode_attention(q, k, v, lengths, 1.0 / math.sqrt(q.shape[-1]))
            if out is not None:
                return out
        return super().attend(q, k, v, step)

    def attention(self, q, k, v, mask, is_causal) -> torch.Tensor:
        B, H, T, D = q.shape
        if T != 1 or q.device.type != "cpu":
            return super().attention(q, k, v, mask, is_causal)
        G = k.shape[1]  # query heads h*rep..h*rep+rep-1 read KV head h
        qg = q.reshape(B, G, H // G, D).float()
        scores = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(1.0 / math.sqrt(D))  # [B, G, rep, S]
        if mask is not None:  # [B, 1, 1, S]: True = attend
            scores.masked_fill_(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
        return out.to(q.dtype).reshape(B, H, 1, D)


class CpuAttention(CpuDecodeAttention, model.Attention):
    def heads(self, qkv, rope):
        if qkv.shape[1] == 1:  # decode steps: split and rotated in one pass (glmchat.kernels.cpu)
            heads = cpu.rotary_heads(qkv, rope, self.n_heads, self.n_kv_heads, self.head_dim)
            if heads is not None:
                return heads
        return super().heads(qkv, rope)


class CpuAttentionV1(CpuDecodeAttention, model_v1.Attention):
    pass
