"""Tiny random ChatGLM-6B (the original, "v1") checkpoints in the official on-disk layout.

``make_tiny_chatglm6b_checkpoint(dir)`` writes ``config.json`` (THUDM/chatglm-6b's keys),
``ice_text.model`` (a SentencePiece model holding every token, specials included),
``tokenizer_config.json`` and weights with the official tensor names (``transformer.layers.{i}...``,
a stored ``rotary_emb.inv_freq`` per layer, ``lm_head.weight`` an exact copy of the embeddings),
deterministically from a seed.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import sentencepiece as spm
import torch

from .tiny_chatglm import WEIGHT_FORMATS, corpus_lines, place_tokenizer, write_weights

ICE_TOKENIZER_FILE = "ice_text.model"
ICE_VOCAB_SIZE = 1200
CONTROL_SYMBOLS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
USER_SYMBOLS = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]

TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
    "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
    "remove_space": False, "do_lower_case": False, "num_image_tokens": 0, "padding_side": "left",
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


def train_ice_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = ICE_VOCAB_SIZE) -> Path:
    """Train a small ``ice_text.model`` (BPE, byte fallback, the v1 specials) on the bundled corpus.

    Returns ``out_dir/ice_text.model``. Same input, same bytes (single-threaded).
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        control_symbols=CONTROL_SYMBOLS, user_defined_symbols=USER_SYMBOLS, byte_fallback=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", character_coverage=0.9995, num_threads=1, minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ICE_TOKENIZER_FILE
    path.write_bytes(buf.getvalue())
    return path


def _weights(g: torch.Generator, *, vocab: int, hidden: int, num_layers: int, heads: int, inner: int):
    """float32 tensors in a fixed creation order, so one seed gives the same values in any format."""

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    rotary_dim = hidden // heads // 2
    # The reference computes this in float32 and rounds it to float16 before registering the buffer.
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)).half().float()
    # Sublayer weights large enough that a layer's output outweighs the alpha-scaled residual: with
    # tied embeddings a tiny model would otherwise keep predicting the token it was given.
    w = {"transformer.word_embeddings.weight": normal(vocab, hidden, std=0.1)}
    for i in range(num_layers):
        p = f"transformer.layers.{i}."
        w[p + "input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        w[p + "input_layernorm.bias"] = normal(hidden, std=0.05)
        w[p + "attention.rotary_emb.inv_freq"] = inv_freq.clone()
        w[p + "attention.query_key_value.weight"] = normal(3 * hidden, hidden, std=0.3)
        w[p + "attention.query_key_value.bias"] = normal(3 * hidden, std=0.05)
        w[p + "attention.dense.weight"] = normal(hidden, hidden, std=0.3)
        w[p + "attention.dense.bias"] = normal(hidden, std=0.02)
        w[p + "post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        w[p + "post_attention_layernorm.bias"] = normal(hidden, std=0.05)
        w[p + "mlp.dense_h_to_4h.weight"] = normal(inner, hidden, std=0.3)
        w[p + "mlp.dense_h_to_4h.bias"] = normal(inner, std=0.02)
        w[p + "mlp.dense_4h_to_h.weight"] = normal(hidden, inner, std=0.3)
        w[p + "mlp.dense_4h_to_h.bias"] = normal(hidden, std=0.02)
    w["transformer.final_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
    w["transformer.final_layernorm.bias"] = normal(hidden, std=0.05)
    w["lm_head.weight"] = w["transformer.word_embeddings.weight"].clone()  # tied in the model
    return w


def make_tiny_chatglm6b_checkpoint(
    path: str | os.PathLike[str], *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
    num_attention_heads: int = 4, inner_hidden_size: int = 256, max_sequence_length: int = 256,
    weight_format: str = "safetensors", shards: int = 2, dtype: torch.dtype = torch.float32,
    tokenizer_model: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a random THUDM/chatglm-6b-layout checkpoint into ``path`` and return it.

    ``weight_format``: one of WEIGHT_FORMATS (the sharded ones in ``shards`` files plus an index).
    ``tokenizer_model``: copy this ``ice_text.model`` instead of training one.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 4:
        raise ValueError("head_dim = hidden/heads must be a multiple of 4 (two rotary halves, in pairs)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(place_tokenizer(out, ICE_TOKENIZER_FILE, tokenizer_model,
                                                                    train_ice_tokenizer)))
    vocab_size = math.ceil(sp.vocab_size() / 64) * 64

    weights = _weights(torch.Generator().manual_seed(seed), vocab=vocab_size, hidden=hidden_size,
                       num_layers=num_layers, heads=num_attention_heads, inner=inner_hidden_size)
    write_weights(out, {k: t.to(dtype).contiguous() for k, t in weights.items()}, weight_format, shards)

    config = {
        "_name_or_path": "THUDM/chatglm-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
        "num_attention_heads": num_attention_heads, "inner_hidden_size": inner_hidden_size,
        "layernorm_epsilon": 1e-05, "max_sequence_length": max_sequence_length, "position_encoding_2d": True,
        "bos_token_id": sp.piece_to_id("<sop>"), "eos_token_id": sp.piece_to_id("<eop>"),
        "mask_token_id": sp.piece_to_id("[MASK]"), "gmask_token_id": sp.piece_to_id("[gMASK]"),
        "pad_token_id": sp.piece_to_id("<pad>"), "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.27.1", "use_cache": True, "pre_seq_len": None, "prefix_projection": False,
        "quantization_bit": 0,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    return out
