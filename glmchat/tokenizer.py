"""ChatGLM3 tokenizer: a SentencePiece model plus nine special tokens, without transformers.

Behaviour follows the reference ``tokenization_chatglm.py`` (see the spec's Tokenizer section).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

# Order matters: special token i has id n_words + i.
SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")
TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(ValueError):
    """The tokenizer file or the input given to the tokenizer is not usable."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """``tokenizer.model`` does not exist (catchable as ValueError or FileNotFoundError)."""


class BatchEncoding(dict):
    """``input_ids`` / ``attention_mask`` / ``position_ids``, readable as keys or attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str) -> BatchEncoding:
        """Move every tensor to ``device`` in place and return self (like transformers)."""
        for key in list(self):
            if isinstance(self[key], torch.Tensor):
                self[key] = self[key].to(device)
        return self


def _as_id_list(ids: int | Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise TokenizerError(f"decode expects a 0-D or 1-D tensor, got shape {tuple(ids.shape)}; use batch_decode")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class ChatGLMTokenizer:
    """Tokenizer for ChatGLM3 checkpoints (``tokenizer.model`` + specials ``[gMASK]``, ``sop``, roles...)."""

    padding_side = "left"
    model_input_names = ("input_ids", "attention_mask", "position_ids")

    def __init__(self, vocab_file: str | os.PathLike[str]) -> None:
        path = Path(vocab_file).expanduser()
        if not path.is_file():
            raise TokenizerNotFoundError(f"SentencePiece tokenizer file not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # sentencepiece raises OSError or RuntimeError on bad files
            raise TokenizerError(f"cannot read SentencePiece model {path}: {exc}") from exc
        self.vocab_file = path
        self.n_words: int = self.sp.vocab_size()
        self.special_tokens: dict[str, int] = {name: self.n_words + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names: dict[int, str] = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size: int = self.n_words + len(SPECIAL_TOKENS)
        self.eos_token_id: int = self.sp.eos_id()
        self.bos_token_id: int = self.sp.bos_id()  # never added to inputs
        self.pad_token_id: int = self.sp.unk_id()  # pad = unk = 0 in ChatGLM3
        # The reference renders these as empty text in decode().
        self._silent_ids = {self.eos_token_id, self.bos_token_id, self.pad_token_id}

    @classmethod
    def from_file(cls, tokenizer_model_path: str | os.PathLike[str]) -> ChatGLMTokenizer:
        return cls(tokenizer_model_path)

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike[str], **_ignored: Any) -> ChatGLMTokenizer:
        """Load from a local checkpoint directory (or a path to ``tokenizer.model`` itself).

        Keyword arguments such as ``trust_remote_code=True`` are accepted and ignored.
        """
        path = Path(path_or_dir).expanduser()
        if path.is_dir():
            path = path / TOKENIZER_FILE
        elif not path.exists():
            raise TokenizerNotFoundError(f"tokenizer directory or file not found: {path}")
        return cls(path)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ChatGLMTokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    # ---- special tokens -------------------------------------------------------------------

    def get_command(self, name: str) -> int:
        """Id of a special token by name: the nine specials, or ``<bos>``/``<eos>``/``<pad>``."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        aliases = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        if name in aliases:
            return aliases[name]
        raise TokenizerError(f"{name!r} is not a special token; known: {', '.join([*self.special_tokens, *aliases])}")

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a chat reply; ``<|assistant|>`` is deliberately not one."""
        return [self.eos_token_id, self.special_tokens["<|user|>"], self.special_tokens["<|observation|>"]]

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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``[gMASK] sop`` + SentencePiece ids. Special-looking text stays plain text."""
        ids = self._sp_encode(text)
        return self.get_prefix_tokens() + ids if add_special_tokens else ids

    def convert_ids_to_tokens(self, ids: int | Iterable[int] | torch.Tensor) -> list[str]:
        """Pieces as the reference sees them: specials by name; bos/eos/pad and out-of-range ids as ""."""
        pieces = []
        for i in _as_id_list(ids):
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
        incomplete UTF-8 sequence becomes U+FFFD. ``skip_special_tokens`` drops the nine specials.
        """
        id_list = _as_id_list(ids)
        if skip_special_tokens:
            id_list = [i for i in id_list if i not in self._special_names]
        return self.sp.decode_pieces(self.convert_ids_to_tokens(id_list))

    def batch_decode(
        self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    # ---- chat prompts ---------------------------------------------------------------------

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` + sp(f"{metadata}\\n") + sp(message)."""
        if role not in ROLES:
            raise TokenizerError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return [self.special_tokens[f"<|{role}|>"]] + self._sp_encode(f"{metadata}\n") + self._sp_encode(message)

    def build_chat_input(
        self, query: str, history: Sequence[dict[str, Any]] | None = None, role: str = "user"
    ) -> BatchEncoding:
        """Prompt ids for the next assistant turn, as a ``[1, len]`` batch."""
        ids = self.get_prefix_tokens()
        for item in history or []:
            if "role" not in item or "content" not in item:
                raise TokenizerError(f"history items need 'role' and 'content' keys, got {item!r}")
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.special_tokens["<|assistant|>"])
        return self.batch_encode([ids])

    # ---- batching -------------------------------------------------------------------------

    def batch_encode(
        self, sequences: Sequence[Iterable[int] | torch.Tensor], return_tensors: str | None = "pt"
    ) -> BatchEncoding:
        """Left-pad token id lists: pads get id 0, mask 0 and position 0; real tokens 0..len-1."""
        seqs = [_as_id_list(s) for s in sequences]
        if not seqs:
            raise TokenizerError("cannot build a batch from zero sequences")
        width = max(len(s) for s in seqs)
        batch: dict[str, list[list[int]]] = {name: [] for name in self.model_input_names}
        for s in seqs:
            pad = width - len(s)
            batch["input_ids"].append([self.pad_token_id] * pad + s)
            batch["attention_mask"].append([0] * pad + [1] * len(s))
            batch["position_ids"].append([0] * pad + list(range(len(s))))
        if return_tensors == "pt":
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
        if return_tensors is None:
            return BatchEncoding(batch)
        raise TokenizerError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a list of texts into a left-padded batch (always 2-D for "pt")."""
        if padding not in (True, False, "longest", "do_not_pad"):
            raise TokenizerError(f"padding must be True/'longest' or False/'do_not_pad', got {padding!r}")
        texts = [text] if isinstance(text, str) else list(text)
        seqs = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if padding in (True, "longest") or len({len(s) for s in seqs}) <= 1:
            out = self.batch_encode(seqs, return_tensors=return_tensors)
        elif return_tensors is None:
            rows = [self.batch_encode([s], return_tensors=None) for s in seqs]
            out = BatchEncoding({k: [row[k][0] for row in rows] for k in self.model_input_names})
        else:
            raise TokenizerError("texts encode to different lengths; pass padding=True to batch them")
        if return_tensors is None and isinstance(text, str):
            return BatchEncoding({k: v[0] for k, v in out.items()})  # flat lists, like transformers
        return out
