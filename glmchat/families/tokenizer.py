"""What every family's tokenizer shares: specials by name, the chat stop ids, left-padded batches
(the reference's `tokenizer(texts, padding=True)`), and the errors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch


class TokenizerError(ValueError):
    """The tokenizer file or the input given to the tokenizer is not usable."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer file does not exist (catchable as ValueError or FileNotFoundError)."""


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


def as_id_list(ids: int | Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise TokenizerError(f"decode expects a 0-D or 1-D tensor, got shape {tuple(ids.shape)}; use batch_decode")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer:
    """The interface of every family's tokenizer. Subclasses set `special_tokens` (name -> id),
    `vocab_size`, `eos_token_id`, `pad_token_id`, and implement `_sp_encode`
    (text -> ids, specials never recognised in text), `decode`, `get_prefix_tokens` and
    `build_chat_input`."""

    padding_side = "left"
    model_input_names = ("input_ids", "attention_mask", "position_ids")
    special_tokens: dict[str, int]
    vocab_size: int
    eos_token_id: int
    bos_token_id: int | None
    pad_token_id: int

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, name: str) -> int:
        """Id of a special token by name, or of ``<bos>``/``<eos>``/``<pad>``."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        aliases = {"<bos>": self.bos_token_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        if aliases.get(name) is not None:
            return aliases[name]
        raise TokenizerError(f"{name!r} is not a special token; known: {', '.join([*self.special_tokens, *aliases])}")

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a chat reply: eos and the roles that start the next turn; ``<|assistant|>``
        is deliberately not one (a reply may hold several segments)."""
        return [self.eos_token_id, self.special_tokens["<|user|>"], self.special_tokens["<|observation|>"]]

    def _sp_encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def get_prefix_tokens(self) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The prefix (``[gMASK] sop``) + the text's ids. Special-looking text stays plain text."""
        ids = self._sp_encode(text)
        return self.get_prefix_tokens() + ids if add_special_tokens else ids

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def batch_encode(self, sequences: Sequence[Iterable[int] | torch.Tensor], return_tensors: str | None = "pt") -> BatchEncoding:
        """Left-pad token id lists: pads get id 0, mask 0 and position 0; real tokens 0..len-1."""
        seqs = [as_id_list(s) for s in sequences]
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

    def __call__(self, text: str | Sequence[str], padding: bool | str = True, return_tensors: str | None = "pt",
                 add_special_tokens: bool = True) -> BatchEncoding:
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


def find_file(path_or_dir: str | Path, names: Sequence[str]) -> Path:
    """The first of `names` in a directory, or the path itself when it is a file."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        for name in names:
            if (path / name).exists():
                return path / name
        raise TokenizerNotFoundError(f"tokenizer file not found: {' or '.join(str(path / n) for n in names)}")
    if not path.exists():
        raise TokenizerNotFoundError(f"tokenizer directory or file not found: {path}")
    return path
