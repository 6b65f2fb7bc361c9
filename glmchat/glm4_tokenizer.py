"""GLM-4 tokenizer: tiktoken-style byte-level BPE with GLM-4's specials, without transformers.

Facts from the reference ``tokenization_chatglm.py`` of THUDM/glm-4-9b-chat: ``tokenizer.model``
is text, one ``base64(token bytes) rank`` per line; text is split by the pre-tokenizer regex
``PATTERN`` and each piece is merged byte pair by byte pair, always the pair whose merged bytes
have the lowest rank. The specials follow the ranks (``<|endoftext|>`` = number of ranks
[151329]). Text that looks like a special is encoded as plain text. The "-hf" repos ship the same
vocabulary as a ``tokenizer.json`` (GPT-2 byte-to-unicode strings); ids are the ranks.
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

from .tokenizer import BatchEncoding, ChatGLMTokenizer, TokenizerError, TokenizerNotFoundError, _as_id_list

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")


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
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items()}
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


class GLM4Tokenizer(ChatGLMTokenizer):
    """Tokenizer for GLM-4 checkpoints. Same interface as ChatGLMTokenizer (batching is shared)."""

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
        self.bos_token_id = None
        self._cache: dict[bytes, list[int]] = {}

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike[str], **_ignored: Any) -> GLM4Tokenizer:
        """From a checkpoint directory: ``tokenizer.model`` (ranks) or else ``tokenizer.json``."""
        path = Path(path_or_dir).expanduser()
        if path.is_dir():
            if (path / "tokenizer.model").exists():
                path = path / "tokenizer.model"
            elif (path / "tokenizer.json").exists():
                path = path / "tokenizer.json"
            else:
                raise TokenizerNotFoundError(f"{path} has neither tokenizer.model nor tokenizer.json")
        elif not path.exists():
            raise TokenizerNotFoundError(f"tokenizer directory or file not found: {path}")
        if path.suffix == ".json":
            ranks, pattern, added = read_tokenizer_json(path)
            tokenizer = cls(ranks, pattern, source=str(path))
            wrong = {t: i for t, i in added.items() if t in tokenizer.special_tokens and tokenizer.special_tokens[t] != i}
            if wrong:
                raise TokenizerError(f"{path}: special tokens at unexpected ids {wrong}")
            return tokenizer
        return cls(read_ranks(path), source=str(path))

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
        return [self._special_names.get(i) or self.decoder.get(i, b"") for i in _as_id_list(ids)]

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

    def build_chat_input(
        self, query: str, history: Sequence[dict[str, Any]] | None = None, role: str = "user"
    ) -> BatchEncoding:
        from .families import glm4_prompt_ids  # the template lives with the other chat formats

        return self.batch_encode([glm4_prompt_ids(self, [*(history or []), {"role": role, "content": query}])])
