"""transformers' GLM tensor names -> the official ChatGLM ones."""

from __future__ import annotations

import re

import torch

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.dense.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.gate_up_proj.weight": "mlp.dense_h_to_4h.weight",
    "mlp.down_proj.weight": "mlp.dense_4h_to_h.weight",
}
_HF_TOP = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}


def official_tensors(tensors, pending: dict):
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
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
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
