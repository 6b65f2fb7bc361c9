"""Tensor parallelism (glmchat.parallel) on the CPU with gloo: N processes, each holding its shard,
give the logits (to float tolerance) and the greedy tokens of one process holding the whole model."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glmchat.export import save_quantized
from glmchat.generate import generate_tokens
from glmchat.testing import make_tiny_checkpoint
from glmchat.loader import load_model
from glmchat.parallel import ShardingError, check_shardable, kv_heads_of_rank, shard

NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(ckpt, ids: list[int], random_weights: bool = False, quantize=None) -> tuple[torch.Tensor, list[int]]:
    model = load_model(ckpt, dtype="float32", progress=False, random_weights=random_weights, **_quantized(quantize))[0]
    with torch.inference_mode():
        return model(torch.tensor([ids])), list(generate_tokens(model, ids, max_new_tokens=NEW))


def _quantized(quantize: str | None) -> dict:
    return {"quantize": quantize, "group_size": 32} if quantize else {}


def _rank(rank: int, world: int, port: int, ckpt, how: str, ids: list[int], results: dict, quantize=None) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if how in ("load", "random"):  # the loader reads (draws) only the rank's share
            model = load_model(ckpt, dtype="float32", progress=False, shard=(rank, world),
                               random_weights=how == "random", **_quantized(quantize))[0]
        else:  # a whole model split afterwards
            model = shard(load_model(ckpt, dtype="float32", progress=False, **_quantized(quantize))[0], rank, world)
        with torch.inference_mode():
            logits = model(torch.tensor([ids]))
            tokens = list(generate_tokens(model, ids, max_new_tokens=NEW))
        results[rank] = (logits.clone(), tokens, model.config.num_kv_heads, model.layers[0].attn.qkv.out_features)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def int4_shardable_ckpt(tmp_path_factory, tiny_tokenizer_model):
    """Heads of 64 channels and 128 MLP units per rank: every share of 2 ranks is whole int4 row blocks."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("int4_tp"), hidden_size=128, kv_channels=64,
                                ffn_hidden_size=256, tokenizer_model=tiny_tokenizer_model)


@pytest.fixture(scope="module")
def int8_saved_ckpt(tmp_path_factory, tiny_ckpt):
    """A checkpoint saved quantized by `glmchat quantize`: its codes and scales are split as stored."""
    return save_quantized(tiny_ckpt, tmp_path_factory.mktemp("int8_saved"), "int8", dtype=torch.float32, progress=False)


@pytest.mark.parametrize("fixture, world, how, quantize", [
    ("tiny_ckpt", 2, "load", None), ("tiny_ckpt", 4, "load", None), ("glm4_hf_ckpt", 2, "load", None),
    ("glm4_ckpt", 2, "shard", None), ("tiny_ckpt", 2, "random", None),
    ("tiny_ckpt", 2, "load", "int8"), ("tiny_ckpt", 4, "shard", "int8"), ("tiny_ckpt", 2, "random", "int8"),
    ("int8_saved_ckpt", 2, "load", None), ("int4_shardable_ckpt", 2, "load", "int4"),
    ("int4_shardable_ckpt", 2, "random", "int4"), ("int4_shardable_ckpt", 2, "shard", "int4"),
    ("chatglm6b_ckpt", 2, "load", None), ("chatglm6b_ckpt", 4, "shard", "int8"),
])
def test_sharded_ranks_give_the_whole_models_logits_and_tokens(request, fixture, world, how, quantize):
    """Quantized: the ranks hold the one-process model's quantization, split, so its logits too."""
    ckpt = request.getfixturevalue(fixture)
    ids = list(range(5, 40, 3))
    marks = json.loads((Path(ckpt) / "config.json").read_text())
    if "gmask_token_id" in marks:  # ChatGLM-6B: a prompt of plain ids, ending in [gMASK] <sop>
        ids = list(range(12, 48, 3)) + [marks["gmask_token_id"], marks["bos_token_id"]]
    expected_logits, expected_tokens = _run(ckpt, ids, random_weights=how == "random", quantize=quantize)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, _free_port(), ckpt, how, ids, results, quantize), nprocs=world, join=True)
        results = dict(results)
    assert sorted(results) == list(range(world))
    config = load_model(ckpt, dtype="float32", progress=False)[0].config
    for rank, (logits, tokens, kv_heads, qkv_rows) in results.items():
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert tokens == expected_tokens
        heads = config.num_attention_heads // world
        assert kv_heads == max(1, config.num_kv_heads // world)  # replicated when ranks outnumber groups
        assert qkv_rows == (heads + 2 * kv_heads) * config.head_dim  # only the rank's share is held


def _load_refused(rank: int, world: int, port: int, ckpts: list, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        load_model(ckpts[rank], dtype="float32", progress=False, shard=(rank, world))
        results[rank] = "loaded"
    except ShardingError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_ranks_given_different_checkpoints_all_refuse_to_load(tiny_ckpt, tiny_ckpt_b):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_load_refused, args=(2, _free_port(), [tiny_ckpt, tiny_ckpt_b], results), nprocs=2, join=True)
        results = dict(results)
    assert results[0] == results[1] and "rank 1's config" in results[0] and "same --model" in results[0]


def test_kv_heads_replicate_when_ranks_outnumber_groups():
    assert [kv_heads_of_rank(32, 2, r, 2) for r in range(2)] == [[0], [1]]
    assert [kv_heads_of_rank(32, 2, r, 4) for r in range(4)] == [[0], [0], [1], [1]]
    assert [kv_heads_of_rank(4, 2, r, 1) for r in range(1)] == [[0, 1]]


def test_ranks_that_do_not_divide_the_model_are_refused(tiny_ckpt, int4_shardable_ckpt):
    config = load_model(tiny_ckpt, dtype="float32", progress=False)[0].config
    with pytest.raises(ShardingError, match="do not divide the 4 attention heads"):
        check_shardable(config, 3)
    with pytest.raises(ShardingError, match="blocks of 64"):  # a rank's 2 query heads of 16 rows cut a block
        load_model(tiny_ckpt, dtype="float32", quantize="int4", group_size=32, progress=False, shard=(0, 2))
    with pytest.raises(ShardingError, match="--group-size"):  # 64 attention outputs per rank, groups of 128
        load_model(int4_shardable_ckpt, dtype="float32", quantize="int4", group_size=128, progress=False, shard=(0, 4))


def test_glmchat_run_under_torchrun_answers_as_one_process(tiny_ckpt, tmp_path):
    """`torchrun --nproc-per-node 2 -m glmchat run --tp 2 ...`: one answer (rank 0's), the one process's."""
    import os
    import subprocess
    import sys

    common = ["--model", str(tiny_ckpt), "--device", "cpu", "--dtype", "float32", "--greedy",
              "--max-new-tokens", "12", "你好"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = subprocess.run([sys.executable, "-m", "glmchat", "run", *common], capture_output=True, text=True,
                         env=env, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "glmchat", "run", "--tp", "2", *common],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    wrong = subprocess.run([sys.executable, "-m", "glmchat", "run", "--tp", "2", *common], capture_output=True,
                           text=True, env=env, timeout=120)
    assert wrong.returncode == 1 and "torchrun --nproc-per-node 2" in wrong.stderr and "Traceback" not in wrong.stderr
    bench = [str(tiny_ckpt), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6", "--json"]
    one = subprocess.run([sys.executable, "-m", "glmchat", "bench", "--model", *bench], capture_output=True,
                         text=True, env=env, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "glmchat", "bench", "--tp", "2", "--model", *bench],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    counts = [[(p["prompt_tokens"], p["generated_tokens"]) for p in json.loads(run.stdout)["prompts"]] for run in (one, two)]
    assert counts[0] == counts[1] and len(counts[0]) == 8  # one report (rank 0's), the same workload


def test_glmchat_serve_under_torchrun_answers_concurrent_clients_as_one_process(tiny_ckpt, tmp_path):
    """`torchrun --nproc-per-node 2 -m glmchat serve --tp 2`: rank 0 serves, rank 1 follows its engine's
    steps; concurrent clients (batched decode steps, prefix-cache hits, chunked prefill, a cancelled
    stream) get one process's greedy answers, and SIGTERM stops both ranks cleanly."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import openai

    from glmchat.families.chatglm3 import ChatGLM3, ChatGLMTokenizer
    from glmchat.server import BackgroundServer, build_app

    long = "你好，请介绍一下你自己。Tell me about yourself. " * 12  # > 2 prefill chunks (blocks) of 128 tokens
    questions = ["你好", "Hello, who are you?", long, "What is 2+2?", "你好"]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "glmchat", "serve", "--tp", "2", "--model", str(tiny_ckpt), "--device", "cpu", "--dtype", "float32",
         "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: a failure below kills the ranks too

    def answers(url: str) -> list[str]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(text):
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                   max_tokens=12, temperature=0)
            return reply.choices[0].message.content

        with client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story"}],
                                            max_tokens=200, temperature=0, stream=True) as stream:
            next(iter(stream))  # a stream left after its first chunk: cancelled mid-way
        with ThreadPoolExecutor(len(questions)) as pool:
            replies = list(pool.map(ask, questions))
        return replies + [ask(long)]  # its first blocks now come from the prefix cache

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        together = answers(url)
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)  # torchrun passes it on, and then reports it (exit status 1)
        server.wait(timeout=120)
        # Rank 1 ignores the signal and leaves when rank 0's engine says stop: long before torchrun
        # would kill it (30 s).
        assert time.monotonic() - start < 20
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its process group is left (nothing, if all went well)
        server.wait()
    log = server.stderr.read()
    assert "Finished server process" in log and "glmchat/" not in log  # rank 0 shut down gracefully, no error
    model = load_model(tiny_ckpt, dtype="float32", progress=False)[0]
    with BackgroundServer(build_app(model, ChatGLMTokenizer.from_pretrained(tiny_ckpt), ChatGLM3(), model_id="m")) as one:
        assert together == answers(one.url)
    assert all(together)
