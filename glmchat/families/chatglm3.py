"""ChatGLM3-6B (+ -base, -32k, -128k): SentencePiece tokenizer with nine specials, role-token
prompts, tool calls written as `tool_call(key=value, ...)` in a python code block.

Behaviour follows the reference ``tokenization_chatglm.py`` / ``modeling_chatglm.py`` (see
../shared/spec/chatglm3.md, sections Tokenizer and "chat and stream_chat").
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .base import ROLES, Family, ToolCallParseError, check_message
from .tokenizer import (BatchEncoding, Tokenizer, TokenizerError, as_id_list, find_file, load_sentencepiece,
                        read_tokenizer_config)

TOKENIZER_FILE = "tokenizer.model"
# Order matters: special token i has id n_words + i.
SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
# The system text ChatGLM3 was trained with for tool use (its tool_using / openai_api demos).
TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class ChatGLMTokenizer(Tokenizer):
    """Tokenizer for ChatGLM3 checkpoints (``tokenizer.model`` + specials ``[gMASK]``, ``sop``, roles...)."""

    SPECIALS = SPECIAL_TOKENS

    def __init__(self, vocab_file: str | os.PathLike[str]) -> None:
        self.vocab_file, self.sp = load_sentencepiece(vocab_file)
        self.n_words: int = self.sp.vocab_size()
        self.special_tokens: dict[str, int] = {name: self.n_words + i for i, name in enumerate(self.SPECIALS)}
        self._special_names: dict[int, str] = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size: int = self.n_words + len(self.SPECIALS)
        self.eos_token_id: int = self.sp.eos_id()
        self._bos_id: int = self.sp.bos_id()  # never added to inputs; the reference's bos_token is None
        self.pad_token_id = self.unk_token_id = self.sp.unk_id()  # pad = unk = 0 in ChatGLM3
        # The reference names the pieces of those ids ("</s>", "<unk>", "<unk>" in the released model).
        self.eos_token, self.pad_token = self.sp.id_to_piece(self.eos_token_id), self.sp.id_to_piece(self.pad_token_id)
        self.unk_token = self.sp.id_to_piece(self.unk_token_id)
        # The reference renders these as empty text in decode().
        self._silent_ids = {self.eos_token_id, self._bos_id, self.pad_token_id}

    @classmethod
    def from_file(cls, tokenizer_model_path: str | os.PathLike[str]):
        return cls(tokenizer_model_path)

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike[str], **_ignored: Any):
        """Load from a local checkpoint directory (or a path to ``tokenizer.model`` itself).

        Keyword arguments such as ``trust_remote_code=True`` are accepted and ignored.
        """
        return cls(find_file(path_or_dir, [TOKENIZER_FILE])).configure(path_or_dir, read_tokenizer_config(path_or_dir))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]

    # ---- text <-> ids ---------------------------------------------------------------------

    def _sp_encode(self, text: str) -> list[int]:
        # sentencepiece would silently batch-encode a list, so insist on str.
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self.sp.encode(text)

    def tokenize(self, text: str) -> list[str]:
        """SentencePiece pieces of ``text`` (no special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self.sp.encode(text, out_type=str)

    def convert_ids_to_tokens(self, ids: int | Iterable[int] | torch.Tensor) -> list[str]:
        """Pieces as the reference sees them: specials by name; bos/eos/pad and out-of-range ids as ""."""
        pieces = []
        for i in as_id_list(ids):
            if i in self._special_names:
                pieces.append(self._special_names[i])
            elif i in self._silent_ids or not 0 <= i < self.n_words:
                pieces.append("")
            else:
                pieces.append(self.sp.id_to_piece(i))
        return pieces

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Decode the whole piece list in one SentencePiece call, like the reference.

        Special names are unknown pieces to SentencePiece, which emits them verbatim; they count as
        text, so a following ``▁`` stays a space. Empty pieces are ignored entirely. Each byte of an
        incomplete UTF-8 sequence becomes U+FFFD. ``skip_special_tokens`` drops the specials.
        """
        id_list = as_id_list(ids)
        if skip_special_tokens:
            id_list = [i for i in id_list if i not in self._special_names]
        return self.sp.decode_pieces(self.convert_ids_to_tokens(id_list))

    # ---- chat prompts ---------------------------------------------------------------------

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + sp(f"{metadata}\\n") + sp(message)."""
        if role not in ROLES:
            raise TokenizerError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return [self.special_tokens[f"<|{role}|>"]] + self._sp_encode(f"{metadata}\n") + self._sp_encode(message)

    def build_chat_input(self, query: str, history: Sequence[dict[str, Any]] | None = None,
                         role: str = "user") -> BatchEncoding:
        """Prompt ids for the next assistant turn, as a ``[1, len]`` batch."""
        return self.batch_encode([chatglm3_prompt_ids(self, [*(history or []), {"role": role, "content": query}])])


def chatglm3_prompt_ids(tokenizer: ChatGLMTokenizer, messages: list[dict]) -> list[int]:
    """`[gMASK] sop` + one `<|role|>` block per message + `<|assistant|>`: the ids the model answers after.

    The reference's `build_chat_input(query, history)` with the query as the last message; a
    system message's "tools" are appended to its content as indented JSON.
    """
    ids = tokenizer.get_prefix_tokens()
    for i, message in enumerate(messages):
        role, content = check_message(message, i)
        if role == "system" and "tools" in message:
            content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        ids += tokenizer.build_single_message(role, message.get("metadata") or "", content)
    ids.append(tokenizer.get_command("<|assistant|>"))
    return ids


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


def format_tool_call(arguments: dict) -> str:
    """A call the way ChatGLM3 writes it: a python block with `tool_call(key=value, ...)`."""
    for key in arguments:
        if not key.isidentifier():
            raise ValueError(f"argument name {key!r} is not an identifier")
    call = ", ".join(f"{key}={_py_literal(value)}" for key, value in arguments.items())
    return f"```python\ntool_call({call})\n```"


def _py_literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is also a Python literal
    if isinstance(value, list):
        return "[" + ", ".join(map(_py_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)  # None, bools, numbers


class ChatGLM3(Family):
    name = "chatglm3"
    label = "ChatGLM3-6B"
    base_label = "ChatGLM3-6B-Base"
    rope_scaling = "base"  # rotary base = 10000 · rope_ratio
    training_time = "2023年"

    def load_tokenizer(self, directory) -> ChatGLMTokenizer:
        return ChatGLMTokenizer.from_pretrained(directory)

    def _prompt_ids(self, tokenizer, messages):
        return chatglm3_prompt_ids(tokenizer, messages)

    def parse_tool_arguments(self, content: str) -> dict:
        return parse_tool_call(content)

    def tools_turn(self, functions: list[dict]) -> dict:
        return {"role": "system", "content": TOOLS_PROMPT, "tools": functions}

    def tool_call_turn(self, name: str, arguments: dict) -> dict:
        return {"role": "assistant", "metadata": name, "content": format_tool_call(arguments)}
