"""The chat page in a real headless browser (Debian's chromium, driven by playwright)."""

from __future__ import annotations

import os
import re

import openai
import pytest
import torch

from glmchat.loader import load_model
from glmchat.server import BackgroundServer, build_app
from glmchat.families.chatglm3 import ChatGLM3, ChatGLMTokenizer

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is faster and immune to busy cores
    model = load_model(tiny_ckpt, dtype=torch.float32, progress=False)[0]
    with BackgroundServer(build_app(model, ChatGLMTokenizer.from_pretrained(tiny_ckpt), ChatGLM3(), model_id="tiny-chatglm3")) as s:
        yield s
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.urls = []
        page.on("request", lambda request: page.urls.append(request.url))
        page.goto(server.url)
        yield page
        browser.close()


def api_answer(server, messages) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=40)
    return r.choices[0].message.content


def send(page, text: str) -> str:
    """Type a message, press Enter, wait for the streamed answer to finish; returns its text."""
    count = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    answer = page.locator(".message.assistant").nth(count)
    answer.and_(page.locator("[data-done=true]")).wait_for(timeout=30_000)
    return answer.text_content()


def test_chat_page_streams_the_answer(page, server):
    # The page asks /v1/models once it is loaded; on a busy machine that answer can come later.
    page.wait_for_function("document.getElementById('model').textContent !== 'connecting…'", timeout=30_000)
    assert page.locator("#model").text_content() == "tiny-chatglm3"
    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "40")
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
    }""")

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    expected = api_answer(server, messages)
    assert len(expected) > 5
    assert send(page, "Hello") == expected
    assert page.evaluate("window.updates") > 3  # the answer grew in several steps, not at once
    assert page.locator(".message.user").first.text_content() == "Hello"
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tok/s · first token [\d.]+ s", page.locator("#stats").text_content())

    messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": "谢谢"}]
    assert send(page, "谢谢") == api_answer(server, messages)  # the conversation so far is sent along

    page.click("#clear")
    assert page.locator("#messages > *").count() == 0
    assert all(url.startswith(server.url) for url in page.urls)  # nothing from outside: works offline
