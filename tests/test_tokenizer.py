"""ChatGLMTokenizer against the spec's Tokenizer section.

Expected values come from SentencePiece directly (``sp``) and from the spec's rules, never from the
tokenizer under test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

import glmchat
from glmchat.chat import standin_tokenizer
from glmchat.families import TokenizerError
from glmchat.families.chatglm3 import ChatGLMTokenizer
from glmchat.testing import DEFAULT_VOCAB_SIZE, train_tokenizer

SPEC_SPECIALS = [
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"
]
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@pytest.fixture(scope="module")
def sp(tiny_ckpt: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))


@pytest.fixture(scope="module")
def ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """Spec ids of the specials: n + index."""
    n = sp.vocab_size()
    return {name: n + i for i, name in enumerate(SPEC_SPECIALS)}


def byte_id(sp: spm.SentencePieceProcessor, b: int) -> int:
    return sp.piece_to_id(f"<0x{b:02X}>")


# ---- vocabulary and special tokens ---------------------------------------------------------


def test_special_token_ids_follow_the_sp_vocab(tokenizer, sp, ids):
    n = sp.vocab_size()
    assert tokenizer.n_words == n
    assert tokenizer.vocab_size == n + 9 == len(tokenizer)
    assert list(tokenizer.special_tokens) == SPEC_SPECIALS
    assert tokenizer.special_tokens == ids
    for name, i in ids.items():
        assert tokenizer.get_command(name) == i


def test_eos_pad_and_stop_ids(tokenizer, sp, ids):
    assert tokenizer.eos_token_id == sp.eos_id() == 2
    assert tokenizer.pad_token_id == sp.unk_id() == 0
    assert tokenizer.get_command("<eos>") == 2 and tokenizer.get_command("<pad>") == 0
    assert tokenizer.stop_token_ids == [2, ids["<|user|>"], ids["<|observation|>"]]
    assert ids["<|assistant|>"] not in tokenizer.stop_token_ids


def test_get_command_unknown_name(tokenizer):
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.get_command("<|robot|>")


# ---- encode -------------------------------------------------------------------------------


def test_encode_adds_gmask_sop_prefix_only(tokenizer, sp, ids):
    text = "Hello world, 你好"
    assert tokenizer.encode(text) == [ids["[gMASK]"], ids["sop"]] + sp.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)
    assert sp.bos_id() not in tokenizer.encode(text) and tokenizer.encode(text)[-1] != sp.eos_id()


def test_dummy_prefix(tokenizer, sp):
    pieces = tokenizer.tokenize("Hello")
    assert pieces == sp.encode("Hello", out_type=str)
    assert pieces[0].startswith("▁")
    assert "".join(pieces) == "▁Hello"
    assert "".join(tokenizer.tokenize("a b")) == "▁a▁b"


def test_newline_is_space_piece_then_byte_0x0A(tokenizer, sp):
    expected = [sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]
    assert sp.piece_to_id("<0x0A>") == 3 + 0x0A  # unk, bos, eos, then the 256 byte pieces
    assert tokenizer.encode("\n", add_special_tokens=False) == expected
    assert tokenizer.tokenize("\n") == ["▁", "<0x0A>"]


@pytest.mark.parametrize("name", SPEC_SPECIALS)
def test_special_looking_text_is_plain_text(tokenizer, sp, name):
    encoded = tokenizer.encode(name, add_special_tokens=False)
    assert encoded == sp.encode(name)
    assert all(i < sp.vocab_size() for i in encoded)
    assert tokenizer.decode(encoded) == name


def test_chinese_round_trip(tokenizer, sp):
    text = "你好，世界！今天天气很好。我们在北京见面吧？"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(encoded) == text == sp.decode(encoded)
    # The ▁ of the dummy prefix follows "sop", so it stays a space.
    assert tokenizer.decode(tokenizer.encode(text)) == "[gMASK]sop " + text


def test_emoji_uses_byte_fallback(tokenizer, sp):
    text = "😀🎉"
    pieces = tokenizer.tokenize(text)
    assert pieces[0] == "▁"
    assert pieces[1:] == [f"<0x{b:02X}>" for b in text.encode("utf-8")]
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[1:] == [byte_id(sp, b) for b in text.encode("utf-8")]
    assert all(sp.is_byte(i) for i in encoded[1:])
    assert tokenizer.decode(encoded) == text
    mixed = "Hi 😀 你好\n  two  spaces"
    assert tokenizer.decode(tokenizer.encode(mixed, add_special_tokens=False)) == mixed


# ---- decode -------------------------------------------------------------------------------


def test_specials_decode_literally_and_keep_following_space(tokenizer, sp, ids):
    hi = sp.encode("Hi")
    assert sp.id_to_piece(hi[0]).startswith("▁")
    assert tokenizer.decode([ids["<|assistant|>"]] + hi) == "<|assistant|> Hi"
    assert tokenizer.decode(hi) == "Hi"  # only a ▁ at the very start is dropped
    first_turn = [ids["[gMASK]"], ids["sop"], ids["<|user|>"]] + sp.encode("\n") + sp.encode("Hello")
    first_turn.append(ids["<|assistant|>"])
    assert tokenizer.decode(first_turn) == "[gMASK]sop<|user|> \n Hello<|assistant|>"
    for name, i in ids.items():
        assert tokenizer.decode([i]) == name


def test_bos_eos_pad_and_out_of_vocab_ids_decode_to_nothing(tokenizer, sp, ids, tiny_ckpt):
    padded_vocab = json.loads((tiny_ckpt / "config.json").read_text())["padded_vocab_size"]
    n = sp.vocab_size()
    for i in [0, 1, 2, n + 9, padded_vocab - 1, padded_vocab + 5, -1]:
        assert tokenizer.decode([i]) == ""
    hi = sp.encode("Hi")
    junk = [0, 1, 2, n + 9, padded_vocab - 1]
    assert tokenizer.decode(hi + junk + hi) == sp.decode(hi + hi) == "Hi Hi"
    # Empty pieces do not count as text: a ▁ after them at the start is still dropped.
    assert tokenizer.decode(junk + hi) == "Hi"


def test_incomplete_utf8_becomes_one_replacement_char_per_byte(tokenizer, sp):
    raw = "你".encode("utf-8")
    assert len(raw) == 3
    byte_ids = [byte_id(sp, b) for b in raw]
    assert tokenizer.decode(byte_ids) == "你"
    assert tokenizer.decode(byte_ids[:2]) == "\ufffd\ufffd"
    assert tokenizer.decode(byte_ids[:1]) == "\ufffd"
    a = sp.encode("A")
    assert tokenizer.decode(a + byte_ids[:2]) == "A\ufffd\ufffd"
    assert tokenizer.decode(a + byte_ids[:2] + a) == "A\ufffd\ufffd A"


def test_decode_whole_list_at_once_not_per_segment(tokenizer, sp, ids):
    hi, there = sp.encode("Hi"), sp.encode("there")
    seq = [ids["<|user|>"]] + hi + [ids["<|assistant|>"]] + there
    whole = tokenizer.decode(seq)
    assert whole == "<|user|> Hi<|assistant|> there"
    per_segment = "<|user|>" + sp.decode(hi) + "<|assistant|>" + sp.decode(there)
    assert per_segment == "<|user|>Hi<|assistant|>there" != whole
    # A character split across calls is only whole when decoded together.
    raw = [byte_id(sp, b) for b in "好".encode("utf-8")]
    assert tokenizer.decode(raw) == "好"
    assert tokenizer.decode(raw[:1]) + tokenizer.decode(raw[1:]) == "\ufffd" * 3


def test_decode_accepts_ints_sequences_and_tensors(tokenizer, sp, ids):
    seq = [ids["[gMASK]"]] + sp.encode("你好 world")
    expected = "[gMASK] 你好 world"
    assert tokenizer.decode(seq) == expected
    assert tokenizer.decode(tuple(seq)) == expected
    assert tokenizer.decode(torch.tensor(seq)) == expected
    assert tokenizer.decode(ids["sop"]) == "sop"
    assert tokenizer.decode(torch.tensor(ids["sop"])) == "sop"
    assert tokenizer.batch_decode(torch.tensor([seq, seq])) == [expected, expected]
    with pytest.raises(ValueError):
        tokenizer.decode(torch.tensor([seq]))


def test_skip_special_tokens(tokenizer, sp, ids):
    hi = sp.encode("Hi")
    seq = [ids["[gMASK]"], ids["sop"], ids["<|assistant|>"]] + hi + [2]
    assert tokenizer.decode(seq) == "[gMASK]sop<|assistant|> Hi"
    assert tokenizer.decode(seq, skip_special_tokens=True) == "Hi"


# ---- chat input ---------------------------------------------------------------------------


def test_build_chat_input_first_turn(tokenizer, sp, ids):
    enc = tokenizer.build_chat_input("Hello")
    expected = [ids["[gMASK]"], ids["sop"], ids["<|user|>"]] + sp.encode("\n") + sp.encode("Hello")
    expected.append(ids["<|assistant|>"])
    assert enc.input_ids.tolist() == [expected]
    assert enc["input_ids"] is enc.input_ids
    assert set(enc) == {"input_ids", "attention_mask", "position_ids"}
    for key in enc:
        assert enc[key].dtype == torch.long and enc[key].shape == (1, len(expected))
    assert enc.attention_mask.tolist() == [[1] * len(expected)]
    assert enc.position_ids.tolist() == [list(range(len(expected)))]
    assert tokenizer.decode(enc.input_ids[0]) == "[gMASK]sop<|user|> \n Hello<|assistant|>"
    assert enc.to("cpu") is enc and enc.input_ids.device.type == "cpu"
    with pytest.raises(AttributeError):
        enc.token_type_ids


def test_build_chat_input_with_history_and_metadata(tokenizer, sp, ids):
    history = [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
        {"role": "observation", "content": '{"temperature": 22}'},
        {"role": "assistant", "content": "北京今天 22 度。"},
    ]
    enc = tokenizer.build_chat_input("Thanks!", history=history)
    expected = [ids["[gMASK]"], ids["sop"]]
    expected += [ids["<|user|>"]] + sp.encode("\n") + sp.encode("北京天气怎么样？")
    expected += [ids["<|assistant|>"]] + sp.encode("get_weather\n") + sp.encode("tool_call(city='北京')")
    expected += [ids["<|observation|>"]] + sp.encode("\n") + sp.encode('{"temperature": 22}')
    expected += [ids["<|assistant|>"]] + sp.encode("\n") + sp.encode("北京今天 22 度。")
    expected += [ids["<|user|>"]] + sp.encode("\n") + sp.encode("Thanks!") + [ids["<|assistant|>"]]
    assert enc.input_ids.tolist() == [expected]
    assert enc.position_ids.tolist() == [list(range(len(expected)))]


def test_build_chat_input_system_tools_json(tokenizer, sp, ids):
    tools = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": {"type": "string"}}}]
    history = [{"role": "system", "content": "You are helpful.", "tools": tools}]
    enc = tokenizer.build_chat_input("上海呢？", history=history)
    content = "You are helpful." + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    assert "查询天气" in content and '\n    {\n        "name"' in content
    expected = [ids["[gMASK]"], ids["sop"], ids["<|system|>"]] + sp.encode("\n") + sp.encode(content)
    expected += [ids["<|user|>"]] + sp.encode("\n") + sp.encode("上海呢？") + [ids["<|assistant|>"]]
    assert enc.input_ids.tolist() == [expected]
    assert "查询天气" in tokenizer.decode(enc.input_ids[0])
    # Without "tools" a system item is just its content.
    plain = tokenizer.build_chat_input("Hi", history=[{"role": "system", "content": "Be brief."}])
    assert plain.input_ids[0].tolist()[2:3 + len(sp.encode("\n")) + len(sp.encode("Be brief."))] == (
        [ids["<|system|>"]] + sp.encode("\n") + sp.encode("Be brief.")
    )


def test_build_chat_input_observation_role(tokenizer, sp, ids):
    enc = tokenizer.build_chat_input('{"temperature": 22}', role="observation")
    expected = [ids["[gMASK]"], ids["sop"], ids["<|observation|>"]] + sp.encode("\n")
    expected += sp.encode('{"temperature": 22}') + [ids["<|assistant|>"]]
    assert enc.input_ids.tolist() == [expected]


def test_build_single_message(tokenizer, sp, ids):
    got = tokenizer.build_single_message("assistant", "search", "query='x'")
    assert got == [ids["<|assistant|>"]] + sp.encode("search\n") + sp.encode("query='x'")
    assert tokenizer.build_single_message("user", "", "") == [ids["<|user|>"]] + sp.encode("\n")


def test_unknown_role_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="role"):
        tokenizer.build_chat_input("hi", role="robot")
    with pytest.raises(ValueError, match="role"):
        tokenizer.build_chat_input("hi", history=[{"role": "function", "content": "x"}])


# ---- batches ------------------------------------------------------------------------------


def test_left_padding_batch(tokenizer, sp, ids):
    texts = ["Hi", "Hello world, 你好！", "中文"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    seqs = [[ids["[gMASK]"], ids["sop"]] + sp.encode(t) for t in texts]
    width = max(len(s) for s in seqs)
    assert enc.input_ids.shape == enc.attention_mask.shape == enc.position_ids.shape == (3, width)
    for row, seq in enumerate(seqs):
        pad = width - len(seq)
        assert enc.input_ids[row].tolist() == [0] * pad + seq
        assert enc.attention_mask[row].tolist() == [0] * pad + [1] * len(seq)
        assert enc.position_ids[row].tolist() == [0] * pad + list(range(len(seq)))
    assert min(width - len(s) for s in seqs) == 0 and max(width - len(s) for s in seqs) > 0


def test_call_single_text_and_options(tokenizer, sp, ids):
    enc = tokenizer("Hello")
    assert enc.input_ids.tolist() == [[ids["[gMASK]"], ids["sop"]] + sp.encode("Hello")]
    assert tokenizer("Hello", add_special_tokens=False).input_ids.tolist() == [sp.encode("Hello")]
    lists = tokenizer("Hello", return_tensors=None)
    assert lists["input_ids"] == [ids["[gMASK]"], ids["sop"]] + sp.encode("Hello")
    with pytest.raises(ValueError, match="padding"):
        tokenizer(["Hi", "Hello world, 你好！"], padding=False)


def test_batch_encode_pads_token_lists(tokenizer):
    enc = tokenizer.batch_encode([[5, 6, 7], torch.tensor([9])])
    assert enc.input_ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert enc.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert enc.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


# ---- files --------------------------------------------------------------------------------


def test_training_is_deterministic_and_chatglm_like(tmp_path, tiny_tokenizer_model):
    again = train_tokenizer(tmp_path / "again")
    assert again.name == "tokenizer.model"
    assert again.read_bytes() == Path(tiny_tokenizer_model).read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(again))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(3), sp.id_to_piece(258)] == ["<0x00>", "<0xFF>"]
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]  # split_digits
    text = "a  b\n\nc  "  # identity normalization keeps spaces and newlines
    assert sp.decode(sp.encode(text)) == text


def test_shipped_standin_tokenizer_is_what_training_gives_today(tiny_tokenizer_model):
    """glmchat/data/standin-tokenizer.model was made by train_tokenizer(): it must not drift from it."""
    shipped_path = Path(glmchat.__file__).parent / "data" / "standin-tokenizer.model"
    assert 5_000 < shipped_path.stat().st_size < 100_000
    shipped = spm.SentencePieceProcessor(model_file=str(shipped_path))
    trained = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_model))
    assert shipped.vocab_size() == trained.vocab_size() == DEFAULT_VOCAB_SIZE
    assert [shipped.id_to_piece(i) for i in range(shipped.vocab_size())] == [
        trained.id_to_piece(i) for i in range(trained.vocab_size())
    ]
    for text in ["你好，请介绍一下你自己", "Implement code for binary search in Python",
                 "什么是ChatGLM？ .Provide answer in English 😀", "  2024年\n\n总结论文 'Attention Is All You Need'"]:
        assert shipped.encode(text, out_type=str) == trained.encode(text, out_type=str), text
    standin = standin_tokenizer()
    assert standin.n_words == shipped.vocab_size() and standin.encode("你好") == ChatGLMTokenizer.from_file(
        tiny_tokenizer_model).encode("你好")


def test_missing_or_broken_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        ChatGLMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        ChatGLMTokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        ChatGLMTokenizer.from_pretrained(tmp_path / "no-such-dir")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path))):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_from_pretrained_ignores_extra_kwargs(tiny_ckpt, tokenizer):
    tok = ChatGLMTokenizer.from_pretrained(str(tiny_ckpt), trust_remote_code=True, revision="main")
    assert tok.encode("你好") == tokenizer.encode("你好")
    assert ChatGLMTokenizer.from_file(tiny_ckpt / "tokenizer.model").vocab_size == tokenizer.vocab_size


def test_tiny_checkpoint_files_match_tokenizer(tiny_ckpt, tiny_ckpt_b, tokenizer):
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["padded_vocab_size"] == math.ceil((tokenizer.n_words + 9) / 64) * 64
    assert (config["model_type"], config["eos_token_id"], config["pad_token_id"]) == ("chatglm", 2, 0)
    assert "rope_ratio" not in config
    assert json.loads((tiny_ckpt_b / "config.json").read_text())["rope_ratio"] == 2.0
    tok_config = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "ChatGLMTokenizer" and tok_config["padding_side"] == "left"
    weights = load_file(tiny_ckpt / "model.safetensors")
    assert weights["transformer.embedding.word_embeddings.weight"].shape == (config["padded_vocab_size"], 64)
    assert weights["transformer.rotary_pos_emb.inv_freq"].shape == (16 // 4,)


def test_tiny_checkpoint_formats_hold_identical_tensors(tiny_ckpt, tiny_ckpt_bin, tiny_ckpt_sharded):
    reference = load_file(tiny_ckpt / "model.safetensors")
    index = json.loads((tiny_ckpt_bin / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    from_bin: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        from_bin.update(torch.load(tiny_ckpt_bin / shard, weights_only=True))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    sharded = tiny_ckpt_sharded
    st_index = json.loads((sharded / "model.safetensors.index.json").read_text())
    from_st: dict[str, torch.Tensor] = {}
    for shard in set(st_index["weight_map"].values()):
        from_st.update(load_file(sharded / shard))
    for name, tensor in reference.items():
        assert torch.equal(from_bin[name], tensor) and torch.equal(from_st[name], tensor), name
    assert reference["transformer.encoder.layers.0.self_attention.query_key_value.bias"].abs().sum() > 0
