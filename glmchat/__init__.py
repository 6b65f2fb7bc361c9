"""glmchat: ChatGLM3 in native PyTorch, without trust_remote_code.

Drop-in: `from glmchat import AutoTokenizer, AutoModel` in code written for the reference.
Native: `glmchat.load(path_or_id).chat([{"role": "user", "content": "..."}])`.
"""

from .chat import ChatModel, Chunk, Reply, load
from .checkpoint import CheckpointError
from .config import ConfigError, GLMConfig
from .device import DeviceError, default_dtype, pick_device
from .dropin import AutoModel, AutoModelForCausalLM, AutoTokenizer, ChatGLMForConditionalGeneration
from .families import Family, NotAChatModelError, TokenizerError, ToolCallParseError
from .families.chatglm3 import ChatGLMTokenizer
from .generate import GenerationResponse, SamplingConfig
from .model import ContextLengthError

__version__ = "0.1.0"

__all__ = [
    "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "ChatGLMForConditionalGeneration", "ChatGLMTokenizer",
    "ChatModel", "CheckpointError", "Chunk", "ConfigError", "ContextLengthError", "DeviceError", "Family", "GLMConfig",
    "GenerationResponse", "NotAChatModelError", "Reply", "SamplingConfig", "TokenizerError", "ToolCallParseError",
    "__version__", "default_dtype", "load", "pick_device",
]
