"""GLM-4-0414 (Glm4ForCausalLM: sandwich norms) and GLM-Edge (GlmForCausalLM with full rotary, no
attention bias, tied embeddings): tiny checkpoints in their official transformers layouts.

Logits and greedy tokens are compared with transformers' own classes loading the same files
(`from_pretrained`), prompts with transformers' rendering of the checkpoint's chat template
(`apply_chat_template`, tokenized by the Rust `tokenizers`).
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

import glmchat
from glmchat.families.glm4_0414 import GLM4_0414Tokenizer
from glmchat.families.glm_edge import GLMEdgeTokenizer
from glmchat.loader import load_model, read_config
from glmchat.server import BackgroundServer, build_app

NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _hf_tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def _ids(n: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, n, (1, length), generator=torch.Generator().manual_seed(seed))


def _hf_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# ---------------------------------------------------------------------------------------------
# Recognition and config


def test_recognised_from_their_files(glm4_0414_ckpt, glm_edge_ckpt, glm_edge_4b_ckpt, glm4_hf_ckpt):
    found = {name: read_config(path)[1] for name, path in [
        ("0414", glm4_0414_ckpt), ("edge", glm_edge_ckpt), ("edge4b", glm_edge_4b_ckpt), ("glm4_hf", glm4_hf_ckpt)]}
    assert {k: (f.name, f.chat, f.label) for k, f in found.items()} == {
        "0414": ("glm4-0414", True, "GLM-4-9B-0414"),
        "edge": ("glm-edge", True, "GLM-Edge-1.5B-chat"),
        "edge4b": ("glm-edge", True, "GLM-Edge-4B-chat"),
        "glm4_hf": ("glm4", True, "GLM-4-9B-chat"),
    }
    assert isinstance(found["0414"].load_tokenizer(glm4_0414_ckpt), GLM4_0414Tokenizer)
    assert isinstance(found["edge"].load_tokenizer(glm_edge_ckpt), GLMEdgeTokenizer)


def test_configs_read_the_variants(glm4_0414_ckpt, glm_edge_ckpt, glm_edge_4b_ckpt):
    c = read_config(glm4_0414_ckpt)[0]
    assert (c.sandwich_norms, c.rotary_dim, c.tie_word_embeddings, c.add_qkv_bias) == (True, 8, False, True)
    e = read_config(glm_edge_ckpt)[0]
    assert (e.sandwich_norms, e.rotary_dim, e.tie_word_embeddings, e.add_qkv_bias) == (False, 16, True, False)
    e4 = read_config(glm_edge_4b_ckpt)[0]
    assert (e4.rotary_dim, e4.tie_word_embeddings, e4.num_kv_heads) == (12, False, 3)


def test_known_ids_give_the_variants_and_families():
    """The built-in configs of the hub ids (no download): their network variant and family."""
    from glmchat.loader import config_and_family

    got = {name: (lambda c, f: (f.name, f.chat, c.sandwich_norms, c.rotary_dim, c.tie_word_embeddings, c.add_qkv_bias,
                                c.num_kv_heads, c.ffn_hidden_size))(*config_and_family(name))
           for name in ("THUDM/GLM-4-9B-0414", "THUDM/GLM-Z1-9B-0414", "THUDM/glm-edge-1.5b-chat",
                        "THUDM/glm-edge-4b-chat")}
    assert got == {
        "THUDM/GLM-4-9B-0414": ("glm4-0414", True, True, 64, False, True, 2, 13696),
        "THUDM/GLM-Z1-9B-0414": ("glm-z1", True, True, 64, False, True, 2, 13696),
        "THUDM/glm-edge-1.5b-chat": ("glm-edge", True, False, 128, True, False, 4, 6144),
        "THUDM/glm-edge-4b-chat": ("glm-edge", True, False, 128, False, False, 6, 8192),
    }


def test_random_weights_keep_the_tie(glm_edge_ckpt):
    model, info = load_model(glm_edge_ckpt, random_weights=True, progress=False)
    assert info.random_weights and model.output.weight is model.embed.weight
    int8, _ = load_model(glm_edge_ckpt, dtype=torch.float32, quantize="int8", progress=False)
    ours, _ = load_model(glm_edge_ckpt, dtype=torch.float32, progress=False)
    ids = _ids(ours.config.padded_vocab_size)
    with torch.no_grad():  # the quantized output layer holds the (quantized) embedding
        assert (int8(ids) - ours(ids)).abs().max() < 0.1 * ours(ids).abs().max()


# ---------------------------------------------------------------------------------------------
# Logits and greedy tokens against transformers' own classes


def _greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens through our KV cache (prefill, then one token per step)."""
    cache = model.new_cache(1, len(prompt) + n)
    out, logits = [], model(torch.tensor([prompt]), cache=cache, last_only=True)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache=cache)
    return out


@pytest.mark.parametrize("fixture,hf_class", [("glm4_0414_ckpt", "Glm4ForCausalLM"), ("glm_edge_ckpt", "GlmForCausalLM"),
                                               ("glm_edge_4b_ckpt", "GlmForCausalLM")])
def test_logits_and_greedy_tokens_match_transformers(request, fixture, hf_class):
    ckpt = request.getfixturevalue(fixture)
    ref = _hf_model(ckpt)
    assert type(ref).__name__ == hf_class
    model, _ = load_model(ckpt, dtype=torch.float32, progress=False)
    ids = _ids(model.config.padded_vocab_size)
    with torch.no_grad():
        expected, got = ref(ids).logits, model(ids)
    diff = (got - expected).abs().max().item()
    print(f"{fixture}: max abs logit diff {diff:.2e}")
    assert diff < 2e-5
    prompt = ids[0, :12].tolist()
    with torch.no_grad():
        hf_tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert _greedy_ours(model, prompt, NEW) == hf_tokens


def test_each_variant_really_changes_the_network(glm4_0414_ckpt, glm_edge_ckpt):
    """The sandwich norms, tied output and full rotary are all in use: transformers agrees, and
    a model built without the variant does not (so the parity above is not vacuous)."""
    ours, _ = load_model(glm4_0414_ckpt, dtype=torch.float32, progress=False)
    assert all(layer.post_attn_norm is not None and layer.post_mlp_norm is not None for layer in ours.layers)
    edge, _ = load_model(glm_edge_ckpt, dtype=torch.float32, progress=False)
    assert edge.output.weight is edge.embed.weight
    ref = _hf_model(glm_edge_ckpt)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()  # tied in transformers too
    ids = _ids(edge.config.padded_vocab_size)
    with torch.no_grad():
        full = edge(ids)
        edge.config.partial_rotary_factor = 0.5
        edge.reset_rotary()
        assert (edge(ids) - full).abs().max() > 1e-3  # half rotary would be a different model
        for layer in ours.layers:
            layer.post_attn_norm.weight.fill_(1.0)
        assert (ours(ids) - _hf_model(glm4_0414_ckpt)(ids).logits).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Prompts against transformers' rendering of each checkpoint's template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]
CONVERSATIONS_0414 = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "\n\n  again?"}],
    [{"role": "user", "content": "first"}, {"role": "system", "content": "late system"}, {"role": "user", "content": ""}],
    [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
     {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
     {"role": "observation", "content": '{"temp": 20}'}],
    [{"role": "system", "content": "You help.", "tools": TOOLS[:1]}, {"role": "user", "content": "weather?"}],
]


def _template_call(messages: list[dict]) -> tuple[list[dict], list | None]:
    """Our conversation in the template's terms: tools as the `tools` argument; a system message
    that only carried them is not a turn."""
    tools = [t for m in messages for t in m.get("tools") or []] or None
    turns = [{k: v for k, v in m.items() if k != "tools"} for m in messages
             if not (m.get("tools") and m["role"] == "system" and not m["content"])]
    return turns, tools


@pytest.mark.parametrize("messages", CONVERSATIONS_0414)
def test_glm4_0414_prompt_matches_its_chat_template(glm4_0414_ckpt, messages):
    turns, tools = _template_call(messages)
    hf = _hf_tokenizer(glm4_0414_ckpt)
    expected = _hf_ids(hf.apply_chat_template(turns, tools=tools, add_generation_prompt=True, tokenize=True))
    family = read_config(glm4_0414_ckpt)[1]
    tok = family.load_tokenizer(glm4_0414_ckpt)
    assert family.prompt_ids(tok, messages) == expected
    assert expected[:2] == [tok.get_command("[gMASK]"), tok.get_command("<sop>")]
    if messages[-1]["role"] == "user" and not tools:
        *history, last = messages
        assert tok.build_chat_input(last["content"], history=history).input_ids[0].tolist() == expected


CONVERSATIONS_EDGE = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "\n\n  again?"}],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS_EDGE)
def test_glm_edge_prompt_matches_its_chat_template(glm_edge_ckpt, messages):
    hf = _hf_tokenizer(glm_edge_ckpt)
    expected = _hf_ids(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    family = read_config(glm_edge_ckpt)[1]
    tok = family.load_tokenizer(glm_edge_ckpt)
    assert family.prompt_ids(tok, messages) == expected
    assert tok.get_command("[gMASK]") not in expected
    *history, last = messages
    assert tok.build_chat_input(last["content"], history=history).input_ids[0].tolist() == expected
    assert tok.encode("hi") == hf("hi")["input_ids"] == tok.encode("hi", add_special_tokens=False)


def test_glm_edge_refuses_what_its_template_cannot_say(glm_edge_ckpt):
    family = read_config(glm_edge_ckpt)[1]
    tok = family.load_tokenizer(glm_edge_ckpt)
    assert not family.supports_tools
    with pytest.raises(ValueError, match="observation"):
        family.prompt_ids(tok, [{"role": "user", "content": "q"}, {"role": "observation", "content": "{}"}])
    with pytest.raises(ValueError, match="no tools"):
        family.prompt_ids(tok, [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "q"}])


def test_stops_are_the_configs_eos_ids(glm4_0414_ckpt, glm_edge_ckpt):
    for ckpt in (glm4_0414_ckpt, glm_edge_ckpt):
        family = read_config(ckpt)[1]
        assert family.stop_ids(family.load_tokenizer(ckpt)) == json.loads((ckpt / "config.json").read_text())["eos_token_id"]


# ---------------------------------------------------------------------------------------------
# Native API and server


def _reference_greedy(ckpt, messages) -> tuple[list[int], list[int], str]:
    """transformers' prompt, greedy tokens and their text (stops left out) for a conversation."""
    hf_tok, ref = _hf_tokenizer(ckpt), _hf_model(ckpt)
    prompt = _hf_ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    stops = json.loads((ckpt / "config.json").read_text())["eos_token_id"]
    with torch.no_grad():
        tokens = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=stops,
                              pad_token_id=stops[0])[0, len(prompt):].tolist()
    return prompt, tokens, hf_tok.decode([t for t in tokens if t not in stops])


def _plain_text(text: str) -> str:
    parts = [s.split("\n", 1) if "\n" in s else ["", s] for s in text.split("<|assistant|>")]
    return "\n\n".join(c.strip() for m, c in parts if not m.strip() and c.strip())


@pytest.mark.parametrize("fixture", ["glm4_0414_ckpt", "glm_edge_ckpt"])
def test_chat_and_server_answer_like_transformers(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    messages = [{"role": "user", "content": "什么是GLM？"}]
    prompt, tokens, text = _reference_greedy(ckpt, messages)

    native = glmchat.load(str(ckpt), device="cpu", dtype="float32", progress=False)
    reply = native.chat(messages, greedy=True, max_new_tokens=NEW)
    assert (reply.prompt_tokens, reply.completion_tokens) == (len(prompt), len(tokens))
    assert reply.text == _plain_text(text).replace("[[训练时间]]", native.family.training_time)

    app = build_app(native.model, native.tokenizer, native.family, model_id="tiny")
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=NEW)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(tokens))
        if native.family.supports_tools:
            with_tools = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS[:1],
                                                        temperature=0, max_tokens=2)
            assert with_tools.usage.prompt_tokens > out.usage.prompt_tokens
        else:
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS[:1], max_tokens=2)


# ---------------------------------------------------------------------------------------------
# The drop-in model's config


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "chatglm2_ckpt", "glm4_ckpt", "glm4_hf_ckpt", "glm4_0414_ckpt",
                                     "glm_edge_ckpt"])
def test_dropin_config_carries_every_key_of_config_json(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    raw = json.loads((ckpt / "config.json").read_text())
    model = glmchat.AutoModel.from_pretrained(str(ckpt))
    missing = {k: v for k, v in raw.items() if not hasattr(model.config, k)}
    different = {k: (getattr(model.config, k), v) for k, v in raw.items() if hasattr(model.config, k)
                 and getattr(model.config, k) != v}
    assert not missing and not different
    assert isinstance(model.config, glmchat.GLMConfig)
    assert model.config.seq_length == model.transformer.config.seq_length  # GLMConfig's fields are there too
    if raw.get("model_type") == "chatglm":  # what user code of the reference reads (rope_ratio: 1 when absent,
        # the default of the reference's ChatGLMConfig)
        assert (model.config.multi_query_attention, model.config.seq_length, model.config.rope_ratio) == (
            raw["multi_query_attention"], raw["seq_length"], raw.get("rope_ratio", 1))
    assert model.transformer.config is not model.config and isinstance(model.transformer.config.eos_token_id, int)


# ---------------------------------------------------------------------------------------------
# GLM-Z1-0414: GLM-4-0414's network with the reasoning template

CONVERSATIONS_Z1 = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "The user greets me.</think>\n\nHello!"}, {"role": "user", "content": " again? "}],
    [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京天气?"},
     {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
     {"role": "observation", "content": '{"temp": 20}'}],
]


def test_glm_z1_is_recognised_and_shares_the_network(glm_z1_ckpt, glm4_0414_ckpt):
    family = read_config(glm_z1_ckpt)[1]
    assert (family.name, family.chat, family.label) == ("glm-z1", True, "GLM-Z1-9B-0414")
    assert read_config(glm_z1_ckpt)[0] == read_config(glm4_0414_ckpt)[0]


@pytest.mark.parametrize("messages", CONVERSATIONS_Z1)
def test_glm_z1_prompt_matches_its_chat_template(glm_z1_ckpt, messages):
    turns, tools = _template_call(messages)
    expected = _hf_ids(_hf_tokenizer(glm_z1_ckpt).apply_chat_template(turns, tools=tools, add_generation_prompt=True,
                                                                       tokenize=True))
    family = read_config(glm_z1_ckpt)[1]
    tok = family.load_tokenizer(glm_z1_ckpt)
    assert family.prompt_ids(tok, messages) == expected
    assert tok.decode(expected).endswith("<|assistant|>\n<think>")
    if messages[-1]["role"] == "user" and not tools:
        *history, last = messages
        assert tok.build_chat_input(last["content"], history=history).input_ids[0].tolist() == expected


def test_glm_z1_replies_read_without_the_reasoning(glm_z1_ckpt):
    family = read_config(glm_z1_ckpt)[1]
    reply = family.parse_reply("The user greets me.\n</think>\n\nHello!", tools_in_prompt=False)
    assert reply.text == "Hello!" and reply.tool_call is None
    # the prompt opened a text segment: a tool call is a later one, as in GLM-4
    call = family.parse_reply('Needs the weather.</think><|assistant|>get_weather\n{"city": "北京"}', tools_in_prompt=True)
    assert call.tool_call == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert family.parse_reply('x</think>\nget_weather\n{}', tools_in_prompt=True).tool_call is None
    assert family.parse_reply("still thinking", tools_in_prompt=False).text == ""  # cut off while reasoning
    stream = ["Hmm", "Hmm, </thi", "Hmm, </think>", "Hmm, </think>\n\nHel", "Hmm, </think>\n\nHello"]
    assert [family.visible_text(t, final=False) for t in stream] == ["", "", "", "Hel", "Hello"]


def test_glm_z1_native_chat_prompts_and_generates_like_transformers(glm_z1_ckpt):
    messages = [{"role": "user", "content": "什么是GLM？"}]
    prompt, tokens, text = _reference_greedy(glm_z1_ckpt, messages)
    reply = glmchat.load(str(glm_z1_ckpt), device="cpu", dtype="float32", progress=False).chat(
        messages, greedy=True, max_new_tokens=NEW)
    assert (reply.prompt_tokens, reply.completion_tokens) == (len(prompt), len(tokens))
    assert reply.text == (_plain_text("\n" + text.split("</think>", 1)[1]) if "</think>" in text else "")


def test_glm_z1_reasoning_reads_as_the_text_before_think_end(glm_z1_ckpt, tiny_ckpt):
    family = read_config(glm_z1_ckpt)[1]
    reply = "  The user greets me.\nI answer.  </think>\n\nHello!"
    assert family.reasoning(reply) == "The user greets me.\nI answer."
    assert family.reasoning("cut off while thinking ") == "cut off while thinking"
    growing = [family.reasoning(reply[:n], final=False) for n in range(len(reply) + 1)]
    assert all(later.startswith(earlier) for earlier, later in zip(growing, growing[1:]))  # it only grows
    assert "</" not in "".join(growing) and growing[-1] == "The user greets me.\nI answer."
    assert read_config(tiny_ckpt)[1].reasoning(reply) is None  # ChatGLM3 does not reason


@pytest.fixture(scope="module")
def thinking_z1(glm_z1_ckpt):
    """GLM-Z1's tiny model taught to think, close </think>, then answer."""
    from glmchat.loader import load_model
    from teaching import teach

    family = read_config(glm_z1_ckpt)[1]
    tok = family.load_tokenizer(glm_z1_ckpt)
    prompt = family.prompt_ids(tok, [{"role": "user", "content": "你好"}])
    target = tok._sp_encode("The user greets me.</think>\n\nHello!") + [tok.eos_token_id]
    model = teach(load_model(glm_z1_ckpt, dtype=torch.float32, progress=False)[0], [(prompt, target)])
    return model, tok, family


def test_glm_z1_reasoning_in_the_server_and_the_native_api(thinking_z1):
    """reasoning_content beside the answer (OpenAI-compatible servers' field), streamed too, left out
    with include_reasoning false; the native API's Reply.reasoning."""
    import openai

    from glmchat.chat import ChatModel
    from glmchat.server import BackgroundServer, build_app

    model, tok, family = thinking_z1
    ask = [{"role": "user", "content": "你好"}]
    with BackgroundServer(build_app(model, tok, family, model_id="z1")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        message = c.chat.completions.create(model="x", messages=ask, temperature=0).choices[0].message
        assert (message.content, message.reasoning_content) == ("Hello!", "The user greets me.")
        chunks = [ch.choices[0].delta for ch in c.chat.completions.create(model="x", messages=ask, temperature=0,
                                                                             stream=True) if ch.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == "The user greets me."
        assert "".join(d.content or "" for d in chunks) == "Hello!"
        hidden = c.chat.completions.create(model="x", messages=ask, temperature=0,
                                           extra_body={"include_reasoning": False}).choices[0].message
        assert hidden.content == "Hello!" and getattr(hidden, "reasoning_content", None) is None
    reply = ChatModel(model, tok, family).chat(ask, greedy=True)
    assert (reply.text, reply.reasoning) == ("Hello!", "The user greets me.")
    chunks = list(ChatModel(model, tok, family).stream(ask, greedy=True))
    assert "".join(c.reasoning for c in chunks) == reply.reasoning and "".join(c.text for c in chunks) == reply.text


@pytest.mark.parametrize("show", [True, False])
def test_glm_z1_reasoning_in_the_terminal_chat_only_when_asked(thinking_z1, capsys, show):
    """`glmchat chat --show-reasoning` prints the thinking as it streams, then the answer."""
    import argparse

    from glmchat.chat import ChatModel
    from glmchat.cli import _answer

    model, tok, family = thinking_z1
    args = argparse.Namespace(max_new_tokens=40, temperature=0.0, top_p=1.0, top_k=0, seed=None, greedy=True,
                              show_reasoning=show)
    kept = _answer(ChatModel(model, tok, family), [{"role": "user", "content": "你好"}], args)
    out = capsys.readouterr().out
    assert kept == [{"role": "assistant", "metadata": "", "content": "Hello!"}]
    assert out.startswith("The user greets me.\n\nHello!" if show else "Hello!")


def test_tied_embeddings_only_where_the_reference_ties_them(tiny_ckpt):
    """GlmForCausalLM ties on tie_word_embeddings; the reference's ChatGLM model never does, so a
    chatglm config asking for it is refused rather than run as something else."""
    from glmchat.config import ConfigError, GLMConfig

    raw = json.loads((tiny_ckpt / "config.json").read_text())
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        GLMConfig.from_dict({**raw, "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        GLMConfig.from_dict({**raw, "model_type": "glm", "num_hidden_layers": 2, "intermediate_size": 96,
                             "vocab_size": 512, "max_position_embeddings": 64, "head_dim": 16,
                             "partial_rotary_factor": 0.3})
