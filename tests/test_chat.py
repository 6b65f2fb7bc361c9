"""The drop-in chat API and the native API against an independent computation.

The expected side is written here from the spec, not taken from glmchat.chat: greedy decoding by
repeated full forward passes without a KV cache, the reference's post-processing re-implemented
below, and its streaming rule (the tokens so far minus the newest, skipping text that is empty or
ends in U+FFFD). Replies the tiny random models would never write (tool calls, stop tokens, split
UTF-8) are made with a logits processor passed through the public API, the way a user would.
"""

from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch

import glmchat
from glmchat import AutoModel, AutoTokenizer
from glmchat.model import rotary_table
from glmchat.chat import ChatModel
from glmchat.families import ToolCallParseError
from glmchat.families.chatglm3 import ChatGLM3, parse_tool_call
from glmchat.families.chatglm3 import chatglm3_prompt_ids as build_prompt_ids
from glmchat.generate import StreamDetokenizer

BLOG = [
    ("What is ChatGLM? What are some similarities and differences between ChatGLM and ChatGPT?",
     "什么是ChatGLM？ChatGLM和ChatGPT之间有哪些相似和不同之处？"),
    ("Explain the recent developments in natural language processing", "解释自然语言处理领域的最近发展。"),
    ("Implement code for binary search in Python", "在Python中实现二分查找的代码"),
    ("Summarize the paper 'Attention Is All You Need'", "总结论文 'Attention Is All You Need'"),
]
QUERIES = [q for en, zh in BLOG for q in (en + " .Provide answer in English", zh + " 请提供答案，并使用中文语言")]
FOLLOW_UP = "Tell me more. 请详细说明。"
NEW = 40  # new tokens per answer: the tiny models rarely stop by themselves

TOOLS = [{"name": "get_weather", "description": "天气 weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


# ---- the independent side ------------------------------------------------------------------


def greedy_reference(net, prompt: list[int], stop: list[int], max_new: int, processor=None) -> list[int]:
    """Greedy tokens by a full forward pass over the whole sequence at every step (no cache)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = net(torch.tensor([ids]))[0, -1].float()
            if processor is not None:
                logits = processor(torch.tensor([ids]), logits[None])[0]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token in stop:
                break
    return out


def reference_process(output: str, history: list[dict], tool_parameters=None):
    """The spec's post-processing. Tool parameters come from the test (the reference evals them)."""
    content, history = "", copy.deepcopy(history)
    for response in output.split("<|assistant|>"):
        if "\n" in response:
            metadata, content = response.split("\n", maxsplit=1)
        else:
            metadata, content = "", response
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
        else:
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            if history[0]["role"] == "system" and "tools" in history[0]:
                content = {"name": metadata.strip(), "parameters": tool_parameters}
            else:
                content = {"name": metadata.strip(), "content": content}
    return content, history


def reference_stream(tokenizer, tokens: list[int], history: list[dict], tool_parameters=None) -> list:
    out = []
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k - 1])
        if text and text[-1] != "\ufffd":
            out.append(reference_process(text, history, tool_parameters))
    return out


def stops(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]


class Script:
    """A logits processor that makes the model write `ids` first, then leaves it alone."""

    def __init__(self, ids: list[int]):
        self.ids, self.start = list(ids), None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        i = input_ids.shape[1] - self.start
        if i >= len(self.ids):
            return scores
        forced = torch.full_like(scores, torch.finfo(scores.dtype).min)  # -inf would trip the inf guard
        forced[..., self.ids[i]] = 0.0
        return forced


def pieces(tokenizer, text: str) -> list[int]:
    """Ids of text without the dummy-prefix space piece logic: plain SentencePiece ids."""
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return AutoTokenizer.from_pretrained(str(tiny_ckpt), trust_remote_code=True)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return AutoModel.from_pretrained(str(tiny_ckpt), trust_remote_code=True).float().eval()


# ---- drop-in: the blog prompts ---------------------------------------------------------------


@pytest.mark.parametrize("query", QUERIES)
def test_blog_prompt_two_turns_match_independent_greedy(model, tok, query):
    history, expected_history = [], []
    for turn in (query, FOLLOW_UP):
        prompt = tok.build_chat_input(turn, history=expected_history).input_ids[0].tolist()
        tokens = greedy_reference(model.transformer, prompt, stops(tok), NEW)
        expected_history.append({"role": "user", "content": turn})
        expected = reference_process(tok.decode(tokens[:-1]), expected_history)

        caller_history = history
        response, history = model.chat(tok, turn, history=history, do_sample=False, max_new_tokens=NEW)
        assert (response, history) == expected
        assert caller_history[-1] == {"role": "user", "content": turn}  # the caller's list, mutated
        assert history is not caller_history
        expected_history = expected[1]


@pytest.mark.parametrize("query", [QUERIES[0], QUERIES[1], QUERIES[5]])
def test_blog_prompt_stream_chat_yields_like_the_reference(model, tok, query):
    first, history = model.chat(tok, query, history=[], do_sample=False, max_new_tokens=NEW)
    for turn, past in ((query, []), (FOLLOW_UP, history)):
        prompt = tok.build_chat_input(turn, history=past).input_ids[0].tolist()
        tokens = greedy_reference(model.transformer, prompt, stops(tok), NEW)
        expected = reference_stream(tok, tokens, past + [{"role": "user", "content": turn}])
        got = list(model.stream_chat(tok, turn, history=copy.deepcopy(past), do_sample=False, max_new_tokens=NEW))
        assert got == expected
        assert len(got) > 5


def test_stream_chat_with_past_key_values_continues_after_the_cache(model, tok):
    """cli_demo style: the second prompt holds only the new turn, after the cache of the first."""
    past, history = None, []
    sequence: list[int] = []
    for turn in QUERIES[2:4]:
        prompt = tok.build_chat_input(turn).input_ids[0].tolist()
        tokens = greedy_reference(model.transformer, sequence + prompt, stops(tok), NEW)
        expected = reference_stream(tok, tokens, history + [{"role": "user", "content": turn}])
        got = list(model.stream_chat(tok, turn, history=history, past_key_values=past, do_sample=False,
                                     max_new_tokens=NEW, return_past_key_values=True))
        assert [g[:2] for g in got] == expected
        past, history = got[-1][2], got[-1][1]
        sequence = sequence + prompt + tokens[:-1]  # the last token is never fed to the model
        assert past.get_seq_length() == len(sequence)


def test_an_older_past_key_values_still_means_what_it_meant(model, tok):
    """Handles share one cache; continuing from an earlier one after a later one moved on forks it."""
    chunks = list(model.stream_chat(tok, "你好", history=[], do_sample=False, max_new_tokens=12,
                                    return_past_key_values=True))
    first_prompt = tok.build_chat_input("你好").input_ids[0].tolist()
    sequence = first_prompt + greedy_reference(model.transformer, first_prompt, stops(tok), 12)
    prompt = tok.build_chat_input("Hello").input_ids[0].tolist()
    user = [{"role": "user", "content": "Hello"}]
    for handle in (chunks[-1][2], chunks[2][2], chunks[-1][2]):
        held = sequence[:handle.get_seq_length()]
        tokens = greedy_reference(model.transformer, held + prompt, stops(tok), 6)
        got = list(model.stream_chat(tok, "Hello", history=[], past_key_values=handle, do_sample=False,
                                     max_new_tokens=6))
        assert got == reference_stream(tok, tokens, user)


# ---- drop-in: replies the reference post-processes ------------------------------------------


def test_tool_call_with_tools_in_the_system_message(model, tok):
    call = "get_weather\n```python\ntool_call(city='北京', days=3, units=['c'])\n```"
    script = pieces(tok, call) + [tok.get_command("<|observation|>")]
    history = [{"role": "system", "content": "Answer with tools.", "tools": TOOLS}]
    response, history = model.chat(tok, "北京天气怎么样", history=history, do_sample=False,
                                   logits_processor=[Script(script)], max_new_tokens=60)
    assert response == {"name": "get_weather", "parameters": {"city": "北京", "days": 3, "units": ["c"]}}
    assert history[-1] == {"role": "assistant", "metadata": "get_weather",
                           "content": tok.decode(script[:-1]).split("\n", 1)[1]}

    # the observation turn: the tool's result goes back with role "observation"
    result = json.dumps({"temperature": 20}, ensure_ascii=False)
    prompt = tok.build_chat_input(result, history=history, role="observation").input_ids[0].tolist()
    assert prompt[-len(pieces(tok, result)) - 1:-1] == pieces(tok, result)
    tokens = greedy_reference(model.transformer, prompt, stops(tok), 20)
    expected = reference_process(tok.decode(tokens[:-1]), history + [{"role": "observation", "content": result}])
    assert model.chat(tok, result, history=history, role="observation", do_sample=False, max_new_tokens=20) == expected


def test_tool_call_without_tools_is_a_name_and_content(model, tok):
    script = pieces(tok, "search\nquery text") + [tok.get_command("<|observation|>")]
    response, history = model.chat(tok, "find", history=[], do_sample=False, logits_processor=[Script(script)])
    text = tok.decode(script[:-1])
    assert response == reference_process(text, [{"role": "user", "content": "find"}])[0]
    assert response["name"] == "search" and isinstance(response["content"], str)


def test_stream_chat_tool_call_yields_once_the_call_parses(model, tok):
    call = "get_weather\n```python\ntool_call(city='Paris')\n```"
    script = pieces(tok, call) + [tok.get_command("<|observation|>")]
    history = [{"role": "system", "content": "", "tools": TOOLS}]
    got = list(model.stream_chat(tok, "weather?", history=history, do_sample=False, logits_processor=[Script(script)]))
    responses = [r for r, _ in got]
    assert responses[-1] == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert all(isinstance(r, str) or r["parameters"] == {"city": "Paris"} for r in responses)


def test_model_output_is_never_executed(model, tok, tmp_path):
    marker = tmp_path / "pwned"
    call = f"get_weather\n```python\ntool_call(city=open({str(marker)!r}, 'w').write('x'))\n```"
    script = pieces(tok, call) + [tok.get_command("<|observation|>")]
    with pytest.raises(ToolCallParseError):
        model.chat(tok, "q", history=[{"role": "system", "content": "", "tools": TOOLS}], do_sample=False,
                   logits_processor=[Script(script)])
    assert not marker.exists()


@pytest.mark.parametrize("code, expected", [
    ("tool_call(a=1, b='x', c=[1, 2.5], d={'k': (1, None)}, e=True, f=-3)",
     {"a": 1, "b": "x", "c": [1, 2.5], "d": {"k": (1, None)}, "e": True, "f": -3}),
    ("tool_call(\n    city='上海',\n)", {"city": "上海"}),
    ("tool_call(**{'a': 1}, b=2)", {"a": 1, "b": 2}),
    ("tool_call()", {}),
])
def test_parse_tool_call_reads_literals(code, expected):
    assert parse_tool_call(f"```python\n{code}\n```") == expected


@pytest.mark.parametrize("code", [
    "__import__('os').system('true')", "tool_call(a=x)", "tool_call(1)", "tool_call(a=1, **{'a': 2})",
    "print(1)", "tool_call(a=[i for i in range(3)])", "tool_call(a=1", "", "tool_call(a=(lambda: 1)())",
])
def test_parse_tool_call_refuses_anything_else(code):
    with pytest.raises(ToolCallParseError):
        parse_tool_call(f"```python\n{code}\n```")


@pytest.mark.parametrize("stop_name", ["<eos>", "<|user|>", "<|observation|>"])
def test_each_stop_token_ends_the_reply_and_is_dropped(model, tok, stop_name):
    script = pieces(tok, "\nHi there") + [tok.get_command(stop_name)]
    response, history = model.chat(tok, "hi", history=[], do_sample=False, logits_processor=[Script(script)])
    assert response == "Hi there"
    assert history[-1] == {"role": "assistant", "metadata": "", "content": "Hi there"}


def test_assistant_token_does_not_stop_and_starts_a_new_segment(model, tok):
    script = (pieces(tok, "\nfirst part") + [tok.get_command("<|assistant|>")] + pieces(tok, "\nsecond part")
              + [tok.eos_token_id])
    response, history = model.chat(tok, "hi", history=[], do_sample=False, logits_processor=[Script(script)])
    assert response == "second part"
    assert [h["content"] for h in history[1:]] == ["first part", "second part"]


def test_length_stop_drops_the_last_real_token(model, tok):
    prompt = tok.build_chat_input("hi").input_ids[0].tolist()
    tokens = greedy_reference(model.transformer, prompt, stops(tok), 7)
    assert len(tokens) == 7 and not set(tokens) & set(stops(tok))
    expected = reference_process(tok.decode(tokens[:-1]), [{"role": "user", "content": "hi"}])
    assert model.chat(tok, "hi", do_sample=False, max_length=len(prompt) + 7) == expected
    assert model.chat(tok, "hi", do_sample=False, max_new_tokens=7) == expected


def test_training_time_placeholder_is_replaced_in_the_response_only(model, tok):
    script = pieces(tok, "\n我的训练时间是[[训练时间]]。") + [tok.eos_token_id]
    response, history = model.chat(tok, "q", do_sample=False, logits_processor=[Script(script)])
    assert response == "我的训练时间是2023年。"
    assert history[-1]["content"] == "我的训练时间是[[训练时间]]。"


def test_characters_split_over_byte_tokens_never_stream_half(model, tok):
    byte = lambda b: tok.sp.piece_to_id(f"<0x{b:02X}>")  # noqa: E731
    script = [byte(b) for b in "\n你好，世界".encode()] + [tok.eos_token_id]
    got = list(model.stream_chat(tok, "q", do_sample=False, logits_processor=[Script(script)]))
    assert [r for r, _ in got] == [r for r, _ in reference_stream(tok, script, [{"role": "user", "content": "q"}])]
    assert got[-1][0] == "你好，世界"
    assert not any("\ufffd" in r for r, _ in got)

    native = ChatModel(model.transformer, tok, ChatGLM3(), processors=[Script(script)])
    chunks = list(native.stream([{"role": "user", "content": "q"}], greedy=True))
    assert not any("\ufffd" in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == chunks[-1].reply.text == "你好，世界"


def test_sampling_defaults_sample_and_do_sample_false_is_greedy(model, tok):
    torch.manual_seed(0)
    samples = {model.chat(tok, "你好", history=[], max_new_tokens=8, temperature=1.5, top_p=1.0)[0] for _ in range(4)}
    assert len(samples) > 1
    greedy = {model.chat(tok, "你好", history=[], do_sample=False, max_new_tokens=8)[0] for _ in range(2)}
    assert len(greedy) == 1
    assert model.chat(tok, "你好", history=[], top_k=1, max_new_tokens=8)[0] in greedy


def test_unsupported_options_are_refused(model, tok):
    with pytest.raises(ValueError, match="num_beams"):
        model.chat(tok, "q", num_beams=2)
    with pytest.raises(TypeError, match="no_repeat_ngram_size"):
        model.chat(tok, "q", no_repeat_ngram_size=3)


# ---- drop-in: forward, generate, torch module behaviour ------------------------------------


def test_forward_logits_and_past_key_values(model, tok):
    ids = tok.build_chat_input("Hello 你好").input_ids
    full = model(ids).logits
    assert full.shape == (1, ids.shape[1], model.config.padded_vocab_size)
    torch.testing.assert_close(full, model.transformer(ids), rtol=1e-5, atol=1e-5)
    head = model(ids[:, :-3], use_cache=True)
    tail = model(ids[:, -3:], past_key_values=head.past_key_values)
    torch.testing.assert_close(tail.logits, full[:, -3:], rtol=1e-4, atol=1e-4)
    assert model(ids)[0].shape == full.shape  # tuple-style access, like transformers' outputs


def test_generate_matches_independent_greedy_and_pads_finished_rows(model, tok):
    texts = ["你好", "Hello, how are you doing today?"]
    batch = tok(texts, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id)
    assert out.shape[0] == 2 and torch.equal(out[:, :batch.input_ids.shape[1]], batch.input_ids)
    for row, text in enumerate(texts):
        ids = tok.encode(text)
        expected = greedy_reference(model.transformer, ids, [tok.eos_token_id], 10)
        assert out[row, batch.input_ids.shape[1]:].tolist()[:len(expected)] == expected

    # a stop id: generation ends at it, the stop token kept, finished rows padded
    prompt = torch.tensor([tok.encode("hi")])
    first = greedy_reference(model.transformer, prompt[0].tolist(), [], 4)
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=[first[2]])
    assert out[0, prompt.shape[1]:].tolist() == first[:first.index(first[2]) + 1]
    # transformers' defaults: greedy, stop at eos, max_length 20 counting the prompt
    expected = greedy_reference(model.transformer, prompt[0].tolist(), [model.config.eos_token_id], 20 - prompt.shape[1])
    assert model.generate(prompt)[0, prompt.shape[1]:].tolist() == expected


def test_dtype_and_device_conversions_chain_like_a_torch_module(tiny_ckpt, tok):
    m = AutoModel.from_pretrained(str(tiny_ckpt))
    assert m.dtype == torch.float32 and m.device.type == "cpu" and not m.training  # the stored dtype
    assert m.half() is m and m.dtype == torch.float16 and m.transformer.rope.dtype == torch.float16
    assert m.bfloat16().dtype == torch.bfloat16
    assert m.float().cpu().to("cpu").eval().dtype == torch.float32
    # the rotary table is recomputed in float32, not round-tripped through float16
    assert torch.equal(m.transformer.rope, rotary_table(m.config))
    assert m.to(torch.bfloat16).dtype == torch.bfloat16
    assert AutoModel.from_pretrained(str(tiny_ckpt), torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    stored = json.loads((tiny_ckpt / "config.json").read_text())["seq_length"]
    assert m.config.seq_length == stored and isinstance(m.config, glmchat.GLMConfig)


# ---- native API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native(tiny_ckpt):
    return glmchat.load(str(tiny_ckpt), device="cpu", dtype="float32", progress=False)


def test_native_chat_keeps_every_token_and_reports_counts_and_timing(native):
    messages = [{"role": "system", "content": "You are helpful. 你是助手。"}, {"role": "user", "content": QUERIES[1]}]
    prompt = build_prompt_ids(native.tokenizer, messages)
    tokens = greedy_reference(native.model, prompt, stops(native.tokenizer), NEW)
    reply = native.chat(messages, greedy=True, max_new_tokens=NEW)
    stopped = tokens[-1] in stops(native.tokenizer)
    text = native.tokenizer.decode(tokens[:-1] if stopped else tokens)
    plain = [c.strip() for m, c in (s.split("\n", 1) if "\n" in s else ("", s) for s in text.split("<|assistant|>"))
             if not m.strip() and c.strip()]
    assert reply.text == "\n\n".join(plain).replace("[[训练时间]]", "2023年")
    assert reply.messages == reference_process(text, messages)[1][len(messages):]
    assert (reply.prompt_tokens, reply.completion_tokens) == (len(prompt), len(tokens))
    assert reply.finish_reason == ("stop" if stopped else "length")
    assert 0 < reply.time_to_first_token <= reply.seconds and reply.tokens_per_second > 0
    assert native.load_seconds > 0


def test_native_stream_chunks_join_to_the_reply(native):
    for query in QUERIES:
        chunks = list(native.stream([{"role": "user", "content": query}], greedy=True, max_new_tokens=NEW))
        assert chunks[-1].reply is not None and all(c.reply is None for c in chunks[:-1])
        assert "".join(c.text for c in chunks) == chunks[-1].reply.text
    # The random model's replies mostly read as tool calls (a first line of "metadata"), which show
    # no text while streaming; a plain-text reply, as ChatGLM3 writes it, arrives piece by piece.
    tok = native.tokenizer
    answer = "\n二分查找 (binary search) 很快。"
    script = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    scripted = ChatModel(native.model, tok, ChatGLM3(), processors=[Script(script)])
    chunks = list(scripted.stream([{"role": "user", "content": QUERIES[5]}], greedy=True, max_new_tokens=NEW))
    assert "".join(c.text for c in chunks) == chunks[-1].reply.text == answer.strip()
    assert chunks[-1].reply.finish_reason == "stop" and len(chunks) > 3


def test_native_multi_turn_reuses_the_cache_without_changing_answers(native, tiny_ckpt):
    fresh = glmchat.load(str(tiny_ckpt), device="cpu", dtype="float32", progress=False)
    messages = []
    for query in (QUERIES[0], FOLLOW_UP, QUERIES[3]):
        messages.append({"role": "user", "content": query})
        reply = native.chat(messages, greedy=True, max_new_tokens=24)
        fresh._cache = None  # recompute everything
        assert fresh.chat(messages, greedy=True, max_new_tokens=24).text == reply.text
        messages += reply.messages
    assert native._cache_valid > 0


def test_native_tool_call_and_stop_tokens(native):
    tok = native.tokenizer
    script = pieces(tok, "get_weather\n```python\ntool_call(city='Paris')\n```") + [tok.get_command("<|observation|>")]
    scripted = ChatModel(native.model, tok, ChatGLM3(), processors=[Script(script)])
    messages = [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "weather?"}]
    chunks = list(scripted.stream(messages, greedy=True))
    reply = chunks[-1].reply
    assert reply.tool_call == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert reply.text == "" and "".join(c.text for c in chunks) == ""  # the call's code is not shown as text
    assert reply.finish_reason == "stop" and reply.completion_tokens == len(script)


def test_native_length_stop_keeps_the_last_token(native):
    tok = native.tokenizer
    script = pieces(tok, "\nabc def ghi")
    reply = ChatModel(native.model, tok, ChatGLM3(), processors=[Script(script)]).chat(
        [{"role": "user", "content": "q"}], greedy=True, max_new_tokens=len(script))
    assert reply.text == "abc def ghi" and reply.finish_reason == "length"


def test_native_training_time_never_streams_half(native):
    tok = native.tokenizer
    script = pieces(tok, "\n训练于[[训练时间]]，完") + [tok.eos_token_id]
    chunks = list(ChatModel(native.model, tok, ChatGLM3(), processors=[Script(script)]).stream(
        [{"role": "user", "content": "q"}], greedy=True))
    shown = ""
    for chunk in chunks:
        shown += chunk.text
        assert "[" not in shown
    assert shown == "训练于2023年，完"


def test_native_sampling_seed_is_repeatable(native):
    messages = [{"role": "user", "content": "你好"}]
    a = native.chat(messages, seed=7, temperature=1.2, max_new_tokens=12).text
    assert native.chat(messages, seed=7, temperature=1.2, max_new_tokens=12).text == a
    others = {native.chat(messages, seed=s, temperature=1.2, max_new_tokens=12).text for s in range(8, 12)}
    assert others - {a}


def test_prompt_ids_follow_the_spec_layout(native):
    """The native API's prompt: the spec's build_chat_input layout, built here from SentencePiece directly."""
    tok = native.tokenizer
    history = [{"role": "system", "content": "sys", "tools": TOOLS}, {"role": "user", "content": "天气"},
               {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='x')\n```"},
               {"role": "observation", "content": '{"t": 1}'}, {"role": "assistant", "metadata": "", "content": "ok"}]
    messages = history + [{"role": "user", "content": "next <|user|>"}]
    sp = tok.sp.encode
    expected = [tok.get_command("[gMASK]"), tok.get_command("sop")]
    for m in messages:
        content = m["content"] + ("\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False) if "tools" in m else "")
        expected += [tok.get_command(f"<|{m['role']}|>")] + sp(m.get("metadata", "") + "\n") + sp(content)
    expected.append(tok.get_command("<|assistant|>"))
    assert native.family.prompt_ids(tok, messages) == expected
    assert tok.build_chat_input("next <|user|>", history=history).input_ids[0].tolist() == expected
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError):
            native.family.prompt_ids(tok, bad)


def test_stream_detokenizer_equals_decoding_everything(native):
    tok = native.tokenizer
    rng = random.Random(0)
    ids = pieces(tok, "Hello 世界! 你好，ChatGLM。\n  spaces  ") + [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "é中".encode()]
    specials = [tok.get_command(n) for n in ("<|assistant|>", "<|user|>", "[gMASK]")] + [2, 0]
    for _ in range(30):
        tokens = [rng.choice(ids + specials) for _ in range(rng.randint(1, 40))]
        detok = StreamDetokenizer(tok)
        streamed = "".join(detok.add(t) for t in tokens)
        full = tok.decode(tokens)
        assert full.startswith(streamed) and (streamed == full or full.endswith("\ufffd"))


def test_random_weights_with_a_stand_in_tokenizer(tiny_ckpt, tmp_path, monkeypatch):
    """No tokenizer next to the config: the stand-in shipped in glmchat/data, sampling kept to its ids."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_ckpt / "config.json", bare / "config.json")
    m = glmchat.load(str(bare), device="cpu", dtype="float32", random_weights=True, progress=False)
    assert m.random_weights and m.standin_tokenizer
    assert not (tmp_path / "cache").exists()  # shipped, not trained into the user's cache
    out = list(m.generate_ids(build_prompt_ids(m.tokenizer, [{"role": "user", "content": "hi"}]), max_new_tokens=60,
                            sampling=glmchat.generate.SamplingConfig(temperature=2.0, top_p=1.0, top_k=0, seed=0)))
    assert max(out) < m.tokenizer.vocab_size

    with_tokenizer = glmchat.load(str(tiny_ckpt), device="cpu", dtype="float32", random_weights=True, progress=False)
    assert not with_tokenizer.standin_tokenizer and with_tokenizer.tokenizer.vocab_size == m.tokenizer.vocab_size


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(glmchat.CheckpointError, match="no checkpoint directory"):
        glmchat.load(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(glmchat.DeviceError):
        glmchat.load(str(tmp_path), device="tpu")


def test_context_overflow_is_a_clear_error(native, model, tok):
    long = "你好 " * 400
    with pytest.raises(glmchat.ContextLengthError, match="context"):
        native.chat([{"role": "user", "content": long}])
    with pytest.raises(glmchat.ContextLengthError, match="context"):
        model.chat(tok, long)
