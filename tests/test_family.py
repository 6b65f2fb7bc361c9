"""The GLM family: ChatGLM2/CodeGeeX2 (+32k), ChatGLM3-Base, GLM-4-9B-chat and its -hf layout.

Each model gets a tiny random checkpoint in its official layout; logits are compared with
transformers' native GlmForCausalLM (the GLM-4 block; linear rope scaling for ChatGLM2-32k's
position interpolation), tokenizers with Hugging Face `tokenizers` / transformers' own chat
template rendering.
"""

from __future__ import annotations

import json

import pytest
import torch

from glmchat.families import NotAChatModelError, detect_family
from glmchat.families.chatglm2 import ChatGLM2Tokenizer, chatglm2_pairs
from glmchat.families.glm4 import SPECIAL_TOKENS, GLM4Tokenizer, glm4_prompt_ids, parse_json_tool_call
from glmchat.loader import load_config, load_model, read_config
from glmchat.registry import KNOWN_CONFIGS
from glmchat.testing import corpus_lines
from reference import reference_model

TRICKY = ["  hello\n\n\tworld  ", "I'M don't we'll 12345 ３４", "emoji 😀👍🏽 ok", "<|user| >[gMASK ]", "a\r\nb\n", ""]


def _ids(n: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, n, (1, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Recognition


def test_families_are_recognised_from_files(glm4_ckpt, glm4_hf_ckpt, chatglm2_ckpt, chatglm2_32k_ckpt, tiny_ckpt,
                                            chatglm3_base_ckpt, glm4_base_ckpt, codegeex2_ckpt):
    base, glm4_base, codegeex = chatglm3_base_ckpt, glm4_base_ckpt, codegeex2_ckpt
    found = {name: read_config(path)[1] for name, path in [
        ("glm4", glm4_ckpt), ("glm4_hf", glm4_hf_ckpt), ("chatglm2", chatglm2_ckpt), ("chatglm2_32k", chatglm2_32k_ckpt),
        ("chatglm3", tiny_ckpt), ("base", base), ("glm4_base", glm4_base), ("codegeex", codegeex),
    ]}
    assert {k: (f.name, f.chat) for k, f in found.items()} == {
        "glm4": ("glm4", True), "glm4_hf": ("glm4", True), "chatglm2": ("chatglm2", True),
        "chatglm2_32k": ("chatglm2", True), "chatglm3": ("chatglm3", True), "base": ("chatglm3", False),
        "glm4_base": ("glm4", False), "codegeex": ("chatglm2", True),
    }
    assert found["codegeex"].label == "CodeGeeX2-6B"
    with pytest.raises(NotAChatModelError, match="base model"):
        found["base"].prompt_ids(found["base"].load_tokenizer(base), [{"role": "user", "content": "hi"}])


def test_family_override_and_unknown_family(chatglm2_ckpt):
    assert read_config(chatglm2_ckpt, family="chatglm3")[1].name == "chatglm3"
    with pytest.raises(ValueError, match="unknown family"):
        read_config(chatglm2_ckpt, family="llama")


def test_known_hub_configs_have_the_real_shapes():
    glm4 = load_config("THUDM/glm-4-9b-chat")
    hf = load_config("THUDM/glm-4-9b-chat-hf")
    for c in (glm4, hf):
        assert (c.num_layers, c.hidden_size, c.padded_vocab_size, c.layernorm_epsilon) == (40, 4096, 151552, 1.5625e-07)
        assert c.rope_base == 5_000_000.0 and c.rope_position_divisor == 1.0
    c2 = load_config("THUDM/chatglm2-6b-32k")
    assert (c2.rope_base, c2.rope_position_divisor) == (10000.0, 16)
    c3 = load_config("THUDM/chatglm3-6b-32k")
    assert (c3.rope_base, c3.rope_position_divisor) == (500000.0, 1.0)
    # Every built-in id against the numbers in its hub config.json (rope_ratio / rope_theta turned
    # into the rotary base and the position divisor by the spec's rules), written out here.
    got = {name: (lambda c: (c.num_layers, c.hidden_size, c.padded_vocab_size, c.seq_length, c.layernorm_epsilon,
                             c.rope_base, c.rope_position_divisor))(load_config(name)) for name in KNOWN_CONFIGS}
    # KV groups, where the hub's config.json was read (the 1M model has 4, the 128K chat 2).
    assert {name: load_config(name).num_kv_heads for name in
            ("THUDM/glm-4-9b-chat", "THUDM/glm-4-9b-chat-1m", "THUDM/chatglm-6b", "THUDM/GLM-4-32B-0414")} == {
        "THUDM/glm-4-9b-chat": 2, "THUDM/glm-4-9b-chat-1m": 4, "THUDM/chatglm-6b": 32, "THUDM/GLM-4-32B-0414": 2}
    assert got == {
        "THUDM/chatglm-6b": (28, 4096, 130528, 2048, 1e-5, 10000.0, 1.0),
        "THUDM/chatglm3-6b": (28, 4096, 65024, 8192, 1e-5, 10000.0, 1.0),
        "THUDM/chatglm3-6b-base": (28, 4096, 65024, 32768, 1e-5, 10000.0, 1.0),
        "THUDM/chatglm3-6b-32k": (28, 4096, 65024, 32768, 1e-5, 500_000.0, 1.0),
        "THUDM/chatglm3-6b-128k": (28, 4096, 65024, 131072, 1e-5, 5_000_000.0, 1.0),
        "THUDM/chatglm2-6b": (28, 4096, 65024, 32768, 1e-5, 10000.0, 1.0),
        "THUDM/chatglm2-6b-32k": (28, 4096, 65024, 32768, 1e-5, 10000.0, 16.0),
        "THUDM/codegeex2-6b": (28, 4096, 65024, 8192, 1e-5, 10000.0, 1.0),
        "THUDM/glm-4-9b-chat": (40, 4096, 151552, 131072, 1.5625e-07, 5_000_000.0, 1.0),
        "THUDM/glm-4-9b": (40, 4096, 151552, 8192, 1.5625e-07, 5_000_000.0, 1.0),
        "THUDM/glm-4-9b-chat-1m": (40, 4096, 151552, 1048576, 1.5625e-07, 100_000_000.0, 1.0),
        "THUDM/glm-4-9b-chat-hf": (40, 4096, 151552, 131072, 1.5625e-07, 5_000_000.0, 1.0),
        "THUDM/GLM-4-9B-0414": (40, 4096, 151552, 32768, 1e-5, 10000.0, 1.0),
        "THUDM/GLM-Z1-9B-0414": (40, 4096, 151552, 32768, 1e-5, 10000.0, 1.0),
        "THUDM/GLM-4-32B-0414": (61, 6144, 151552, 32768, 1e-5, 10000.0, 1.0),
        "THUDM/GLM-Z1-32B-0414": (61, 6144, 151552, 32768, 1e-5, 10000.0, 1.0),
        "THUDM/glm-edge-1.5b-chat": (28, 2048, 59264, 8192, 1e-5, 10000.0, 1.0),
        "THUDM/glm-edge-4b-chat": (28, 3072, 59264, 8192, 1e-5, 10000.0, 1.0),
    }


# ---------------------------------------------------------------------------------------------
# Logits parity


def _assert_parity(ours, ref, n_vocab):
    ids = _ids(n_vocab)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_glm4_logits_match_transformers(glm4_ckpt):
    model, _ = load_model(glm4_ckpt, progress=False)
    assert model.config.rope_base == 10000.0 * 500 and model.config.layernorm_epsilon == 1.5625e-07
    _assert_parity(model, reference_model(glm4_ckpt), model.config.padded_vocab_size)


def test_glm4_hf_layout_loads_natively_in_both(glm4_ckpt, glm4_hf_ckpt):
    """The -hf checkpoint is read by transformers' own from_pretrained and by glmchat: same logits,
    and the same as the chatglm-layout checkpoint made from the same seed."""
    from transformers import GlmForCausalLM

    ref = GlmForCausalLM.from_pretrained(glm4_hf_ckpt, attn_implementation="eager").eval()
    model, _ = load_model(glm4_hf_ckpt, progress=False)
    _assert_parity(model, ref, model.config.padded_vocab_size)
    other, _ = load_model(glm4_ckpt, progress=False)
    ids = _ids(model.config.padded_vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids))


def test_chatglm2_32k_interpolates_positions(chatglm2_32k_ckpt):
    """ChatGLM2-32k divides positions by rope_ratio (base stays 10000): transformers' linear rope scaling."""
    model, _ = load_model(chatglm2_32k_ckpt, progress=False)
    assert (model.config.rope_base, model.config.rope_position_divisor) == (10000.0, 4.0)
    linear = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    _assert_parity(model, reference_model(chatglm2_32k_ckpt, rope_parameters=linear), model.config.padded_vocab_size)
    # ... and it is not ChatGLM3's base scaling, which the same config means for ChatGLM3:
    as_chatglm3 = reference_model(chatglm2_32k_ckpt)
    ids = _ids(model.config.padded_vocab_size)
    with torch.no_grad():
        assert (model(ids) - as_chatglm3(ids).logits).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# GLM-4 tokenizer


def test_glm4_tokenizer_matches_huggingface_tokenizers(glm4_ckpt, glm4_hf_ckpt):
    """Our BPE against the Rust `tokenizers` implementation reading the same vocabulary."""
    from tokenizers import Tokenizer

    ours, from_json = GLM4Tokenizer.from_pretrained(glm4_ckpt), GLM4Tokenizer.from_pretrained(glm4_hf_ckpt)
    rust = Tokenizer.from_file(str(glm4_hf_ckpt / "tokenizer.json"))
    for text in corpus_lines() + TRICKY:
        expected = rust.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert from_json.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected) == text


def test_glm4_specials_follow_the_ranks(glm4_ckpt, glm4_ranks):
    tok = GLM4Tokenizer.from_pretrained(glm4_ckpt)
    n = len(glm4_ranks)
    assert [tok.get_command(s) for s in SPECIAL_TOKENS] == list(range(n, n + 14))
    assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (n, n, n + 14)
    assert tok.encode("hi")[:2] == [n + 2, n + 4]  # [gMASK] <sop>
    assert n + 7 not in tok.encode("<|user|>")  # special-looking text stays text
    assert tok.decode([n + 2, n + 4, n + 7]) == "[gMASK]<sop><|user|>"
    assert tok.decode([n + 7] + tok.encode("x", add_special_tokens=False), skip_special_tokens=True) == "x"
    half = "世".encode()[:2]
    assert tok.decode([glm4_ranks[bytes([b])] for b in half]) == "\ufffd"


def test_glm4_tokenizer_refuses_bad_files(tmp_path):
    (tmp_path / "tokenizer.model").write_text("not base64! 3\n")
    with pytest.raises(ValueError, match="base64"):
        GLM4Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_text("YQ== 0\n")
    with pytest.raises(ValueError, match="256 single bytes"):
        GLM4Tokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# GLM-4 chat template and stops

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "\n\n  again?"}],
    [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
     {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
     {"role": "observation", "content": '{"temp": 20}'}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_glm4_prompt_matches_transformers_chat_template(glm4_ckpt, glm4_hf_ckpt, messages):
    """transformers renders the checkpoint's chat template and tokenizes it with its Rust tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(glm4_hf_ckpt)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    tok = GLM4Tokenizer.from_pretrained(glm4_ckpt)
    assert glm4_prompt_ids(tok, messages) == list(expected)
    family = read_config(glm4_ckpt)[1]
    assert family.prompt_ids(tok, messages) == list(expected)


def test_glm4_stops_are_the_configs_eos_ids(glm4_ckpt):
    config = json.loads((glm4_ckpt / "config.json").read_text())
    family, tok = read_config(glm4_ckpt)[1], GLM4Tokenizer.from_pretrained(glm4_ckpt)
    assert family.stop_ids(tok) == config["eos_token_id"]
    assert [tok.decode([i]) for i in family.stop_ids(tok)] == ["<|endoftext|>", "<|user|>", "<|observation|>"]


def test_glm4_tool_call_arguments_are_json():
    assert parse_json_tool_call('{"city": "北京", "days": 3}') == {"city": "北京", "days": 3}
    with pytest.raises(ValueError, match="not JSON"):
        parse_json_tool_call("city='北京'")


# ---------------------------------------------------------------------------------------------
# ChatGLM2


def test_chatglm2_tokenizer_has_five_specials_rendered_empty(chatglm2_ckpt):
    tok = read_config(chatglm2_ckpt)[1].load_tokenizer(chatglm2_ckpt)
    assert isinstance(tok, ChatGLM2Tokenizer)
    n = tok.n_words
    assert (tok.get_command("[gMASK]"), tok.get_command("sop"), tok.vocab_size) == (n + 1, n + 3, n + 5)
    with pytest.raises(ValueError):
        tok.get_command("<|user|>")
    ids = tok.encode("你好")
    assert ids[:2] == [n + 1, n + 3] and tok.decode(ids) == "你好"
    assert tok.stop_token_ids == [tok.eos_token_id] == read_config(chatglm2_ckpt)[1].stop_ids(tok)


def test_chatglm2_prompt_is_rounds_of_questions_and_answers(chatglm2_ckpt):
    tok = ChatGLM2Tokenizer.from_pretrained(chatglm2_ckpt)
    history = [("你好", "你好！"), ("1+1?", "2")]
    assert tok.build_prompt("再见", history) == (
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：1+1?\n\n答：2\n\n[Round 3]\n\n问：再见\n\n答："
    )
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "再见"}]
    assert chatglm2_pairs(messages) == ("再见", history)
    ids = read_config(chatglm2_ckpt)[1].prompt_ids(tok, messages)
    assert ids == tok.get_prefix_tokens() + tok.sp.encode(tok.build_prompt("再见", history))
    assert tok.build_chat_input("再见", history).input_ids[0].tolist() == ids
    with pytest.raises(ValueError, match="only user and assistant"):
        chatglm2_pairs([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_detection_without_files_uses_the_name():
    raw = dict(KNOWN_CONFIGS["THUDM/chatglm3-6b"], rope_ratio=16)
    assert detect_family(None, raw, name="THUDM/chatglm2-6b-32k").rope_scaling == "position"
    assert detect_family(None, raw, name="THUDM/chatglm3-6b-32k").rope_scaling == "base"
    assert not detect_family(None, raw, name="THUDM/chatglm3-6b-base").chat
