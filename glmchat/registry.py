"""config.json of the known hub models, so that random weights of the real shapes need no download."""

KNOWN_CONFIGS = {
    "THUDM/chatglm3-6b": {
        "model_type": "chatglm", "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
        "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2,
        "ffn_hidden_size": 13696, "padded_vocab_size": 65024, "seq_length": 8192,
        "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
        "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": False, "torch_dtype": "float16", "eos_token_id": 2, "pad_token_id": 0,
    },
}
_CHATGLM_6B = KNOWN_CONFIGS["THUDM/chatglm3-6b"]
_GLM4_9B = {
    **_CHATGLM_6B, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072,
    "layernorm_epsilon": 1.5625e-07, "rope_ratio": 500, "torch_dtype": "bfloat16",
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}
# Shapes of the rest of the family (random weights need no download; the family comes from the id).
KNOWN_CONFIGS.update({
    "THUDM/chatglm3-6b-base": {**_CHATGLM_6B, "seq_length": 32768},
    "THUDM/chatglm3-6b-32k": {**_CHATGLM_6B, "seq_length": 32768, "rope_ratio": 50},
    "THUDM/chatglm3-6b-128k": {**_CHATGLM_6B, "seq_length": 131072, "rope_ratio": 500},
    "THUDM/chatglm2-6b": {**_CHATGLM_6B, "seq_length": 32768},
    "THUDM/chatglm2-6b-32k": {**_CHATGLM_6B, "seq_length": 32768, "rope_ratio": 16},
    "THUDM/codegeex2-6b": {**_CHATGLM_6B, "seq_length": 8192, "torch_dtype": "bfloat16"},
    "THUDM/glm-4-9b-chat": _GLM4_9B,
    "THUDM/glm-4-9b": {**_GLM4_9B, "seq_length": 8192},
    "THUDM/glm-4-9b-chat-1m": {**_GLM4_9B, "seq_length": 1048576, "rope_ratio": 10000, "multi_query_group_num": 4},
    "THUDM/glm-4-9b-chat-hf": {
        "model_type": "glm", "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696, "vocab_size": 151552,
        "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07, "rope_theta": 5000000.0,
        "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
    },
})
_GLM_EDGE = {  # GlmForCausalLM with full rotary, no attention bias
    "model_type": "glm", "hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "vocab_size": 59264,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
    "attention_bias": False, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "eos_token_id": [59246, 59253, 59255], "pad_token_id": 59246,
}
KNOWN_CONFIGS.update({
    "THUDM/GLM-4-9B-0414": {  # Glm4ForCausalLM: the GLM block with sandwich norms
        "model_type": "glm4", "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696, "vocab_size": 151552,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
    },
    "THUDM/glm-edge-1.5b-chat": _GLM_EDGE,
    "THUDM/glm-edge-4b-chat": {
        **_GLM_EDGE, "hidden_size": 3072, "num_attention_heads": 24, "num_key_value_heads": 6,
        "intermediate_size": 8192, "tie_word_embeddings": False,
    },
})
KNOWN_CONFIGS["THUDM/chatglm-6b"] = {  # the original ChatGLM-6B: its own network (glmchat.model_v1)
    "model_type": "chatglm", "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
    "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048, "position_encoding_2d": True,
    "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
    "pad_token_id": 3, "torch_dtype": "float16",
}
KNOWN_CONFIGS["THUDM/GLM-4-32B-0414"] = {  # no attention bias (the 9B has one); evidence: its GGUF's metadata
    **KNOWN_CONFIGS["THUDM/GLM-4-9B-0414"], "hidden_size": 6144, "num_hidden_layers": 61, "num_attention_heads": 48,
    "intermediate_size": 23040, "attention_bias": False,
}
KNOWN_CONFIGS["THUDM/GLM-Z1-9B-0414"] = KNOWN_CONFIGS["THUDM/GLM-4-9B-0414"]  # the same network; the id names the family
KNOWN_CONFIGS["THUDM/GLM-Z1-32B-0414"] = KNOWN_CONFIGS["THUDM/GLM-4-32B-0414"]
