"""Tensor parallelism over torch.distributed, by explicit sharding (the approach of gpt-fast's tp.py).

Each of N ranks keeps its share of every attention layer's query heads and of every MLP's hidden
units: the fused qkv projection is split into q, k and v, and each rank keeps the rows of its query
heads and of the KV heads they read; the fused gate|up projection is split into its halves, each
sharded by rows. The attention output projection and the MLP's down projection are then sharded by
columns (their inputs), and their partial outputs are summed across ranks with one all_reduce each.
ChatGLM3 and GLM-4 have only 2 KV groups, so with more ranks than groups each rank keeps a copy of
the one KV head its query heads read. Embedding, norms and output layer stay whole on every rank.
The original ChatGLM-6B (glmchat.model_v1) splits alike: its fused projection holds each head's
[q | k | v] rows together, so a rank keeps its heads' rows; its ungated MLP splits by units.

Quantized layers shard the same way: the whole weight is quantized first and each rank keeps its
share of the codes and scales (int8: per-row scales follow the rows, a column split keeps them all;
int4: codes packed in blocks of 64 rows split by whole blocks, group scales by whole groups), so the
ranks together hold exactly the one-process model's quantization. Checkpoints saved quantized split
alike.

Run every rank through the same steps (`torchrun`); the backend is torch.distributed's: gloo on
the CPU, nccl on GPUs (RCCL on AMD). The model then runs as before, its KV cache holding only the
rank's KV heads.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from . import kernels
from .model import GLMTransformer
from .quantize import INT4_ROW_BLOCK, QuantizedLinear, int4_supported


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


def check_same_checkpoint(description: dict, group=None) -> None:
    """Refuse, on every rank, a group whose ranks would load different checkpoints (config.json,
    weight files, dtype, quantization): their shares would not fit together. `description` is this
    rank's; a no-op outside an initialized torch.distributed group."""
    if not dist.is_initialized():
        return
    descriptions = [None] * dist.get_world_size(group)
    dist.all_gather_object(descriptions, description, group=group)
    for rank, other in enumerate(descriptions):
        if other != descriptions[0]:
            differ = sorted(key for key in set(other) | set(descriptions[0]) if other.get(key) != descriptions[0].get(key))
            raise ShardingError(f"the ranks disagree on the checkpoint: rank {rank}'s {', '.join(differ)} differ from "
                                "rank 0's; give every rank the same --model (the same files) and options")


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
        units = torch.arange(rank * self.ffn, (rank + 1) * self.ffn)
        if config.network == "chatglm-6b":  # every head's [q | k | v] rows together; the MLP's up, ungated
            self.rows = {"qkv": torch.arange(rank * self.heads * 3 * d, (rank + 1) * self.heads * 3 * d), "up": units}
        else:
            self.rows = {"qkv": torch.cat([q_rows, offset + kv_rows, offset + config.num_kv_heads * d + kv_rows]),
                         "gate_up": torch.cat([units, config.ffn_hidden_size + units])}
        self.columns = {"dense": slice(rank * self.heads * d, (rank + 1) * self.heads * d),
                        "down": slice(rank * self.ffn, (rank + 1) * self.ffn)}
        self.whole_inputs = {"dense": heads * d, "down": config.ffn_hidden_size}
        self.config = dataclasses.replace(config, num_attention_heads=self.heads, multi_query_group_num=len(self.kv),
                                          ffn_hidden_size=self.ffn)  # the shapes a rank's model has

    def check_int4(self, whole_config, group_size: int) -> None:
        """Refuse an int4 split where a layer the whole model packs would stay 16-bit in a rank's
        share (the ranks would then not hold the one-process model's quantization)."""
        c, share = whole_config, self.config
        shapes = {"qkv": ((c.qkv_size, c.hidden_size), (share.qkv_size, c.hidden_size)),
                  "gate_up": ((2 * c.ffn_hidden_size, c.hidden_size), (2 * share.ffn_hidden_size, c.hidden_size)),
                  "dense": ((c.hidden_size, self.whole_inputs["dense"]), (c.hidden_size, share.num_attention_heads * c.head_dim)),
                  "down": ((c.hidden_size, c.ffn_hidden_size), (c.hidden_size, share.ffn_hidden_size))}
        for layer, (whole, part) in shapes.items():
            if int4_supported(*whole, group_size) and not int4_supported(*part, group_size):
                what = (f"rows in blocks of {INT4_ROW_BLOCK}" if part[0] % INT4_ROW_BLOCK else
                        f"inputs in groups of {group_size}; use a smaller --group-size or int8")
                raise ShardingError(f"int4 keeps {what}, and {self.world} ranks' shares of the {layer} layer "
                                    f"({part[0]}×{part[1]} each) do not hold whole ones")

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's part of the whole tensor `name` (from a checkpoint file or a whole model): a
        weight or bias, or a quantized layer's codes and scales."""
        layer, kind = name.split(".")[-2:] if "." in name else ("", "")
        if layer in self.rows:
            return _rows_of(tensor, kind, self.rows[layer])
        if layer in self.columns:
            return _columns_of(tensor, kind, self.columns[layer], self.whole_inputs[layer], self.rank)
        return tensor


def _rows_of(t: torch.Tensor, kind: str, rows: torch.Tensor) -> torch.Tensor:
    if kind == "scales_zeros":  # int4: [K / group, N, 2]
        return t[:, rows]
    if kind == "qweight" and t.dtype == torch.uint8:  # int4 codes: [N / 64, K, 32] bytes
        blocks = rows.view(-1, INT4_ROW_BLOCK) if len(rows) % INT4_ROW_BLOCK == 0 else None
        if blocks is None or not torch.equal(blocks, blocks[:, :1] + torch.arange(INT4_ROW_BLOCK)) \
                or bool((blocks[:, 0] % INT4_ROW_BLOCK).any()):
            raise ShardingError(f"int4 keeps rows in blocks of {INT4_ROW_BLOCK}, and a rank's share here cuts "
                                "through one; use int8, or another number of ranks")
        K = t.shape[1] * 2
        return t.view(-1, K, INT4_ROW_BLOCK // 2)[blocks[:, 0] // INT4_ROW_BLOCK].reshape(len(rows), K // 2)
    return t[rows]  # weight, bias, int8 codes and scales


def _columns_of(t: torch.Tensor, kind: str, columns: slice, whole_inputs: int, rank: int) -> torch.Tensor:
    if kind == "bias":
        return t if rank == 0 else torch.zeros_like(t)  # the sum of the ranks' outputs adds it once
    if kind == "scales":  # int8: one per output row, whatever the columns
        return t
    if kind == "scales_zeros":
        group = whole_inputs // t.shape[0]
        if columns.start % group or columns.stop % group:
            raise ShardingError(f"int4 groups of {group} inputs do not split into whole groups per rank "
                                f"({columns.stop - columns.start} inputs each); use a smaller --group-size or int8")
        return t[columns.start // group : columns.stop // group]
    if kind == "qweight" and t.dtype == torch.uint8:
        N, K = t.shape[0], t.shape[1] * 2
        return t.view(N // INT4_ROW_BLOCK, K, INT4_ROW_BLOCK // 2)[:, columns].reshape(N, (columns.stop - columns.start) // 2)
    return t[:, columns]


def set_quantized_share(layer: QuantizedLinear, name: str, weight: torch.Tensor, plan: ShardPlan) -> None:
    """Quantize the whole float `weight` of layer `name` ("layers.0.attn.qkv.weight") and keep the
    plan's share of its codes and scales: the ranks' shares are the whole layer's quantization."""
    prefix = name.removesuffix("weight")
    for buffer, whole in layer.quantized(weight).items():
        getattr(layer, buffer).copy_(plan(prefix + buffer, whole))


def shard(model: GLMTransformer, rank: int, world: int, group=None) -> GLMTransformer:
    """Keep rank's share of a whole `model` (in place) and sum the split products across the group."""
    plan = ShardPlan(model.config, rank, world)
    kernels.install(model, enabled=False)  # the portable layouts, which the plan splits
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        whole = tensor.data
        part = plan(name, whole)
        if part is not whole:
            module, attribute = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            if isinstance(tensor, nn.Parameter):
                setattr(module, attribute, nn.Parameter(part.contiguous(), requires_grad=False))
            else:
                setattr(module, attribute, part.contiguous())
    return kernels.install(connect(model, plan, group))


def connect(model: GLMTransformer, plan: ShardPlan, group=None) -> GLMTransformer:
    """Make a model holding plan's shares (see `shard`, or a loader that read only them) run as one:
    its layers' head counts and sizes, and an all_reduce after each split product."""
    for block in model.layers:
        block.attn.n_heads, block.attn.n_kv_heads = plan.heads, len(plan.kv)
        for name, layer in block.named_modules():
            kind = name.rsplit(".", 1)[-1]
            if kind in plan.rows or kind in plan.columns:
                layer.out_features, layer.in_features = _weight_shape(layer)
            if kind in plan.columns:
                layer.register_forward_hook(lambda module, inputs, output: _summed(output, group))
    model.config = plan.config
    return model


def _weight_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of the weight a float or quantized layer holds (int4: two codes per byte)."""
    if isinstance(layer, QuantizedLinear):
        return layer.qweight.shape[0], layer.qweight.shape[1] * (2 if layer.qweight.dtype == torch.uint8 else 1)
    return tuple(layer.weight.shape)


def _summed(output: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(output, group=group)
    return output
