"""GLM-Edge (THUDM/glm-edge-1.5b-chat, glm-edge-4b-chat; model_type "glm"): GLM-4's byte-level BPE
tokenizer format (its own, smaller vocabulary, the same specials after the ranks) and stops, a
plain chat template without ``[gMASK]<sop>`` and without tools.

What the template (tokenizer_config.json) renders: per message ``<|system|>\\n{content}``,
``<|user|>\\n{content}`` or ``<|assistant|>\\n{content}`` (empty contents included, metadata
ignored), then always ``<|assistant|>``. It has no observation role: such a message is refused
rather than dropped.
"""

from __future__ import annotations

from .glm4 import GLM4, GLM4Tokenizer
from .tokenizer import TokenizerError

_ROLES = ("system", "user", "assistant")


def glm_edge_prompt_ids(tokenizer: GLM4Tokenizer, messages: list[dict]) -> list[int]:
    """GLM-Edge's chat template as ids (text between specials tokenized as one piece)."""
    ids: list[int] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str):
            raise TokenizerError(f"message {i} must be a dict with 'role' and string 'content', got {m!r:.80}")
        if m["role"] not in _ROLES:
            raise TokenizerError(f"message {i} has role {m['role']!r}; GLM-Edge's template has only {', '.join(_ROLES)}")
        if m.get("tools"):
            raise TokenizerError("GLM-Edge's chat template has no tools")
        ids += [tokenizer.get_command(f"<|{m['role']}|>")] + tokenizer._sp_encode("\n" + m.get("content", ""))
    ids.append(tokenizer.get_command("<|assistant|>"))
    return ids


class GLMEdgeTokenizer(GLM4Tokenizer):
    """GLM-4's tokenizer format without the ``[gMASK]<sop>`` prefix; chat input is GLM-Edge's template."""

    def get_prefix_tokens(self) -> list[int]:
        return []

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return glm_edge_prompt_ids(self, messages)

    def generation_prompt_ids(self) -> list[int]:
        return []  # the template ends with <|assistant|> whether or not a generation prompt is asked for


class GLMEdge(GLM4):
    name = "glm-edge"
    label = "GLM-Edge-chat"
    base_label = "GLM-Edge (base)"
    training_time = "2024年"
    supports_tools = False

    def load_tokenizer(self, directory) -> GLMEdgeTokenizer:
        return GLMEdgeTokenizer.from_pretrained(directory)
