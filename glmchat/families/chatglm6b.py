"""The original ChatGLM-6B (THUDM/chatglm-6b): its own network (glmchat.model_v1) and tokenizer.

The tokenizer is one SentencePiece model, ``ice_text.model``, that holds every token: the specials
``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`` as control pieces (never made from
text, dropped when decoding), and ``<n>``, ``<|tab|>``, ``<|blank_2|>`` … ``<|blank_80|>`` for
newlines, tabs and runs of spaces. Ids are SentencePiece ids + num_image_tokens (0 in the hub's
tokenizer_config.json; the reference's default is 20000). A text's ids end in ``[gMASK] <sop>``.

Prompts: the first query alone; after that one "[Round i]\\n问：q\\n答：r\\n" per earlier turn from
i = 0, then "[Round n]\\n问：query\\n答：". The reply stops at ``<eop>``; the reference strips it,
writes "[[训练时间]]" as "2023年" and turns ASCII , ! : ; ? next to a CJK character full-width
(the tokenizer's normalization makes them ASCII).

Evidence: public mirrors of the reference's tokenization_chatglm.py / modeling_chatglm.py (PaddleNLP's
port of the tokenizer; the chat / stream_chat / process_response code as quoted by several projects),
and chatglm.cpp's v1 tokenizer (same prompt, ids straight from the SentencePiece model).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import torch

from .base import Family, ParsedReply
from .chatglm2 import chatglm2_pairs
from .tokenizer import Tokenizer, TokenizerError, as_id_list, find_file, load_sentencepiece, read_tokenizer_config

TOKENIZER_FILE = "ice_text.model"
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_CJK = "\u4e00-\u9fff"


class ChatGLM6BTokenizer(Tokenizer):
    """ChatGLM-6B's tokenizer (``ice_text.model``)."""

    def __init__(self, vocab_file: str | os.PathLike[str], num_image_tokens: int = 20000) -> None:
        self.vocab_file, self.sp = load_sentencepiece(vocab_file)
        self.offset = num_image_tokens
        self.n_words = self.sp.vocab_size()
        self.vocab_size = self.offset + self.n_words
        self.special_tokens = {name: self._piece_id(name) for name in SPECIAL_TOKENS}
        self.bos_token, self.eos_token, self.end_token = "<sop>", "<eop>", "</s>"
        self.pad_token, self.unk_token, self.mask_token, self.gmask_token = "<pad>", "<unk>", "[MASK]", "[gMASK]"
        self.bos_token_id = self._bos_id = self.special_tokens["<sop>"]
        self.eos_token_id = self.special_tokens["<eop>"]
        self.pad_token_id, self.unk_token_id = self._piece_id("<pad>"), self._piece_id("<unk>")
        self.end_token_id = self._piece_id("</s>")
        self.gmask_token_id = self.special_tokens["[gMASK]"]

    def _piece_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise TokenizerError(f"{self.vocab_file} has no {piece!r} piece: it is not ChatGLM-6B's ice_text.model")
        return i + self.offset

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike[str], **_ignored: Any) -> ChatGLM6BTokenizer:
        """From a checkpoint directory (or the path of ``ice_text.model``); its tokenizer_config.json
        gives num_image_tokens. Keyword arguments like ``trust_remote_code`` are ignored."""
        config = read_tokenizer_config(path_or_dir)
        images = config.get("num_image_tokens", 20000)
        if not isinstance(images, int) or isinstance(images, bool) or images < 0:
            raise TokenizerError(f"tokenizer_config.json: num_image_tokens={images!r} must be a whole number >= 0")
        return cls(find_file(path_or_dir, [TOKENIZER_FILE]), images).configure(path_or_dir, config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def get_prefix_tokens(self) -> list[int]:
        return []  # ChatGLM-6B's specials go at the end of a text (`encode`)

    def _sp_encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return [i + self.offset for i in self.sp.encode(_spell_whitespace(text))]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids, then ``[gMASK] <sop>``."""
        ids = self._sp_encode(text)
        return ids + [self.gmask_token_id, self.bos_token_id] if add_special_tokens else ids

    def tokenize(self, text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self.sp.encode(_spell_whitespace(text), out_type=str)

    def convert_ids_to_tokens(self, ids: int | Iterable[int] | torch.Tensor) -> list[str]:
        """Pieces by id; ids below num_image_tokens are the reference's ``<image_N>``."""
        tokens = []
        for i in as_id_list(ids):
            if 0 <= i < self.offset:
                tokens.append(f"<image_{i}>")
            elif self.offset <= i < self.vocab_size:
                tokens.append(self.sp.id_to_piece(i - self.offset))
            else:
                tokens.append("")
        return tokens

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ids: pads and image ids left out, specials silent (control pieces), whitespace
        tokens written back. skip_special_tokens changes nothing: specials never show."""
        pieces = [i - self.offset for i in as_id_list(ids) if i != self.pad_token_id and self.offset <= i < self.vocab_size]
        return _unspell_whitespace(self.sp.decode(pieces))


def _spell_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _unspell_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


def full_width_marks(text: str) -> str:
    """ASCII , ! : ; ? right after, then right before, a CJK character become full-width."""
    for ascii_mark, wide in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\1{wide}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{wide}\1", text)
    return text


def round_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """The reference's prompt: the query alone, or "[Round i]" blocks from 0 after a history."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


class ChatGLM1(Family):
    name = "chatglm-6b"
    label = "ChatGLM-6B"
    base_label = "ChatGLM-6B"  # there is no base model; kept for the contract
    rope_scaling = "base"  # no rope_ratio in ChatGLM-6B
    training_time = "2023年"
    supports_tools = False
    chat_defaults = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}

    def load_tokenizer(self, directory) -> ChatGLM6BTokenizer:
        return ChatGLM6BTokenizer.from_pretrained(directory)

    def _prompt_ids(self, tokenizer, messages):
        query, history = chatglm2_pairs(messages, self.label)
        return tokenizer.encode(round_prompt(query, history))

    def show(self, text: str) -> str:
        return full_width_marks(super().show(text))

    def parse_reply(self, text, tools_in_prompt):
        content = text.strip()
        return ParsedReply(self.show(content), None, [{"role": "assistant", "content": content}])

    def visible_text(self, text, final=True, tool_calls=True):
        """All of it is text; before the end a last ASCII mark waits for the character after it
        (a CJK one makes it full-width)."""
        if not final and text[-1:] in _FULL_WIDTH:
            text = text[:-1]
        return super().visible_text(text, final, tool_calls=False)

    def tools_turn(self, functions):
        raise ValueError(f"{self.label} was not trained to call tools")

    tool_call_turn = tools_turn

    # ---- the drop-in API: (query, response) pairs, a new history list, every token kept ----

    def process_response(self, response: str) -> str:
        """ChatGLM-6B's `process_response(response)`: stripped, placeholder and marks rewritten."""
        return self.show(response.strip())

    def build_inputs(self, tokenizer, query, history=None):
        raise AttributeError(f"{self.label}'s reference model has no build_inputs; use tokenizer([prompt])")

    build_stream_inputs = build_inputs

    def dropin_text(self, tokenizer, tokens):
        return tokenizer.decode(tokens)

    def dropin_response(self, text, query, history):
        response = self.process_response(text)
        return response, history + [(query, response)]

    def dropin_chat(self, tokenizer, generate, query, history, role):
        history = list(history or [])
        tokens = list(generate(self._dropin_prompt(tokenizer, query, history, role)))
        return self.dropin_response(self.dropin_text(tokenizer, tokens), query, history)

    def dropin_stream_chat(self, tokenizer, generate, query, history, role, *, past_given, return_past):
        """A yield per token but the last (the reference's stream ends at <eop> or the length
        limit without a yield), every one of them, also those ending in half a character."""
        history = list(history or [])
        tokens: list[int] = []
        for token in generate(self._dropin_prompt(tokenizer, query, history, role)):
            if tokens:
                yield self.dropin_response(self.dropin_text(tokenizer, tokens), query, history)
            tokens.append(token)

    def _dropin_prompt(self, tokenizer, query: str, history: list, role: str) -> list[int]:
        if role != "user":
            raise ValueError(f"{self.label} has no {role!r} role; only user queries")
        return tokenizer.encode(round_prompt(query, history))
