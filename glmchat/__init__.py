"""glmchat: ChatGLM3 in native PyTorch, without trust_remote_code.

Drop-in: `from glmchat import AutoTokenizer, AutoModel` in code written for the reference.
Native: `glmchat.load(path_or_id).chat([{"role": "user", "content": "..."}])`.

The names below are imported on first use (PEP 562), so that `glmchat --help` and other
commands that need no model start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ChatModel": "chat", "Chunk": "chat", "Reply": "chat", "load": "chat",
    "CheckpointError": "errors",
    "ConfigError": "config", "GLMConfig": "config",
    "DeviceError": "device", "default_dtype": "device", "pick_device": "device",
    "AutoModel": "dropin", "AutoModelForCausalLM": "dropin", "AutoTokenizer": "dropin",
    "ChatGLMForConditionalGeneration": "dropin",
    "Family": "families", "NotAChatModelError": "families", "TokenizerError": "families",
    "ToolCallParseError": "families",
    "ChatGLMTokenizer": "families.chatglm3",
    "GenerationResponse": "generate", "SamplingConfig": "sampling",
    "ContextLengthError": "model",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'glmchat' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .chat import ChatModel, Chunk, Reply, load
    from .config import ConfigError, GLMConfig
    from .device import DeviceError, default_dtype, pick_device
    from .dropin import AutoModel, AutoModelForCausalLM, AutoTokenizer, ChatGLMForConditionalGeneration
    from .errors import CheckpointError
    from .families import Family, NotAChatModelError, TokenizerError, ToolCallParseError
    from .families.chatglm3 import ChatGLMTokenizer
    from .generate import GenerationResponse
    from .model import ContextLengthError
    from .sampling import SamplingConfig
