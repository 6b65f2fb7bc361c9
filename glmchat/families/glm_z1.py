"""GLM-Z1-0414 (THUDM/GLM-Z1-9B-0414, GLM-Z1-32B-0414; model_type "glm4"): GLM-4-0414's network,
tokenizer and tool-call format, a reasoning model. Its template differs from GLM-4-0414's in three
places: the tools block opens with the ChatGLM preamble, every non-system message shows only what
follows its last ``</think>`` (stripped), and the generation prompt is ``<|assistant|>\\n<think>``:
the model reasons first, closes with ``</think>``, then answers.

Replies read back without the reasoning. The prompt already opened a text segment (its metadata
line is the empty one before ``<think>``), so the reply is that segment's content, reasoning
first: what follows ``</think>`` is the answer, and a tool call is a later segment
(``<|assistant|>name\n{json}``), as in GLM-4. While a reply is being generated nothing is shown
until ``</think>`` has come; a reply cut off before it shows nothing. The reasoning itself is
`reasoning` (the server's `reasoning_content`, the native API's `Reply.reasoning`).
"""

from __future__ import annotations

import json

from .base import ParsedReply, without_partial_tail
from .glm4 import GLM4_TOOL_FOOTER
from .glm4_0414 import GLM4_0414, GLM4_0414Tokenizer, glm4_0414_prompt_ids

THINK_END = "</think>"
Z1_TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)


def z1_tools_text(tools: list[dict]) -> str:
    text = "\n" + Z1_TOOLS_PREAMBLE
    for tool in tools:
        function = tool["function"] if isinstance(tool, dict) and tool.get("function") else tool
        if not isinstance(function, dict) or "name" not in function:
            raise ValueError(f"a tool must be {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r:.80}")
        text += f"\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}{GLM4_TOOL_FOOTER}"
    return text


def after_thinking(text: str) -> str:
    return text.split(THINK_END)[-1].strip()


def glm_z1_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """GLM-Z1-0414's chat template with add_generation_prompt, as ids."""
    shown = [m if not isinstance(m, dict) or m.get("role") == "system" or not isinstance(m.get("content", ""), str)
             else {**m, "content": after_thinking(m.get("content", ""))} for m in messages]
    ids = glm4_0414_prompt_ids(tokenizer, shown, tools_text=z1_tools_text)
    return ids + tokenizer._sp_encode("\n<think>")


class GLMZ1Tokenizer(GLM4_0414Tokenizer):
    """GLM-4's tokenizer whose chat input is GLM-Z1-0414's template."""

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return glm_z1_prompt_ids(self, messages)

    def generation_prompt_ids(self) -> list[int]:
        return super().generation_prompt_ids() + self._sp_encode("\n<think>")


class GLMZ1(GLM4_0414):
    name = "glm-z1"
    label = "GLM-Z1-0414"
    base_label = "GLM-Z1-0414 (base)"
    reasons = True

    def load_tokenizer(self, directory) -> GLMZ1Tokenizer:
        return GLMZ1Tokenizer.from_pretrained(directory)

    @staticmethod
    def _answer(text: str) -> str:
        """The reply without its reasoning, as GLM-4 segments: "\n" stands for the prompt's empty metadata line."""
        return "\n" + text.split(THINK_END, 1)[1] if THINK_END in text else ""

    def parse_reply(self, text: str, tools_in_prompt: bool) -> ParsedReply:
        return super().parse_reply(self._answer(text), tools_in_prompt)

    def visible_text(self, text: str, final: bool = True, tool_calls: bool = True) -> str:
        return super().visible_text(self._answer(text), final=final, tool_calls=tool_calls)

    def reasoning(self, text: str, final: bool = True) -> str:
        """What precedes ``</think>`` (all of a reply cut off before it), stripped; while it is being
        written, a tail that may still become ``</think>`` is held back."""
        thought = text.split(THINK_END, 1)[0]
        if THINK_END not in text and not final:
            thought = without_partial_tail(thought, [THINK_END])
        return thought.strip()
