"""The original ChatGLM-6B (v1): network, tokenizer, prompts, drop-in and native chat, and the server,
each against tests/reference_v1.py (a straightforward re-implementation of the reference's facts)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from safetensors import safe_open

import glmchat
from glmchat import AutoModel, AutoTokenizer
from glmchat.chat import resized_cache
from glmchat.config import ConfigError
from glmchat.families import detect_family
from glmchat.families.chatglm6b import ChatGLM1, ChatGLM6BTokenizer
from glmchat.loader import load_checkpoint
from glmchat.model_v1 import PromptError
from glmchat.parallel import ShardingError, check_shardable
from glmchat.quantize import QuantizedLinear
from glmchat.server import BackgroundServer, build_app
import quant_reference
from reference_v1 import (reference_decode, reference_encode, reference_greedy, reference_logits, reference_process_response,
                          reference_prompt)

TEXTS = ["你好", "Hello, who are you?", "def f(x):\n\treturn  x   +1\n", "解释一下   量子计算。\n\n谢谢!", ""]
HISTORY = [("你好", "你好,我是人工智能助手!"), ("What can you do?", "Many things: chat; code?")]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(chatglm6b_ckpt):
    return load_checkpoint(chatglm6b_ckpt, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def tok(loaded) -> ChatGLM6BTokenizer:
    return loaded.tokenizer


def test_checkpoint_is_recognised_as_chatglm_6b(chatglm6b_ckpt, loaded):
    raw = json.loads((chatglm6b_ckpt / "config.json").read_text())
    assert isinstance(detect_family(chatglm6b_ckpt, raw), ChatGLM1)
    assert loaded.config.network == "chatglm-6b" and loaded.config.tie_word_embeddings
    assert loaded.model.output.weight is loaded.model.embed.weight  # lm_head is the embedding


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_and_decodes_like_the_reference(chatglm6b_ckpt, tok, text):
    ids = tok.encode(text)
    assert ids == reference_encode(chatglm6b_ckpt, text)
    assert ids[-2:] == [tok.gmask_token_id, tok.bos_token_id]
    assert tok.decode(ids) == reference_decode(chatglm6b_ckpt, ids) == text.lstrip(" ")


def test_tokenizer_attributes_are_the_references(chatglm6b_ckpt, tok):
    config = json.loads((chatglm6b_ckpt / "config.json").read_text())
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<sop>", "<eop>", "<pad>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    assert tok.gmask_token_id == config["gmask_token_id"]
    assert tok.vocab_size == tok.sp.vocab_size()  # num_image_tokens 0, as in the hub's tokenizer_config.json
    assert tok.decode([tok.eos_token_id, tok.gmask_token_id]) == ""  # specials never show


def test_image_token_offset_from_tokenizer_config(chatglm6b_ckpt, tmp_path):
    """The reference's default (and older hub files): 20000 image ids before the text ids."""
    for f in chatglm6b_ckpt.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "num_image_tokens": 20000}))
    shifted, plain = ChatGLM6BTokenizer.from_pretrained(tmp_path), ChatGLM6BTokenizer.from_pretrained(chatglm6b_ckpt)
    assert shifted.encode("你好") == [i + 20000 for i in plain.encode("你好")]
    assert shifted.decode([5, *shifted.encode("你好")]) == "你好"  # image ids are no text
    assert shifted.convert_ids_to_tokens([5]) == ["<image_5>"]


@pytest.mark.parametrize("query, history", [("什么是ChatGLM？", HISTORY), ("Hello there! " * 34, [])])
def test_logits_match_the_reference(chatglm6b_ckpt, loaded, tok, query, history):
    """Tight enough that the long prompt (positions up to 240) tells float16-rounded rotary
    frequencies (the reference's) from exact ones (2e-5 apart there)."""
    ids = torch.tensor([tok.encode(reference_prompt(query, history))])
    assert (loaded.model(ids) - reference_logits(chatglm6b_ckpt, ids)).abs().max() < 5e-5


def test_cached_decoding_matches_full_forward_passes_of_the_reference(chatglm6b_ckpt, loaded, tok):
    prompt = tok.encode(reference_prompt("Write a poem", HISTORY[:1]))
    new = reference_greedy(chatglm6b_ckpt, prompt, max_new_tokens=24, eos_id=tok.eos_token_id)
    ours = loaded.model.new_cache(1, len(prompt) + len(new))
    logits = loaded.model(torch.tensor([prompt]), cache=ours)[:, -1]
    for token in new[:-1]:
        assert int(logits.argmax()) == token
        logits = loaded.model(torch.tensor([[token]]), cache=ours)[:, -1]
    assert int(logits.argmax()) == new[-1]


def test_a_grown_or_copied_cache_decodes_like_the_original(loaded, tok):
    """The drop-in copies its cache when past_key_values outgrows it or is reused from an earlier
    length (chat.resized_cache): the copy keeps the prompt's [gMASK]/<sop> positions."""
    prompt = tok.encode(reference_prompt("Write a poem", HISTORY[:1]))
    model, token = loaded.model, torch.tensor([[tok.encode("poem", add_special_tokens=False)[0]]])
    cache = model.new_cache(1, len(prompt) + 1)
    model(torch.tensor([prompt]), cache=cache)
    grown = resized_cache(model, cache, len(prompt), len(prompt) + 8)
    torch.testing.assert_close(model(token, cache=grown), model(token, cache=cache), rtol=0, atol=0)


def test_bfloat16_prefill_and_decode_follow_the_float32_reference(chatglm6b_ckpt, tok):
    """The CPU fast paths (bf16 kernels with biases) run ChatGLM-6B's layers too."""
    model = load_checkpoint(chatglm6b_ckpt, dtype=torch.bfloat16, progress=False).model
    assert type(model.layers[0].attn).__name__ == "CpuAttentionV1"  # its decode steps take the fast product
    prompt = tok.encode(reference_prompt("Hello there! 你好", HISTORY))
    cache = model.new_cache(1, len(prompt) + 1)
    logits = [model(torch.tensor([prompt]), cache=cache)[0, -1], model(torch.tensor([[700]]), cache=cache)[0, -1]]
    expected = reference_logits(chatglm6b_ckpt, torch.tensor([prompt + [700]]))[0, -2:]
    for ours, theirs in zip(logits, expected):
        assert torch.nn.functional.cosine_similarity(ours.float(), theirs, dim=0) > 0.995


def test_left_padded_batch_rows_equal_each_row_alone(loaded, tok):
    rows = [tok.encode("你好"), tok.encode(reference_prompt("Hello there, how are you?", HISTORY))]
    batch = tok.batch_encode(rows)
    logits = loaded.model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    for b, row in enumerate(rows):
        alone = loaded.model(torch.tensor([row]))
        assert torch.allclose(logits[b, -len(row):], alone[0], atol=1e-5)


def test_prompt_without_gmask_and_sop_is_refused_with_advice(loaded, tok):
    with pytest.raises(PromptError, match=r"\[gMASK\] and <sop>"):
        loaded.model(torch.tensor([tok.encode("hi", add_special_tokens=False)]))


def test_chat_prompt_and_reply_processing_follow_the_reference(tok):
    family = ChatGLM1()
    messages = [m for q, r in HISTORY for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]
    messages.append({"role": "user", "content": "继续"})
    assert family.prompt_ids(tok, messages) == tok.encode(reference_prompt("继续", HISTORY))
    assert family.prompt_ids(tok, messages[-1:]) == tok.encode("继续")  # the first turn: the query alone
    for text in ["你好,世界!", " a,b:c ", "[[训练时间]]?好", "是吗?是的;好:", "Yes, 好!\n"]:
        assert family.process_response(text) == reference_process_response(text)
        assert family.parse_reply(text, False).text == reference_process_response(text)


def test_streamed_text_only_grows_and_ends_as_the_processed_reply():
    family = ChatGLM1()
    text = "好,这是答案:[[训练时间]]! ok, fine? 中;"
    shown = ""
    for n in range(1, len(text) + 1):
        now = family.visible_text(text[:n], final=False)
        assert now.startswith(shown)
        shown = now
    assert family.visible_text(text).startswith(shown)
    assert family.visible_text(text) == reference_process_response(text)


def test_dropin_chat_and_stream_chat_give_the_references_answer(chatglm6b_ckpt, tok):
    tokenizer = AutoTokenizer.from_pretrained(str(chatglm6b_ckpt), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(chatglm6b_ckpt), trust_remote_code=True).float()
    history = list(HISTORY)
    prompt = reference_encode(chatglm6b_ckpt, reference_prompt("你好", history))
    new = reference_greedy(chatglm6b_ckpt, prompt, max_new_tokens=40, eos_id=tok.eos_token_id)
    expected = reference_process_response(reference_decode(chatglm6b_ckpt, new))
    response, new_history = model.chat(tokenizer, "你好", history=history, do_sample=False, max_length=len(prompt) + 40)
    assert response == expected and expected.strip()  # text to compare, not two empty strings
    assert new_history == HISTORY + [("你好", expected)] and history == HISTORY  # the caller's list untouched
    yields = list(model.stream_chat(tokenizer, "你好", history=history, do_sample=False, max_length=len(prompt) + 40))
    # A yield per generated token but the last, each the processed text so far.
    assert [r for r, _ in yields] == [reference_process_response(reference_decode(chatglm6b_ckpt, new[:n]))
                                      for n in range(1, len(new))]


def test_native_chat_answers_each_turn_as_from_scratch(chatglm6b_ckpt, tok):
    """No KV reuse between turns (the prompt attends both ways): turn two is the reference's."""
    model = glmchat.load(str(chatglm6b_ckpt), dtype="float32")
    messages = [{"role": "user", "content": "你好"}]
    for query in ("Tell me more", "谢谢"):
        reply = model.chat(messages, greedy=True, max_new_tokens=16)
        pairs = [(m["content"], n["content"]) for m, n in zip(messages[::2], messages[1::2])]
        prompt = reference_encode(chatglm6b_ckpt, reference_prompt(messages[-1]["content"], pairs))
        new = reference_greedy(chatglm6b_ckpt, prompt, max_new_tokens=16, eos_id=tok.eos_token_id)
        stopped = new[-1] == tok.eos_token_id
        assert reply.text == reference_process_response(reference_decode(chatglm6b_ckpt, new[:-1] if stopped else new))
        assert reply.text.strip()
        messages += reply.messages + [{"role": "user", "content": query}]


def test_server_answers_concurrent_clients_as_each_alone(loaded, tok):
    with BackgroundServer(build_app(loaded.model, tok, ChatGLM1(), model_id="tiny-chatglm-6b")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        def ask(text):
            reply = client.chat.completions.create(model="tiny-chatglm-6b", messages=[{"role": "user", "content": text}],
                                                   max_tokens=12, temperature=0)
            return reply.choices[0].message.content

        alone = [ask(t) for t in TEXTS[:4]]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, TEXTS[:4]))
    assert together == alone and all(text.strip() for text in alone)
    prompt = tok.encode(TEXTS[0])
    new = reference_greedy(loaded.directory, prompt, max_new_tokens=12, eos_id=tok.eos_token_id)
    assert alone[0] == reference_process_response(reference_decode(loaded.directory, new))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_chatglm_6b_is_the_network_with_dequantized_weights(chatglm6b_ckpt, tok, method):
    """Every Linear quantized (biases kept): the logits are those of the float network whose
    weights are the dequantized codes (tests/quant_reference.py, written from the format)."""
    quantized = load_checkpoint(chatglm6b_ckpt, dtype=torch.float32, quantize=method, group_size=32, progress=False).model
    plain = load_checkpoint(chatglm6b_ckpt, dtype=torch.float32, progress=False).model
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 4 * len(plain.layers) + 1  # qkv, dense, up, down per layer; the output
    with torch.no_grad():
        for name, layer in layers.items():  # a new Parameter: the tied output's must not change the embedding
            plain.get_submodule(name).weight = torch.nn.Parameter(quant_reference.weight(layer), requires_grad=False)
    ids = torch.tensor([tok.encode(reference_prompt("你好", HISTORY))])
    assert torch.allclose(quantized(ids), plain(ids), atol=1e-4)


def test_unsupported_variants_say_what_is_wrong(chatglm6b_ckpt, loaded):
    raw = json.loads((chatglm6b_ckpt / "config.json").read_text())
    for key, value in [("quantization_bit", 4), ("pre_seq_len", 128), ("position_encoding_2d", False)]:
        with pytest.raises(ConfigError, match=key):
            glmchat.config.GLMConfig.from_dict({**raw, key: value})
    with pytest.raises(ShardingError, match="do not divide the 4 attention heads"):
        check_shardable(loaded.config, 3)


def test_quantized_copy_saved_by_glmchat_quantize_loads_back(chatglm6b_ckpt, tok, tmp_path):
    from glmchat.export import save_quantized

    saved = save_quantized(chatglm6b_ckpt, tmp_path / "int8", "int8", dtype=torch.float32, progress=False)
    names = set(json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]) if (
        saved / "model.safetensors.index.json").exists() else set(safe_open(saved / "model.safetensors", "pt").keys())
    assert {"transformer.word_embeddings.weight", "transformer.layers.0.attention.query_key_value.qweight",
            "transformer.final_layernorm.bias", "lm_head.qweight"} <= names  # ChatGLM-6B's own layout
    assert not any("encoder" in name for name in names)
    direct = load_checkpoint(chatglm6b_ckpt, dtype=torch.float32, quantize="int8", progress=False).model
    reloaded = load_checkpoint(saved, progress=False)
    assert isinstance(reloaded.family, ChatGLM1) and reloaded.info.quantization == {"method": "int8"}
    ids = torch.tensor([tok.encode("你好")])
    assert torch.equal(reloaded.model(ids), direct(ids))
