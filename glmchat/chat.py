"""The native API: `glmchat.load(path_or_id).chat(messages)` / `.stream(messages)`.

A conversation is a list of messages `{"role", "content"}` (see glmchat.families.base); the
model's family decides the prompt, the stop ids and how the reply reads. Generation goes through
glmchat.generate's core.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .device import default_dtype, pick_device
from .families import Family
from .families.base import has_tools
from .families.chatglm3 import ChatGLM3, ChatGLMTokenizer
from .generate import SamplingConfig, TextStream, generate_tokens, stream_generate, vocab_limit
from .hub import DEFAULT_MODEL
from .loader import load_checkpoint
from .model import GLMTransformer, KVCache


# ---------------------------------------------------------------------------------------------
# The native API


@dataclass
class Reply:
    """A whole answer: its text, tool call, history entries, token counts and timing."""

    text: str  # the plain-text answer (what the stream showed)
    tool_call: dict | None  # when the answer ends in a tool call (see Family.parse_reply)
    messages: list[dict]  # assistant entries to append to the conversation
    finish_reason: str  # "stop": the model ended it; "length": max_new_tokens or the context ran out
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the stop token included
    time_to_first_token: float  # seconds from the call to the first token (mostly the prompt's prefill)
    seconds: float  # the whole answer
    reasoning: str | None = None  # a reasoning model's thinking before the answer (GLM-Z1), else None

    @property
    def tokens_per_second(self) -> float:
        """Generation speed after the first token (the prefill is in time_to_first_token)."""
        decode_seconds = self.seconds - self.time_to_first_token
        if self.completion_tokens > 1 and decode_seconds > 0:
            return (self.completion_tokens - 1) / decode_seconds
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Chunk:
    """A piece of a streamed answer; the last one carries the whole Reply."""

    text: str
    reply: Reply | None = None
    reasoning: str = ""  # what a reasoning model's thinking added (GLM-Z1; shown before its answer)


class ChatModel:
    """A loaded model and its tokenizer: `chat(messages)` and `stream(messages)`.

    Successive calls reuse the KV cache for the prompt's prefix that the previous call already
    computed (in a chat, everything but the new turn). Not thread-safe: one call at a time.
    """

    def __init__(self, model: GLMTransformer, tokenizer, family: Family, *, load_seconds: float = 0.0,
                 source: str = "", random_weights: bool = False, standin_tokenizer: bool = False, processors=(),
                 raw_config: dict | None = None):
        self.model = model
        self.raw_config = dict(raw_config or {})  # the checkpoint's config.json, every key
        self.tokenizer = tokenizer
        self.family = family  # decides the prompt format, the stop tokens and how replies read
        self.load_seconds = load_seconds
        self.source = source
        self.random_weights = random_weights
        self.standin_tokenizer = standin_tokenizer  # random weights without the model's own tokenizer
        self.processors = list(processors)
        self._cache: KVCache | None = None
        self._cache_ids: list[int] = []  # the ids whose keys/values the cache holds, in order
        self._cache_valid = 0  # how many of them are complete

    def __repr__(self) -> str:
        return f"ChatModel({self.source!r}, {self.family.label}, device={self.device}, dtype={self.dtype})"

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def chat(self, messages: list[dict], **options) -> Reply:
        """The answer to `messages` (ending with a user or observation message). See `stream`."""
        for chunk in self.stream(messages, **options):
            if chunk.reply is not None:
                return chunk.reply
        raise AssertionError("stream ended without a reply")

    def stream(self, messages: list[dict], *, max_new_tokens: int | None = None, greedy: bool = False,
               **sampling) -> Iterator[Chunk]:
        """Chunks of the answer's text as it is generated; the last chunk carries the Reply.

        Joined, the chunks' texts equal reply.text (and their reasoning reply.reasoning). Sampling
        options (temperature, top_p, top_k, repetition_penalty, seed) default to the reference
        chat's (`SamplingConfig`); greedy=True (or temperature=0) picks the most likely token.
        max_new_tokens None: until the model stops or the context is full.
        """
        options = SamplingConfig(greedy=greedy, **sampling)
        prompt = self.family.prompt_ids(self.tokenizer, messages)
        text = TextStream(self.tokenizer, self.family.visible_text, stop_ids=self.family.stop_ids(self.tokenizer),
                          reasoning=self.family.reasoning_rule)
        max_new = self.model.config.seq_length if max_new_tokens is None else max_new_tokens
        cache, reused = self._prefix_cache(prompt, len(prompt) + max_new)
        self._cache_ids, self._cache_valid = list(prompt), reused
        for record in stream_generate(self.model, text, prompt, max_new_tokens=max_new, sampling=options,
                                      cache=cache, cached=reused, processors=self.processors):
            if record.token is not None:  # the cache now holds everything before this token
                self._cache_valid = len(self._cache_ids)
                self._cache_ids.append(record.token)
            if record.finish_reason is None:
                if record.text or record.reasoning:
                    yield Chunk(record.text, reasoning=record.reasoning)
                continue
            parsed = self.family.parse_reply(text.text, has_tools(messages))
            reply = Reply(parsed.text, parsed.tool_call, parsed.messages, record.finish_reason, len(prompt),
                          record.generation_tokens, record.time_to_first_token, record.elapsed,
                          self.family.reasoning(text.text))
            yield Chunk(record.text, reply, record.reasoning)

    def generate_ids(self, prompt_ids: list[int], *, max_new_tokens: int, sampling: SamplingConfig | None = None,
                     stop_ids=None, processors=(), cache: KVCache | None = None) -> Iterator[int]:
        """Generated token ids after prompt_ids (or after what `cache` holds), the stop token included.

        Defaults: greedy, stopping at the family's stop ids."""
        stop_ids = self.family.stop_ids(self.tokenizer) if stop_ids is None else stop_ids
        return generate_tokens(self.model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                               sampling=sampling, cache=cache, processors=[*self.processors, *processors])

    def _prefix_cache(self, prompt: list[int], needed: int) -> tuple[KVCache, int]:
        """The kept cache, cut to its longest prefix shared with prompt (at least one token left to run);
        nothing of it where a prompt's keys depend on its end (ChatGLM-6B)."""
        held = self._cache_ids[:self._cache_valid] if self._cache is not None and self.model.prompt_is_causal else []
        n = 0
        for a, b in zip(held, prompt[:-1]):
            if a != b:
                break
            n += 1
        needed = min(needed, self.model.config.seq_length)
        if self._cache is None or self._cache.max_len < needed:
            self._cache = resized_cache(self.model, self._cache, n, needed)
        self._cache.length = n
        return self._cache, n


def resized_cache(model: GLMTransformer, cache: KVCache | None, length: int, capacity: int) -> KVCache:
    """A new cache of `capacity` slots holding the first `length` slots of `cache`."""
    new = model.new_cache(cache.k.shape[1] if cache is not None else 1, capacity)
    if cache is not None and length:
        new.k[:, :, :, :length] = cache.k[:, :, :, :length]
        new.v[:, :, :, :length] = cache.v[:, :, :, :length]
        if cache.key_mask is not None:
            new.key_mask = cache.key_mask[:, :length].clone()
        new.prompt_marks = cache.prompt_marks
    new.length = length
    return new


# ---------------------------------------------------------------------------------------------
# Loading


def load(path_or_id: str = DEFAULT_MODEL, *, device: str | torch.device = "auto", dtype="auto",
         random_weights: bool = False, quantize: str | None = None, group_size: int = 128,
         progress: bool = True, compile: bool = False, shard: tuple[int, int] | None = None) -> ChatModel:
    """Load a checkpoint of the GLM family (a local directory or a Hugging Face id) and its tokenizer.

    The family (ChatGLM-6B, ChatGLM2/3, GLM-4 and their variants; chat or base) is recognised from
    the checkpoint's own files.

    device: "auto" (CUDA/ROCm, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps".
    dtype: "auto" (see `default_dtype`), None for the checkpoint's stored dtype, or a name/torch dtype.
    random_weights: the real architecture with random weights, for trying things out and measuring
    speed without the download; the text is meaningless. Without a tokenizer at hand (no local
    directory, hub unreachable) a small stand-in tokenizer is used and sampling is kept to its ids.
    quantize: "int8" or "int4" (group_size 32/64/128) weight-only quantization while loading.
    compile: torch.compile the decode step (see `GLMTransformer.compile_decode`; does not pay on CPU).
    """
    start = time.perf_counter()
    device = pick_device(device)
    dtype = default_dtype(device) if dtype == "auto" else dtype
    loaded = load_checkpoint(path_or_id, device=device, dtype=dtype, random_weights=random_weights, shard=shard,
                             quantize=quantize, group_size=group_size, progress=progress)
    model, tokenizer, family = loaded.model, loaded.tokenizer, loaded.family
    processors, standin = [], tokenizer is None
    if standin:  # random weights, no tokenizer at hand: the model's name, the stand-in's ChatGLM3 format
        tokenizer, family = standin_tokenizer(), ChatGLM3(label=family.label)
        processors.append(vocab_limit(tokenizer.vocab_size))
        # Its [gMASK] and sop are the ones that place ChatGLM-6B's 2D positions.
        model.config.gmask_token_id = tokenizer.get_command("[gMASK]")
        model.config.bos_token_id = tokenizer.get_command("sop")
    if compile:
        model.compile_decode()
    return ChatModel(model, tokenizer, family, load_seconds=time.perf_counter() - start,
                     source=os.fspath(path_or_id), random_weights=random_weights, standin_tokenizer=standin,
                     processors=processors, raw_config=loaded.raw_config)


def standin_tokenizer() -> ChatGLMTokenizer:
    """A small bilingual SentencePiece tokenizer shipped with the package (glmchat/data)."""
    return ChatGLMTokenizer.from_pretrained(Path(__file__).parent / "data" / "standin-tokenizer.model")
