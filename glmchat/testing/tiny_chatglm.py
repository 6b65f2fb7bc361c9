"""Tiny random ChatGLM3 checkpoints in the official on-disk layout, for tests and demos.

``make_tiny_checkpoint(dir)`` writes ``config.json``, ``tokenizer.model``, ``tokenizer_config.json``
and weights with the official tensor names, deterministically from a seed. The same layout retagged
as ChatGLM2-6B / CodeGeeX2-6B (+ -32k) or ChatGLM3-6B-Base: ``make_tiny_chatglm2_checkpoint``,
``make_tiny_chatglm3_base_checkpoint``.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from importlib import resources
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from ..families.chatglm3 import SPECIAL_TOKENS, TOKENIZER_FILE

DEFAULT_VOCAB_SIZE = 1000  # smallest round size that covers the corpus' characters plus 256 bytes
WEIGHT_FORMATS = ("safetensors", "safetensors-sharded", "bin")


def corpus_lines() -> list[str]:
    """The lines of the bundled bilingual corpus (``glmchat/data/bilingual.txt``)."""
    text = resources.files("glmchat").joinpath("data", "bilingual.txt").read_text(encoding="utf-8")
    return text.splitlines()


def train_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train a small SentencePiece BPE model like chatglm3's on the bundled bilingual corpus.

    Returns the path of ``out_dir/tokenizer.model``. Same input, same bytes (single-threaded).
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=True,
        # identity keeps "\n" and repeated spaces; lines carry no "\n", so it becomes <0x0A>.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    path.write_bytes(buf.getvalue())
    return path


def place_tokenizer(out: Path, name: str, tokenizer_model, train) -> Path:
    """out/name: a copy of tokenizer_model, or (None) one trained by train(out)."""
    if tokenizer_model is None:
        train(out)
    elif Path(tokenizer_model).resolve() != (out / name).resolve():
        shutil.copyfile(tokenizer_model, out / name)
    return out / name


def random_weights(
    generator: torch.Generator,
    *,
    vocab: int,
    hidden: int,
    num_layers: int,
    heads: int,
    kv_channels: int,
    groups: int,
    ffn: int,
) -> dict[str, torch.Tensor]:
    """float32 tensors in a fixed creation order, so one seed gives the same values in any format."""

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std + mean

    qkv_out = (heads + 2 * groups) * kv_channels
    weights = {"transformer.embedding.word_embeddings.weight": normal(vocab, hidden, std=0.1)}
    # Stored like the reference (base 10000, dim kv_channels // 2); loaders must recompute it.
    rotary_dim = kv_channels // 2
    weights["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    )
    for i in range(num_layers):
        p = f"transformer.encoder.layers.{i}."
        weights[p + "input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        weights[p + "self_attention.query_key_value.weight"] = normal(qkv_out, hidden, std=0.08)
        weights[p + "self_attention.query_key_value.bias"] = normal(qkv_out, std=0.05)
        weights[p + "self_attention.dense.weight"] = normal(hidden, heads * kv_channels, std=0.05)
        weights[p + "post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        weights[p + "mlp.dense_h_to_4h.weight"] = normal(2 * ffn, hidden, std=0.08)
        weights[p + "mlp.dense_4h_to_h.weight"] = normal(hidden, ffn, std=0.05)
    weights["transformer.encoder.final_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
    weights["transformer.output_layer.weight"] = normal(vocab, hidden, std=0.1)
    return weights


def _shards(names: list[str], count: int) -> list[list[str]]:
    """Split names into ``count`` contiguous, nearly equal, non-empty groups."""
    count = max(1, min(count, len(names)))
    size = math.ceil(len(names) / count)
    return [names[i : i + size] for i in range(0, len(names), size)]


def write_weights(out: Path, tensors: dict[str, torch.Tensor], weight_format: str, shards: int) -> None:
    """Write ``tensors`` into ``out`` as one of WEIGHT_FORMATS (the sharded ones in ``shards`` files + index)."""
    if weight_format == "safetensors":
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    groups = _shards(list(tensors), shards)
    if weight_format == "safetensors-sharded":
        pattern, index_name = "model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json"
    else:
        pattern, index_name = "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json"
    weight_map: dict[str, str] = {}
    for n, names in enumerate(groups, start=1):
        filename = pattern.format(n, len(groups))
        shard = {name: tensors[name] for name in names}
        if weight_format == "bin":
            torch.save(shard, out / filename)
        else:
            save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _config(
    *,
    hidden_size: int,
    num_layers: int,
    num_attention_heads: int,
    kv_channels: int,
    multi_query_group_num: int,
    ffn_hidden_size: int,
    padded_vocab_size: int,
    seq_length: int,
    layernorm_epsilon: float,
    rope_ratio: float | None,
    dtype: torch.dtype,
) -> dict[str, object]:
    config: dict[str, object] = {
        "_name_or_path": "glmchat/tiny-chatglm3",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": ffn_hidden_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden_size,
        "kv_channels": kv_channels,
        "layernorm_epsilon": layernorm_epsilon,
        "multi_query_attention": True,
        "multi_query_group_num": multi_query_group_num,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "original_rope": True,
        "padded_vocab_size": padded_vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": seq_length,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if rope_ratio is not None:
        config["rope_ratio"] = rope_ratio
    return config


TOKENIZER_CONFIG = {
    "name_or_path": "glmchat/tiny-chatglm3",
    "remove_space": False,
    "do_lower_case": False,
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


# The default context: room for the family's own tools prompt (about 370 tokens for one small
# function with the tiny tokenizers), several tools and a reply, so tool calls work on a demo
# checkpoint; it costs nothing until used (the cache grows with the conversation).
DEMO_CONTEXT = 2048


def make_tiny_checkpoint(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    kv_channels: int = 16,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 96,
    layernorm_epsilon: float = 1e-5,
    seq_length: int = DEMO_CONTEXT,
    rope_ratio: float | None = None,
    weight_format: str = "safetensors",
    bin_shards: int = 2,
    dtype: torch.dtype = torch.float32,
    tokenizer_model: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a random ChatGLM3-layout checkpoint into ``path`` and return it.

    ``weight_format``: "safetensors" (one file), "safetensors-sharded" or "bin" (both split into
    ``bin_shards`` files plus an index). ``tokenizer_model``: copy this ``tokenizer.model`` instead
    of training one. The same seed and shapes give identical tensors in every format.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if num_attention_heads % multi_query_group_num:
        raise ValueError("num_attention_heads must be a multiple of multi_query_group_num")
    if kv_channels % 4:
        raise ValueError("kv_channels must be a multiple of 4 (half of each head rotates, in pairs)")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    place_tokenizer(out, TOKENIZER_FILE, tokenizer_model, train_tokenizer)
    n_words = spm.SentencePieceProcessor(model_file=str(out / TOKENIZER_FILE)).vocab_size()
    padded_vocab_size = math.ceil((n_words + len(SPECIAL_TOKENS)) / 64) * 64

    generator = torch.Generator().manual_seed(seed)
    weights = random_weights(
        generator,
        vocab=padded_vocab_size,
        hidden=hidden_size,
        num_layers=num_layers,
        heads=num_attention_heads,
        kv_channels=kv_channels,
        groups=multi_query_group_num,
        ffn=ffn_hidden_size,
    )
    weights = {name: t.to(dtype).contiguous() for name, t in weights.items()}
    write_weights(out, weights, weight_format, bin_shards)

    config = _config(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        kv_channels=kv_channels,
        multi_query_group_num=multi_query_group_num,
        ffn_hidden_size=ffn_hidden_size,
        padded_vocab_size=padded_vocab_size,
        seq_length=seq_length,
        layernorm_epsilon=layernorm_epsilon,
        rope_ratio=rope_ratio,
        dtype=dtype,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# The same layout under other names: ChatGLM2-6B / CodeGeeX2-6B (+ -32k), ChatGLM3-6B-Base


def _retag(out: Path, name: str, **config_updates) -> None:
    config = json.loads((out / "config.json").read_text())
    config.update({"_name_or_path": name, **config_updates})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = json.loads((out / "tokenizer_config.json").read_text())
    tok["name_or_path"] = name
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")


def make_tiny_chatglm2_checkpoint(path, *, name: str = "THUDM/chatglm2-6b", rope_ratio: float | None = None, **kw) -> Path:
    """ChatGLM2-6B layout (CodeGeeX2 with name="THUDM/codegeex2-6b", 32k with a rope_ratio)."""
    out = make_tiny_checkpoint(path, **kw)
    updates = {"rope_ratio": rope_ratio} if rope_ratio is not None else {}
    _retag(out, name, **updates)
    return out


def make_tiny_chatglm3_base_checkpoint(path, **kw) -> Path:
    """ChatGLM3-6B-Base: the ChatGLM3 layout under the base model's name (not a chat model)."""
    out = make_tiny_checkpoint(path, **kw)
    _retag(out, "THUDM/chatglm3-6b-base")
    return out
