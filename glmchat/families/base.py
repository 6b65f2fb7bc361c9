"""The contract every model family implements, and what the families share.

A `Family` answers every question whose answer depends on the model family: which tokenizer reads
the checkpoint, the prompt ids of a conversation, which ids stop a reply, how a reply reads back
(text, tool call, history entries), which part of a reply still being generated may be shown,
how the server writes tools and tool calls into a conversation, and the quirks of the reference's
drop-in `chat` / `stream_chat`. Callers hold a Family and call it; they never ask which one it is.
A new family is one new file with a subclass (mlx-lm's per-model contract).

A conversation is a list of messages `{"role", "content"}` with roles system (optionally with
"tools"), user, assistant (optionally with "metadata": a tool name) and observation (a tool's
result). The ChatGLM3 / GLM-4 models answer after `<|assistant|>`; a reply can hold several
segments separated by `<|assistant|>`, each `metadata\\n content`, where a non-blank metadata
line makes it a tool call (see the spec's "chat and stream_chat" section).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tokenizer import Tokenizer, TokenizerError

ASSISTANT = "<|assistant|>"
TRAINING_TIME = "[[训练时间]]"  # a placeholder the models were trained with; each family says what it becomes
ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")


class ToolCallParseError(ValueError):
    """A tool-call segment whose arguments cannot be read as the family writes them. It is never run."""


class NotAChatModelError(ValueError):
    """chat() on a base model: it was never trained on a chat template."""


# ---------------------------------------------------------------------------------------------
# Conversations and replies (the ChatGLM3 / GLM-4 shape; ChatGLM2 overrides what differs)


def check_message(message: Any, index: int) -> tuple[str, str]:
    """(role, content) of a well-formed message; a TokenizerError (a ValueError) that says what is wrong."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise TokenizerError(f"message {index} must be a dict with 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise TokenizerError(f"message {index} has role {role!r}; roles are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise TokenizerError(f"message {index} content must be a string, got {type(content).__name__}")
    return role, content


def has_tools(messages: list[dict]) -> bool:
    """The reference parses tool-call parameters only when the first message is a system with tools."""
    first = messages[0] if messages else None
    return isinstance(first, dict) and first.get("role") == "system" and "tools" in first


def split_segments(text: str) -> list[tuple[str, str]]:
    """(metadata, content) per `<|assistant|>`-separated segment; no newline: metadata is ""."""
    segments = []
    for segment in text.split(ASSISTANT):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        segments.append((metadata, content))
    return segments


def without_partial_tail(text: str, markers: Iterable[str]) -> str:
    """text without its longest tail that could still grow into one of `markers`."""
    markers = [m for m in markers if m]
    for n in range(min(max(map(len, markers), default=1) - 1, len(text)), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return text[:-n]
    return text


@dataclass
class ParsedReply:
    text: str  # the plain-text segments, stripped, joined by a blank line, placeholder replaced
    tool_call: dict | None  # the last segment's tool call, exactly as the reference returns it
    messages: list[dict] = field(default_factory=list)  # one assistant history entry per segment


Generate = Callable[[list[int]], Iterator[int]]  # prompt ids -> generated ids (the stop token included)


class Family:
    """One model family; an instance is one checkpoint's variant of it (chat or base, its label).

    Subclasses set the class attributes and override what their reference does differently.
    """

    name: str  # "chatglm3", ...: for `--family` and messages, never for branching
    label: str  # for messages: "ChatGLM3-6B", ...
    base_label: str  # the label of the family's base (pretrained-only) model
    rope_scaling: str  # how config.json's rope_ratio applies (GLMConfig.rope_scaling)
    training_time: str  # what the reply's "[[训练时间]]" placeholder becomes
    supports_tools: bool = True
    reasons: bool = False  # its models think before they answer (see `reasoning`)
    # The reference's chat / stream_chat defaults (ChatGLM2/3, GLM-4; ChatGLM-6B's differ).
    chat_defaults: dict = {"max_length": 8192, "top_p": 0.8, "temperature": 0.8}

    def __init__(self, chat: bool = True, label: str | None = None):
        self.chat = chat  # False for base models: generate only
        self.label = label or (type(self).label if chat else type(self).base_label)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chat={self.chat}, label={self.label!r})"

    # ---- tokenizer, prompt, stops ----------------------------------------------------------

    def load_tokenizer(self, directory: str | Path) -> Tokenizer:
        raise NotImplementedError

    def check_chat(self) -> None:
        if not self.chat:
            raise NotAChatModelError(
                f"{self.label} is a base model without a chat template: use generate (plain text "
                "continuation) or a chat model of the family"
            )

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Ids that end a reply: the tokenizer's chat stops, eos alone for a base model."""
        return list(tokenizer.stop_token_ids) if self.chat else [tokenizer.eos_token_id]

    def prompt_ids(self, tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
        """The ids the model answers after, for a conversation ending in the user's (or a tool's) message."""
        self.check_chat()
        if not messages:
            raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...}")
        return self._prompt_ids(tokenizer, messages)

    def _prompt_ids(self, tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    # ---- reading replies -------------------------------------------------------------------

    def show(self, text: str) -> str:
        return text.replace(TRAINING_TIME, self.training_time)

    def parse_tool_arguments(self, content: str) -> Any:
        """The arguments of a tool-call segment's content; ToolCallParseError if unreadable."""
        raise NotImplementedError

    def parse_reply(self, text: str, tools_in_prompt: bool) -> ParsedReply:
        """The reference's post-processing of a decoded reply, with tool calls parsed safely.

        A segment whose metadata is blank is text: its history entry holds the stripped content.
        Any other segment is a tool call named by the metadata: `{"name", "parameters"}` when the
        prompt offered tools, else `{"name", "content"}` (the reference's shapes).
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
                    tool_call = {"name": name, "parameters": self.parse_tool_arguments(content)}
                else:
                    tool_call = {"name": name, "content": content}
        return ParsedReply(self.show("\n\n".join(texts)), tool_call, messages)

    def visible_text(self, text: str, final: bool = True, tool_calls: bool = True) -> str:
        """The part of a reply decoded so far that a reader may see.

        tool_calls: segments with a metadata line are tool calls and not shown (False: every
        segment is text, for a server request that offered no tools). Before the end
        (final=False) the result only grows as text is added: a segment whose first line is not
        complete yet is held back (that line may name a tool), and so are trailing blanks and a
        tail that may still become "<|assistant|>" or the training-time placeholder.
        """
        if not final:
            text = without_partial_tail(text, [ASSISTANT])
        if tool_calls:
            segments = split_segments(text)
            if not final and "\n" not in text.rsplit(ASSISTANT, 1)[-1]:
                segments = segments[:-1]
            parts = [c.strip() for m, c in segments if not m.strip()]
        else:
            parts = [s.strip() for s in text.split(ASSISTANT)]
        shown = self.show("\n\n".join(p for p in parts if p))
        return shown if final else without_partial_tail(shown, [TRAINING_TIME]).rstrip()

    def reasoning(self, text: str, final: bool = True) -> str | None:
        """The reasoning part of a reply decoded so far (None: this family's models answer without
        one). Before the end (final=False) it only grows as text is added."""
        return None

    @property
    def reasoning_rule(self):
        """`reasoning` for a TextStream to split a streamed reply with, or None where this family's
        models do not reason (no rule to run on every token)."""
        return self.reasoning if self.reasons else None

    # ---- the server's conversation (OpenAI messages -> turns) ------------------------------

    def tools_turn(self, functions: list[dict]) -> dict:
        """The system turn that offers OpenAI-style function definitions to the model."""
        raise NotImplementedError

    def tool_call_turn(self, name: str, arguments: dict) -> dict:
        """The assistant turn of an earlier call of tool `name` with `arguments`, as the model writes it."""
        raise NotImplementedError

    # ---- the drop-in API (the reference's chat / stream_chat and the helpers it is built on) --

    def process_response(self, output: str, history: list) -> tuple[Any, list]:
        """The reference model's `process_response(output, history)`: (the last segment's text, or
        its tool call as a dict, and a copy of history + one assistant entry per segment).

        ChatGLM3 and GLM-4 read replies alike (modeling_chatglm.py of chatglm3-6b and of
        glm-4-9b-chat): segments split at `<|assistant|>`, then at the first newline into metadata
        and content (no newline: the metadata is empty); a text segment's content is stripped.
        The tool-call arguments are parsed as `parse_tool_arguments` says, never evaluated.
        """
        parsed = self.parse_reply(output, has_tools(history))
        new_history = copy.deepcopy(history) + parsed.messages
        if parsed.tool_call is not None:
            return parsed.tool_call, new_history
        return self.show(parsed.messages[-1]["content"]), new_history

    def build_inputs(self, tokenizer: Tokenizer, query: str, history: list | None = None):
        raise AttributeError(f"{self.label}'s reference model has no build_inputs; "
                             "use tokenizer.build_chat_input(query, history=history)")

    def build_stream_inputs(self, tokenizer: Tokenizer, query: str, history: list | None = None):
        raise AttributeError(f"{self.label}'s reference model has no build_stream_inputs; "
                             "use tokenizer.build_chat_input(query, history=history)")

    def dropin_text(self, tokenizer: Tokenizer, tokens: list[int]) -> str:
        """What the reference decodes of the generated ids: it always drops the last one."""
        return tokenizer.decode(tokens[:-1])

    def dropin_response(self, text: str, query: str, history: list) -> tuple[Any, list]:
        """(response, new history) of the reference's chat for the decoded reply to `query`."""
        return self.process_response(text, history)

    def dropin_chat(self, tokenizer: Tokenizer, generate: Generate, query: str, history: list | None, role: str):
        """(response, history) of the reference's chat(): the caller's history list gets the query."""
        history = [] if history is None else history
        prompt = tokenizer.build_chat_input(query, history=history, role=role).input_ids[0].tolist()
        tokens = list(generate(prompt))
        history.append({"role": role, "content": query})
        return self.dropin_response(self.dropin_text(tokenizer, tokens), query, history)

    def dropin_stream_prompt(self, tokenizer: Tokenizer, query: str, history: list, role: str, *,
                             past_given: bool, return_past: bool) -> tuple[list[int], list]:
        """(prompt ids, the history the stream reports) of the reference's stream_chat; with past
        key values the prompt is this turn alone. The caller's list gets the query, once."""
        turn = tokenizer.build_chat_input(query, history=None if past_given else history, role=role)
        history.append({"role": role, "content": query})
        return turn.input_ids[0].tolist(), history

    def dropin_stream_chat(self, tokenizer: Tokenizer, generate: Generate, query: str, history: list | None,
                           role: str, *, past_given: bool, return_past: bool) -> Iterator[tuple[Any, list]]:
        """(response, history) after each generated id, like the reference's stream_chat.

        Yields whose text is empty or ends in U+FFFD are skipped. One deliberate difference: where
        the reference would crash on a tool call still being written (it evals the incomplete
        code), that step is skipped; a call still invalid at the end raises.
        """
        history = [] if history is None else history
        prompt, history = self.dropin_stream_prompt(tokenizer, query, history, role, past_given=past_given,
                                                    return_past=return_past)
        tokens, failed = [], None
        for token in generate(prompt):
            tokens.append(token)
            text = self.dropin_text(tokenizer, tokens)
            if not text or text[-1] == "\ufffd":
                continue
            try:
                yield self.dropin_response(text, query, history)
            except ToolCallParseError as e:  # the call is not complete yet
                failed = e
                continue
            failed = None
        if failed is not None:
            raise failed
