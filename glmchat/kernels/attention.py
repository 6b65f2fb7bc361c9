"""Attention's fast path on CPU: subclasses of the networks' Attention classes that
`glmchat.kernels.install` swaps in (their `attention`, the product for given keys and mask).

For a decode step (one new token per row) PyTorch's CPU scaled_dot_product_attention is slow:
at ChatGLM3-6B's shapes (32 query heads over 2 KV heads, bf16, 2 threads) it took 0.39 ms per
layer over 80 cached tokens, 3.2 ms over 600 and 9.5 ms over 2000 — over 28 layers, more than
streaming the int4 weights. Two grouped matrix products in float32 (each KV head with its 16 query
heads as rows) take 0.06, 0.15 and 0.6 ms. Prompts (several new tokens per row) keep SDPA.
"""

from __future__ import annotations

import itertools
import math

import torch

from .. import model, model_v1


class CpuDecodeAttention:
    """The fast decode product, for any attention class whose `attention(q, k, v, mask, is_causal)`
    is the model's (the GLM network's and ChatGLM-6B's)."""

    @staticmethod
    def applies_to(layer) -> bool:
        return next(itertools.chain(layer.parameters(), layer.buffers())).device.type == "cpu"

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
    pass


class CpuAttentionV1(CpuDecodeAttention, model_v1.Attention):
    pass
