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
    if config.network != "glm":
        raise ShardingError("tensor parallelism covers the GLM network (ChatGLM2/3, GLM-4); the original "
                            "ChatGLM-6B runs on one device")
    if config.num_attention_heads % world:
        raise ShardingError(f"{world} ranks do not divide the {config.num_attention_heads} attention heads; "
                            "use a divisor of it")
    groups = config.num_kv_heads
    if (world <= groups and groups % world) or (world > groups and world % groups):
        raise ShardingError(f"{world} ranks and {groups} KV groups: one must divide the other")
    if config.ffn_hidden_size % world:
        raise ShardingError(f"{world} ranks do not divide the MLP's {config.ffn_hidden_size} hidden units")


class ShardPlan:
    """Which part of each whole tensor a rank keeps, by state-dict name (norms, embedding and output: all)."""

    def __init__(self, config, rank: int, world: int):
        check_shardable(config, world)
        self.rank, self.world = rank, world
        d, heads = config.head_dim, config.num_attention_heads
        self.heads = heads // world
        self.kv = kv_heads_of_rank(heads, config.num_kv_heads, rank, world)
        self.ffn = config.ffn_hidden_size // world
        q_rows = torch.arange(rank * self.heads * d, (rank + 1) * self.heads * d)
        kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in self.kv])
        offset = heads * d
        self.qkv_rows = torch.cat([q_rows, offset + kv_rows, offset + config.num_kv_heads * d + kv_rows])
        units = torch.arange(rank * self.ffn, (rank + 1) * self.ffn)
        self.gate_up_rows = torch.cat([units, config.ffn_hidden_size + units])
        self.dense_columns = slice(rank * self.heads * d, (rank + 1) * self.heads * d)
        self.down_columns = slice(rank * self.ffn, (rank + 1) * self.ffn)
        self.config = dataclasses.replace(config, num_attention_heads=self.heads, multi_query_group_num=len(self.kv),
                                          ffn_hidden_size=self.ffn)  # the shapes a rank's model has

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's part of the whole tensor `name` (from a checkpoint file or a whole model)."""
        kind = name.split(".")[-2:]  # e.g. ["qkv", "weight"]
        if kind[0] == "qkv":
            return tensor[self.qkv_rows]
        if kind[0] == "gate_up":
            return tensor[self.gate_up_rows]
        if kind == ["dense", "weight"] or kind == ["down", "weight"]:
            columns = self.dense_columns if kind[0] == "dense" else self.down_columns
            return tensor[:, columns]
        if kind[1] == "bias" and kind[0] in ("dense", "down") and self.rank != 0:
            return torch.zeros_like(tensor)  # the sum of the ranks' outputs adds it once
        return tensor


def shard(model: GLMTransformer, rank: int, world: int, group=None) -> GLMTransformer:
    """Keep rank's share of a whole `model` (in place) and sum the split products across the group."""
    _check_float(model)
    plan = ShardPlan(model.config, rank, world)
    for name, param in model.named_parameters():
        part = plan(name, param.data)
        if part is not param.data:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(module, name.rsplit(".", 1)[1], nn.Parameter(part.contiguous(), requires_grad=False))
    return connect(model, plan, group)


def connect(model: GLMTransformer, plan: ShardPlan, group=None) -> GLMTransformer:
    """Make a model holding plan's shares (see `shard`, or a loader that read only them) run as one:
    its layers' head counts and sizes, and an all_reduce after each split product."""
    for block in model.layers:
        block.attn.n_heads, block.attn.n_kv_heads = plan.heads, len(plan.kv)
        for layer in (block.attn.qkv, block.mlp.gate_up):
            layer.out_features = layer.weight.shape[0]
        for layer in (block.attn.dense, block.mlp.down):
            layer.in_features = layer.weight.shape[1]
            layer.register_forward_hook(lambda module, inputs, output: _summed(output, group))
    model.config = plan.config
    return model


def _check_float(model: GLMTransformer) -> None:
    layers = [m for b in model.layers for m in (b.attn.qkv, b.attn.dense, b.mlp.gate_up, b.mlp.down)]
    if any(not isinstance(m, nn.Linear) for m in layers):
        raise ShardingError("tensor parallelism takes bfloat16/float16/float32 weights; load without --quantize")


def _summed(output: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(output, group=group)
    return output
