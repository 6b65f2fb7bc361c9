"""Shared fixtures: one tiny random checkpoint per model family and layout, each built once per session.

ChatGLM3 keeps its historic names (``tiny_ckpt`` and its variants ``tiny_ckpt_*``); the other
families are ``<family>_ckpt``. Every test file uses these: a test that changes files copies the
checkpoint first (``shutil.copytree``), and the session fails if one of them was changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from glmchat.families.chatglm3 import ChatGLMTokenizer
from glmchat.testing import (
    make_tiny_chatglm2_checkpoint,
    make_tiny_chatglm3_base_checkpoint,
    make_tiny_chatglm6b_checkpoint,
    make_tiny_checkpoint,
    make_tiny_glm4_0414_checkpoint,
    make_tiny_glm4_checkpoint,
    make_tiny_glm_edge_checkpoint,
    train_bpe_ranks,
    train_tokenizer,
)

TINY_CONTEXT = 512


def _digest(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def _shared(path: Path) -> Iterator[Path]:
    """Yield a session checkpoint; at the end of the session, fail if any test changed its files."""
    before = _digest(path)
    yield path
    assert _digest(path) == before, f"a test changed the shared checkpoint {path}: copy it first"


# ---- tokenizers --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a tokenizer.model trained once on the bundled bilingual corpus."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def glm4_ranks() -> dict[bytes, int]:
    """GLM-4's byte-level BPE ranks, learned once from the bundled corpus."""
    return train_bpe_ranks()


# ---- ChatGLM3 ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """Default tiny shape (hidden 64, 2 layers, 4 heads, 2 KV groups), seed 0, model.safetensors.

    The context (512) leaves room for a prompt with a tools JSON plus a tool-call reply."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seq_length=TINY_CONTEXT,
                                tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


@pytest.fixture(scope="session")
def tiny_ckpt_bin(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """Same seed and shape as ``tiny_ckpt``, stored as 2 pytorch_model-*.bin shards + index."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_bin"), weight_format="bin",
                                seq_length=TINY_CONTEXT, tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """Same seed and shape as ``tiny_ckpt``, stored as 3 model-*.safetensors shards + index."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_sharded"), weight_format="safetensors-sharded",
                                bin_shards=3, seq_length=TINY_CONTEXT, tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


@pytest.fixture(scope="session")
def tiny_ckpt_fp16(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """Same seed and shape as ``tiny_ckpt``, stored in float16 (like the real chatglm3-6b)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_fp16"), dtype=torch.float16,
                                seq_length=TINY_CONTEXT, tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


@pytest.fixture(scope="session")
def tiny_ckpt_4k(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """Same seed and shape as ``tiny_ckpt``, context 4096: room for a tools prompt and for a
    generation the server tests can interrupt."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_4k"), seq_length=4096,
                                tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


@pytest.fixture(scope="session")
def tiny_ckpt_b(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """Second shape: heads·kv_channels (96) != hidden (80), 4 KV groups, eps 1e-6, rope_ratio 2."""
    path = make_tiny_checkpoint(
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
    yield from _shared(path)


@pytest.fixture(scope="session")
def chatglm3_base_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """ChatGLM3-6B-Base: the default shape under the base model's name (not a chat model)."""
    path = make_tiny_chatglm3_base_checkpoint(tmp_path_factory.mktemp("chatglm3_base"),
                                              tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


# ---- ChatGLM-6B (v1) ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chatglm6b_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """THUDM/chatglm-6b layout (ice_text.model, 2D rotary, tied lm_head), default tiny shape, seed 0."""
    path = make_tiny_chatglm6b_checkpoint(tmp_path_factory.mktemp("chatglm6b"))
    yield from _shared(path)


# ---- ChatGLM2 / CodeGeeX2 ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def chatglm2_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    path = make_tiny_chatglm2_checkpoint(tmp_path_factory.mktemp("chatglm2"), tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


@pytest.fixture(scope="session")
def chatglm2_32k_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    """ChatGLM2-6B-32k: rope_ratio 4 (positions divided by it), seed 3."""
    path = make_tiny_chatglm2_checkpoint(tmp_path_factory.mktemp("chatglm2_32k"), name="THUDM/chatglm2-6b-32k",
                                         rope_ratio=4.0, tokenizer_model=tiny_tokenizer_model, seed=3)
    yield from _shared(path)


@pytest.fixture(scope="session")
def codegeex2_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_model: Path) -> Iterator[Path]:
    path = make_tiny_chatglm2_checkpoint(tmp_path_factory.mktemp("codegeex2"), name="THUDM/codegeex2-6b",
                                         tokenizer_model=tiny_tokenizer_model)
    yield from _shared(path)


# ---- GLM-4 -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def glm4_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-4-9B-chat layout, seed 0; the context (512) leaves room for a tools prompt."""
    path = make_tiny_glm4_checkpoint(tmp_path_factory.mktemp("glm4"), ranks=glm4_ranks, seq_length=TINY_CONTEXT)
    yield from _shared(path)


@pytest.fixture(scope="session")
def glm4_hf_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-4-9B-chat-hf (transformers-native names, tokenizer.json), the same seed as ``glm4_ckpt``."""
    path = make_tiny_glm4_checkpoint(tmp_path_factory.mktemp("glm4_hf"), ranks=glm4_ranks, seq_length=TINY_CONTEXT,
                                     layout="hf")
    yield from _shared(path)


@pytest.fixture(scope="session")
def glm4_base_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-4-9B (the base model: no chat template)."""
    path = make_tiny_glm4_checkpoint(tmp_path_factory.mktemp("glm4_base"), ranks=glm4_ranks, chat=False)
    yield from _shared(path)


# ---- GLM-4-0414 and GLM-Edge -------------------------------------------------------------------


@pytest.fixture(scope="session")
def glm4_0414_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-4-9B-0414 layout (Glm4ForCausalLM: sandwich norms; chat_template.jinja), seed 5."""
    path = make_tiny_glm4_0414_checkpoint(tmp_path_factory.mktemp("glm4_0414"), ranks=glm4_ranks, seed=5,
                                          seq_length=TINY_CONTEXT)
    yield from _shared(path)


@pytest.fixture(scope="session")
def glm_z1_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-Z1-9B-0414 layout: GLM-4-0414's network (seed 5) with the reasoning template."""
    path = make_tiny_glm4_0414_checkpoint(tmp_path_factory.mktemp("glm_z1"), ranks=glm4_ranks, seed=5,
                                          seq_length=TINY_CONTEXT, reasoning=True)
    yield from _shared(path)


@pytest.fixture(scope="session")
def glm_edge_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-Edge-1.5B-chat layout: full rotary, no attention bias, tied embeddings; seed 6."""
    path = make_tiny_glm_edge_checkpoint(tmp_path_factory.mktemp("glm_edge"), ranks=glm4_ranks, seed=6,
                                         seq_length=TINY_CONTEXT)
    yield from _shared(path)


@pytest.fixture(scope="session")
def glm_edge_4b_ckpt(tmp_path_factory: pytest.TempPathFactory, glm4_ranks: dict[bytes, int]) -> Iterator[Path]:
    """GLM-Edge-4B-chat layout: like the 1.5B but an untied lm_head and a second shape (6 heads, 3 KV groups)."""
    path = make_tiny_glm_edge_checkpoint(tmp_path_factory.mktemp("glm_edge_4b"), name="THUDM/glm-edge-4b-chat",
                                         ranks=glm4_ranks, seed=7, hidden_size=72, num_attention_heads=6,
                                         kv_channels=12, multi_query_group_num=3, tie_word_embeddings=False,
                                         seq_length=TINY_CONTEXT)
    yield from _shared(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other processes hold the cores
    (modules ask for it with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
