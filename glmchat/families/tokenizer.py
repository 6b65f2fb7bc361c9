"""What every family's tokenizer shares: specials by name, the chat stop ids, left-padded batches
(the reference's `tokenizer(texts, padding=True)`), the attributes of a transformers tokenizer that
scripts read (`eos_token`, `name_or_path`, `get_vocab()`, ...), and the errors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when tokenizer_config.json names none


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
    `vocab_size`, the reference's `eos_token`/`pad_token`/`unk_token` and their ids, and implement
    `_sp_encode` (text -> ids, specials never recognised in text), `convert_ids_to_tokens`,
    `decode`, `get_prefix_tokens` and `build_chat_input`.

    The attributes a transformers tokenizer has hold what the family's reference tokenizer gives:
    `name_or_path` is what from_pretrained was given, `model_max_length` the tokenizer config's
    (transformers' VERY_LARGE_INTEGER without one), `bos_token` None unless the reference sets one.
    """

    padding_side = "left"  # the reference tokenizers pad on the left only
    model_input_names = ("input_ids", "attention_mask", "position_ids")
    name_or_path: str = ""
    model_max_length: int = VERY_LARGE_INTEGER
    special_tokens: dict[str, int]
    vocab_size: int
    eos_token: str | None = None
    eos_token_id: int
    pad_token: str | None = None
    pad_token_id: int
    unk_token: str | None = None
    unk_token_id: int | None = None
    bos_token: str | None = None
    bos_token_id: int | None = None
    _bos_id: int | None = None  # what get_command("<bos>") answers (ChatGLM: the SentencePiece bos)

    def __len__(self) -> int:
        return self.vocab_size

    def configure(self, name_or_path: str | Path, config: dict) -> Tokenizer:
        """Take what transformers takes from a checkpoint's tokenizer_config.json; returns self."""
        self.name_or_path = str(name_or_path)
        if config.get("model_max_length") is not None:
            self.model_max_length = int(config["model_max_length"])
        return self

    def get_vocab(self) -> dict[Any, int]:
        """Token -> id for every id below vocab_size, built like the reference: token by token in
        id order, so where the reference names several ids alike ("" for ChatGLM's bos/eos/pad)
        the last one wins."""
        return {token: i for i, token in enumerate(self.convert_ids_to_tokens(range(self.vocab_size)))}

    def convert_ids_to_tokens(self, ids) -> list:
        raise NotImplementedError

    def get_command(self, name: str) -> int:
        """Id of a special token by name, or of ``<bos>``/``<eos>``/``<pad>``/``<unk>``."""
        if name in self.special_tokens:
            return self.special_tokens[name]
        aliases = {"<bos>": self._bos_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id,
                   "<unk>": self.unk_token_id}
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


def load_sentencepiece(vocab_file: str | Path):
    """(path, SentencePieceProcessor) of a SentencePiece model file; a missing or unreadable file
    raises TokenizerNotFoundError / TokenizerError naming it."""
    import sentencepiece as spm

    path = Path(vocab_file).expanduser()
    if not path.is_file():
        raise TokenizerNotFoundError(f"SentencePiece tokenizer file not found: {path}")
    try:
        return path, spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises OSError or RuntimeError on bad files
        raise TokenizerError(f"cannot read SentencePiece model {path}: {exc}") from exc


def read_tokenizer_config(path_or_dir: str | Path) -> dict:
    """The checkpoint directory's tokenizer_config.json ({} without one, or for a path to a file)."""
    path = Path(path_or_dir).expanduser() / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); restore it from the model repository") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return config


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


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
