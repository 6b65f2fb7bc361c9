"""benchmarks/to_gguf.py: the GGUF file llama.cpp is compared on holds the checkpoint's own weights under
llama.cpp's ChatGLM names, read back with the gguf package (llama.cpp's own Python reader)."""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from to_gguf import write_gguf  # noqa: E402

from glmchat.loader import load_model  # noqa: E402

# ChatGLM's official names -> llama.cpp's (its convert_hf_to_gguf.py mapping for the chatglm architecture)
LLAMA_CPP_NAMES = {
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.query_key_value.weight": "attn_qkv.weight",
    "self_attention.query_key_value.bias": "attn_qkv.bias",
    "self_attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
}


def llama_cpp_name(official: str) -> str:
    if official in LLAMA_CPP_NAMES:
        return LLAMA_CPP_NAMES[official]
    layer, rest = official.removeprefix("transformer.encoder.layers.").split(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    path = write_gguf(model, tiny_ckpt / "tokenizer.model", tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return gguf.GGUFReader(path)


def field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0].item()


def test_every_checkpoint_tensor_is_in_the_gguf_under_llama_cpp_name(exported, tiny_ckpt):
    official = {k: v for k, v in load_file(tiny_ckpt / "model.safetensors").items() if "rotary_pos_emb" not in k}
    tensors = {t.name: t for t in exported.tensors}
    assert sorted(tensors) == sorted(llama_cpp_name(k) for k in official)
    for name, value in official.items():
        t = tensors[llama_cpp_name(name)]
        # GGUF lists dimensions innermost first; 2-D weights are float16, the rest float32
        assert list(t.shape) == list(reversed(value.shape)), name
        expected_type = gguf.GGMLQuantizationType.F16 if value.dim() == 2 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == expected_type, name
        expected = value.to(torch.float16 if value.dim() == 2 else torch.float32).numpy()
        np.testing.assert_array_equal(np.asarray(t.data).reshape(expected.shape), expected, err_msg=name)


def test_hyperparameters_are_the_config_json_values(exported, tiny_ckpt):
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert field(exported, "general.architecture") == "chatglm"
    assert field(exported, "chatglm.embedding_length") == config["hidden_size"]
    assert field(exported, "chatglm.block_count") == config["num_layers"]
    assert field(exported, "chatglm.feed_forward_length") == config["ffn_hidden_size"]
    assert field(exported, "chatglm.attention.head_count") == config["num_attention_heads"]
    assert field(exported, "chatglm.attention.head_count_kv") == config["multi_query_group_num"]
    assert field(exported, "chatglm.context_length") == config["seq_length"]
    assert field(exported, "chatglm.rope.dimension_count") == config["kv_channels"] // 2
    assert field(exported, "chatglm.rope.freq_base") == pytest.approx(10000 * config.get("rope_ratio", 1))
    assert field(exported, "chatglm.attention.layer_norm_rms_epsilon") == pytest.approx(config["layernorm_epsilon"])


def test_the_vocabulary_is_the_tokenizer_padded_to_the_embedding(exported, tiny_ckpt):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    tokens = exported.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert len(pieces) == config["padded_vocab_size"]
    assert pieces[:sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert field(exported, "tokenizer.ggml.model") == "llama"


def test_a_network_llama_cpp_does_not_have_is_refused(glm4_0414_ckpt, tiny_ckpt, tmp_path):
    model, _ = load_model(glm4_0414_ckpt, dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="sandwich norms"):
        write_gguf(model, tiny_ckpt / "tokenizer.model", tmp_path / "x.gguf")
