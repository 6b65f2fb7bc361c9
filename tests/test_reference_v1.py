"""Self-checks of the ChatGLM-6B (v1) test reference (tests/reference_v1.py) and its tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch

from reference_v1 import (
    reference_decode,
    reference_encode,
    reference_greedy,
    reference_logits,
    reference_mask,
    reference_positions,
    reference_process_response,
    reference_prompt,
    reference_tensors,
)


@pytest.fixture(scope="module")
def config(chatglm6b_ckpt):
    return json.loads((chatglm6b_ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def sp(chatglm6b_ckpt):
    return spm.SentencePieceProcessor(model_file=str(chatglm6b_ckpt / "ice_text.model"))


def test_config_ids_are_the_tokenizer_pieces(config, sp):
    pieces = {"bos_token_id": "<sop>", "eos_token_id": "<eop>", "mask_token_id": "[MASK]",
              "gmask_token_id": "[gMASK]", "pad_token_id": "<pad>"}
    assert {key: sp.id_to_piece(config[key]) for key in pieces} == pieces
    assert config["pad_token_id"] == 3 and sp.id_to_piece(0) == "<unk>"
    assert all(sp.is_control(config[key]) for key in ("bos_token_id", "eos_token_id", "gmask_token_id"))
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= sp.vocab_size()
    assert config["position_encoding_2d"] is True and "tie_word_embeddings" not in config


def test_weights_official_names_and_tied_head(chatglm6b_ckpt, config):
    w = reference_tensors(chatglm6b_ckpt)
    assert torch.equal(w["lm_head.weight"], w["transformer.word_embeddings.weight"])
    H, inner = config["hidden_size"], config["inner_hidden_size"]
    assert w["transformer.layers.1.attention.query_key_value.weight"].shape == (3 * H, H)
    assert w["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape == (H, inner)
    assert w["transformer.final_layernorm.bias"].shape == (H,)
    head_dim = H // config["num_attention_heads"]
    assert w["transformer.layers.0.attention.rotary_emb.inv_freq"].shape == (head_dim // 4,)


def test_positions_and_mask_by_hand(config):
    g, m, sop = config["gmask_token_id"], config["mask_token_id"], config["bos_token_id"]
    row = [100, 101, 102, g, sop, 103, 104]
    pos, block, c = reference_positions(row, config)
    assert (pos, block, c) == ([0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3], 4)
    assert reference_mask(7, c).int().tolist() == [
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    # [MASK] only when the row has no [gMASK]
    assert reference_positions([100, m, 102, sop, 103], config)[:2] == ([0, 1, 2, 1, 1], [0, 0, 0, 1, 2])
    assert reference_positions([m, 100, g, sop], config)[:2] == ([0, 1, 2, 2], [0, 0, 0, 1])


def test_encode_specials(chatglm6b_ckpt, config, sp):
    ids = reference_encode(chatglm6b_ckpt, "a\n\tb   c")
    for piece in ("<n>", "<|tab|>", "<|blank_3|>"):
        assert sp.piece_to_id(piece) in ids
    assert ids[-2:] == [config["gmask_token_id"], config["bos_token_id"]]
    assert reference_decode(chatglm6b_ckpt, ids) == "a\n\tb   c"


ROUND_TRIPS = ["你好，世界", "line one\nline two\n", "a\tb\t\tc", "x" + " " * 7 + "y",
               "  两个空格 and 100 spaces" + " " * 100 + "end", "[Round 0]\n问：你好\n答："]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_decode_encode_round_trip(chatglm6b_ckpt, text):
    assert reference_decode(chatglm6b_ckpt, reference_encode(chatglm6b_ckpt, text)) == text


def test_prompt_and_process_response():
    assert reference_prompt("你好", []) == "你好"
    assert reference_prompt("再见", [("你好", "嗨")]) == "[Round 0]\n问：你好\n答：嗨\n[Round 1]\n问：再见\n答："
    assert reference_process_response("你好,世界") == "你好，世界"
    assert reference_process_response("a,b") == "a,b"
    assert reference_process_response("  [[训练时间]]! ") == "2023年！"
    assert reference_process_response("what?好") == "what？好"
    assert reference_process_response("好:a;b") == "好：a;b"


def test_logits_shape_mask_and_greedy(chatglm6b_ckpt, config):
    g, sop = config["gmask_token_id"], config["bos_token_id"]
    rows = torch.tensor([[100, 101, 102, g, sop, 103, 104],
                         [200, 201, 202, g, sop, 203, 205]])
    logits = reference_logits(chatglm6b_ckpt, rows)
    assert logits.shape == (2, 7, config["vocab_size"]) and torch.isfinite(logits).all()
    # rows are independent
    torch.testing.assert_close(reference_logits(chatglm6b_ckpt, rows[1:]), logits[1:], rtol=0, atol=0)
    # the context is bidirectional: a later context token changes the first position's logits ...
    changed = rows[:1].clone()
    changed[0, 2] = 150
    other = reference_logits(chatglm6b_ckpt, changed)
    assert not torch.allclose(other[0, 0], logits[0, 0])
    # ... while after <sop> attention is causal: the last token does not change earlier logits
    changed = rows[:1].clone()
    changed[0, 6] = 150
    other = reference_logits(chatglm6b_ckpt, changed)
    torch.testing.assert_close(other[0, :6], logits[0, :6], rtol=0, atol=0)
    assert not torch.allclose(other[0, 6], logits[0, 6])

    prompt = reference_encode(chatglm6b_ckpt, "你好")
    new = reference_greedy(chatglm6b_ckpt, prompt, 4, config["eos_token_id"])
    assert 1 <= len(new) <= 4
    full = reference_logits(chatglm6b_ckpt, torch.tensor([prompt + new[:-1]]))[0]
    assert full[len(prompt) - 1 :].argmax(-1).tolist() == new
    half = reference_logits(chatglm6b_ckpt, torch.tensor([prompt]), dtype=torch.float16)
    torch.testing.assert_close(half.float(), reference_logits(chatglm6b_ckpt, torch.tensor([prompt])),
                               rtol=0.05, atol=0.1)
