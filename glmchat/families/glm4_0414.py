"""GLM-4-0414 (THUDM/GLM-4-9B-0414, GLM-4-32B-0414; model_type "glm4"): GLM-4's tokenizer, stops and
tool-call format (a name line, then JSON arguments), with its own chat template.

What the template (``chat_template.jinja``) renders, with add_generation_prompt:
``[gMASK]<sop>``; if tools are given, ``<|system|>`` + "\\n# 可用工具\\n" and per function
"\\n## {name}\\n\\n{indented JSON}\\n在调用上述函数时，请使用 Json 格式表示调用的参数。" (no
"你是一个名为 ChatGLM…" preamble, unlike GLM-4-9B-chat); then every system message, in order,
as ``<|system|>\\n{content}``; then the other messages in order: ``<|user|>\\n{content}``,
``<|assistant|>\\n{content}`` or, for a tool call, ``<|assistant|>{metadata}\\n{content}``,
``<|observation|>\\n{content}``; finally ``<|assistant|>``. Unlike GLM-4-9B-chat, empty contents
are rendered too.

Tools live in our conversations as GLM-4's do: a message with "tools" (the system turn
`tools_turn` builds). The template takes them as ``apply_chat_template(tools=...)``, so a system
message that only carries tools (empty content) is not rendered as a system turn of its own.

It is the GLM4 family with a different prompt: a subclass, so tokenizer, reply parsing and the
server's tool turns stay GLM-4's.
"""

from __future__ import annotations

import json
from .glm4 import GLM4, GLM4_TOOL_FOOTER, GLM4Tokenizer
from .tokenizer import TokenizerError

_RENDERED_ROLES = ("user", "assistant", "observation")


def glm4_0414_tools_text(tools: list[dict]) -> str:
    """The text after ``<|system|>`` that lists the tools, as GLM-4-0414's template renders it."""
    text = "\n# 可用工具\n"
    for tool in tools:
        if not isinstance(tool, dict):
            raise ValueError(f"a tool must be a dict, got {tool!r:.80}")
        function = tool["function"] if tool.get("function") else tool
        if not isinstance(function, dict) or "name" not in function:
            raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r:.80}")
        text += f"\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}{GLM4_TOOL_FOOTER}"
    return text


def glm4_0414_prompt_ids(tokenizer: GLM4Tokenizer, messages: list[dict], tools_text=glm4_0414_tools_text) -> list[int]:
    """GLM-4-0414's chat template with add_generation_prompt, as ids (text between specials is
    tokenized as one piece, like the rendered template; text in messages is never a special).
    tools_text: how the tools block reads (GLM-Z1's differs)."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content", ""), str):
            raise TokenizerError(f"message {i} must be a dict with 'role' and string 'content', got {message!r:.80}")
    command, text = tokenizer.get_command, tokenizer._sp_encode
    ids = tokenizer.get_prefix_tokens()
    tools = [tool for m in messages for tool in (m.get("tools") or [])]
    if tools:
        ids += [command("<|system|>")] + text(tools_text(tools))
    for m in messages:
        if m["role"] == "system" and (m.get("content") or not m.get("tools")):
            ids += [command("<|system|>")] + text("\n" + m.get("content", ""))
    for m in messages:
        role = m["role"]
        if role in _RENDERED_ROLES:
            metadata = (m.get("metadata") or "") if role == "assistant" else ""
            ids += [command(f"<|{role}|>")] + text(f"{metadata}\n{m.get('content', '')}")
    ids.append(command("<|assistant|>"))
    return ids


class GLM4_0414Tokenizer(GLM4Tokenizer):
    """GLM-4's tokenizer whose chat input is GLM-4-0414's template."""

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return glm4_0414_prompt_ids(self, messages)


class GLM4_0414(GLM4):
    name = "glm4-0414"
    label = "GLM-4-0414"
    base_label = "GLM-4-0414 (base)"
    training_time = "2025年"

    def load_tokenizer(self, directory) -> GLM4_0414Tokenizer:
        return GLM4_0414Tokenizer.from_pretrained(directory)
