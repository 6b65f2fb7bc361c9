"""The one table of tensor names: every checkpoint layout glmchat reads, mapped to our modules.

Official ChatGLM names (transformer.encoder.layers.N.self_attention.query_key_value.weight, ...)
map to our module names (layers.N.attn.qkv.weight, ...) and back, quantized checkpoints' buffers
(qweight, scales, scales_zeros) included. transformers' native GLM names ("-hf" repos:
model.layers.N.self_attn.q_proj.weight, ...) map to the official ones, with q/k/v joined into
query_key_value. GLM-4-0414's sandwich norms (post_self_attn_layernorm, post_mlp_layernorm) exist
only in transformers' layout; their "official" names here are the same words in ChatGLM's
prefix. The original ChatGLM-6B's names (transformer.layers.N.attention.query_key_value, ...,
transformer.final_layernorm, lm_head) map to glmchat.model_v1's modules and back: names are written
in the layout of the model's network. `sanitize` applies all of it where tensors enter the loader.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from .checkpoint import CheckpointError

# official name -> our module name, per network (GLMConfig.network); a group is the layer (and weight|bias).
_NAME_PATTERNS = {
    "glm": [
        (r"transformer\.embedding\.word_embeddings\.weight", "embed.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attn_norm.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", "layers.{}.attn.qkv.{}"),
        (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight", "layers.{}.attn.dense.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.mlp_norm.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.post_self_attn_layernorm\.weight", "layers.{}.post_attn_norm.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.post_mlp_layernorm\.weight", "layers.{}.post_mlp_norm.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", "layers.{}.mlp.gate_up.weight"),
        (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", "layers.{}.mlp.down.weight"),
        (r"transformer\.encoder\.final_layernorm\.weight", "norm.weight"),
        (r"transformer\.output_layer\.weight", "output.weight"),
    ],
    # The original ChatGLM-6B (glmchat.model_v1): other names, biases on every Linear and LayerNorm.
    "chatglm-6b": [
        (r"transformer\.word_embeddings\.weight", "embed.weight"),
        (r"transformer\.layers\.(\d+)\.input_layernorm\.(weight|bias)", "layers.{}.attn_norm.{}"),
        (r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", "layers.{}.attn.qkv.{}"),
        (r"transformer\.layers\.(\d+)\.attention\.dense\.(weight|bias)", "layers.{}.attn.dense.{}"),
        (r"transformer\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", "layers.{}.mlp_norm.{}"),
        (r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", "layers.{}.mlp.up.{}"),
        (r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", "layers.{}.mlp.down.{}"),
        (r"transformer\.final_layernorm\.(weight|bias)", "norm.{}"),
        (r"lm_head\.weight", "output.weight"),  # the embedding, tied (a copy in the official files)
    ],
}
_NAME_PATTERNS = {network: [(re.compile(p), target) for p, target in rows] for network, rows in _NAME_PATTERNS.items()}
# Recomputed: rotary frequencies (ChatGLM2/3's, and ChatGLM-6B's per layer).
_IGNORED = re.compile(r"transformer\.rotary_pos_emb\.inv_freq|transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq")

QUANTIZED_SUFFIXES = ("qweight", "scales", "scales_zeros")  # a quantized checkpoint's Linear buffers


def native_name(official: str) -> str | None:
    """Our parameter name for an official tensor name; None for tensors we recompute."""
    if _IGNORED.fullmatch(official):
        return None
    base, _, suffix = official.rpartition(".")
    if suffix in QUANTIZED_SUFFIXES:
        return native_name(base + ".weight").removesuffix("weight") + suffix
    for pattern, target in (row for rows in _NAME_PATTERNS.values() for row in rows):
        m = pattern.fullmatch(official)
        if m:
            return target.format(*m.groups())
    raise KeyError(official)


def _reversed(pattern: re.Pattern, target: str) -> tuple[re.Pattern, str]:
    """(regex of our name, template of the official name) for one row of _NAME_PATTERNS."""
    return re.compile(re.escape(target).replace(r"\{\}", r"(\w+)")), re.sub(r"\([^)]*\)", "{}", pattern.pattern).replace("\\.", ".")


_OFFICIAL_NAMES = {network: [_reversed(p, t) for p, t in rows] for network, rows in _NAME_PATTERNS.items()}


def official_name(native: str, network: str = "glm") -> str:
    """The checkpoint name of one of our tensors in `network`'s official layout (the inverse of native_name)."""
    base, _, suffix = native.rpartition(".")
    if suffix in QUANTIZED_SUFFIXES:
        return official_name(base + ".weight", network).removesuffix("weight") + suffix
    for pattern, template in _OFFICIAL_NAMES[network]:
        m = pattern.fullmatch(native)
        if m:
            return template.format(*m.groups())
    raise KeyError(native)


# transformers' native layout ("-hf" repos) -> official names
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")
_HF_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "post_self_attn_layernorm.weight": "post_self_attn_layernorm.weight",  # GLM-4-0414
    "post_mlp_layernorm.weight": "post_mlp_layernorm.weight",  # GLM-4-0414
    "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
}
_HF_TOP = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}


def _official_tensors(tensors: Iterable[tuple[str, torch.Tensor]], pending: dict):
    """(name, tensor) with transformers' GLM names turned into ChatGLM's official ones.

    q_proj/k_proj/v_proj of a layer are held in `pending` (shared across shards, since a shard may
    end between them) until all three are there, then yielded as one query_key_value. Other
    names pass through unchanged.
    """
    for name, tensor in tensors:
        if name in _HF_TOP:
            yield _HF_TOP[name], tensor
            continue
        m = _HF_LAYER.fullmatch(name)
        if not m:
            yield name, tensor
            continue
        layer, rest = m.groups()
        prefix = f"transformer.encoder.layers.{layer}."
        qkv = _HF_QKV.fullmatch(rest)
        if qkv:
            part, kind = qkv.groups()
            parts = pending.setdefault((layer, kind), {})
            parts[part] = tensor
            if len(parts) == 3:
                del pending[(layer, kind)]
                yield prefix + f"self_attention.query_key_value.{kind}", torch.cat([parts[p] for p in "qkv"])
        elif rest in _HF_SIMPLE:
            yield prefix + _HF_SIMPLE[rest], tensor
        else:
            yield name, tensor


def sanitize(tensors: Iterable[tuple[str, torch.Tensor]], pending: dict, source: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(our module name, tensor) for checkpoint tensors of any layout; recomputed tensors are dropped.

    pending: q/k/v of "-hf" checkpoints waiting for the rest of their layer (pass the same dict
    for every shard of a checkpoint). A name of no known layout raises CheckpointError naming `source`.
    """
    for name, tensor in _official_tensors(tensors, pending):
        try:
            target = native_name(name)
        except KeyError:
            raise CheckpointError(
                f"{source}: unexpected tensor {name!r}; this does not look like a ChatGLM2/3 checkpoint"
            ) from None
        if target is not None:
            yield target, tensor
