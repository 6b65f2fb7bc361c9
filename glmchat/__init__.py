"""glmchat: ChatGLM3 in native PyTorch, without trust_remote_code.

Drop-in: `from glmchat import AutoTokenizer, AutoModel` in code written for the reference.
Native: `glmchat.load(path_or_id).chat([{"role": "user", "content": "..."}])`.
"""

from .chat import ChatModel, Chunk, Reply, ToolCallParseError, build_prompt_ids, load, parse_response, parse_tool_call
from .checkpoint import CheckpointError
from .config import ConfigError, GLMConfig
from .device import DeviceError, default_dtype, pick_device
from .dropin import AutoModel, AutoModelForCausalLM, AutoTokenizer, ChatGLMForConditionalGeneration
from .model import ContextLengthError
from .tokenizer import ChatGLMTokenizer, TokenizerError

__version__ = "0.1.0"

__all__ = [
    "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "ChatGLMForConditionalGeneration", "ChatGLMTokenizer",
    "ChatModel", "CheckpointError", "Chunk", "ConfigError", "ContextLengthError", "DeviceError", "GLMConfig",
    "Reply", "TokenizerError", "ToolCallParseError", "__version__", "build_prompt_ids", "default_dtype", "load",
    "parse_response", "parse_tool_call", "pick_device",
]
