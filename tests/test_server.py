"""The server: batching engine against plain generation, then the real HTTP server through `openai`."""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from glmchat.families.chatglm3 import TOOLS_PROMPT, ChatGLM3, ChatGLMTokenizer, format_tool_call, parse_tool_call
from glmchat.families.chatglm3 import chatglm3_prompt_ids as build_prompt_ids
from glmchat.generate import generate_tokens, prefill_chunks, prefill_together
from glmchat.kernels import prompts_keep_rows_apart
from glmchat.model import PromptPieces
from glmchat.loader import load_model
from glmchat.server import BackgroundServer, build_app
from glmchat.server.engine import Engine, SlotCache
from glmchat.server.prefix_cache import PrefixCache
from teaching import teach
from glmchat.generate import TextStream
from glmchat.server.protocol import ChatRequest, reply_tool_calls, to_glm_messages

CONTEXT = 4096  # tiny_ckpt_4k's: long enough for a tools prompt and for a generation we can interrupt
TEXTS = [
    "Hello", "你好，请介绍一下你自己", "Implement binary search in Python", "What is 2+2?",
    "解释自然语言处理领域的最近发展。", "Tell me a story about a dragon and a knight", "谢谢", "Why is the sky blue? 😀",
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
CALL = '```python\ntool_call(city="Paris")\n```'
OBSERVATION = '{"temperature": 22}'
ANSWER = "It is 22 degrees in Paris."


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_ckpt_4k):
    return load_model(tiny_ckpt_4k, dtype=torch.float32, progress=False)[0]


@pytest.fixture(scope="module")
def tok(tiny_ckpt_4k):
    return ChatGLMTokenizer.from_pretrained(tiny_ckpt_4k)


@pytest.fixture(scope="module")
def server(model, tok):
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny-chatglm3")) as s:
        yield s


def client(url, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def expected(model, tok, messages, max_tokens, processors=()):
    """(content, prompt tokens, completion tokens, finish reason) of plain greedy generation."""
    prompt = build_prompt_ids(tok, messages)
    ids = list(generate_tokens(model, prompt, max_new_tokens=max_tokens, processors=processors, stop_ids=tok.stop_token_ids))
    stopped = ids[-1] in tok.stop_token_ids
    text = tok.decode(ids[:-1] if stopped else ids)
    content = "\n\n".join(s.strip() for s in text.split("<|assistant|>") if s.strip())
    return content, len(prompt), len(ids), "stop" if stopped else "length"


def banning(ids):
    """A processor that gives `ids` the lowest finite score (what a logit bias of -100 means)."""
    ids = torch.tensor(list(ids))
    return lambda seen, scores: scores.index_fill(-1, ids, torch.finfo(scores.dtype).min)


def collect(q: queue.Queue) -> tuple[list[int], str]:
    tokens = []
    while True:
        event = q.get(timeout=30)
        if event.token is not None:
            tokens.append(event.token)
        if event.finish_reason:
            return tokens, event.finish_reason


# ---- the engine ----------------------------------------------------------------------------

@functools.cache
def tiny_model(path, dtype: str, quantize: str | None = None):
    return load_model(path, dtype=dtype, progress=False, quantize=quantize, group_size=32)[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_slot_cache_decode_steps_are_batch_invariant(tiny_ckpt_4k, tok, dtype):
    """Batch invariance: a row's decode-step logits are bit for bit the same alone or among others,
    in any slot, whatever the other rows' lengths (and with a separate KV cache of its own)."""
    model = tiny_model(tiny_ckpt_4k, dtype)
    prompts = [tok.encode(t) for t in TEXTS[:6]]

    def decode(order: list[int], steps: int = 3) -> dict[int, list[torch.Tensor]]:
        slots, tokens, out = SlotCache(model, rows=8, capacity=8), [], {i: [] for i in order}
        for i in order:
            cache = model.new_cache(1, len(prompts[i]))
            tokens.append(int(model(torch.tensor([prompts[i]]), cache=cache, last_only=True)[0, -1].argmax()))
            slots.add(cache)
        for _ in range(steps):
            logits = model(torch.tensor(tokens)[:, None], cache=slots)[:, -1]
            for row, i in enumerate(order):
                out[i].append(logits[row])
            tokens = logits.float().argmax(-1).tolist()
        return out

    with torch.inference_mode():
        together, reversed_slots = decode(list(range(6))), decode(list(range(5, -1, -1)))
        for i, prompt in enumerate(prompts):
            alone = decode([i])[i]
            assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(alone, together[i], reversed_slots[i]))
            cache = model.new_cache(1, len(prompt) + 1)
            first = int(model(torch.tensor([prompt]), cache=cache)[0, -1].argmax())
            assert torch.equal(model(torch.tensor([[first]]), cache=cache)[0, -1], together[i][0])


# ---- the prefix cache ----------------------------------------------------------------------------

DOCUMENT = " ".join(TEXTS) * 6  # a long message: its prompt spans several 128-token blocks


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_prefill_after_a_cached_prefix_equals_prefill_from_scratch(tiny_ckpt_4k, tok, dtype):
    """Chunked at block boundaries, a prompt's prefill is the same computation whether the cache held
    a prefix of it or not: the same last logits and KV, bit for bit (caches of other sizes too)."""
    model = tiny_model(tiny_ckpt_4k, dtype)
    prompt = build_prompt_ids(tok, user(DOCUMENT))
    assert len(prompt) > 300
    pieces = []  # (first position, tokens) of every forward pass: the chunks actually run
    hook = model.register_forward_pre_hook(lambda m, args, kw: pieces.append((kw["cache"].length, args[0].shape[1])),
                                           with_kwargs=True)
    try:
        with torch.inference_mode():
            whole = model.new_cache(1, len(prompt))
            *_, logits = prefill_chunks(model, torch.tensor([prompt]), whole, 16)
            chunks, pieces[:] = list(pieces), []
            assert all(start % 16 == 0 for start, _ in chunks) and sum(n for _, n in chunks) == len(prompt)
            for hit in (16, 64, 160, (len(prompt) - 1) // 16 * 16):
                cache = model.new_cache(1, len(prompt) + hit)
                cache.append(whole.k[:, :, :, :hit].clone(), whole.v[:, :, :, :hit].clone())
                assert torch.equal([*prefill_chunks(model, torch.tensor([prompt[hit:]]), cache, 16)][-1], logits), hit
                assert pieces == [c for c in chunks if c[0] >= hit]  # the same chunks as from scratch
                pieces.clear()
                assert torch.equal(cache.k[:, :, :, : len(prompt)], whole.k) and torch.equal(cache.v[:, :, :, : len(prompt)], whole.v)
    finally:
        hook.remove()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_prompts_prefilled_together_get_the_bits_they_get_alone(tiny_ckpt_4k, tok, quantize):
    """Pieces of several prompts in one forward pass (PromptPieces), one of them after a prefix its
    cache already holds: each gets the logits and KV of its forward pass alone, bit for bit, where
    every product keeps rows apart (the int8/int4 C kernels; not bf16's PyTorch products)."""
    model = tiny_model(tiny_ckpt_4k, "bfloat16", quantize)
    assert prompts_keep_rows_apart(model) and not prompts_keep_rows_apart(tiny_model(tiny_ckpt_4k, "bfloat16"))
    prompts = [build_prompt_ids(tok, user(t)) for t in TEXTS[:5]] + [build_prompt_ids(tok, user(DOCUMENT))]
    done = {len(prompts) - 1: 128}  # the long prompt's cache holds a block already

    def cache_for(i):
        cache = model.new_cache(1, len(prompts[i]))
        if i in done:
            model(torch.tensor([prompts[i][: done[i]]]), cache=cache)
        return cache

    with torch.inference_mode():
        alone = []
        for i, prompt in enumerate(prompts):
            cache = cache_for(i)
            alone.append((model(torch.tensor([prompt[done.get(i, 0) :]]), cache=cache, last_only=True)[0, -1], cache))
        caches = [cache_for(i) for i in range(len(prompts))]
        pieces = [(torch.tensor([prompt[done.get(i, 0) :]]), cache) for i, (prompt, cache) in enumerate(zip(prompts, caches))]
        passes = []
        hook = model.register_forward_pre_hook(lambda m, args, kw: passes.append(type(kw["cache"])), with_kwargs=True)
        try:
            together = prefill_together(model, pieces)
        finally:
            hook.remove()
    assert passes == [PromptPieces]
    for i, ((logits, cache), shared) in enumerate(zip(alone, caches)):
        assert torch.equal(together[i], logits), i
        assert shared.length == cache.length == len(prompts[i])
        assert torch.equal(shared.k, cache.k) and torch.equal(shared.v, cache.v), i


def answers(engine: Engine, prompts: list[list[int]], max_new_tokens: int, stop_ids) -> list[list[int]]:
    """The engine's greedy answers to prompts all waiting before its thread starts."""
    queues = [queue.Queue() for _ in prompts]
    for prompt, q in zip(prompts, queues):
        engine.submit(prompt, max_new_tokens=max_new_tokens, emit=q.put, stop_ids=stop_ids)
    engine.start()
    try:
        return [collect(q)[0] for q in queues]
    finally:
        engine.stop()


def test_engine_prefills_waiting_prompts_together(tiny_ckpt_4k, tok):
    """With int4 kernels the engine prefills prompts that wait at the same time in shared forward
    passes, and each answer is still the one it gets alone; a prompt that begins with the same block
    as one being prefilled waits, and takes that block from the prefix cache."""
    model = tiny_model(tiny_ckpt_4k, "bfloat16", "int4")
    prompts = [build_prompt_ids(tok, user(t)) for t in TEXTS[:5]]
    prompts += [build_prompt_ids(tok, user(DOCUMENT + question)) for question in ("Summarize.", "Translate it.")]
    shared = []  # pieces per forward pass that prefilled several prompts
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: shared.append(len(kw["cache"].lengths)) if isinstance(kw["cache"], PromptPieces) else None,
        with_kwargs=True)
    together = Engine(model, max_batch=8)
    try:
        got = answers(together, prompts, 12, tok.stop_token_ids)
    finally:
        hook.remove()
    assert shared and max(shared) >= 3, shared
    assert together.prefix.hit_tokens >= 128  # the second document prompt reused the first's blocks
    alone = [answers(Engine(model, max_batch=1, cache_bytes=0), [prompt], 12, tok.stop_token_ids)[0] for prompt in prompts]
    assert got == alone
    assert alone[:5] == [list(generate_tokens(model, p, max_new_tokens=12, stop_ids=tok.stop_token_ids)) for p in prompts[:5]]


def test_prefix_cache_chains_blocks_and_evicts_the_least_recent_ends():
    kv = torch.zeros(1, 1, 64, 2)  # [layers, kv heads, positions, head dim]
    block_bytes = 2 * 4 * 2 * 4
    cache = PrefixCache(max_bytes=3 * block_bytes, block=4)
    a, b = list(range(12)), list(range(100, 108))
    cache.store(a, kv, kv)
    assert len(cache) == 3 and cache.bytes == 3 * block_bytes
    assert len(cache.match(a + [7])) == 3 and len(cache.match(a)) == 2  # the last token is always computed
    assert cache.match([99] + a[1:] + [7]) == []  # a block counts only after the same blocks before it
    assert len(cache.match(a[:4] + b)) == 1
    cache.store(b, kv, kv)  # over budget: a's last two blocks go (a chain's end before its start)
    assert len(cache) == 3 and cache.bytes == 3 * block_bytes
    assert len(cache.match(a + [7])) == 1 and len(cache.match(b + [7])) == 2
    assert PrefixCache(max_bytes=0).store(a, kv, kv) is None and len(PrefixCache(0)) == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_prefix_cache_hits_answer_as_a_cold_engine_does(tiny_ckpt_4k, tok, dtype):
    """A conversation resent turn after turn, several at once: the warm engine takes the earlier turns'
    prompts from its prefix cache and answers exactly what an engine without a cache answers."""
    model = tiny_model(tiny_ckpt_4k, dtype)
    warm = Engine(model, max_batch=4, prefill_chunk=32).start()
    cold = Engine(model, max_batch=4, prefill_chunk=32, cache_bytes=0).start()
    try:
        conversations = [[{"role": "system", "content": DOCUMENT}, {"role": "user", "content": TEXTS[i]}] for i in range(3)]
        at_least = 0  # tokens the warm engine must take from its cache: the earlier turns' full blocks
        for turn in range(3):
            answers = {}
            for name, engine in (("warm", warm), ("cold", cold)):
                queues = [queue.Queue() for _ in conversations]
                for messages, q in zip(conversations, queues):
                    engine.submit(build_prompt_ids(tok, messages), max_new_tokens=12, emit=q.put,
                                  stop_ids=tok.stop_token_ids)
                answers[name] = [collect(q)[0] for q in queues]
            assert answers["warm"] == answers["cold"]
            for messages, tokens in zip(conversations, answers["warm"]):
                at_least += len(build_prompt_ids(tok, messages)) // 32 * 32 if turn < 2 else 0
                messages += [{"role": "assistant", "content": tok.decode(tokens[:-1])}, {"role": "user", "content": "继续"}]
        assert warm.prefix.hit_tokens >= at_least > 0
        assert cold.prefix.hit_tokens == 0 and len(cold.prefix) == 0
    finally:
        warm.stop()
        cold.stop()


def test_server_prefix_cache_gives_the_answers_of_a_server_without(tiny_ckpt_4k, tok):
    """The official client resends a growing conversation: with the prefix cache (the default) the
    server answers every turn exactly as a server started with --cache-gb 0, and says in /health how
    much of the prompts it served from the cache."""
    model = tiny_model(tiny_ckpt_4k, "bfloat16")
    answers = {}
    for cache_gb in (2.0, 0.0):
        with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", cache_gb=cache_gb)) as s:
            messages, answers[cache_gb] = [{"role": "system", "content": DOCUMENT}], []
            for turn in range(4):
                messages.append({"role": "user", "content": f"{TEXTS[turn]} {DOCUMENT[: 40 * turn]}"})
                r = client(s.url).chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=20)
                answers[cache_gb].append(r.choices[0].message.content)
                messages.append({"role": "assistant", "content": r.choices[0].message.content})
            stats = httpx.get(s.url + "/health").json()["prefix_cache"]
        if cache_gb:
            assert stats["blocks"] > 4 and stats["hit_tokens"] >= 3 * 128, stats
        else:
            assert stats["blocks"] == stats["hit_tokens"] == 0, stats
    assert answers[2.0] == answers[0.0]


def test_engine_prefills_a_long_prompt_between_decode_steps(tiny_ckpt_4k, tok):
    """A long prompt that arrives while another request decodes is prefilled a chunk at a time with
    decode steps in between (the running request keeps getting tokens), and both answers are what
    each gets alone."""
    model = tiny_model(tiny_ckpt_4k, "bfloat16")
    engine = Engine(model, max_batch=4, prefill_chunk=16, cache_bytes=0).start()
    try:
        short, long = build_prompt_ids(tok, user(TEXTS[2])), build_prompt_ids(tok, user(DOCUMENT))
        chunks = -(-len(long) // 16)
        solo = {}
        for name, prompt in (("short", short), ("long", long)):
            q = queue.Queue()
            engine.submit(prompt, max_new_tokens=chunks + 20, emit=q.put, logit_bias=never_stop_ids(tok))
            solo[name] = collect(q)[0]
        events = queue.Queue()
        engine.submit(short, max_new_tokens=chunks + 20, emit=lambda e: events.put(("short", e)),
                      logit_bias=never_stop_ids(tok))
        while events.get(timeout=30)[1].token is None:
            pass
        engine.submit(long, max_new_tokens=chunks + 20, emit=lambda e: events.put(("long", e)),
                      logit_bias=never_stop_ids(tok))
        order, tokens = [], {"short": [solo["short"][0]], "long": []}
        while len(order) < 2 * (chunks + 20) - 1:
            name, event = events.get(timeout=30)
            if event.token is not None:
                order.append(name)
                tokens[name].append(event.token)
        assert tokens == solo
        during = order[: order.index("long")].count("short")
        assert during >= chunks - 2, (during, chunks)  # a decode step after (about) every chunk
    finally:
        engine.stop()


def test_fixed_rows_keep_answers_batch_invariant_without_row_apart_kernels(tiny_ckpt_4k, tok):
    """Where the products are not kept row-apart (GPU libraries choose kernels by the number of rows;
    here: the portable classes, PyTorch's own products) every decode step runs all slot rows, free
    ones as padding, always the same shape: concurrent answers stay those of each request alone."""
    from glmchat.kernels import install, keeps_rows_apart

    model = tiny_model(tiny_ckpt_4k, "float32")
    assert keeps_rows_apart(model)
    install(model, enabled=False)
    try:
        assert not keeps_rows_apart(model)
        engine = Engine(model, max_batch=8, cache_bytes=0)
        assert engine.cache.fixed_rows
        engine.start()
        prompts, lengths = [tok.encode(t) for t in TEXTS[:6]], (9, 30, 14, 22, 5, 17)

        def answers(together: bool) -> list[list[int]]:
            queues = [queue.Queue() for _ in prompts]
            out = []
            for prompt, n, q in zip(prompts, lengths, queues):
                engine.submit(prompt, max_new_tokens=n, emit=q.put, logit_bias=never_stop_ids(tok))
                if not together:
                    out.append(collect(q)[0])
            return [collect(q)[0] for q in queues] if together else out

        alone, together = answers(False), answers(True)
        assert together == alone and [len(a) for a in alone] == list(lengths)
        assert engine.peak_batch >= 4
        engine.stop()
    finally:
        install(model)


def test_server_answers_the_same_with_prompts_prefilled_in_chunks_or_whole(tiny_ckpt_4k, tok):
    """The official client against a server prefilling in 16-token chunks between decode steps and one
    prefilling every prompt whole: a long prompt and a short one asked together get the same answers."""
    model = tiny_model(tiny_ckpt_4k, "bfloat16")
    answers = {}
    for chunk in (16, model.config.seq_length):
        with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", prefill_chunk=chunk, cache_gb=0)) as s:
            def ask(text):
                r = client(s.url).chat.completions.create(model="x", messages=user(text), temperature=0,
                                                          max_tokens=40, logit_bias=never_stop(tok))
                return r.choices[0].message.content

            with ThreadPoolExecutor(2) as pool:
                answers[chunk] = list(pool.map(ask, [TEXTS[5], DOCUMENT]))
    assert answers[16] == answers[model.config.seq_length]


def test_engine_batched_greedy_equals_generation_alone(model, tok):
    engine = Engine(model, max_batch=3).start()  # fewer slots than requests: they join and leave
    try:
        prompts = [tok.encode(t) for t in TEXTS]
        lengths = [12, 30, 7, 25, 18, 30, 3, 22]
        queues = [queue.Queue() for _ in prompts]
        for prompt, n, q in zip(prompts, lengths, queues):
            engine.submit(prompt, max_new_tokens=n, emit=q.put, stop_ids=tok.stop_token_ids)
        for prompt, n, q in zip(prompts, lengths, queues):
            tokens, finish = collect(q)
            assert tokens == list(generate_tokens(model, prompt, max_new_tokens=n, stop_ids=tok.stop_token_ids))
            assert finish == ("stop" if tokens[-1] in tok.stop_token_ids else "length")
        assert engine.peak_batch == 3
    finally:
        engine.stop()


def test_engine_vocab_limit_is_the_processor(model, tok):
    engine = Engine(model, max_batch=4, vocab_limit=300).start()
    try:
        prompts = [tok.encode(t) for t in TEXTS[:4]]
        assert any(max(generate_tokens(model, p, max_new_tokens=25)) >= 300 for p in prompts)  # the limit matters
        queues = [queue.Queue() for _ in prompts]
        for prompt, q in zip(prompts, queues):
            engine.submit(prompt, max_new_tokens=25, emit=q.put)
        for prompt, q in zip(prompts, queues):
            tokens = collect(q)[0]
            assert max(tokens) < 300
            ban = banning(range(300, model.config.padded_vocab_size))
            assert tokens == list(generate_tokens(model, prompt, max_new_tokens=25, processors=[ban]))
    finally:
        engine.stop()


def test_engine_failing_request_leaves_others_alone(model, tok):
    engine = Engine(model, max_batch=4).start()
    try:
        good, bad, later = queue.Queue(), queue.Queue(), queue.Queue()
        prompt = tok.encode(TEXTS[0])
        engine.submit(prompt, max_new_tokens=20, emit=good.put)
        engine.submit([model.config.padded_vocab_size + 5], max_new_tokens=20, emit=bad.put)  # no such embedding
        engine.submit(prompt, max_new_tokens=20, emit=later.put)
        assert bad.get(timeout=30).error
        reference = list(generate_tokens(model, prompt, max_new_tokens=20))
        assert collect(good)[0] == reference and collect(later)[0] == reference
    finally:
        engine.stop()


def test_engine_cancel_frees_the_slot(model, tok):
    engine = Engine(model, max_batch=2).start()
    try:
        q = queue.Queue()
        request = engine.submit(tok.encode(TEXTS[1]), max_new_tokens=3000, emit=q.put)
        assert q.get(timeout=30).token is not None
        request.cancel()
        tokens, finish = collect(q)
        assert finish == "cancelled" and len(tokens) < 2999
        assert engine.running == 0 and engine.cache.active == 0
    finally:
        engine.stop()


# ---- OpenAI <-> ChatGLM3 -------------------------------------------------------------------

def test_openai_messages_become_chatglm3_turns():
    request = ChatRequest.model_validate({"tools": TOOLS, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": OBSERVATION},
    ]})
    assert to_glm_messages(request, ChatGLM3()) == [
        {"role": "system", "content": TOOLS_PROMPT, "tools": [TOOLS[0]["function"]]},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": CALL},
        {"role": "observation", "content": OBSERVATION},
    ]


def test_tool_call_text_round_trips_through_the_safe_parser():
    arguments = {"city": "北京", "days": 3, "metric": True, "note": None, "tags": ["a", "b\"c\n"],
                 "where": {"lat": 39.9, "lon": -116.4}}
    assert parse_tool_call(format_tool_call(arguments)) == arguments


def feed(text: TextStream, ids: list[int]) -> list[str]:
    """Stream ids into a reply's text the way the engine does; returns the deltas shown."""
    deltas = []
    for i, token in enumerate(ids):
        deltas.append(text.add(token))
        if text.stopped:
            break
    deltas.append(text.finish())
    return [d for d in deltas if d]


def server_text(tok, tools: bool, stop_ids=(), stop_strings=()) -> TextStream:
    return TextStream(tok, functools.partial(ChatGLM3().visible_text, tool_calls=tools), stop_ids, stop_strings)


def test_streamed_reply_never_shows_half_a_character(tok):
    text = "\n 你好 🙂👍 ça va? [[训练时间]] ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) / 2  # byte-fallback pieces: many characters take several ids
    deltas = feed(server_text(tok, False, tok.stop_token_ids), ids)
    assert len(deltas) > 3 and not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text.strip().replace("[[训练时间]]", "2023年")


def test_reply_cuts_at_a_stop_string_and_reads_tool_calls(tok):
    ids = tok.encode("one two STOP three", add_special_tokens=False)
    text = server_text(tok, False, stop_strings=["STOP"])
    assert "".join(feed(text, ids)) == "one two" and text.stopped

    ids = tok.encode("I will look it up.", add_special_tokens=False) + [tok.get_command("<|assistant|>")]
    ids += tok.encode("get_weather\n" + CALL, add_special_tokens=False)
    text = server_text(tok, True)
    assert "".join(feed(text, ids)) == "I will look it up."
    [call], unread = reply_tool_calls(ChatGLM3(), text.text)
    assert call["function"]["name"] == "get_weather" and unread == ""
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert reply_tool_calls(ChatGLM3(), "get_weather\n```python\nnot a call\n```") == (
        [], "get_weather\n```python\nnot a call\n```")


def test_stop_strings_are_matched_in_the_visible_text_not_in_special_token_names(tok):
    """`<|assistant|>` separates segments (shown as a blank line): stop="a" must not cut inside it."""
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.get_command("<|assistant|>")]
    ids += tok.encode("\nyes, a dog", add_special_tokens=False)
    whole = "".join(feed(server_text(tok, False), ids))
    assert whole == "Hi\n\nyes, a dog"
    for stops, shown in ((["a", "e"], "Hi\n\ny"), (["a"], "Hi\n\nyes,"), (["|"], whole), (["<"], whole), (["dog"], "Hi\n\nyes, a"),
                         ([", a"], "Hi\n\nyes")):
        text = server_text(tok, False, stop_strings=stops)
        deltas = "".join(feed(text, ids))
        assert deltas == shown and whole.startswith(deltas) and "<|" not in deltas
        assert text.stopped == (shown != whole)
        assert text.text == (shown if text.stopped else tok.decode(ids))  # cut: the visible text, no call to read


# ---- the HTTP server -------------------------------------------------------------------------

def test_models_and_health(server):
    assert [m.id for m in client(server.url).models.list()] == ["tiny-chatglm3"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-chatglm3"


@pytest.mark.parametrize("text", TEXTS[:3])
def test_completion_is_plain_greedy_generation(server, model, tok, text):
    content, prompt_tokens, completion_tokens, finish = expected(model, tok, user(text), 40)
    r = client(server.url).chat.completions.create(model="x", messages=user(text), temperature=0, max_tokens=40)
    assert r.choices[0].message.content == content
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert r.usage.total_tokens == prompt_tokens + completion_tokens


def test_streaming_gives_the_same_reply(server, model, tok):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, *user(TEXTS[1])]
    content, prompt_tokens, completion_tokens, finish = expected(model, tok, messages, 60)
    stream = client(server.url).chat.completions.create(
        model="x", messages=messages, temperature=0, max_tokens=60, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, completion_tokens)

    body = {"messages": messages, "temperature": 0, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_string_cuts_the_reply(server, model, tok):
    full, *_ = expected(model, tok, user(TEXTS[2]), 60)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client(server.url).chat.completions.create(
        model="x", messages=user(TEXTS[2]), temperature=0, max_tokens=60, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)].strip()
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 60


@pytest.mark.parametrize("text", TEXTS[:4])
def test_greedy_answer_with_stop_strings_is_a_prefix_of_the_one_without(server, text):
    def answer(**kw):
        r = client(server.url).chat.completions.create(model="x", messages=user(text), temperature=0, max_tokens=60, **kw)
        return r.choices[0].message.content
    full = answer()
    for stop in (["a", "e"], ["<", "|"], ["\n"], [" "], ["o", "t", "。", "，"]):
        cut = answer(stop=stop)
        assert full.startswith(cut) and not any(s in cut for s in stop) and "<|" not in cut, (stop, cut, full)


def test_seeded_sampling_repeats(server):
    def sample():
        r = client(server.url).chat.completions.create(
            model="x", messages=user(TEXTS[0]), temperature=1.0, top_p=0.9, seed=1234, max_tokens=30)
        return r.choices[0].message.content

    assert sample() == sample()


@pytest.mark.parametrize("dtype,clients", [("bfloat16", 8), ("bfloat16", 16), ("float16", 8), ("float32", 8)])
def test_concurrent_clients_get_what_they_get_alone(tiny_ckpt_4k, tok, dtype, clients):
    """Greedy answers do not depend on what else is in the batch, in the default dtype (bfloat16 on
    the CPU) as in the others."""
    model = tiny_model(tiny_ckpt_4k, dtype)
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", max_batch=8)) as s:
        def ask(i):
            r = client(s.url).chat.completions.create(model="x", messages=user(TEXTS[i % len(TEXTS)] + " " * (i // 8)),
                                                      temperature=0, max_tokens=60 + 5 * (i % 8),
                                                      logit_bias=never_stop(tok) if i % 2 else None)
            return r.choices[0].message.content, r.usage.completion_tokens

        alone = [ask(i) for i in range(clients)]
        with ThreadPoolExecutor(clients) as pool:
            together = list(pool.map(ask, range(clients)))
        assert together == alone
        assert httpx.get(s.url + "/health").json()["peak_batch"] >= 4  # they really shared decode steps


def never_stop_ids(tok) -> dict[int, float]:
    return {i: -100 for i in tok.stop_token_ids}


def never_stop(tok) -> dict:
    """A logit_bias that bans the stop tokens, so a generation runs to max_tokens."""
    return {str(i): -100 for i in tok.stop_token_ids}


def test_logit_bias(server, model, tok):
    c = client(server.url)
    r = c.chat.completions.create(model="x", messages=user(TEXTS[0]), temperature=0, max_tokens=60, logit_bias=never_stop(tok))
    assert r.choices[0].message.content == expected(model, tok, user(TEXTS[0]), 60, [banning(tok.stop_token_ids)])[0]
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"

    token = tok.encode("天", add_special_tokens=False)[-1]
    r = c.chat.completions.create(model="x", messages=user(TEXTS[0]), temperature=0, max_tokens=5, logit_bias={str(token): 100})
    assert r.choices[0].message.content == tok.decode([token] * 5).strip()


def test_disconnected_client_stops_its_generation(server, tok):
    steps = lambda: httpx.get(server.url + "/health").json()
    before = steps()["steps"]
    body = {"messages": user(TEXTS[5]), "temperature": 0, "max_tokens": 3000, "stream": True, "logit_bias": never_stop(tok)}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)]
    deadline = time.monotonic() + 10
    while steps()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert steps()["running"] == 0
    assert steps()["steps"] - before < 2999  # stopped long before max_tokens


def test_disconnect_stops_a_non_streaming_request_too(server, tok):
    before = httpx.get(server.url + "/health").json()["steps"]
    body = {"messages": user(TEXTS[5]), "temperature": 0, "max_tokens": 4000, "logit_bias": never_stop(tok)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.2)
    deadline = time.monotonic() + 10
    while (health := httpx.get(server.url + "/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health["running"] == 0 and health["steps"] - before < 3999


# ---- tools: a tiny model taught one tool-call exchange --------------------------------------

@pytest.fixture(scope="module")
def tool_server(tiny_ckpt_4k, tok):
    """A server whose model calls get_weather(city="Paris"), then reports the observation."""
    sp = lambda text: tok.encode(text, add_special_tokens=False)
    system = {"role": "system", "content": TOOLS_PROMPT, "tools": [TOOLS[0]["function"]]}  # the spec's format
    ask = user("What is the weather in Paris?")
    called = [system, *ask, {"role": "assistant", "metadata": "get_weather", "content": CALL},
              {"role": "observation", "content": OBSERVATION}]
    examples = [
        (build_prompt_ids(tok, [system, *ask]), sp("get_weather\n") + sp(CALL) + [tok.get_command("<|observation|>")]),
        (build_prompt_ids(tok, called), sp("\n") + sp(ANSWER) + [tok.eos_token_id]),
    ]
    model = teach(load_model(tiny_ckpt_4k, dtype=torch.float32, progress=False)[0], examples)
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny-tools")) as s:
        yield s


def test_tool_call_round_trip(tool_server):
    c = client(tool_server.url)
    messages = user("What is the weather in Paris?")
    r = c.chat.completions.create(model="x", messages=messages, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(c.chat.completions.create(model="x", messages=messages, tools=TOOLS, temperature=0, stream=True))
    [streamed] = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert (streamed.function.name, json.loads(streamed.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    messages += [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": OBSERVATION}]
    r = c.chat.completions.create(model="x", messages=messages, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"


def test_langchain_chat_openai_works_against_the_server(server, tool_server):
    """LangChain's ChatOpenAI (langchain-openai) as users wire it: invoke, stream, and bind_tools with a
    tool round trip."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    def llm(url, **kw):
        return ChatOpenAI(base_url=url + "/v1", api_key="unused", model="tiny", temperature=0, max_retries=0, **kw)

    reply = llm(server.url, max_tokens=12).invoke("你好")
    direct = client(server.url).chat.completions.create(model="x", messages=user("你好"), temperature=0, max_tokens=12)
    assert reply.content == direct.choices[0].message.content
    assert "".join(chunk.content for chunk in llm(server.url, max_tokens=12).stream("你好")) == reply.content

    with_tools = llm(tool_server.url).bind_tools(TOOLS)
    messages = [HumanMessage("What is the weather in Paris?")]
    call = with_tools.invoke(messages)
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "Paris"})]
    messages += [call, ToolMessage(OBSERVATION, tool_call_id=call.tool_calls[0]["id"])]
    assert with_tools.invoke(messages).content == ANSWER


# ---- the rest of the API: n, logprobs, penalties, text completions ----------------------------------


def test_n_choices(server, model, tok):
    c = client(server.url)
    r = c.chat.completions.create(model="x", messages=user(TEXTS[2]), temperature=0, max_tokens=12, n=3,
                                  logit_bias=never_stop(tok))
    content = expected(model, tok, user(TEXTS[2]), 12, [banning(tok.stop_token_ids)])[0]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and {ch.message.content for ch in r.choices} == {content}
    assert r.usage.prompt_tokens == len(build_prompt_ids(tok, user(TEXTS[2]))) and r.usage.completion_tokens == 36

    def sampled(**kw):
        return c.chat.completions.create(model="x", messages=user(TEXTS[5]), temperature=1.5, seed=7, max_tokens=15,
                                         n=4, **kw)
    first = [ch.message.content for ch in sampled().choices]
    assert [ch.message.content for ch in sampled().choices] == first and len(set(first)) > 1  # seed, seed + 1, ...
    chunks = list(sampled(stream=True, stream_options={"include_usage": True}))
    streamed = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
                for i in range(4)}
    assert [streamed[i] for i in range(4)] == first
    assert sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason) == [0, 1, 2, 3]
    assert chunks[-1].usage.completion_tokens == 60


def test_logprobs_are_the_models(server, model, tok):
    """Each token's log-probability and its top alternatives, against log_softmax of a full forward pass."""
    r = client(server.url).chat.completions.create(model="x", messages=user(TEXTS[1]), temperature=0, max_tokens=8,
                                                   logprobs=True, top_logprobs=3, logit_bias=never_stop(tok))
    entries = r.choices[0].logprobs.content
    prompt = build_prompt_ids(tok, user(TEXTS[1]))
    ids = list(generate_tokens(model, prompt, max_new_tokens=8, processors=[banning(tok.stop_token_ids)]))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1].float()
    logits[:, tok.stop_token_ids] = torch.finfo(torch.float32).min
    expect = torch.log_softmax(logits, dim=-1)
    assert len(entries) == 8
    for k, (entry, token) in enumerate(zip(entries, ids)):
        assert entry.token == tok.decode([token]) and entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - float(expect[k, token])) < 1e-4
        top = torch.topk(expect[k], 3)
        assert [a.token for a in entry.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the most likely one
    stream = client(server.url).chat.completions.create(model="x", messages=user(TEXTS[1]), temperature=0, max_tokens=8,
                                                        logprobs=True, logit_bias=never_stop(tok), stream=True)
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert r.choices[0].logprobs is not None and client(server.url).chat.completions.create(
        model="x", messages=HI, max_tokens=2).choices[0].logprobs is None


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.0, 0.0), (-0.5, 0.5)])
def test_presence_and_frequency_penalties(server, model, tok, presence, frequency):
    """OpenAI's penalties: each id generated before loses presence once and frequency per time."""
    def penalties(seen, scores):
        generated = seen[:, len(prompt):]
        counts = torch.zeros_like(scores).scatter_add_(-1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - presence * (counts > 0) - frequency * counts

    prompt = build_prompt_ids(tok, user(TEXTS[3]))
    ids = list(generate_tokens(model, prompt, max_new_tokens=30, processors=[banning(tok.stop_token_ids), penalties]))
    r = client(server.url).chat.completions.create(model="x", messages=user(TEXTS[3]), temperature=0, max_tokens=30,
                                                   presence_penalty=presence, frequency_penalty=frequency,
                                                   logit_bias=never_stop(tok))
    assert r.choices[0].message.content == expected(model, tok, user(TEXTS[3]), 30, [banning(tok.stop_token_ids), penalties])[0]
    assert ids != list(generate_tokens(model, prompt, max_new_tokens=30, processors=[banning(tok.stop_token_ids)]))


def test_text_completions(server, model, tok):
    """/v1/completions: the raw prompt after [gMASK] sop (the reference tokenizer's), no chat template."""
    c = client(server.url)
    prompt = "The capital of France is"
    ids = list(generate_tokens(model, tok.encode(prompt), max_new_tokens=10, stop_ids=tok.stop_token_ids))
    stopped = ids[-1] in tok.stop_token_ids
    r = c.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].text == tok.decode(ids[:-1] if stopped else ids)
    assert r.choices[0].finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == len(ids)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) - stopped
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="x", prompt=prompt, max_tokens=10,
                                                                          temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text
    by_ids = c.completions.create(model="x", prompt=tok.encode(prompt), max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text and c.completions.create(
        model="x", prompt=[prompt], max_tokens=10, temperature=0).choices[0].text == r.choices[0].text
    assert c.completions.create(model="x", prompt=prompt, temperature=0).usage.completion_tokens <= 16  # OpenAI's default
    for bad, param in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                       ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [10**9]}, "prompt"), ({"logprobs": 6}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**{"model": "x", "prompt": prompt, **bad})
        assert e.value.param == param


def test_text_completions_serve_a_base_model(chatglm3_base_ckpt):
    """A base model has no chat template: chat completions are a 400, text completions work."""
    base = tiny_model(chatglm3_base_ckpt, "float32")
    tok = ChatGLMTokenizer.from_pretrained(chatglm3_base_ckpt)
    from glmchat.loader import read_config

    family = read_config(chatglm3_base_ckpt)[1]
    with BackgroundServer(build_app(base, tok, family, model_id="base")) as s:
        with pytest.raises(openai.BadRequestError, match="base model"):
            client(s.url).chat.completions.create(model="x", messages=HI, max_tokens=4)
        r = client(s.url).completions.create(model="x", prompt="Once upon a time", max_tokens=12, temperature=0)
    ids = list(generate_tokens(base, tok.encode("Once upon a time"), max_new_tokens=12, stop_ids=[tok.eos_token_id]))
    assert r.choices[0].text == tok.decode(ids[:-1] if ids[-1] == tok.eos_token_id else ids)


# ---- limits and bad input --------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, param", [
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "top_p": 2}, "top_p"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "n": 17}, "n"),
    ({"messages": HI, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [*HI, {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    # the fuzz run's 500s and silently accepted values (issue item 6)
    ({"messages": [{"role": "user", "content": "\ud800 x \udfff"}]}, "messages[0].content"),
    ({"messages": HI, "seed": 1180591620717411303424}, "seed"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"messages": HI, "max_tokens": True}, "max_tokens"),
    ({"messages": HI, "temperature": True}, "temperature"),
    ({"messages": HI, "n": True}, "n"),
    ({"messages": HI, "seed": True}, "seed"),
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": HI, "top_k": "a"}, "top_k"),
    ({"messages": HI, "top_k": -1}, "top_k"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [*HI, {"role": "assistant"}]}, "messages[1].content"),
    ({"messages": HI, "presence_penalty": 2.5}, "presence_penalty"),
    ({"messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": HI, "stop": ["\udfff"]}, "stop[0]"),
])
def test_bad_fields_are_named(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body),  # ASCII, surrogates escaped
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param)


@pytest.mark.parametrize("body", ['{"messages": [', "[1, 2]", "not json at all"])
def test_malformed_json_is_a_400(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


NAN, INF = float("nan"), float("inf")
WRONG = {  # per kind of field: values of the wrong type, non-finite numbers, lone surrogates
    "number": [True, False, "a", "1", [], {}, NAN, INF, -INF],
    "int": [True, False, "a", "1", 1.5, [], {}, NAN, INF, -INF],
    "bool": ["yes", "true", 1, 0, 1.5, [], {}, NAN],
    "text": [5, 1.5, True, {}, NAN, "\ud800 x \udfff"],
    "mapping": [5, 1.5, True, "a", [], NAN],
}
FIELDS = {  # field path -> (kind, more values of the right type that are still wrong)
    "temperature": ("number", [-0.1, 2.5, 1e308 * 10]), "top_p": ("number", [0, 1.01, -1]),
    "presence_penalty": ("number", [2.5]), "frequency_penalty": ("number", [-2.1]),
    "max_tokens": ("int", [0, -5, 10**30]), "max_completion_tokens": ("int", [0, 10**30]),
    "top_k": ("int", [-1]), "n": ("int", [0, 17]), "seed": ("int", [2**63, -(2**63) - 1, 1180591620717411303424]),
    "top_logprobs": ("int", [-1, 21]),
    "stream": ("bool", []), "logprobs": ("bool", []), "stream_options.include_usage": ("bool", []),
    "model": ("text", [[]]), "stop": ("text", [[5], [""], "", ["a"] * 5, ["\udfff"], {"a": 1}]),
    "messages[0].content": ("text", [[{"type": "image_url", "image_url": {"url": "x"}}], [{"type": "text"}]]),
    "messages[0].role": ("text", ["robot", ""]), "tools[0].function.name": ("text", ["", []]),
    "tool_choice": ("text", ["required", {"type": "function"}]),
    "logit_bias": ("mapping", [{"a": 1}, {"1": "a"}, {"1": True}, {"1": NAN}, {"1": 1000}, {"-1": 1}, {"99999999": 1}]),
    "messages": ("text", [[], [5], [{}], [{"role": "user"}], [{"role": "tool"}], [{"role": "assistant"}], None]),
    "tools": ("text", [[5], [{"type": "function"}], [{"type": "x", "function": {"name": "f"}}]]),
    "response_format": ("text", [{"type": "json_object"}]), "functions": ("text", [[{"name": "f"}]]),
}
VALID = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
         "stream_options": {"include_usage": False}, "tools": [{"type": "function", "function": {"name": "f"}}]}


def _set(body: dict, path: str, value) -> dict:
    body = json.loads(json.dumps(body))
    *parents, last = path.replace("[0]", ".0").split(".")
    node = body
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return body


def fuzzed_bodies() -> list[tuple[bytes, str | None]]:
    """(raw body, the param the 400 must name, or None for a body that is not an object at all)."""
    cases = []
    for path, (kind, more) in FIELDS.items():
        for value in WRONG[kind] + more:
            if value is None and path != "messages":
                continue
            body = _set(VALID, path, value)
            if path.startswith("stream_options"):
                body["stream"] = True
            param = "messages" if value == 10**30 else path.split(".")[0].split("[")[0]  # context_length_exceeded
            cases.append((json.dumps(body).encode(), param))
    huge = json.dumps({"messages": [{"role": "user", "content": "hi " * 300_000}]}).encode()
    many = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 20_000}).encode()
    deep_tool = {"type": "object"}
    for _ in range(3000):
        deep_tool = {"properties": deep_tool}
    cases += [
        (b"\xff\xfe{\"messages\": 1}", None), (b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', None),
        (b"[" * 100_000, None), (b'{"a":' * 100_000, None), (b"", None), (b"null", None), (b"[]", None), (b"5", None),
        (b'"hi"', None), (b"{}", "messages"), (b'{"messages": NaN}', "messages"), (b'{"messages": [' + b"[" * 5000, None),
        (huge, "messages"), (many, "messages"),
    ]
    try:
        cases.append((json.dumps({**VALID, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": deep_tool}}]}).encode(), None))
    except RecursionError:
        pass
    return cases


def test_fuzzed_bad_input_gets_a_named_400_and_changes_nothing(server):
    """≥ 200 payloads of every field's wrong type, NaN/inf, huge bodies, deep nesting, invalid
    UTF-8: each a 4xx in OpenAI's shape naming the field, and the next answer is the same."""
    normal = {"messages": [{"role": "user", "content": TEXTS[2]}], "temperature": 0, "max_tokens": 12}
    url = server.url + "/v1/chat/completions"
    cases = fuzzed_bodies()
    assert len(cases) >= 200
    with httpx.Client(timeout=30, headers={"content-type": "application/json"}) as http:
        before = http.post(url, json=normal).json()["choices"][0]["message"]["content"]
        start = time.monotonic()
        for body, param in cases:
            r = http.post(url, content=body)
            assert 400 <= r.status_code < 500, (body.decode(errors="replace")[-300:], r.status_code)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], body[:120]
            if param is not None:
                assert (error["param"] or "").startswith(param), (body[:120], error)
        assert time.monotonic() - start < 30
        assert http.post(url, json=normal).json()["choices"][0]["message"]["content"] == before
    assert client(server.url).chat.completions.create(**normal, model="x").choices[0].message.content == before


def test_openai_client_gets_bad_request_errors(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server.url).chat.completions.create(model="x", messages=HI, max_tokens=True)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client(server.url).chat.completions.create(model="x", messages=HI, response_format={"type": "json_object"})
    assert e.value.param == "response_format" and e.value.code == "unsupported_parameter"
    r = client(server.url).chat.completions.create(model="x", messages=HI, max_tokens=3, user="someone", top_p=1,
                                                   extra_body={"top_k": 1}, seed=2**63 - 1)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_prompt_longer_than_the_context_says_by_how_much(server, tok):
    messages = user("hello world " * 2000)
    n = len(build_prompt_ids(tok, messages))
    with pytest.raises(openai.BadRequestError) as e:
        client(server.url).chat.completions.create(model="x", messages=messages)
    assert e.value.code == "context_length_exceeded"
    assert f"{n} tokens, {n - CONTEXT + 1} more than fit" in e.value.message

    n = len(build_prompt_ids(tok, HI))
    with pytest.raises(openai.BadRequestError) as e:
        client(server.url).chat.completions.create(model="x", messages=HI, max_tokens=CONTEXT)
    assert f"({n} in the messages, {CONTEXT} in the completion), {n} more than fit" in e.value.message
    # still serving
    assert client(server.url).chat.completions.create(model="x", messages=HI, max_tokens=3).usage.completion_tokens


def test_demo_checkpoint_context_fits_a_tools_request(tiny_ckpt_b):
    """make_tiny_checkpoint's default context holds its own tools prompt (it once did not: 256)."""
    from glmchat.testing.tiny_chatglm import DEMO_CONTEXT

    demo = load_model(tiny_ckpt_b, dtype=torch.float32, progress=False)[0]
    assert demo.config.seq_length == DEMO_CONTEXT
    demo_tok = ChatGLMTokenizer.from_pretrained(tiny_ckpt_b)
    with BackgroundServer(build_app(demo, demo_tok, ChatGLM3(), model_id="demo")) as s:
        r = client(s.url).chat.completions.create(model="x", messages=user("What is the weather in Paris?"),
                                                  tools=TOOLS, max_tokens=256, temperature=0)
    assert r.usage.prompt_tokens > 256 and r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_top_k_is_honoured_and_bodies_over_the_limit_are_a_413(model, tok):
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", max_body_bytes=4000)) as s:
        def answer(**kw):
            return client(s.url).chat.completions.create(model="x", messages=user(TEXTS[2]), max_tokens=20, **kw)
        greedy = answer(temperature=0).choices[0].message.content
        assert answer(temperature=1.5, top_p=1, seed=7, extra_body={"top_k": 1}).choices[0].message.content == greedy
        url = s.url + "/v1/chat/completions"
        big = json.dumps({"messages": user("x" * 5000)}).encode()
        for r in (httpx.post(url, content=big, headers={"content-type": "application/json"}),
                  httpx.post(url, content=iter([big[:3000], big[3000:]]), headers={"content-type": "application/json"})):
            assert "content-length" in r.request.headers or r.request.headers["transfer-encoding"] == "chunked"
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert answer(temperature=0).choices[0].message.content == greedy


def test_api_key(model, tok):
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError):
            client(s.url, api_key="wrong").models.list()
        missing = httpx.post(s.url + "/v1/chat/completions", json={"messages": HI})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        garbage = httpx.post(s.url + "/v1/chat/completions", content="{oops", headers={"content-type": "application/json"})
        assert garbage.status_code == 401  # the key is checked before the body is read
        assert client(s.url, api_key="s3cret").chat.completions.create(model="x", messages=HI, max_tokens=2).choices
        # /health stays open as a liveness probe but tells only that; the details need the key
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        assert httpx.get(s.url + "/health", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
        full = httpx.get(s.url + "/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert full["model"] == "tiny" and "running" in full
        # the chat page is static, holds no data and asks for the key itself: open
        page = httpx.get(s.url + "/")
        assert page.status_code == 200 and 'id="api-key"' in page.text
        assert httpx.get(s.url + "/static/app.js").status_code == 200


def test_full_queue_is_a_503_not_a_backlog(model, tok):
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", max_batch=1, max_queue=1)) as s:
        long = {"messages": user(TEXTS[5]), "temperature": 0, "max_tokens": 3000, "stream": True,
                "logit_bias": never_stop(tok)}
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", s.url + "/v1/chat/completions", json=long) as first:
                first_lines = first.iter_lines()  # kept: a dropped iterator closes the connection
                next(first_lines)
                with b.stream("POST", s.url + "/v1/chat/completions", json=long) as second:
                    second_lines = second.iter_lines()
                    next(second_lines)
                    health = httpx.get(s.url + "/health").json()
                    assert (health["running"], health["queued"]) == (1, 1)
                    with pytest.raises(openai.APIStatusError) as e:
                        client(s.url).chat.completions.create(model="x", messages=HI)
                    assert e.value.status_code == 503
        r = client(s.url).chat.completions.create(model="x", messages=HI, max_tokens=3)
        assert r.choices[0].finish_reason in ("stop", "length")


# ---- operations: metrics, timeouts --------------------------------------------------------------


def _metrics(url: str, **headers) -> dict:
    """/metrics read by Prometheus' own parser: {name + labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url + "/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_count_requests_tokens_and_latencies(model, tok):
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", api_key="k3y")) as s:
        c = client(s.url, api_key="k3y")
        for i in range(3):
            c.chat.completions.create(model="x", messages=user(TEXTS[i]), temperature=0, max_tokens=5,
                                      logit_bias=never_stop(tok))
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="x", messages=user("hi"), max_tokens=0)
        assert httpx.get(s.url + "/metrics").status_code == 401  # load figures need the key
        m = _metrics(s.url, Authorization="Bearer k3y")
    prompts = sum(len(build_prompt_ids(tok, user(TEXTS[i]))) for i in range(3))
    assert m["glmchat_requests_total[status=200]"] == 3 and m["glmchat_requests_total[status=400]"] == 1
    assert m["glmchat_prompt_tokens_total"] == prompts and m["glmchat_generation_tokens_total"] == 15
    assert m["glmchat_time_to_first_token_seconds_count"] == 3 and m["glmchat_inter_token_seconds_count"] == 12
    assert m["glmchat_time_to_first_token_seconds_bucket[le=+Inf]"] == 3 and m["glmchat_time_to_first_token_seconds_sum"] > 0
    assert m["glmchat_queued_requests"] == m["glmchat_running_requests"] == 0
    assert m["glmchat_prefix_cache_prompt_tokens_total"] == prompts and 0 <= m["glmchat_prefix_cache_hit_rate"] <= 1


def test_request_timeout_is_a_504_and_frees_the_slot(model, tok):
    with BackgroundServer(build_app(model, tok, ChatGLM3(), model_id="tiny", timeout=0.3)) as s:
        c = client(s.url)
        forever = dict(model="x", messages=user(TEXTS[0]), max_tokens=4000, logit_bias=never_stop(tok))
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(**forever)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout" and "--timeout" in e.value.message
        assert time.monotonic() - start < 5
        with pytest.raises(openai.APIError, match="limit of 0.3 s"):
            list(c.chat.completions.create(stream=True, **forever))
        deadline = time.monotonic() + 5
        while httpx.get(s.url + "/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json()["running"] == 0  # the engine stopped generating them
        r = c.chat.completions.create(model="x", messages=HI, max_tokens=3)  # and the server goes on
        assert r.usage.completion_tokens >= 1


# ---- `glmchat serve` -------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _glmchat(*args, code="from glmchat.cli import main; sys.exit(main(sys.argv[1:]))", **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", f"import sys; {code}", *args], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True, **kw)


def _serve(ckpt, *options) -> tuple[subprocess.Popen, str]:
    """`glmchat serve` on a free port, once it answers /health: (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _glmchat("serve", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--port", str(port), *options)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"glmchat serve did not come up: {proc.communicate()[1]}")
        time.sleep(0.1)


def test_glmchat_serve_command(tiny_ckpt_4k):
    proc, url = _serve(tiny_ckpt_4k, "--api-key", "k3y")
    try:
        r = client(url, api_key="k3y").chat.completions.create(model="x", messages=HI, max_tokens=4)
        assert r.model == str(tiny_ckpt_4k) and r.usage.completion_tokens >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"{url}/" in stderr


def test_sigterm_stops_admitting_finishes_what_it_can_then_exits(tiny_ckpt_4k, tok):
    """SIGTERM: new connections are refused at once; a request in flight that ends within
    --shutdown-timeout gets its whole answer, one still running then is cancelled (its stream ends
    with an error event); the process exits 0."""
    proc, url = _serve(tiny_ckpt_4k, "--shutdown-timeout", "1.5")
    results, streaming = {}, {"long": threading.Event(), "short": threading.Event()}

    def ask(name: str, max_tokens: int):
        stream = client(url).chat.completions.create(model="x", messages=user(TEXTS[1]), max_tokens=max_tokens,
                                                     logit_bias=never_stop(tok), stream=True)
        chunks = results[name] = []
        try:
            for chunk in stream:
                chunks.append(chunk)
                streaming[name].set()
        except openai.APIError as e:
            results[name] = e

    try:
        threads = {name: threading.Thread(target=ask, args=(name, n)) for name, n in (("long", 4000), ("short", 200))}
        threads["long"].start()
        assert streaming["long"].wait(30)
        threads["short"].start()
        assert streaming["short"].wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        for thread in threads.values():
            thread.join(30)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    short = results["short"]
    assert not isinstance(short, Exception) and short[-1].choices[0].finish_reason == "length"
    assert isinstance(results["long"], openai.APIError) and "shutting down" in str(results["long"])


def test_serve_without_fastapi_says_what_to_install(tiny_ckpt_4k):
    code = "sys.modules['fastapi'] = None; from glmchat.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = _glmchat("serve", "--model", str(tiny_ckpt_4k), code=code)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "pip install 'glmchat[server]'" in stderr and "Traceback" not in stderr
