"""Which family a checkpoint holds, from its own files (config.json, tokenizer files, chat template).

Structural facts first: the original ChatGLM-6B's config has position_encoding_2d; GLM-4-0414 has model_type "glm4" (Glm4ForCausalLM: the sandwich norms),
and GLM-Z1-0414 is the one whose template opens the reply with "<think>" (without a template:
"glm-z1" in the name);
GLM-4 has model_type "glm" (the -hf layout), a vocabulary over 100 K, a tiktoken-style rank file
or its own tokenizer class, and among those GLM-Edge is the one whose chat template does not
start with "[gMASK]" (without a template: "glm-edge" in the name); ChatGLM3 has role tokens in
its chat template. ChatGLM2 and ChatGLM3 share model_type, shapes and tokenizer.model, so without a
template the hub id / path names them (chatglm2, codegeex2); the text of the repo's
tokenization_chatglm.py (never run) is the last resort. Base models: no chat template and a
"-base" name (GLM-4: no "chat" in the name).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import ConfigError, is_chatglm_v1
from .base import Family
from .chatglm2 import ChatGLM2
from .chatglm3 import ChatGLM3
from .chatglm6b import ChatGLM1
from .glm4 import GLM4
from .glm4_0414 import GLM4_0414
from .glm_edge import GLMEdge
from .glm_z1 import GLMZ1

FAMILIES: dict[str, type[Family]] = {f.name: f for f in (ChatGLM1, ChatGLM2, ChatGLM3, GLM4, GLM4_0414, GLMZ1, GLMEdge)}

# Labels of checkpoints whose family label is too general, by a hint in the id or path.
_LABELS = {
    "codegeex": "CodeGeeX2-6B",
    "glm-edge-1.5b": "GLM-Edge-1.5B-chat",
    "glm-edge-4b": "GLM-Edge-4B-chat",
    "glm-4-9b-0414": "GLM-4-9B-0414",
    "glm-4-32b-0414": "GLM-4-32B-0414",
    "glm-z1-9b-0414": "GLM-Z1-9B-0414",
    "glm-z1-32b-0414": "GLM-Z1-32B-0414",
}


def detect_family(directory: str | Path | None, raw: dict, name: str = "", family: str | None = None) -> Family:
    """The family of a checkpoint from its config.json (`raw`) and tokenizer files.

    `name` is a hub id or path that hints at the model when files are silent. `family`
    ("chatglm2", "chatglm3", "glm4", "glm4-0414", "glm-edge", each with an optional "-base")
    overrides recognition.
    """
    if family is not None:
        cls = FAMILIES.get(family.removesuffix("-base"))
        if cls is None:
            raise ConfigError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)} (optionally with -base)")
        return _variant(cls, chat=not family.endswith("-base"), hints=name.lower())
    directory = Path(directory) if directory is not None else None
    tok_config = _read_json(directory / "tokenizer_config.json") if directory else {}
    hints = " ".join(
        str(x) for x in (name, directory or "", raw.get("_name_or_path", ""), tok_config.get("name_or_path", ""))
    ).lower()
    template = _template_text(tok_config.get("chat_template")) or _read_text(directory, "chat_template.jinja")
    if is_chatglm_v1(raw):
        return _variant(ChatGLM1, chat=True, hints=hints)
    if raw.get("model_type") == "glm4":
        chat = "<|assistant|>" in template or (not template and not re.search(r"[-_]base\b", hints))
        reasoning = "<think>" in template or (not template and "glm-z1" in hints)
        return _variant(GLMZ1 if reasoning else GLM4_0414, chat=chat, hints=hints)
    is_glm4 = (
        raw.get("model_type") == "glm"
        or raw.get("padded_vocab_size", 0) > 100_000
        or (directory is not None and _is_rank_file(directory / "tokenizer.model"))
        or tok_config.get("tokenizer_class") == "ChatGLM4Tokenizer"
    )
    if is_glm4:
        edge = ("<|assistant|>" in template and "[gMASK]" not in template) or (not template and "glm-edge" in hints)
        return _variant(GLMEdge if edge else GLM4, chat=_glm4_chat(template, hints), hints=hints)
    if "<|user|>" in template or "<|{{" in template:
        return _variant(ChatGLM3, chat=True, hints=hints)
    if re.search(r"chatglm2|codegeex2", hints):
        found = ChatGLM2
    elif "chatglm3" in hints:
        found = ChatGLM3
    else:
        found = ChatGLM2 if "[Round" in _tokenizer_code(directory) else ChatGLM3
    return _variant(found, chat=not re.search(r"[-_]base\b", hints), hints=hints)


def _glm4_chat(template: str, hints: str) -> bool:
    """A GLM-4-style chat model: its template opens an assistant turn; without one, "chat" in the name."""
    return "<|assistant|>" in template or (not template and "chat" in hints)


def _variant(cls: type[Family], *, chat: bool, hints: str) -> Family:
    label = next((label for hint, label in _LABELS.items() if hint in hints), None)
    return cls(chat=chat, label=label if chat else None)


def _read_text(directory: Path | None, name: str) -> str:
    try:
        return (directory / name).read_text(encoding="utf-8") if directory is not None else ""
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _template_text(template) -> str:
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        return " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else ""


def _is_rank_file(path: Path) -> bool:
    """A tiktoken-style tokenizer.model (text lines "base64 rank") rather than a SentencePiece proto."""
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.split(b"\n", 1)[0]))


def _tokenizer_code(directory: Path | None) -> str:
    path = directory / "tokenization_chatglm.py" if directory is not None else None
    if path is None or not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")
