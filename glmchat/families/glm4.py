"""GLM-4-9B (-chat, -chat-1m, -hf): tiktoken-style byte-level BPE with GLM-4's specials, the
chat template's prompt (`[gMASK]<sop><|role|>\ncontent … <|assistant|>`), tool calls as a name
line followed by JSON arguments.

Tokenizer facts from the reference ``tokenization_chatglm.py`` of THUDM/glm-4-9b-chat:
``tokenizer.model`` is text, one ``base64(token bytes) rank`` per line; text is split by the
pre-tokenizer regex ``PATTERN`` and each piece is merged byte pair by byte pair, always the pair
whose merged bytes have the lowest rank. The specials follow the ranks (``<|endoftext|>`` = number
of ranks [151329]). Text that looks like a special is encoded as plain text. The "-hf" repos ship
the same vocabulary as a ``tokenizer.json`` (GPT-2 byte-to-unicode strings); ids are the ranks.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import regex

from .base import ROLES, Family, ToolCallParseError
from .tokenizer import (BatchEncoding, Tokenizer, TokenizerError, as_id_list, find_file, read_tokenizer_config,
                        token_text)

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, used by byte-level BPE tokenizer.json files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


CHAR_OF_BYTE = bytes_to_unicode()
BYTE_OF_CHAR = {c: b for b, c in CHAR_OF_BYTE.items()}


def read_ranks(path: Path) -> dict[bytes, int]:
    """``base64 rank`` lines of a tiktoken-style ``tokenizer.model``."""
    ranks: dict[bytes, int] = {}
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} line {n} is not 'base64-token rank' ({e})") from None
    return ranks


def read_tokenizer_json(path: Path) -> tuple[dict[bytes, int], str, dict[str, int]]:
    """Ranks, pre-tokenizer pattern and added tokens of a byte-level BPE ``tokenizer.json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not a BPE tokenizer.json ({e!r})") from None
    try:
        ranks = {bytes(BYTE_OF_CHAR[c] for c in token): i for token, i in vocab.items()}
    except KeyError:
        raise TokenizerError(f"{path}: vocabulary is not byte-level (GPT-2 byte-to-unicode) BPE") from None
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return ranks, _split_pattern(data.get("pre_tokenizer")) or PATTERN, added


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex of the first `Split` pre-tokenizer, if any."""
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Split":
        return pre_tokenizer.get("pattern", {}).get("Regex")
    for item in pre_tokenizer.get("pretokenizers", []):
        found = _split_pattern(item)
        if found:
            return found
    return None


class GLM4Tokenizer(Tokenizer):
    """Tokenizer for GLM-4 checkpoints."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = PATTERN, source: str = "tokenizer.model") -> None:
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"{source}: byte-level BPE must rank all 256 single bytes; {len(missing)} are missing")
        self.vocab_file = source
        self.ranks = ranks
        self.pattern = regex.compile(pattern)
        self.n_words = len(ranks)
        self.decoder = {rank: token for token, rank in ranks.items()}
        if len(self.decoder) != self.n_words or max(self.decoder) != self.n_words - 1:
            raise TokenizerError(f"{source}: ranks must be 0 … {self.n_words - 1}, each once")
        self.special_tokens = {name: self.n_words + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = self.n_words + len(SPECIAL_TOKENS)
        self.eos_token_id = self.pad_token_id = self.special_tokens["<|endoftext|>"]
        self.named_by_unicode = False  # tokens named by GPT-2's byte-to-unicode text (a tokenizer.json)
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike[str], **_ignored: Any) -> GLM4Tokenizer:
        """From a checkpoint directory: ``tokenizer.model`` (ranks) or else ``tokenizer.json``."""
        path = find_file(path_or_dir, ["tokenizer.model", "tokenizer.json"])
        if path.suffix == ".json":
            ranks, pattern, added = read_tokenizer_json(path)
            tokenizer = cls(ranks, pattern, source=str(path))
            wrong = {t: i for t, i in added.items() if t in tokenizer.special_tokens and tokenizer.special_tokens[t] != i}
            if wrong:
                raise TokenizerError(f"{path}: special tokens at unexpected ids {wrong}")
            tokenizer.named_by_unicode = True
        else:
            tokenizer = cls(read_ranks(path), source=str(path))
        return tokenizer.configure(path_or_dir, read_tokenizer_config(path_or_dir))

    def configure(self, name_or_path, config: dict) -> GLM4Tokenizer:
        """The reference's token attributes from tokenizer_config.json.

        GLM-4-9B-chat's remote tokenizer (ChatGLM4Tokenizer) fixes eos_token_id to <|endoftext|> and
        takes eos_token / pad_token (and their ids) from the config; the "-hf" repos' transformers
        tokenizer (a tokenizer.json) takes all of them from the config, and counts only the ranks in
        vocab_size (the specials are added tokens). Neither has an unk token unless the config names one.
        """
        super().configure(name_or_path, config)
        for name in ("eos_token", "pad_token", "unk_token"):
            token = token_text(config.get(name))
            if token is not None:
                setattr(self, name, token)
                setattr(self, f"{name}_id", self.token_to_id(token))
        if not self.named_by_unicode:
            self.eos_token_id = self.special_tokens["<|endoftext|>"]
        else:
            self.vocab_size = self.n_words
        return self

    def __len__(self) -> int:
        return self.n_words + len(self.special_tokens)

    def token_to_id(self, token: str) -> int:
        """The id of a special's name or of a token's text (byte-to-unicode text for a tokenizer.json)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        data = bytes(BYTE_OF_CHAR[c] for c in token) if self.named_by_unicode else token.encode("utf-8")
        if data not in self.ranks:
            raise TokenizerError(f"{self.vocab_file}: token {token!r} of tokenizer_config.json is not in the vocabulary")
        return self.ranks[data]

    def get_vocab(self) -> dict[bytes | str, int]:
        """The reference's vocabulary: bytes -> rank and name -> special id (ChatGLM4Tokenizer), or for
        a tokenizer.json byte-to-unicode text -> rank and the specials (transformers' fast tokenizer)."""
        if not self.named_by_unicode:
            return super().get_vocab()
        return {**{"".join(CHAR_OF_BYTE[b] for b in t): r for t, r in self.ranks.items()}, **self.special_tokens}

    def __repr__(self) -> str:
        return f"GLM4Tokenizer(vocab_file={self.vocab_file!r}, vocab_size={self.vocab_size})"

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]

    # ---- text <-> ids ---------------------------------------------------------------------

    def _bpe(self, piece: bytes) -> list[int]:
        rank = self.ranks.get(piece)
        if rank is not None:
            return [rank]
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        ids = [self.ranks[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            ids += self._bpe(piece.encode("utf-8"))
        return ids

    def tokenize(self, text: str) -> list[bytes]:
        """The BPE tokens of ``text`` as bytes (no specials)."""
        return [self.decoder[i] for i in self._sp_encode(text)]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> list[str | bytes]:
        """Specials by name (str), other tokens as bytes; ids outside the vocabulary as b""."""
        return [self._special_names.get(i) or self.decoder.get(i, b"") for i in as_id_list(ids)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Bytes of consecutive tokens decode together (invalid UTF-8 -> U+FFFD); specials by name."""
        text, run = [], b""
        for token in self.convert_ids_to_tokens(ids):
            if isinstance(token, bytes):
                run += token
                continue
            text.append(run.decode("utf-8", errors="replace"))
            run = b""
            if not skip_special_tokens:
                text.append(token)
        text.append(run.decode("utf-8", errors="replace"))
        return "".join(text)

    # ---- chat prompts ---------------------------------------------------------------------

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + bpe(f"{metadata}\\n{message}"): the chat template renders them as one text."""
        if role not in ROLES:
            raise TokenizerError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return [self.special_tokens[f"<|{role}|>"]] + self._sp_encode(f"{metadata}\n{message}")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The checkpoint's chat template for messages, as ids, ending with the generation prompt."""
        return glm4_prompt_ids(self, messages)

    def generation_prompt_ids(self) -> list[int]:
        """What the template's add_generation_prompt adds at the end."""
        return [self.special_tokens["<|assistant|>"]]

    def build_chat_input(
        self, query: str, history: Sequence[dict[str, Any]] | None = None, role: str = "user"
    ) -> BatchEncoding:
        return self.batch_encode([self.chat_ids([*(history or []), {"role": role, "content": query}])])

    def apply_chat_template(self, conversation: Sequence[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = False, **_ignored: Any):
        """transformers' apply_chat_template over the checkpoint's chat template: the text
        (tokenize=False), the ids, or with return_dict a BatchEncoding (`model.generate(**inputs)`).
        tools (OpenAI-style function definitions) go first, as the system message that carries them."""
        messages = [*([{"role": "system", "content": "", "tools": list(tools)}] if tools else []), *conversation]
        ids = self.chat_ids(messages)
        if not add_generation_prompt:
            ids = ids[: len(ids) - len(self.generation_prompt_ids())]
        if not tokenize:
            return self.decode(ids)
        if not (return_dict or return_tensors):
            return ids
        batch = self.batch_encode([ids], return_tensors=return_tensors)
        return batch if return_dict else batch["input_ids"]


# The system prompt GLM-4-9B-chat's chat template puts before function tools (tokenizer_config.json).
GLM4_TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_TOOL_FOOTER = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def glm4_tools_text(tools: list[dict]) -> str:
    """The text after ``<|system|>`` that lists function tools, as the chat template renders it."""
    text = GLM4_TOOLS_PREAMBLE
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"GLM-4 tools must be {{'type': 'function', 'function': {{...}}}}, got {tool!r:.80}")
        # One newline before "##": transformers renders templates with trim_blocks, which eats the
        # first of the two that follow the template's {% if %} tag.
        text += f"\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}{GLM4_TOOL_FOOTER}"
    return text


def glm4_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """GLM-4-9B-chat's chat template with add_generation_prompt, as ids.

    `[gMASK]<sop>`, then per message: its tools block (`<|system|>` + preamble + each function as
    indented JSON) if it has "tools", and `<|role|>{metadata}\\n{content}` if its content is not
    empty; finally `<|assistant|>`. Text between specials is tokenized as one piece, like the
    reference's rendered template; text in messages is never read as a special token.
    """
    ids = tokenizer.get_prefix_tokens()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content", ""), str):
            raise ValueError(f"message {i} must be a dict with 'role' and string 'content', got {message!r:.80}")
        if message.get("tools") is not None:
            ids += [tokenizer.get_command("<|system|>")] + tokenizer._sp_encode("\n" + glm4_tools_text(message["tools"]))
        if message.get("content"):
            ids += tokenizer.build_single_message(message["role"], message.get("metadata") or "", message["content"])
    ids.append(tokenizer.get_command("<|assistant|>"))
    return ids


def parse_json_tool_call(content: str) -> Any:
    """GLM-4's tool arguments: the content after the name line is JSON."""
    try:
        return json.loads(content)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"tool call arguments are not JSON ({e.msg}): {content!r:.200}") from None


class GLM4(Family):
    name = "glm4"
    label = "GLM-4-9B-chat"
    base_label = "GLM-4-9B (base)"
    rope_scaling = "base"
    # "2023年", like ChatGLM3: the process_response of THUDM's own GLM-4 code (the GLM-4 repository's
    # composite_demo client, which reads GLM-4's JSON tool calls) replaces the placeholder with
    # "2023年", and so do the other copies of GLM-4 / GLM-4V code we found; the "2024年" we had came
    # from a third-party pipeline. The hub's glm-4-9b-chat modeling_chatglm.py of June-July 2024 was
    # not at hand (the hub dropped chat/stream_chat in August 2024).
    training_time = "2023年"

    def load_tokenizer(self, directory) -> GLM4Tokenizer:
        return GLM4Tokenizer.from_pretrained(directory)

    def _prompt_ids(self, tokenizer, messages):
        return tokenizer.chat_ids(messages)  # each GLM-4-style tokenizer holds its checkpoint's template

    def parse_tool_arguments(self, content: str) -> Any:
        return parse_json_tool_call(content)

    def tools_turn(self, functions: list[dict]) -> dict:
        return {"role": "system", "content": "", "tools": [{"type": "function", "function": f} for f in functions]}

    def tool_call_turn(self, name: str, arguments: dict) -> dict:
        return {"role": "assistant", "metadata": name, "content": json.dumps(arguments, ensure_ascii=False)}
