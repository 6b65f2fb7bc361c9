"""transformers' native GlmForCausalLM built from an official-layout checkpoint: the public reference.

It reads the checkpoint files itself (not through glmchat's loader) and converts the names:
query_key_value -> q/k/v_proj, dense -> o_proj, dense_h_to_4h -> gate_up_proj, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def official_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    if (ckpt / "model.safetensors").exists():
        return load_file(ckpt / "model.safetensors")
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(torch.load(ckpt / shard, weights_only=True))
    return tensors


def reference_model(ckpt: Path, dtype=torch.float32, rope_parameters: dict | None = None):
    from transformers import GlmConfig, GlmForCausalLM

    c = json.loads((ckpt / "config.json").read_text())
    heads, groups, kv = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
    config = GlmConfig(
        vocab_size=c["padded_vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["ffn_hidden_size"], num_hidden_layers=c["num_layers"],
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=kv,
        rms_norm_eps=c["layernorm_epsilon"], max_position_embeddings=c["seq_length"],
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0 * c.get("rope_ratio", 1.0),
                                            "partial_rotary_factor": 0.5},
        attention_bias=True, pad_token_id=c.get("pad_token_id"), eos_token_id=c["eos_token_id"],
    )
    config._attn_implementation = "eager"
    model = GlmForCausalLM(config)

    src = official_tensors(ckpt)
    dst = {"model.embed_tokens.weight": src["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": src["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": src["transformer.output_layer.weight"]}
    sizes = [heads * kv, groups * kv, groups * kv]
    for i in range(c["num_layers"]):
        s, d = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = src[s + f"self_attention.query_key_value.{kind}"].split(sizes)
            dst[d + f"self_attn.q_proj.{kind}"] = q
            dst[d + f"self_attn.k_proj.{kind}"] = k
            dst[d + f"self_attn.v_proj.{kind}"] = v
        dst[d + "self_attn.o_proj.weight"] = src[s + "self_attention.dense.weight"]
        dst[d + "input_layernorm.weight"] = src[s + "input_layernorm.weight"]
        dst[d + "post_attention_layernorm.weight"] = src[s + "post_attention_layernorm.weight"]
        dst[d + "mlp.gate_up_proj.weight"] = src[s + "mlp.dense_h_to_4h.weight"]
        dst[d + "mlp.down_proj.weight"] = src[s + "mlp.dense_4h_to_h.weight"]
    model.load_state_dict(dst, strict=True)
    return model.to(dtype).eval()
