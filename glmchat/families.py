"""The GLM family: which model a checkpoint holds, and what follows from it.

One network (glmchat.model) runs ChatGLM2-6B, CodeGeeX2-6B, ChatGLM3-6B (+ -base, -32k, -128k)
and GLM-4-9B (+ -chat, -chat-1m, -hf). They differ in what the checkpoint's files say:

| family   | tokenizer                                 | prompt                                        | stops                          | rope_ratio            |
|----------|-------------------------------------------|-----------------------------------------------|--------------------------------|-----------------------|
| chatglm2 | SentencePiece + 5 specials                | [gMASK]sop "[Round N]\\n\\n问：q\\n\\n答：r\\n\\n" | eos                            | positions / rope_ratio|
| chatglm3 | SentencePiece + 9 specials (role tokens)  | [gMASK]sop <|role|>▁\\n content … <|assistant|> | eos, <|user|>, <|observation|> | base · rope_ratio     |
| glm4     | byte-level BPE (tiktoken ranks) + 14      | [gMASK]<sop><|role|>\\ncontent … <|assistant|>  | eos, <|user|>, <|observation|> | base · rope_ratio     |

Base (pretrained-only) models have no chat template: they generate, and chat refuses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ConfigError, GLMConfig
from .tokenizer import ChatGLMTokenizer, TokenizerError, _as_id_list


class NotAChatModelError(ValueError):
    """chat() on a base model: it was never trained on a chat template."""


@dataclass(frozen=True)
class Family:
    name: str  # "chatglm2" | "chatglm3" | "glm4"
    chat: bool  # False for base models: generate only
    label: str  # for messages: "ChatGLM2-6B", "GLM-4-9B-chat", ...
    rope_scaling: str  # how config.json's rope_ratio applies, see GLMConfig.rope_scaling
    training_time: str  # what the reply's "[[训练时间]]" placeholder becomes
    drops_last_token: bool  # the reference's chat() decodes output[len(prompt):-1]
    tool_calls: str | None  # "python" (ChatGLM3: tool_call(k=v) in a code block), "json" (GLM-4), None

    def load_tokenizer(self, directory: str | Path):
        cls = {"chatglm2": ChatGLM2Tokenizer, "chatglm3": ChatGLMTokenizer}.get(self.name)
        if cls is None:
            from .glm4_tokenizer import GLM4Tokenizer as cls
        return cls.from_pretrained(directory)

    def check_chat(self) -> None:
        if not self.chat:
            raise NotAChatModelError(
                f"{self.label} is a base model without a chat template: use generate (plain text "
                "continuation) or a chat model of the family"
            )

    def stop_ids(self, tokenizer) -> list[int]:
        """Ids that end a chat reply (a base model stops at eos only)."""
        if self.name == "chatglm2" or not self.chat:
            return [tokenizer.eos_token_id]
        return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]

    def prompt_ids(self, tokenizer, messages: list[dict]) -> list[int]:
        """The ids the model answers after, for a conversation ending in the user's message."""
        self.check_chat()
        if self.name == "chatglm2":
            return chatglm2_prompt_ids(tokenizer, messages)
        if self.name == "glm4":
            return glm4_prompt_ids(tokenizer, messages)
        from .chat import build_prompt_ids

        return build_prompt_ids(tokenizer, messages)

    def show(self, text: str) -> str:
        return text.replace("[[训练时间]]", self.training_time)


CHATGLM2 = Family("chatglm2", True, "ChatGLM2-6B", "position", "2023年", False, None)
CHATGLM3 = Family("chatglm3", True, "ChatGLM3-6B", "base", "2023年", True, "python")
GLM4 = Family("glm4", True, "GLM-4-9B-chat", "base", "2024年", True, "json")
FAMILIES = {f.name: f for f in (CHATGLM2, CHATGLM3, GLM4)}


# ---------------------------------------------------------------------------------------------
# Recognising a checkpoint


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_rank_file(path: Path) -> bool:
    """A tiktoken-style tokenizer.model (text lines "base64 rank") rather than a SentencePiece proto."""
    try:
        head = path.read_bytes()[:200]
    except OSError:
        return False
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.split(b"\n", 1)[0]))


def detect_family(directory: str | Path | None, raw: dict, name: str = "", family: str | None = None) -> Family:
    """The family of a checkpoint from its config.json (`raw`) and tokenizer files.

    `name` is a hub id or path that hints at the model when files are silent (chatglm2 and chatglm3
    share model_type and tokenizer.model). `family` ("chatglm2", "chatglm3", "glm4", each with an
    optional "-base") overrides recognition.
    """
    if family is not None:
        base_name = family.removesuffix("-base")
        if base_name not in FAMILIES:
            raise ConfigError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)} (optionally with -base)")
        return _variant(FAMILIES[base_name], chat=not family.endswith("-base"), name=name)
    directory = Path(directory) if directory is not None else None
    tok_config = _read_json(directory / "tokenizer_config.json") if directory else {}
    hints = " ".join(
        str(x) for x in (name, directory or "", raw.get("_name_or_path", ""), tok_config.get("name_or_path", ""))
    ).lower()
    template = tok_config.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    is_glm4 = (
        raw.get("model_type") == "glm"
        or raw.get("padded_vocab_size", 0) > 100_000
        or (directory is not None and _is_rank_file(directory / "tokenizer.model"))
        or tok_config.get("tokenizer_class") == "ChatGLM4Tokenizer"
    )
    if is_glm4:
        chat = "<|assistant|>" in template or (not template and "chat" in hints)
        return _variant(GLM4, chat=chat, name=hints)
    if "<|user|>" in template or "<|{{" in template:
        return _variant(CHATGLM3, chat=True, name=hints)
    code = ""
    if directory is not None and (directory / "tokenization_chatglm.py").exists():
        code = (directory / "tokenization_chatglm.py").read_text(encoding="utf-8", errors="replace")
    if "<|user|>" in code:
        found = CHATGLM3
    elif "[Round" in code or re.search(r"chatglm2|codegeex2", hints):
        found = CHATGLM2
    else:
        found = CHATGLM3
    return _variant(found, chat=not re.search(r"[-_]base\b", hints), name=hints)


def _variant(family: Family, *, chat: bool, name: str) -> Family:
    label = {"chatglm2": "CodeGeeX2-6B" if "codegeex" in name.lower() else "ChatGLM2-6B",
             "chatglm3": "ChatGLM3-6B", "glm4": "GLM-4-9B-chat"}[family.name]
    if not chat:
        label = {"chatglm3": "ChatGLM3-6B-Base", "glm4": "GLM-4-9B (base)"}.get(family.name, label + " (base)")
    return replace(family, chat=chat, label=label)


def family_config(raw: dict, source: str, family: Family) -> GLMConfig:
    """GLMConfig of a checkpoint, with rope_ratio read the way its family's reference reads it."""
    config = GLMConfig.from_dict(raw, source=source)
    config.rope_scaling = family.rope_scaling
    config.validate(source)
    return config


# ---------------------------------------------------------------------------------------------
# ChatGLM2 / CodeGeeX2


class ChatGLM2Tokenizer(ChatGLMTokenizer):
    """ChatGLM2's tokenizer: the same SentencePiece model with five specials and no role tokens.

    Unlike ChatGLM3's, it renders every special (and eos/bos/pad) as empty text when decoding.
    """

    SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

    def __init__(self, vocab_file) -> None:
        super().__init__(vocab_file)
        self.special_tokens = {name: self.n_words + i for i, name in enumerate(self.SPECIALS)}
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = self.n_words + len(self.SPECIALS)

    def __repr__(self) -> str:
        return f"ChatGLM2Tokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.eos_token_id]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        id_list = _as_id_list(ids)
        pieces = super().convert_ids_to_tokens(id_list)
        return ["" if i in self._special_names else piece for i, piece in zip(id_list, pieces)]

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The reference's prompt text: one "[Round N]" block per earlier turn, then the query's."""
        prompt = ""
        for i, (old_query, response) in enumerate(history or []):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："

    def build_single_message(self, role, metadata, message):
        raise TokenizerError("ChatGLM2 has no role tokens; build prompts with build_prompt(query, history)")

    def build_chat_input(self, query: str, history=None, role: str = "user"):
        """``[gMASK] sop`` + build_prompt(query, history) as a [1, len] batch (history: (query, reply) pairs)."""
        if role != "user":
            raise TokenizerError(f"ChatGLM2 has no {role!r} role; only user queries")
        return self(self.build_prompt(query, history))


def chatglm2_pairs(messages: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """(query, [(query, reply), ...]) from user/assistant messages that alternate and end with the user."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if not messages or any(r not in ("user", "assistant") for r in roles):
        bad = next((r for r in roles if r not in ("user", "assistant")), None)
        raise ValueError(
            f"ChatGLM2 knows only user and assistant turns, got role {bad!r}" if messages else "messages is empty"
        )
    if roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise ValueError("ChatGLM2 needs alternating user/assistant messages that start and end with the user")
    contents = [m["content"] for m in messages]
    return contents[-1], list(zip(contents[:-1:2], contents[1:-1:2]))


def chatglm2_prompt_ids(tokenizer: ChatGLM2Tokenizer, messages: list[dict]) -> list[int]:
    query, history = chatglm2_pairs(messages)
    return tokenizer.encode(tokenizer.build_prompt(query, history))


# ---------------------------------------------------------------------------------------------
# GLM-4

# The system prompt GLM-4-9B-chat's chat template puts before function tools (tokenizer_config.json).
GLM4_TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
GLM4_TOOL_FOOTER = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def glm4_tools_text(tools: list[dict]) -> str:
    """The text after ``<|system|>`` that lists function tools, as the chat template renders it."""
    text = GLM4_TOOLS_PREAMBLE
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"GLM-4 tools must be {{'type': 'function', 'function': {{...}}}}, got {tool!r:.80}")
        # One newline before "##": transformers renders templates with trim_blocks, which eats the
        # first of the two that follow the template's {% if %} tag.
        text += f"\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}{GLM4_TOOL_FOOTER}"
    return text


def glm4_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """GLM-4-9B-chat's chat template with add_generation_prompt, as ids.

    `[gMASK]<sop>`, then per message: its tools block (`<|system|>` + preamble + each function as
    indented JSON) if it has "tools", and `<|role|>{metadata}\\n{content}` if its content is not
    empty; finally `<|assistant|>`. Text between specials is tokenized as one piece, like the
    reference's rendered template; text in messages is never read as a special token.
    """
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    ids = tokenizer.get_prefix_tokens()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content", ""), str):
            raise ValueError(f"message {i} must be a dict with 'role' and string 'content', got {message!r:.80}")
        if message.get("tools") is not None:
            ids += [tokenizer.get_command("<|system|>")] + tokenizer._sp_encode("\n" + glm4_tools_text(message["tools"]))
        if message.get("content"):
            ids += tokenizer.build_single_message(message["role"], message.get("metadata") or "", message["content"])
    ids.append(tokenizer.get_command("<|assistant|>"))
    return ids


def parse_json_tool_call(content: str) -> Any:
    """GLM-4's tool arguments: the content after the name line is JSON."""
    from .chat import ToolCallParseError

    try:
        return json.loads(content)
    except json.JSONDecodeError as e:
        raise ToolCallParseError(f"tool call arguments are not JSON ({e.msg}): {content!r:.200}") from None
