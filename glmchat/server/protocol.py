"""OpenAI chat-completions schema and its mapping to ChatGLM3 turns and back.

Requests: OpenAI messages/tools become the chat history that glmchat.chat turns into prompt ids.
Replies: `Reply` turns the growing list of generated ids into content and tool calls, the same way
whether streamed or not (streamed text only ever grows: uncertain tails are held back).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import chat
from ..chat import ASSISTANT, TRAINING_TIME
from ..families import CHATGLM3, Family, parse_json_tool_call

# The system text ChatGLM3 was trained with for tool use (its tool_using / openai_api demos).
TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class BadRequest(ValueError):
    """Input the client must fix; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


# ---- request schema ----------------------------------------------------------------------

class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise BadRequest("stop: at most 4 non-empty strings", "stop")
        return stops

    def active_tools(self) -> list[dict]:
        if self.tool_choice == "none" or not self.tools:
            return []
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools]


# ---- OpenAI messages -> ChatGLM3 history ---------------------------------------------------

def to_glm_messages(request: ChatRequest, family: Family = CHATGLM3) -> list[dict]:
    """The conversation turns for a request: tools go first as a system turn with "tools"
    (ChatGLM3: the functions after a prompt; GLM-4: OpenAI-style tools, its template adds the rest)."""
    if request.n != 1:
        raise BadRequest(f"n: only n=1 is supported, got {request.n}", "n")
    tools = request.active_tools()
    json_calls = family.tool_calls == "json"
    turns: list[dict] = []
    if tools and json_calls:
        turns.append({"role": "system", "content": "", "tools": [{"type": "function", "function": t} for t in tools]})
    elif tools:
        turns.append({"role": "system", "content": TOOLS_PROMPT, "tools": tools})
    for i, message in enumerate(request.messages):
        text = message.text()
        if message.role in ("system", "developer"):
            turns.append({"role": "system", "content": text})
        elif message.role == "user":
            turns.append({"role": "user", "content": text})
        elif message.role == "tool":
            turns.append({"role": "observation", "content": text})
        else:
            if text or not message.tool_calls:
                turns.append({"role": "assistant", "metadata": "", "content": text})
            for j, call in enumerate(message.tool_calls or []):
                param = f"messages[{i}].tool_calls[{j}].function.arguments"
                arguments = _arguments(call.function.arguments, param)
                content = json.dumps(arguments, ensure_ascii=False) if json_calls else format_tool_call(arguments, param)
                turns.append({"role": "assistant", "metadata": call.function.name, "content": content})
    return turns


def _arguments(arguments: str, param: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise BadRequest(f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{param}: must be a JSON object", param)
    return value


def format_tool_call(arguments: dict, param: str = "arguments") -> str:
    """A call the way ChatGLM3 writes it: a python block with `tool_call(key=value, ...)`."""
    for key in arguments:
        if not key.isidentifier():
            raise BadRequest(f"{param}: argument name {key!r} is not an identifier", param)
    call = ", ".join(f"{key}={_py_literal(value)}" for key, value in arguments.items())
    return f"```python\ntool_call({call})\n```"


def _py_literal(value) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is also a Python literal
    if isinstance(value, list):
        return "[" + ", ".join(map(_py_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)  # None, bools, numbers


# ---- generated ids -> content and tool calls ------------------------------------------------

def _partial_tail(text: str, patterns: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into one of `patterns`."""
    for n in range(min(max(map(len, patterns), default=1) - 1, len(text)), 0, -1):
        if any(p.startswith(text[-n:]) for p in patterns):
            return n
    return 0


class Reply:
    """Accumulates generated ids; `content()` is what may be shown so far, `tool_calls()` at the end.

    With tools offered, segments are read as the reference does (chat.visible_text /
    chat.parse_response): a segment with a non-blank first line is a tool call. Without tools
    every segment is text, since there is nothing the model could be calling.
    """

    def __init__(self, tokenizer, *, stop_ids, stop_strings: list[str], tools: bool, family=CHATGLM3):
        self.tokenizer = tokenizer
        self.family = family
        self.stop_ids = set(stop_ids)
        self.stop_strings = stop_strings
        self.tools = tools
        self.ids: list[int] = []
        self.stopped = False  # a stop string was found: the caller ends the request
        self._text = chat.StreamDetokenizer(tokenizer)  # linear-time text, never half a character
        self._calls: list[dict] = []

    def add(self, token: int) -> None:
        if token not in self.stop_ids:
            self.ids.append(token)
            self._text.add(token)

    def content(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self.ids) if final else self._text.text
        cuts = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            text, final, self.stopped = text[: min(cuts)], True, True
        elif not final:
            text = text[: len(text) - _partial_tail(text, self.stop_strings)]
        if self.tools:
            return self._with_tools(text, final)
        if not final:
            text = text[: len(text) - _partial_tail(text, [ASSISTANT])]
        content = self.family.show("\n\n".join(s.strip() for s in text.split(ASSISTANT) if s.strip()))
        return content if final else content[: len(content) - _partial_tail(content, [TRAINING_TIME])]

    def _with_tools(self, text: str, final: bool) -> str:
        content = chat.visible_text(text, final, self.family)
        if not final:
            return content
        metadata, body = chat.split_segments(text)[-1]
        if not metadata.strip():
            return content
        try:
            arguments = parse_json_tool_call(body) if self.family.tool_calls == "json" else chat.parse_tool_call(body)
        except chat.ToolCallParseError:  # not a call we can read: show it as text
            return "\n\n".join(filter(None, [content, f"{metadata}\n{body}".strip()]))
        self._calls = [{
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": metadata.strip(), "arguments": json.dumps(arguments, ensure_ascii=False, default=list)},
        }]
        return content

    def tool_calls(self) -> list[dict]:
        """The call the reply ended with, found by `content(final=True)`."""
        return self._calls
