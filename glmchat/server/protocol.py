"""OpenAI chat-completions schema and its mapping to the family's conversation turns and back.

Requests: OpenAI messages/tools become the turns whose prompt ids the model's family builds.
Replies: the reply's visible text comes from the generation core (glmchat.generate.TextStream);
`reply_tool_calls` reads the call a finished reply ends with, in OpenAI's shape.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..families import Family, ToolCallParseError
from ..families.base import split_segments


class BadRequest(ValueError):
    """Input the client must fix; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


# ---- request schema ----------------------------------------------------------------------
# Types are strict where JSON could slip a wrong one through: a bool is not an int or a number
# (`"max_tokens": true`), a string is not a bool (`"stream": "yes"`), and numbers are finite.

Int = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
INT64 = 2**63


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
    include_usage: Bool = False


MAX_N = 16  # choices per request


class _GenerationRequest(_Lenient):
    """The fields chat and text completions share. Unknown fields are ignored (`user`, `metadata`,
    ...); known ones that would change the answer in a way glmchat does not implement get a 400
    naming them (`unsupported_fields`). `top_k` is not OpenAI's but honoured (0: off; default 50)."""

    model: str | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=0)
    max_tokens: Int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-INT64, lt=INT64)
    logit_bias: dict[int, Number] | None = None
    n: Int | None = Field(None, ge=1, le=MAX_N)
    stream: Bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)

    def refused(self) -> dict[str, bool]:
        return {}

    def unsupported_fields(self) -> None:
        """A BadRequest naming the first field set to something glmchat cannot honour."""
        for name, refuse in self.refused().items():
            if refuse:
                value = json.dumps(getattr(self, name), default=str)
                raise BadRequest(f"{name}: not supported by this server, got {value:.80}", name,
                                 code="unsupported_parameter")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise BadRequest("stop: at most 4 non-empty strings", "stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenerationRequest):
    """OpenAI's chat-completions request."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    include_reasoning: Bool | None = None  # false: no reasoning_content (models that reason: GLM-Z1)
    # accepted so that they can be refused by name (see unsupported_fields)
    response_format: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    def refused(self) -> dict[str, bool]:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs: needs logprobs set to true", "top_logprobs")
        return {
            "response_format": self.response_format not in (None, {"type": "text"}),
            "functions": self.functions is not None,
            "function_call": self.function_call is not None,
            "audio": self.audio is not None,
            "modalities": self.modalities not in (None, ["text"]),
            "prediction": self.prediction is not None,
            "web_search_options": self.web_search_options is not None,
        }

    @property
    def top_alternatives(self) -> int | None:
        """Alternatives per token in the logprobs (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def active_tools(self) -> list[dict]:
        if self.tool_choice == "none" or not self.tools:
            return []
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools]


class CompletionRequest(_GenerationRequest):
    """OpenAI's (legacy) text-completions request: a raw prompt, no chat template (base models)."""

    prompt: str | list[str] | list[Int] = Field(min_length=1)
    max_tokens: Int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Int | None = Field(None, ge=0, le=5)
    echo: Bool | None = None
    suffix: str | None = None
    best_of: Int | None = None

    def refused(self) -> dict[str, bool]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise BadRequest("prompt: one prompt per request (a string, a list of one string, or token ids)", "prompt")
        return {"echo": bool(self.echo), "suffix": bool(self.suffix), "best_of": self.best_of not in (None, self.n or 1)}

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs


def unencodable_text(value: Any, path: str = "") -> str | None:
    """The path of the first string in `value` that is not valid Unicode text (a lone UTF-16
    surrogate, which JSON's \\ud800 escapes can carry but no tokenizer can encode), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key in value:
            if unencodable_text(key) is not None:
                return path or "body"
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for where, item in items:
        found = unencodable_text(item, where)
        if found is not None:
            return found
    return None


# ---- OpenAI messages -> the family's turns -------------------------------------------------

def to_glm_messages(request: ChatRequest, family: Family) -> list[dict]:
    """The conversation turns for a request: tools go first as a system turn (the family's way)."""
    request.unsupported_fields()
    where = unencodable_text(request.model_dump(exclude_none=True))
    if where is not None:
        raise BadRequest(f"{where}: the text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                         "valid Unicode", where)
    tools = request.active_tools()
    turns: list[dict] = []
    if tools:
        try:
            turns.append(family.tools_turn(tools))
        except ValueError as e:
            raise BadRequest(str(e), "tools") from None
    for i, message in enumerate(request.messages):
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            needs = "content or tool_calls" if message.role == "assistant" else "content"
            raise BadRequest(f"messages[{i}].content: a {message.role} message needs {needs}", f"messages[{i}].content")
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
