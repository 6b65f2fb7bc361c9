"""Tiny random checkpoints of the GLM family in each model's official layout, for tests and demos.

Nothing in the runtime package imports this one: it only writes files that the runtime reads.

    from glmchat.testing import make_tiny_checkpoint
    make_tiny_checkpoint("tiny-glm")   # config.json, model.safetensors, tokenizer.model, tokenizer_config.json
"""

from .tiny_chatglm import (
    DEFAULT_VOCAB_SIZE,
    WEIGHT_FORMATS,
    corpus_lines,
    make_tiny_chatglm2_checkpoint,
    make_tiny_chatglm3_base_checkpoint,
    make_tiny_checkpoint,
    random_weights,
    train_tokenizer,
    write_weights,
)
from .tiny_chatglm6b import ICE_TOKENIZER_FILE, make_tiny_chatglm6b_checkpoint, train_ice_tokenizer
from .tiny_glm4 import (
    make_tiny_glm4_0414_checkpoint,
    make_tiny_glm4_checkpoint,
    make_tiny_glm_edge_checkpoint,
    train_bpe_ranks,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "ICE_TOKENIZER_FILE",
    "WEIGHT_FORMATS",
    "corpus_lines",
    "make_tiny_chatglm2_checkpoint",
    "make_tiny_chatglm3_base_checkpoint",
    "make_tiny_chatglm6b_checkpoint",
    "make_tiny_checkpoint",
    "make_tiny_glm4_0414_checkpoint",
    "make_tiny_glm4_checkpoint",
    "make_tiny_glm_edge_checkpoint",
    "random_weights",
    "train_bpe_ranks",
    "train_ice_tokenizer",
    "train_tokenizer",
    "write_weights",
]
