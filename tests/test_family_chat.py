"""Chat across the family: each model answers in its own format through the native API, the
drop-in API, the CLI and the server. Expected values come from greedy decoding by full forward
passes over prompts built by hand from each model's documented format."""

from __future__ import annotations

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
from glmchat.server.protocol import ChatRequest, Reply, to_glm_messages
from glmchat.tiny_family import (make_tiny_chatglm2_checkpoint, make_tiny_chatglm3_base_checkpoint,
                                 make_tiny_glm4_checkpoint, train_bpe_ranks)

NEW = 12
QUERY = "什么是ChatGLM？ .Provide answer in English"


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    return make_tiny_glm4_checkpoint(tmp_path_factory.mktemp("glm4_chat"), ranks=train_bpe_ranks(), seq_length=512)


@pytest.fixture(scope="module")
def chatglm2(tmp_path_factory, tiny_tokenizer_model):
    return make_tiny_chatglm2_checkpoint(tmp_path_factory.mktemp("chatglm2_chat"), tokenizer_model=tiny_tokenizer_model)


def greedy(ckpt, prompt: list[int], stops: list[int], max_new: int = NEW) -> list[int]:
    """Greedy tokens by a full forward pass over the whole sequence per step (no cache)."""
    net, _ = load_model(ckpt, dtype=torch.float32, progress=False)
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


def glm4_post_process(text: str):
    """GLM-4's process_response for a reply without tools: the last segment, stripped when plain."""
    metadata, content = text.split("<|assistant|>")[-1].split("\n", 1) if "\n" in text.split("<|assistant|>")[-1] \
        else ("", text.split("<|assistant|>")[-1])
    if metadata.strip():
        return {"name": metadata.strip(), "content": content}
    return content.strip().replace("[[训练时间]]", "2024年")


def test_each_checkpoint_gets_its_family(glm4, chatglm2, tiny_ckpt):
    assert glmchat.load(str(glm4), device="cpu", progress=False).family.name == "glm4"
    assert glmchat.load(str(chatglm2), device="cpu", progress=False).family.name == "chatglm2"
    assert glmchat.load(str(tiny_ckpt), device="cpu", progress=False).family.name == "chatglm3"


def test_glm4_native_and_dropin_chat(glm4):
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4))
    stops = [tok.eos_token_id, tok.get_command("<|user|>"), tok.get_command("<|observation|>")]
    tokens = greedy(glm4, glm4_prompt(tok, QUERY), stops)

    native = glmchat.load(str(glm4), device="cpu", dtype="float32", progress=False)
    reply = native.chat([{"role": "user", "content": QUERY}], greedy=True, max_new_tokens=NEW)
    assert reply.completion_tokens == len(tokens) and reply.prompt_tokens == len(glm4_prompt(tok, QUERY))

    model = glmchat.AutoModel.from_pretrained(str(glm4)).float()
    history = []
    response, new_history = model.chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW)
    assert response == glm4_post_process(tok.decode(tokens[:-1]))  # the reference drops the last token
    assert history == [{"role": "user", "content": QUERY}] and new_history[0] == history[0]


def test_chatglm2_dropin_keeps_tuple_history_and_every_token(chatglm2):
    tok = glmchat.AutoTokenizer.from_pretrained(str(chatglm2))
    model = glmchat.AutoModel.from_pretrained(str(chatglm2)).float()
    history = [("你好", "你好👋！我是人工智能助手 ChatGLM2-6B。")]
    caller = list(history)
    prompt_text = f"[Round 1]\n\n问：你好\n\n答：{history[0][1]}\n\n[Round 2]\n\n问：{QUERY}\n\n答："
    tokens = greedy(chatglm2, tok.encode(prompt_text), [tok.eos_token_id])
    expected = tok.decode(tokens).strip().replace("[[训练时间]]", "2023年")

    response, new_history = model.chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW)
    assert response == expected
    assert new_history == caller + [(QUERY, expected)] and history == caller  # the caller's list is untouched
    streamed = list(model.stream_chat(tok, QUERY, history=history, do_sample=False, max_new_tokens=NEW))
    assert streamed[-1] == (expected, caller + [(QUERY, expected)])
    assert all(not r.endswith("\ufffd") and r for r, _ in streamed)

    native = glmchat.load(str(chatglm2), device="cpu", dtype="float32", progress=False)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": history[0][1]},
                {"role": "user", "content": QUERY}]
    reply = native.chat(messages, greedy=True, max_new_tokens=NEW)
    assert reply.text == expected and reply.tool_call is None
    with pytest.raises(ValueError, match="ChatGLM2"):
        native.chat([{"role": "system", "content": "hi"}, {"role": "user", "content": "q"}], max_new_tokens=2)


def test_base_model_refuses_chat(tmp_path, tiny_tokenizer_model):
    base = make_tiny_chatglm3_base_checkpoint(tmp_path / "base", tokenizer_model=tiny_tokenizer_model)
    native = glmchat.load(str(base), device="cpu", progress=False)
    with pytest.raises(NotAChatModelError, match="base model"):
        native.chat([{"role": "user", "content": "hi"}])
    glmchat_cli = shutil.which("glmchat")
    result = subprocess.run([glmchat_cli, "run", "--model", str(base), "hi"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "base model" in result.stderr and "Traceback" not in result.stderr


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气 weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_glm4_tool_calls_in_the_server_protocol(glm4):
    """GLM-4 writes a call as the tool's name on one line and JSON arguments on the next."""
    tok = glmchat.AutoTokenizer.from_pretrained(str(glm4))
    family = glmchat.load(str(glm4), device="cpu", progress=False).family
    request = ChatRequest.model_validate({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
    ]})
    prompt = tok.decode(family.prompt_ids(tok, to_glm_messages(request, family)))
    assert '"name": "get_weather"' in prompt  # the template's tool listing
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n{"temperature": 21}<|assistant|>' in prompt

    reply = Reply(tok, stop_ids=family.stop_ids(tok), stop_strings=[], tools=True, family=family)
    for token in tok.encode('get_weather\n{"city": "北京"}', add_special_tokens=False):
        reply.add(token)
    assert reply.content(final=True) == ""
    [call] = reply.tool_calls()
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "北京"}


def test_glm4_through_the_server_and_cli(glm4):
    native = glmchat.load(str(glm4), device="cpu", dtype="float32", progress=False)
    expected = native.chat([{"role": "user", "content": QUERY}], greedy=True, max_new_tokens=NEW)
    app = build_app(native.model, native.tokenizer, model_id="glm-4", family=native.family)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        reply = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": QUERY}],
                                               temperature=0, max_tokens=NEW)
        assert reply.usage.prompt_tokens == expected.prompt_tokens
        assert reply.usage.completion_tokens == expected.completion_tokens
        with_tools = client.chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "hi"}],
                                                    tools=TOOLS, temperature=0, max_tokens=4)
        assert with_tools.usage.prompt_tokens > reply.usage.prompt_tokens  # the tools are in the prompt

    result = subprocess.run([shutil.which("glmchat"), "run", "--model", str(glm4), "--dtype", "float32", "--greedy",
                             "--max-new-tokens", str(NEW), "--json", QUERY], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == expected.text and data["completion_tokens"] == expected.completion_tokens
