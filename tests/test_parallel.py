"""Tensor parallelism (glmchat.parallel) on the CPU with gloo: N processes, each holding its shard,
give the logits (to float tolerance) and the greedy tokens of one process holding the whole model."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glmchat.generate import generate_tokens
from glmchat.loader import load_model
from glmchat.parallel import ShardingError, check_shardable, kv_heads_of_rank, shard

NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(ckpt, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    model = load_model(ckpt, dtype="float32", progress=False)[0]
    with torch.inference_mode():
        return model(torch.tensor([ids])), list(generate_tokens(model, ids, max_new_tokens=NEW))


def _rank(rank: int, world: int, port: int, ckpt, ids: list[int], results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = shard(load_model(ckpt, dtype="float32", progress=False)[0], rank, world)
        with torch.inference_mode():
            logits = model(torch.tensor([ids]))
            tokens = list(generate_tokens(model, ids, max_new_tokens=NEW))
        results[rank] = (logits.clone(), tokens, model.config.num_kv_heads, model.layers[0].attn.qkv.weight.shape[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fixture, world", [("tiny_ckpt", 2), ("tiny_ckpt", 4), ("glm4_ckpt", 2)])
def test_sharded_ranks_give_the_whole_models_logits_and_tokens(request, fixture, world):
    ckpt = request.getfixturevalue(fixture)
    ids = list(range(5, 40, 3))
    expected_logits, expected_tokens = _run(ckpt, ids)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, _free_port(), ckpt, ids, results), nprocs=world, join=True)
        results = dict(results)
    assert sorted(results) == list(range(world))
    config = load_model(ckpt, dtype="float32", progress=False)[0].config
    for rank, (logits, tokens, kv_heads, qkv_rows) in results.items():
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert tokens == expected_tokens
        heads = config.num_attention_heads // world
        assert kv_heads == max(1, config.num_kv_heads // world)  # replicated when ranks outnumber groups
        assert qkv_rows == (heads + 2 * kv_heads) * config.head_dim  # only the rank's share is held


def test_kv_heads_replicate_when_ranks_outnumber_groups():
    assert [kv_heads_of_rank(32, 2, r, 2) for r in range(2)] == [[0], [1]]
    assert [kv_heads_of_rank(32, 2, r, 4) for r in range(4)] == [[0], [0], [1], [1]]
    assert [kv_heads_of_rank(4, 2, r, 1) for r in range(1)] == [[0, 1]]


def test_ranks_that_do_not_divide_the_model_are_refused(tiny_ckpt):
    config = load_model(tiny_ckpt, dtype="float32", progress=False)[0].config
    with pytest.raises(ShardingError, match="do not divide the 4 attention heads"):
        check_shardable(config, 3)
    with pytest.raises(ShardingError, match="--quantize"):
        shard(load_model(tiny_ckpt, dtype="bfloat16", quantize="int8", progress=False)[0], 0, 2)
