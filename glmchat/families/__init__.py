"""The GLM model families: one file each, behind one contract (`base.Family`).

| family   | file        | tokenizer                                | prompt                                          | stops                          | rope_ratio             |
|----------|-------------|------------------------------------------|-------------------------------------------------|--------------------------------|------------------------|
| chatglm-6b | chatglm6b.py | ice_text.model (SentencePiece, specials inside) | query alone, then "[Round i]\n问：q\n答：r\n" from 0; [gMASK]<sop> at the end | <eop> | none          |
| chatglm2 | chatglm2.py | SentencePiece + 5 specials               | [gMASK]sop "[Round N]\\n\\n问：q\\n\\n答：r\\n\\n"   | eos                            | positions / rope_ratio |
| chatglm3 | chatglm3.py | SentencePiece + 9 specials (role tokens) | [gMASK]sop <|role|>▁\\n content … <|assistant|>   | eos, <|user|>, <|observation|> | base · rope_ratio      |
| glm4     | glm4.py     | byte-level BPE (tiktoken ranks) + 14     | [gMASK]<sop><|role|>\\ncontent … <|assistant|>    | eos, <|user|>, <|observation|> | base · rope_ratio      |
| glm4-0414 | glm4_0414.py | as glm4 (tokenizer.json)               | [gMASK]<sop> tools, systems, <|role|>\\ncontent … <|assistant|> | as glm4               | rope_theta             |
| glm-z1   | glm_z1.py   | as glm4 (tokenizer.json)                 | as glm4-0414, reply opened with <think>; reasoning hidden | as glm4       | rope_theta             |
| glm-edge | glm_edge.py | as glm4, its own vocabulary (tokenizer.json) | <|role|>\\ncontent … <|assistant|> (no prefix, no tools) | as glm4            | rope_theta             |

One network (glmchat.model) runs them all (GLM-4-0414: sandwich norms; GLM-Edge: full rotary, tied
embeddings — set by the config, not the family) but the original ChatGLM-6B, whose config selects its
own (glmchat.model_v1); `detect.py` tells them apart from a checkpoint's files.
Base (pretrained-only) models have no chat template: they generate, and chat refuses.
"""

from ..config import GLMConfig
from .base import Family, NotAChatModelError, ToolCallParseError
from .tokenizer import Tokenizer, TokenizerError
from .detect import FAMILIES, detect_family


def family_config(raw: dict, source: str, family: Family) -> GLMConfig:
    """GLMConfig of a checkpoint, with rope_ratio read the way its family's reference reads it."""
    config = GLMConfig.from_dict(raw, source=source)
    config.rope_scaling = family.rope_scaling
    config.validate(source)
    return config


__all__ = ["FAMILIES", "Family", "NotAChatModelError", "Tokenizer", "TokenizerError", "ToolCallParseError", "detect_family",
           "family_config"]
