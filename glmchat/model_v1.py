"""The original ChatGLM-6B (THUDM/chatglm-6b, "v1") transformer, read top to bottom.

GLM-130B's block at 6B: token embedding, `num_layers` blocks, a final LayerNorm and the embedding
as output layer. Each block normalizes first and adds the *normalized* input, scaled:

    a = LayerNorm(x);  x = alpha * a + Attention(a);  m = LayerNorm(x);  x = alpha * m + MLP(m)

with alpha = sqrt(2 * num_layers). LayerNorms have biases, every Linear has one, the MLP is
GELU (tanh form) without a gate, and every head has its own keys and values, laid out per head
as [q | k | v] in the fused projection.

Positions are 2D. A prompt ends in `[gMASK] <sop>`; every token from `<sop>` on takes the position
of `[gMASK]`, and a second "block" position counts 1, 2, ... from `<sop>` (0 before it). The first
half of each head's channels rotates by the position, the second half by the block position
(rotate-half pairs, base 10000). Attention runs both ways over the prompt before `<sop>` and is
causal from there on: the prompt's keys depend on its end, so it is prefilled in one piece.

Evidence: the reference's modeling_chatglm.py / tokenization_chatglm.py as mirrored publicly
(vLLM's and PaddleNLP's ports, chatglm.cpp's convert.py, which also checks that lm_head equals the
embedding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import model
from .config import GLMConfig
from .model import GLMTransformer, Step


def rotary_table_v1(config: GLMConfig, device=None) -> torch.Tensor:
    """cos/sin [seq_length, d, 2] for half a head (d = head_dim / 2) in rotate-half layout (the d/2
    angles twice), computed in float32.

    The reference keeps its inverse frequencies in float16 (`inv_freq.half()`), whatever the
    model's dtype, so they are rounded the same way here. (It then computes the angles in the
    model's dtype; in float32, as here, that is exactly what a float32 reference model does.)
    """
    d = config.head_dim // 2
    theta = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    theta = theta.half().float()
    angles = torch.outer(torch.arange(config.seq_length, dtype=torch.float32, device=device), theta)
    angles = torch.cat((angles, angles), dim=-1)
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)


def rotate_half_style(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d] rotated in (x[j], x[j + d/2]) pairs; rope [B, T, d, 2]."""
    cos, sin = rope[:, None, ..., 0], rope[:, None, ..., 1]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(model.Attention):
    """The GLM attention's products (and their CPU fast path) with ChatGLM-6B's projections: every
    head's [q | k | v] rows together, a bias on the output, and the 2D rotary."""

    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)  # qkv: heads × 3 × head_dim rows, with bias
        self.dense = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=True)

    def forward(self, x, rope, step: Step, cache):
        """rope: [B, T, 2, d, 2], the tables at the position and at the block position."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, self.n_heads, 3 * self.head_dim).transpose(1, 2).chunk(3, dim=-1)
        q, k = self.rotate(q, rope), self.rotate(k, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, step)
        return self.dense(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    @staticmethod
    def rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((rotate_half_style(first, rope[:, :, 0]), rotate_half_style(second, rope[:, :, 1])), dim=-1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=True)
        self.down = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=True)

    def forward(self, x):
        return self.down(gelu_tanh(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        eps = config.layernorm_epsilon
        self.alpha = math.sqrt(2 * config.num_layers)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, step, cache):
        a = self.attn_norm(x)
        x = a * self.alpha + self.attn(a, rope, step, cache)
        m = self.mlp_norm(x)
        return m * self.alpha + self.mlp(m)


class PromptError(ValueError):
    """A ChatGLM-6B prompt without the `[gMASK] <sop>` its positions are counted from."""


class ChatGLM6BTransformer(GLMTransformer):
    """GLMTransformer's cache, decoding and loading with ChatGLM-6B's block, norm and positions."""

    block = Block
    norm_class = nn.LayerNorm
    rotary_table = staticmethod(rotary_table_v1)
    prompt_is_causal = False

    def place(self, input_ids, step: Step, cache, position_ids) -> tuple[torch.Tensor, Step]:
        """2D rotary tables for the new tokens; for a prompt also its mask (both ways before <sop>).

        position_ids (or the step's positions) count each row's real tokens; the 2D positions are
        read from them and the row's marks (where `[gMASK]` and `<sop>` sit), found in a prompt and
        kept in the cache for the decode steps after it.
        """
        p = position_ids if position_ids is not None else step.positions
        p = p.to(input_ids.device).expand(input_ids.shape)
        marks = cache.prompt_marks if cache is not None else None
        marks = marks[: input_ids.shape[0]] if marks is not None else None  # a slot cache's rows in this step
        prompt = marks is None or input_ids.shape[1] > 1
        if prompt:
            if cache is not None and cache.length != input_ids.shape[1]:
                raise PromptError("ChatGLM-6B's prompt attends both ways: prefill it in one piece into an empty cache")
            marks = self.prompt_marks(input_ids, p)
            if cache is not None:
                cache.prompt_marks = marks
        mask_position, context = marks[:, 0, None], marks[:, 1, None]
        position = torch.where(p < context, p, mask_position)
        block = (p - context + 1).clamp(min=0)
        rope = self.rope_at(torch.stack((position, block), dim=2))  # [B, T, 2, ...]: one check, one gather
        if prompt:
            step = Step(step.positions, self.prompt_mask(p, context, step), is_causal=False)
        return rope, step

    def prompt_marks(self, input_ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """[B, 2]: each row's mask position (of its first `[gMASK]`, or `[MASK]` where no row has
        one, as the reference picks) and context length (where its first `<sop>` is)."""
        c = self.config
        gmask = (input_ids == c.gmask_token_id)
        mask = gmask if bool(gmask.any()) else (input_ids == c.mask_token_id)
        sop = input_ids == c.bos_token_id
        if not bool(sop.any(1).all()) or not bool(mask.any(1).all()):
            raise PromptError("a ChatGLM-6B prompt must hold [gMASK] and <sop> (the tokenizer appends them to "
                              "every text: use tokenizer.encode or tokenizer(text))")
        return torch.stack((_position_of_first(mask, p), _position_of_first(sop, p)), dim=1)

    @staticmethod
    def prompt_mask(p: torch.Tensor, context: torch.Tensor, step: Step) -> torch.Tensor:
        """[B, 1, T, T]: a token sees every earlier one and the whole context before <sop>; left
        padding is never seen (rows of padding see everything: their results are not used)."""
        see = (p[:, None, :] <= p[:, :, None]) | (p[:, None, :] < context[:, :, None])
        if step.mask is not None:  # padded rows: the step's mask marks real keys in its last row
            real = step.mask[:, 0, -1, :]
            see = (see & real[:, None, :]) | ~real[:, :, None]
        return see[:, None]


def _position_of_first(hits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """[B]: the position p of each row's first hit."""
    return p.gather(1, hits.int().argmax(1, keepdim=True))[:, 0]
