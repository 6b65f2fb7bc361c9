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
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .generate import SamplingConfig, generate_tokens
from .model import GLMTransformer, KVCache
from .tokenizer import ROLES, ChatGLMTokenizer

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


def parse_response(text: str, tools_in_prompt: bool) -> ParsedResponse:
    """The reference's post-processing of a decoded reply, with tool calls parsed safely.

    A segment whose metadata is blank is text: its history entry holds the stripped content. Any
    other segment is a tool call named by the metadata: `{"name", "parameters"}` when the prompt
    offered tools (the call is parsed, see `parse_tool_call`), else `{"name", "content"}`.
    """
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
                tool_call = {"name": name, "parameters": parse_tool_call(content)}
            else:
                tool_call = {"name": name, "content": content}
    return ParsedResponse(_show("\n\n".join(texts)), tool_call, messages)


def _show(text: str) -> str:
    return text.replace(TRAINING_TIME, "2023年")


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
