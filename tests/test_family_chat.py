"""Chat across the family: each model answers in its own format through the native API, the
drop-in API, the CLI and the server. Expected values come from greedy decoding by full forward
passes over prompts built by hand from each model's documented format."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess

import openai
import pytest
import torch

import glmchat
from glmchat.families import NotAChatModelError
from glmchat.loader import load_model
from glmchat.server import BackgroundServer, build_app
from glmchat.generate import TextStream
from glmchat.server.protocol import ChatRequest, reply_tool_calls, to_glm_messages
from glmchat.families.chatglm3 import ChatGLMTokenizer

NEW = 12
QUERY = "什么是ChatGLM？ .Provide answer in English"


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _network(ckpt):
    return load_model(ckpt, dtype=torch.float32, progress=False)[0]


def greedy(ckpt, prompt: list[int], stops: list[int], max_new: int = NEW) -> list[int]:
    """Greedy tokens by a full forward pass over the whole sequence per step (no cache)."""
    net = _network(str(ckpt))
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(net(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                break
    return out


def glm4_prompt(tok, query: str) -> list[int]:
    """`[gMASK]<sop><|user|>\\n{query}<|assistant|>`."""
    return (tok.get_prefix_tokens() + [tok.get_command("<|user|>")] + tok.encode("\n" + query, add_special_tokens=False)
            + [tok.get_command("<|assistant|>")])


def segments(text: str) -> list[tuple[str, str]]:
    """(first line, rest) of each `<|assistant|>` segment; no newline: ("", segment)."""
    return [tuple(s.split("\n", 1)) if "\n" in s else ("", s) for s in text.split("<|assistant|>")]


def glm4_post_process(text: str):
    """GLM-4's process_response for a reply without tools: the last segment, stripped when plain."""
    metadata, content = segments(text)[-1]
    if metadata.strip():
        return {"name": metadata.strip(), "content": content}
    return content.strip().replace("[[训练时间]]", "2023年")


def glm4_text(text: str) -> str:
    """The native API's text of a GLM-4 reply: its plain segments (blank first line), stripped."""
    plain = [c.strip() for m, c in segments(text) if not m.strip() and c.strip()]
    return "\n\n".join(plain).replace("[[训练时间]]", "2023年")


def chatglm2_post_process(text: str) -> str:
    return text.strip().replace("[[训练时间]]", "2023年")


def server_text(text: str, year: str) -> str:
    """The server's content without tools: every segment is text."""
    return "\n\n".join(s.strip() for s in text.split("<|assistant|>") if s.strip()).replace("[[训练时间]]", year)


def force(ids, at: int):
    """A logits processor that makes ids[i] the only choice when the sequence has `at + i` ids."""
    ids = [ids] if isinstance(ids, int) else list(ids)

    def process(seen, scores):
        i = seen.shape[1] - at
        if 0 <= i < len(ids):
            scores = torch.full_like(scores, -1e4)
            scores[:, ids[i]] = 0.0
        return scores
    return process


def last_shown(tok, tokens: list[int]) -> int:
    """How many tokens the last yield of a stream that shows every token covers."""
    return max(k for k in range(1, len(tokens) + 1) if tok.decode(tokens[:k]) and tok.decode(tokens[:k])[-1] != "\ufffd")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("glmchat"), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_each_checkpoint_gets_its_family(glm4_ckpt, chatglm2_ckpt, tiny_ckpt):
    assert glmchat.load(str(glm4_ckpt), device="cpu", progress=False).family.name == "glm4"
    assert glmchat.load(str(chatglm2_ckpt), device="cpu", progress=False).family.name == "chatglm2"
    assert glmchat.load(str(tiny_ckpt), device="cpu", progress=False).family.name == "chatglm3"


def test_glm4_native_and_dropin_chat(glm4_ckpt):
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_ckpt))
    stops = [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")]
    tokens = greedy(glm4_ckpt, glm4_prompt(tok, QUERY), stops)

    native = glmchat.load(str(glm4_ckpt), device="cpu", dtype="float32", progress=False)
    reply = native.chat([{"role": "user", "content": QUERY}], greedy=True, max_new_tokens=NEW)
    assert reply.completion_tokens == len(tokens) and reply.prompt_tokens == len(glm4_prompt(tok, QUERY))

    model = glmchat.AutoModel.from_pretrained(str(glm4_ckpt)).float()
    history = []
    response, new_history = model.chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW)
    assert response == glm4_post_process(tok.decode(tokens[:-1]))  # the reference drops the last token
    assert history == [{"role": "user", "content": QUERY}] and new_history[0] == history[0]


def test_chatglm2_dropin_keeps_tuple_history_and_every_token(chatglm2_ckpt):
    tok = glmchat.AutoTokenizer.from_pretrained(str(chatglm2_ckpt))
    model = glmchat.AutoModel.from_pretrained(str(chatglm2_ckpt)).float()
    history = [("你好", "你好👋！我是人工智能助手 ChatGLM2-6B。")]
    caller = list(history)
    prompt_text = f"[Round 1]\n\n问：你好\n\n答：{history[0][1]}\n\n[Round 2]\n\n问：{QUERY}\n\n答："
    tokens = greedy(chatglm2_ckpt, tok.encode(prompt_text), [tok.eos_token_id])
    expected = tok.decode(tokens).strip().replace("[[训练时间]]", "2023年")

    response, new_history = model.chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW)
    assert response == expected
    assert new_history == caller + [(QUERY, expected)] and history == caller  # the caller's list is untouched
    # stream_chat: a yield per token with all of them decoded (no lag), skipping empty text and
    # text ending in half a character
    streamed = list(model.stream_chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW))
    texts = [tok.decode(tokens[:k]) for k in range(1, len(tokens) + 1)]
    shown = [chatglm2_post_process(t) for t in texts if t and not t.endswith("\ufffd")]
    assert streamed == [(r, caller + [(QUERY, r)]) for r in shown] and history == caller
    native = glmchat.load(str(chatglm2_ckpt), device="cpu", dtype="float32", progress=False)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": history[0][1]},
                {"role": "user", "content": QUERY}]
    reply = native.chat(messages, greedy=True, max_new_tokens=NEW)
    assert reply.text == expected and reply.tool_call is None
    with pytest.raises(ValueError, match="ChatGLM2"):
        native.chat([{"role": "system", "content": "hi"}, {"role": "user", "content": "q"}], max_new_tokens=2)


def test_base_model_refuses_chat(chatglm3_base_ckpt):
    base = chatglm3_base_ckpt
    native = glmchat.load(str(base), device="cpu", progress=False)
    with pytest.raises(NotAChatModelError, match="base model"):
        native.chat([{"role": "user", "content": "hi"}])
    glmchat_cli = shutil.which("glmchat")
    result = subprocess.run([glmchat_cli, "run", "--model", str(base), "hi"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "base model" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("chat", "--model", base)
    assert result.returncode != 0 and "base model" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # the load notice, then one line
    with pytest.raises(NotAChatModelError, match="base model"):
        glmchat.AutoModel.from_pretrained(str(base)).chat(glmchat.AutoTokenizer.from_pretrained(str(base)), "hi")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气 weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_glm4_tool_calls_in_the_server_protocol(glm4_ckpt):
    """GLM-4 writes a call as the tool's name on one line and JSON arguments on the next."""
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_ckpt))
    family = glmchat.load(str(glm4_ckpt), device="cpu", progress=False).family
    request = ChatRequest.model_validate({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
    ]})
    prompt = tok.decode(family.prompt_ids(tok, to_glm_messages(request, family)))
    assert '"name": "get_weather"' in prompt  # the template's tool listing
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temperature": 21}<|assistant|>' in prompt

    text = TextStream(tok, family.visible_text, stop_ids=family.stop_ids(tok))
    shown = "".join(text.add(t) for t in tok.encode('get_weather\n{"city": "北京"}', add_special_tokens=False))
    assert shown + text.finish() == ""
    [call], unread = reply_tool_calls(family, text.text)
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "北京"}


def test_glm4_through_the_server_and_cli(glm4_ckpt):
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_ckpt))
    prompt = glm4_prompt(tok, QUERY)
    stops = [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")]
    tokens = greedy(glm4_ckpt, prompt, stops)
    text = tok.decode([t for t in tokens if t not in stops])
    native = glmchat.load(str(glm4_ckpt), device="cpu", dtype="float32", progress=False)
    expected = native.chat([{"role": "user", "content": QUERY}], greedy=True, max_new_tokens=NEW)
    assert expected.text == glm4_text(text) and expected.completion_tokens == len(tokens)
    app = build_app(native.model, native.tokenizer, native.family, model_id="glm-4")
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": QUERY}],
                                               temperature=0, max_tokens=NEW)
        assert reply.choices[0].message.content == server_text(text, "2023年")  # no tools: every segment is text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(tokens))
        with_tools = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "hi"}],
                                                    tools=TOOLS, temperature=0, max_tokens=4)
        assert with_tools.usage.prompt_tokens > reply.usage.prompt_tokens  # the tools are in the prompt

    result = run_cli("run", "--model", glm4_ckpt, "--dtype", "float32", "--greedy", "--max-new-tokens", NEW, "--json",
                     "--verbose", QUERY)
    assert result.returncode == 0, result.stderr
    assert "(GLM-4-9B-chat)" in result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == glm4_text(text) and data["completion_tokens"] == len(tokens)


def test_glm4_dropin_stream_chat_lags_one_token(glm4_ckpt):
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_ckpt))
    tokens = greedy(glm4_ckpt, glm4_prompt(tok, QUERY), glmchat.load(str(glm4_ckpt), device="cpu", progress=False).family.stop_ids(tok))
    model = glmchat.AutoModel.from_pretrained(str(glm4_ckpt)).float()
    history = []
    streamed = list(model.stream_chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW))
    texts = [tok.decode(tokens[:k - 1]) for k in range(1, len(tokens) + 1)]
    expected = [glm4_post_process(t) for t in texts if t and not t.endswith("\ufffd")]
    assert [r for r, _ in streamed] == expected
    assert history == [{"role": "user", "content": QUERY}]  # mutated once
    assert streamed[-1][1][:1] == history and streamed[-1][1][1]["role"] == "assistant"


def test_glm4_hf_layout_chats_like_glm4(glm4_hf_ckpt):
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_hf_ckpt))
    stops = [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")]
    tokens = greedy(glm4_hf_ckpt, glm4_prompt(tok, QUERY), stops)
    model = glmchat.AutoModel.from_pretrained(str(glm4_hf_ckpt)).float()
    assert model.family.name == "glm4" and model.family.chat
    response, _ = model.chat(tok, QUERY, do_sample=False, max_new_tokens=NEW)
    assert response == glm4_post_process(tok.decode(tokens[:-1]))


def test_chatglm2_stream_chat_with_past_key_values(chatglm2_ckpt):
    """cli_demo style: the second round continues the cache with "\\n\\n[Round 2]..." only."""
    tok = glmchat.AutoTokenizer.from_pretrained(str(chatglm2_ckpt))
    model = glmchat.AutoModel.from_pretrained(str(chatglm2_ckpt)).float()
    first = tok.encode("[Round 1]\n\n问：你好\n\n答：")
    tokens1 = greedy(chatglm2_ckpt, first, [tok.eos_token_id])
    *_, (response1, history, past) = model.stream_chat(tok, "你好", history=[], do_sample=False, max_new_tokens=NEW,
                                                       return_past_key_values=True)
    # the last yield is the last step whose text is shown; its cache holds the prompt and the
    # tokens before that step's (the newest is never fed back)
    k = last_shown(tok, tokens1)
    assert history == [("你好", chatglm2_post_process(tok.decode(tokens1[:k])))] and response1 == history[0][1]
    assert past.get_seq_length() == len(first) + k - 1

    turn = tok.encode(f"\n\n[Round 2]\n\n问：{QUERY}\n\n答：", add_special_tokens=False)[1:]
    tokens2 = greedy(chatglm2_ckpt, first + tokens1[:k - 1] + turn, [tok.eos_token_id])
    *_, (response2, history2, _) = model.stream_chat(tok, QUERY, history=history, past_key_values=past,
                                                     do_sample=False, max_new_tokens=NEW, return_past_key_values=True)
    assert response2 == chatglm2_post_process(tok.decode(tokens2[:last_shown(tok, tokens2)]))
    assert history2 == history + [(QUERY, response2)]


def test_stop_tokens_per_family(glm4_ckpt, chatglm2_ckpt, chatglm3_base_ckpt):
    """GLM-4 stops at <|user|> and <|observation|> but not <|assistant|>; ChatGLM2 and base models
    stop at eos only."""
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_ckpt))
    n = len((glm4_ckpt / "tokenizer.model").read_text().splitlines())  # specials follow the ranks
    eos, user, assistant, observation = n, n + 7, n + 8, n + 9
    prompt = glm4_prompt(tok, QUERY)
    plain = greedy(glm4_ckpt, prompt, [])
    model = glmchat.AutoModel.from_pretrained(str(glm4_ckpt)).float()
    native = glmchat.load(str(glm4_ckpt), device="cpu", dtype="float32", progress=False)
    for stop in (eos, user, observation):
        out = list(native.generate_ids(prompt, max_new_tokens=NEW, sampling=None, processors=[force(stop, len(prompt) + 2)]))
        assert out == plain[:2] + [stop]
        response, _ = model.chat(tok, QUERY, do_sample=False, max_new_tokens=NEW,
                                 logits_processor=[force(stop, len(prompt) + 2)])
        assert response == glm4_post_process(tok.decode(plain[:2]))
    out = list(native.generate_ids(prompt, max_new_tokens=4, processors=[force(assistant, len(prompt) + 1)]))
    assert len(out) == 4 and out[1] == assistant

    tok2 = glmchat.AutoTokenizer.from_pretrained(str(chatglm2_ckpt))
    assert tok2.eos_token_id == 2
    native2 = glmchat.load(str(chatglm2_ckpt), device="cpu", dtype="float32", progress=False)
    prompt2 = tok2.encode("[Round 1]\n\n问：hi\n\n答：")
    assert list(native2.generate_ids(prompt2, max_new_tokens=NEW, processors=[force(2, len(prompt2) + 1)]))[-1] == 2
    user3 = ChatGLMTokenizer.from_pretrained(chatglm3_base_ckpt).get_command("<|user|>")  # ChatGLM3's id: no stop here
    assert len(list(native2.generate_ids(prompt2, max_new_tokens=4, processors=[force(user3, len(prompt2))]))) == 4

    base = glmchat.load(str(chatglm3_base_ckpt), device="cpu", dtype="float32", progress=False)
    text = base.tokenizer.encode("The capital of France is")
    assert len(list(base.generate_ids(text, max_new_tokens=4, processors=[force(user3, len(text))]))) == 4
    assert list(base.generate_ids(text, max_new_tokens=4, processors=[force(2, len(text))])) == [2]


def test_chatglm2_and_base_through_the_server_and_cli(chatglm2_ckpt, chatglm3_base_ckpt):
    tok = glmchat.AutoTokenizer.from_pretrained(str(chatglm2_ckpt))
    prompt = tok.encode(f"[Round 1]\n\n问：{QUERY}\n\n答：")
    tokens = greedy(chatglm2_ckpt, prompt, [tok.eos_token_id])
    generated = [t for t in tokens if t != tok.eos_token_id]
    native = glmchat.load(str(chatglm2_ckpt), device="cpu", dtype="float32", progress=False)
    app = build_app(native.model, native.tokenizer, native.family, model_id="chatglm2")
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="chatglm2", messages=[{"role": "user", "content": QUERY}],
                                               temperature=0, max_tokens=NEW)
        assert reply.choices[0].message.content == server_text(tok.decode(generated), "2023年")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(tokens))
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(model="chatglm2", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
        with pytest.raises(openai.BadRequestError, match="ChatGLM2"):
            client.chat.completions.create(model="chatglm2", messages=[{"role": "system", "content": "be brief"},
                                                                       {"role": "user", "content": "hi"}])
    base = glmchat.load(str(chatglm3_base_ckpt), device="cpu", progress=False)
    with BackgroundServer(build_app(base.model, base.tokenizer, base.family, model_id="base")) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="base model"):
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])

    result = run_cli("run", "--model", chatglm2_ckpt, "--dtype", "float32", "--greedy", "--max-new-tokens", 5, "--verbose",
                     QUERY)
    assert result.returncode == 0, result.stderr
    assert "(ChatGLM2-6B)" in result.stderr
    assert result.stdout == chatglm2_post_process(tok.decode(greedy(chatglm2_ckpt, prompt, [2], 5))) + "\n"


def test_replies_are_post_processed_per_family(glm4_ckpt, chatglm2_ckpt):
    """Forced replies: the date placeholder (2023年 for GLM-4 as for ChatGLM2), GLM-4's JSON tool
    call (name line, JSON line) read only when the history offers tools."""
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4_ckpt))
    model = glmchat.AutoModel.from_pretrained(str(glm4_ckpt)).float()
    observation = tok.get_command("<|observation|>")
    tools = [{"role": "system", "content": "", "tools": TOOLS}]
    call = tok.encode('get_weather\n{"city": "Paris"}', add_special_tokens=False) + [observation]
    start = len(tok.build_chat_input("天气?", history=tools).input_ids[0])
    history = list(tools)
    response, new_history = model.chat(tok, "天气?", history=history, do_sample=False, max_new_tokens=40,
                                       logits_processor=[force(call, start)])
    assert response == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert new_history[-1] == {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'}
    start = len(glm4_prompt(tok, "天气?"))
    response, _ = model.chat(tok, "天气?", do_sample=False, max_new_tokens=40, logits_processor=[force(call, start)])
    assert response == {"name": "get_weather", "content": '{"city": "Paris"}'}  # no tools offered: not parsed
    date = tok.encode("\n今天是[[训练时间]] ", add_special_tokens=False) + [tok.eos_token_id]
    start = len(glm4_prompt(tok, "几年?"))
    response, new_history = model.chat(tok, "几年?", do_sample=False, max_new_tokens=40,
                                       logits_processor=[force(date, start)])
    assert response == "今天是2023年" and new_history[-1]["content"] == "今天是[[训练时间]]"

    tok2 = glmchat.AutoTokenizer.from_pretrained(str(chatglm2_ckpt))
    model2 = glmchat.AutoModel.from_pretrained(str(chatglm2_ckpt)).float()
    start = len(tok2.encode("[Round 1]\n\n问：几年?\n\n答："))
    date = tok2.encode("今天是[[训练时间]]\n", add_special_tokens=False) + [2]
    response, new_history = model2.chat(tok2, "几年?", do_sample=False, max_new_tokens=40,
                                        logits_processor=[force(date, start)])
    assert response == "今天是2023年" and new_history == [("几年?", "今天是2023年")]
