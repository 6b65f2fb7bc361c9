"""Write a glmchat ChatGLM3-shaped model as a GGUF file that llama.cpp runs (its "chatglm" architecture).

For comparing with llama.cpp on the same weights (benchmarks/vs_llama_cpp.py). The layout follows
llama.cpp's own ChatGLM support (src/models/chatglm.cpp and convert_hf_to_gguf.py's ChatGLMModel):
a fused attn_qkv with bias, a fused ffn_up holding [gate; up] (SwiGLU takes the first half through
SiLU), interleaved ("normal") rotary over the first 64 dimensions of each head, rotary base
10000·rope_ratio. 2-D weights are written as float16 (the 16-bit format llama.cpp quantizes from),
norms and biases as float32. Tensors stream to the file one at a time, so the model is in memory
once. The tokenizer is the SentencePiece model given (llama.cpp needs one; the benchmark feeds it
token ids), padded with unused pieces to the model's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# our parameter names -> llama.cpp's tensor names (per layer: "layers.N.<key>" -> "blk.N.<value>")
_TOP_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight", "attn.qkv.weight": "attn_qkv.weight", "attn.qkv.bias": "attn_qkv.bias",
    "attn.dense.weight": "attn_output.weight", "mlp_norm.weight": "ffn_norm.weight",
    "mlp.gate_up.weight": "ffn_up.weight", "mlp.down.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, layer, rest = (name.split(".", 2) + ["", ""])[:3]
    if prefix == "layers" and rest in _LAYER_NAMES:
        return f"blk.{layer}.{_LAYER_NAMES[rest]}"
    raise KeyError(f"{name}: no llama.cpp chatglm tensor for it (only ChatGLM3-6B's layout is written)")


def _file_dtype(t: torch.Tensor) -> tuple[torch.dtype, np.dtype]:
    """Matrices in float16 (what llama.cpp quantizes from), norms and biases in float32."""
    return (torch.float16, np.dtype(np.float16)) if t.dim() == 2 else (torch.float32, np.dtype(np.float32))


def write_gguf(model, tokenizer_model: str | Path, path: str | Path, name: str = "glmchat random ChatGLM3-6B") -> Path:
    """Write `model` (a 16-bit or float32 GLMTransformer with ChatGLM3's layout) to `path` as GGUF."""
    import gguf  # optional: pip install -e ".[compare]"
    from sentencepiece import SentencePieceProcessor

    config = model.config
    if (config.rotary_dim != config.head_dim // 2 or config.sandwich_norms or config.tie_word_embeddings
            or not config.add_qkv_bias or config.rope_scaling != "base"
            or config.head_dim * config.num_attention_heads != config.hidden_size):
        raise ValueError("llama.cpp's chatglm architecture is ChatGLM3's network: half rotary scaled by its base, "
                         "qkv bias, heads filling the width, no sandwich norms, untied output")
    path = Path(path)
    w = gguf.GGUFWriter(path, "chatglm")
    w.add_name(name)
    w.add_context_length(config.seq_length)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.ffn_hidden_size)
    w.add_block_count(config.num_layers)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_layer_norm_rms_eps(config.layernorm_epsilon)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_rope_freq_base(config.rope_base)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(w, SentencePieceProcessor(model_file=str(tokenizer_model)), config.padded_vocab_size)

    state = model.state_dict()
    for key, t in state.items():
        _, dtype = _file_dtype(t)
        w.add_tensor_info(gguf_name(key), tuple(t.shape), dtype, t.numel() * dtype.itemsize)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in state.values():
        w.write_tensor_data(t.detach().to("cpu", _file_dtype(t)[0]).contiguous().numpy())
    w.close()
    return path


def _add_tokenizer(w, sp, vocab_size: int) -> None:
    import gguf

    if sp.vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer has {sp.vocab_size()} pieces, more than the model's {vocab_size} embeddings")
    kinds = gguf.TokenType
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
                     else kinds.BYTE if sp.is_byte(i) else kinds.UNUSED if sp.is_unused(i) else kinds.NORMAL)
    for i in range(sp.vocab_size(), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(kinds.UNUSED)
    w.add_tokenizer_model("llama")  # SentencePiece, as llama.cpp's converter writes ChatGLM3's
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_add_bos_token(False)
