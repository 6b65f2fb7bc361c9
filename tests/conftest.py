"""Shared fixtures: tiny random ChatGLM3 checkpoints in the official layout (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmchat.testing import make_tiny_checkpoint, train_tokenizer
from glmchat.tokenizer import ChatGLMTokenizer

TINY_CONTEXT = 512


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a tokenizer.model trained once on the bundled bilingual corpus."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Path:
    """Default tiny shape (hidden 64, 2 layers, 4 heads, 2 KV groups), seed 0, model.safetensors.

    The context (512) leaves room for a prompt with a tools JSON plus a tool-call reply."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seq_length=TINY_CONTEXT,
                                tokenizer_model=tiny_tokenizer_model)


@pytest.fixture(scope="session")
def tiny_ckpt_bin(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Path:
    """Same seed and shape as ``tiny_ckpt``, stored as pytorch_model-*.bin shards + index."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_ckpt_bin"), weight_format="bin", seq_length=TINY_CONTEXT,
        tokenizer_model=tiny_tokenizer_model,
    )


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Path:
    """Second shape: heads·kv_channels (96) != hidden (80), 4 KV groups, eps 1e-6, rope_ratio 2."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_ckpt_b"),
        seed=1,
        hidden_size=80,
        num_attention_heads=8,
        kv_channels=12,
        multi_query_group_num=4,
        layernorm_epsilon=1e-6,
        rope_ratio=2.0,
        tokenizer_model=tiny_tokenizer_model,
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(tiny_ckpt)
