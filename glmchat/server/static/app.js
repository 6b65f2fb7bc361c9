// glmchat web chat: streams /v1/chat/completions (server-sent events) into the conversation.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = []; // {role, content} of the finished turns
let controller = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns);
  const body = { model: "glmchat", messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// Yields the parsed JSON of each "data:" event until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  turns.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant streaming", "");
  const started = performance.now();
  let firstToken = null, chunks = 0, usage = null, content = "";
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error(err.error?.message || `HTTP ${response.status}`);
    }
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta;
      if (delta?.content) {
        firstToken ??= performance.now();
        chunks += 1;
        content += delta.content;
        bubble.textContent = content;
        bubble.scrollIntoView({ block: "end" });
      }
    }
    turns.push({ role: "assistant", content });
    showStats(usage ? usage.completion_tokens : chunks, started, firstToken);
  } catch (e) {
    if (e.name === "AbortError") {
      turns.push({ role: "assistant", content });
    } else {
      turns.pop();
      bubble.remove();
      addMessage("error", e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    controller = null;
    setBusy(false);
  }
}

function showStats(tokens, started, firstToken) {
  const end = performance.now();
  const seconds = (end - (firstToken ?? started)) / 1000;
  const rate = seconds > 0 ? tokens / seconds : 0;
  const wait = firstToken ? ((firstToken - started) / 1000).toFixed(2) : "–";
  $("stats").textContent = `${tokens} tokens · ${rate.toFixed(1)} tok/s · first token ${wait} s`;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller?.abort());

$("clear").addEventListener("click", () => {
  controller?.abort();
  turns.length = 0;
  $("messages").replaceChildren();
  $("stats").textContent = "";
});

fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.model || "API key needed"; })
  .catch(() => { $("model").textContent = "server not reachable"; });
