"""OpenAI chat-completions schema and its mapping to the family's conversation turns and back.

Requests: OpenAI messages/tools become the turns whose prompt ids the model's family builds.
Replies: the reply's visible text comes from the generation core (glmchat.generate.TextStream);
`reply_tool_calls` reads the call a finished reply ends with, in OpenAI's shape.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..families import Family, ToolCallParseError
from ..families.base import split_segments


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


# ---- OpenAI messages -> the family's turns -------------------------------------------------

def to_glm_messages(request: ChatRequest, family: Family) -> list[dict]:
    """The conversation turns for a request: tools go first as a system turn (the family's way)."""
    if request.n != 1:
        raise BadRequest(f"n: only n=1 is supported, got {request.n}", "n")
    tools = request.active_tools()
    turns: list[dict] = []
    if tools:
        try:
            turns.append(family.tools_turn(tools))
        except ValueError as e:
            raise BadRequest(str(e), "tools") from None
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
                try:
                    turns.append(family.tool_call_turn(call.function.name, _arguments(call.function.arguments, param)))
                except ValueError as e:
                    raise BadRequest(f"{param}: {e}", param) from None
    return turns


def _arguments(arguments: str, param: str) -> dict:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise BadRequest(f"{param}: not valid JSON ({e})", param) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{param}: must be a JSON object", param)
    return value


# ---- a finished reply -> tool calls --------------------------------------------------------

def reply_tool_calls(family: Family, text: str) -> tuple[list[dict], str]:
    """(OpenAI tool_calls, text to show in addition) for a finished reply's text, tools offered.

    A reply that ends in a segment with a metadata line calls that tool; arguments it cannot read
    make the segment plain text instead (shown after the rest).
    """
    metadata, body = split_segments(text)[-1]
    if not metadata.strip():
        return [], ""
    try:
        arguments = family.parse_tool_arguments(body)
    except ToolCallParseError:
        return [], f"{metadata}\n{body}".strip()
    return [{
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": metadata.strip(), "arguments": json.dumps(arguments, ensure_ascii=False, default=list)},
    }], ""
