"""Chat on top of the transformer: prompts from messages, parsing replies, and the native API.

A conversation is a list of messages `{"role", "content"}` with roles system (optionally with
"tools"), user, assistant (optionally with "metadata": a tool name) and observation (a tool's
result). The model answers after `<|assistant|>`; its reply can hold several segments separated by
`<|assistant|>`, each `metadata\\n content`, where a non-blank metadata line makes it a tool call.
See the spec's "chat and stream_chat" section.
"""

from __future__ import annotations

import ast
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .device import default_dtype, pick_device
from .families import CHATGLM3, Family, parse_json_tool_call, read_config
from .generate import SamplingConfig, generate_tokens, vocab_limit
from .loader import DEFAULT_MODEL, CheckpointError, config_and_family, load_model, resolve_checkpoint
from .model import GLMTransformer, KVCache
from .tokenizer import ROLES, TOKENIZER_FILE, ChatGLMTokenizer

ASSISTANT = "<|assistant|>"
TRAINING_TIME = "[[训练时间]]"  # a placeholder the model was trained with; shown as "2023年"


class ToolCallParseError(ValueError):
    """A tool-call segment whose code is not `tool_call(name=literal, ...)`. It is never run."""


# ---------------------------------------------------------------------------------------------
# Prompts


def build_prompt_ids(tokenizer: ChatGLMTokenizer, messages: list[dict]) -> list[int]:
    """`[gMASK] sop` + one block per message + `<|assistant|>`: the ids the model answers after.

    Same layout as the reference's `build_chat_input(query, history)`, with the query as the last
    message; a system message's "tools" are appended to its content as indented JSON.
    """
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    ids = tokenizer.get_prefix_tokens()
    for i, message in enumerate(messages):
        role, content = _check_message(message, i)
        if role == "system" and "tools" in message:
            content = content + "\n" + _tools_json(message["tools"])
        ids += tokenizer.build_single_message(role, message.get("metadata") or "", content)
    ids.append(tokenizer.get_command(ASSISTANT))
    return ids


def _check_message(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}; roles are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
    return role, content


def _tools_json(tools) -> str:
    return json.dumps(tools, indent=4, ensure_ascii=False)


def has_tools(messages: list[dict]) -> bool:
    """The reference parses tool-call parameters only when the first message is a system with tools."""
    first = messages[0] if messages else None
    return isinstance(first, dict) and first.get("role") == "system" and "tools" in first


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass
class ParsedResponse:
    content: str  # the plain-text segments, stripped, joined by a blank line; "[[训练时间]]" -> "2023年"
    tool_call: dict | None  # the last segment's tool call, exactly as the reference returns it
    messages: list[dict] = field(default_factory=list)  # one assistant history entry per segment


def split_segments(text: str) -> list[tuple[str, str]]:
    """(metadata, content) per `<|assistant|>`-separated segment; no newline: metadata is ""."""
    segments = []
    for segment in text.split(ASSISTANT):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        segments.append((metadata, content))
    return segments


def parse_response(text: str, tools_in_prompt: bool, family: Family = CHATGLM3) -> ParsedResponse:
    """The reference's post-processing of a decoded reply, with tool calls parsed safely.

    A segment whose metadata is blank is text: its history entry holds the stripped content. Any
    other segment is a tool call named by the metadata: `{"name", "parameters"}` when the prompt
    offered tools (the call is parsed: `parse_tool_call` for ChatGLM3, JSON for GLM-4), else
    `{"name", "content"}`. ChatGLM2 has no segments: its reply is the stripped text.
    """
    if family.tool_calls is None:
        content = text.strip()
        return ParsedResponse(family.show(content), None, [{"role": "assistant", "content": content}])
    parse_arguments = parse_json_tool_call if family.tool_calls == "json" else parse_tool_call
    texts, messages, tool_call = [], [], None
    for metadata, content in split_segments(text):
        if not metadata.strip():
            content = content.strip()
            messages.append({"role": "assistant", "metadata": metadata, "content": content})
            if content:
                texts.append(content)
            tool_call = None
        else:
            messages.append({"role": "assistant", "metadata": metadata, "content": content})
            name = metadata.strip()
            if tools_in_prompt:
                tool_call = {"name": name, "parameters": parse_arguments(content)}
            else:
                tool_call = {"name": name, "content": content}
    return ParsedResponse(family.show("\n\n".join(texts)), tool_call, messages)


def parse_tool_call(content: str) -> dict:
    """Keyword arguments of the `tool_call(...)` in a tool segment's content, read as literals.

    Like the reference, the content's first and last lines (the code fence) are dropped and the
    rest must be one call `tool_call(key=value, ...)`; the reference `eval`s it, here each value
    must be a Python literal (str, number, bool, None, list, tuple, dict, set). Anything else
    raises ToolCallParseError: model output is never executed.
    """
    code = "\n".join(content.split("\n")[1:-1]).lstrip(" \t")  # eval() ignores leading blanks too
    try:
        call = ast.parse(code, mode="eval").body
    except SyntaxError as e:
        raise ToolCallParseError(f"tool call is not valid Python ({e.msg}): {code!r:.200}") from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ToolCallParseError(f"expected tool_call(key=value, ...), got {code!r:.200}")
    if call.args:
        raise ToolCallParseError(f"tool_call takes keyword arguments only: {code!r:.200}")
    kwargs: dict = {}
    for keyword in call.keywords:
        try:
            value = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            shown = ast.get_source_segment(code, keyword.value) or "?"
            raise ToolCallParseError(f"tool_call argument is not a literal: {shown!r:.200}") from None
        if keyword.arg is None:  # tool_call(**{...})
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ToolCallParseError(f"tool_call(**...) needs a dict with string keys: {code!r:.200}")
            items = value.items()
        else:
            items = [(keyword.arg, value)]
        for key, item in items:
            if key in kwargs:
                raise ToolCallParseError(f"tool_call got argument {key!r} twice")
            kwargs[key] = item
    return kwargs


def visible_text(text: str, final: bool = True, family: Family = CHATGLM3) -> str:
    """The part of a reply decoded so far that a reader may see: its plain-text segments.

    Before the end (final=False) this only grows as text is added: a segment whose first line is
    not complete yet is held back (that line may name a tool), and so are trailing blanks and a
    tail that may still become "<|assistant|>" or "[[训练时间]]".
    """
    if family.tool_calls is None:  # ChatGLM2: all of it is text
        shown = family.show(text.strip())
    else:
        if not final:
            text = _without_partial(text, ASSISTANT)
        segments = split_segments(text)
        if not final and "\n" not in text.rsplit(ASSISTANT, 1)[-1]:
            segments = segments[:-1]
        shown = family.show("\n\n".join(c.strip() for m, c in segments if not m.strip() and c.strip()))
    return shown if final else _without_partial(shown, TRAINING_TIME).rstrip()


def _without_partial(text: str, marker: str) -> str:
    """text without a tail that is the start of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return text[:-k]
    return text


class StreamDetokenizer:
    """The text of a growing list of token ids, never ending in half a UTF-8 character.

    Decodes only a short window at each step (the tokens since the text last grew, with those of
    the step before as context), so a long answer costs linear time, not quadratic.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new


# ---------------------------------------------------------------------------------------------
# The native API


@dataclass
class Reply:
    """A whole answer: its text, tool call, history entries, token counts and timing."""

    text: str  # the plain-text answer (what the stream showed)
    tool_call: dict | None  # when the answer ends in a tool call (see parse_response)
    messages: list[dict]  # assistant entries to append to the conversation
    finish_reason: str  # "stop": the model ended it; "length": max_new_tokens or the context ran out
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the stop token included
    time_to_first_token: float  # seconds from the call to the first token (mostly the prompt's prefill)
    seconds: float  # the whole answer

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


class ChatModel:
    """A loaded model and its tokenizer: `chat(messages)` and `stream(messages)`.

    Successive calls reuse the KV cache for the prompt's prefix that the previous call already
    computed (in a chat, everything but the new turn). Not thread-safe: one call at a time.
    """

    def __init__(self, model: GLMTransformer, tokenizer: ChatGLMTokenizer, *, load_seconds: float = 0.0,
                 source: str = "", random_weights: bool = False, standin_tokenizer: bool = False, processors=(),
                 family: Family = CHATGLM3):
        self.model = model
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

    def stream(self, messages: list[dict], *, max_new_tokens: int | None = None, temperature: float = 0.8,
               top_p: float = 0.8, top_k: int = 50, repetition_penalty: float = 1.0, seed: int | None = None,
               greedy: bool = False) -> Iterator[Chunk]:
        """Chunks of the answer's text as it is generated; the last chunk carries the Reply.

        Joined, the chunks' texts equal reply.text. Sampling defaults are the reference chat's;
        greedy=True (or temperature=0) picks the most likely token. max_new_tokens None: until the
        model stops or the context is full.
        """
        sampling = SamplingConfig(greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, seed=seed)
        prompt = self.family.prompt_ids(self.tokenizer, messages)
        stop = set(self.family.stop_ids(self.tokenizer))
        start = time.perf_counter()
        first = None
        detok = StreamDetokenizer(self.tokenizer)
        shown, finish, count = "", "length", 0
        for token in self.stream_ids(prompt, max_new_tokens=max_new_tokens, sampling=sampling, reuse_cache=True):
            first = first or time.perf_counter()
            count += 1
            if token in stop:
                finish = "stop"
                continue
            detok.add(token)
            seen = visible_text(detok.text, final=False, family=self.family)
            if len(seen) > len(shown) and seen.startswith(shown):
                yield Chunk(seen[len(shown):])
                shown = seen
        end = time.perf_counter()
        parsed = parse_response(self.tokenizer.decode(detok.ids), has_tools(messages), self.family)
        reply = Reply(parsed.content, parsed.tool_call, parsed.messages, finish, len(prompt), count,
                      (first or end) - start, end - start)
        yield Chunk(parsed.content[len(shown):] if parsed.content.startswith(shown) else "", reply)

    def stream_ids(self, prompt_ids: list[int], *, max_new_tokens: int | None = None,
                   sampling: SamplingConfig | None = None, stop_ids=None, processors=(),
                   cache: KVCache | None = None, reuse_cache: bool = False) -> Iterator[int]:
        """Generated token ids, one at a time, the stop token included.

        cache: continue after what it holds; or reuse_cache: keep one cache across calls and reuse
        its longest prefix shared with prompt_ids.
        """
        stop_ids = self.family.stop_ids(self.tokenizer) if stop_ids is None else stop_ids
        context = self.model.config.seq_length
        max_new = context if max_new_tokens is None else max_new_tokens
        ids, before = list(prompt_ids), None
        if reuse_cache:
            cache, reused = self._prefix_cache(ids, len(ids) + max_new)
            self._cache_ids, self._cache_valid = ids, reused
            ids, before = ids[reused:], ids[:reused]
        tokens = generate_tokens(self.model, ids, max_new_tokens=max_new, stop_ids=stop_ids, sampling=sampling,
                                 cache=cache, processors=[*self.processors, *processors], seen_before=before)
        for token in tokens:
            if reuse_cache:  # the cache now holds everything before this token
                self._cache_valid = len(self._cache_ids)
                self._cache_ids.append(token)
            yield token

    def _prefix_cache(self, prompt: list[int], needed: int) -> tuple[KVCache, int]:
        """The kept cache, cut to its longest prefix shared with prompt (at least one token left to run)."""
        held = self._cache_ids[:self._cache_valid] if self._cache is not None else []
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
    new.length = length
    return new


# ---------------------------------------------------------------------------------------------
# Loading


def load(path_or_id: str = DEFAULT_MODEL, *, device: str | torch.device = "auto", dtype="auto",
         random_weights: bool = False, quantize: str | None = None, group_size: int = 128,
         progress: bool = True, compile: bool = False) -> ChatModel:
    """Load a checkpoint of the GLM family (a local directory or a Hugging Face id) and its tokenizer.

    The family (ChatGLM2/3, GLM-4; chat or base) is recognised from the checkpoint's own files.

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
    processors, standin = [], False
    if random_weights:
        model, _ = load_model(path_or_id, device=device, dtype=dtype, random_weights=True, progress=progress,
                              quantize=quantize, group_size=group_size)
        family = config_and_family(path_or_id)[1]
        directory = _tokenizer_directory(path_or_id)
        if directory is not None:
            tokenizer = family.load_tokenizer(directory)
        else:  # the stand-in speaks ChatGLM3's format
            tokenizer, standin, family = standin_tokenizer(), True, CHATGLM3
            processors.append(vocab_limit(tokenizer.vocab_size))
    else:
        directory = resolve_checkpoint(path_or_id)
        model, _ = load_model(directory, device=device, dtype=dtype, progress=progress, quantize=quantize,
                              group_size=group_size)
        family = read_config(directory, name=os.fspath(path_or_id))[1]
        tokenizer = family.load_tokenizer(directory)
    if compile:
        model.compile_decode()
    return ChatModel(model, tokenizer, load_seconds=time.perf_counter() - start, source=os.fspath(path_or_id),
                     random_weights=random_weights, standin_tokenizer=standin, processors=processors,
                     family=family)


def _tokenizer_directory(path_or_id) -> Path | None:
    """The checkpoint directory when its tokenizer can be had without the weights, else None."""
    try:
        directory = resolve_checkpoint(path_or_id, weights=False)
    except CheckpointError:
        return None
    has_tokenizer = (directory / TOKENIZER_FILE).exists() or (directory / "tokenizer.json").exists()
    return directory if has_tokenizer else None


def standin_tokenizer() -> ChatGLMTokenizer:
    """A small bilingual SentencePiece tokenizer shipped with the package (glmchat/data)."""
    return ChatGLMTokenizer.from_pretrained(Path(__file__).parent / "data" / "standin-tokenizer.model")
