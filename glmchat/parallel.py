"""Tensor parallelism over torch.distributed, by explicit sharding (the approach of gpt-fast's tp.py).

Each of N ranks keeps its share of every attention layer's query heads and of every MLP's hidden
units: the fused qkv projection is split into q, k and v, and each rank keeps the rows of its query
heads and of the KV heads they read; the fused gate|up projection is split into its halves, each
sharded by rows. The attention output projection and the MLP's down projection are then sharded by
columns (their inputs), and their partial outputs are summed across ranks with one all_reduce each.
ChatGLM3 and GLM-4 have only 2 KV groups, so with more ranks than groups each rank keeps a copy of
the one KV head its query heads read. Embedding, norms and output layer stay whole on every rank.

Run every rank through the same steps (`torchrun`); the backend is torch.distributed's: gloo on
the CPU, nccl on GPUs (RCCL on AMD). The model then runs as before, its KV cache holding only the
rank's KV heads.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from .model import GLMTransformer


class ShardingError(ValueError):
    """The model cannot be split over this many ranks."""


def kv_heads_of_rank(heads: int, groups: int, rank: int, world: int) -> list[int]:
    """The KV heads that rank's query heads read (query head h reads group h // (heads // groups))."""
    per_rank, per_group = heads // world, heads // groups
    return sorted({h // per_group for h in range(rank * per_rank, (rank + 1) * per_rank)})


def check_shardable(config, world: int) -> None:
    if config.num_attention_heads % world:
        raise ShardingError(f"{world} ranks do not divide the {config.num_attention_heads} attention heads; "
                            "use a divisor of it")
    groups = config.num_kv_heads
    if (world <= groups and groups % world) or (world > groups and world % groups):
        raise ShardingError(f"{world} ranks and {groups} KV groups: one must divide the other")
    if config.ffn_hidden_size % world:
        raise ShardingError(f"{world} ranks do not divide the MLP's {config.ffn_hidden_size} hidden units")


def shard(model: GLMTransformer, rank: int, world: int, group=None) -> GLMTransformer:
    """Keep rank's share of `model` (in place) and sum the row-sharded products across the group."""
    if any(not isinstance(m, nn.Linear) for b in model.layers for m in (b.attn.qkv, b.attn.dense, b.mlp.gate_up, b.mlp.down)):
        raise ShardingError("tensor parallelism takes bfloat16/float16/float32 weights; load without --quantize")
    c = model.config
    check_shardable(c, world)
    heads, d = c.num_attention_heads // world, c.head_dim
    kv = kv_heads_of_rank(c.num_attention_heads, c.num_kv_heads, rank, world)
    ffn = c.ffn_hidden_size // world
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        q, k, v = _row_indices(attn.qkv).split([c.num_attention_heads * d, c.num_kv_heads * d, c.num_kv_heads * d])
        kept_kv = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kv])
        _keep_rows(attn.qkv, torch.cat([q[rank * heads * d : (rank + 1) * heads * d], k[kept_kv], v[kept_kv]]))
        attn.n_heads, attn.n_kv_heads = heads, len(kv)
        _keep_columns(attn.dense, slice(rank * heads * d, (rank + 1) * heads * d), rank, group)
        gate, up = _row_indices(mlp.gate_up).chunk(2)
        _keep_rows(mlp.gate_up, torch.cat([gate[rank * ffn : (rank + 1) * ffn], up[rank * ffn : (rank + 1) * ffn]]))
        _keep_columns(mlp.down, slice(rank * ffn, (rank + 1) * ffn), rank, group)
    model.config = dataclasses.replace(c, num_attention_heads=heads, multi_query_group_num=len(kv), ffn_hidden_size=ffn)
    return model


def _row_indices(layer: nn.Linear) -> torch.Tensor:
    """0 .. out_features - 1: split like the weight's rows, they pick rows of the weight and the bias alike."""
    return torch.arange(layer.out_features)


def _keep_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.data[rows].contiguous(), requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.data[rows].contiguous(), requires_grad=False)
    layer.out_features = len(rows)


def _keep_columns(layer: nn.Linear, columns: slice, rank: int, group) -> None:
    layer.weight = nn.Parameter(layer.weight.data[:, columns].contiguous(), requires_grad=False)
    layer.in_features = layer.weight.shape[1]
    if layer.bias is not None and rank != 0:  # the sum of the ranks' outputs adds it once
        layer.bias = nn.Parameter(torch.zeros_like(layer.bias), requires_grad=False)
    layer.register_forward_hook(lambda module, inputs, output: _summed(output, group))


def _summed(output: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(output, group=group)
    return output
