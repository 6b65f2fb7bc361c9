"""The ChatGLM2/3 transformer, read top to bottom.

A pre-norm decoder: token embedding, `num_layers` blocks of
`x + Attention(RMSNorm(x))` then `x + MLP(RMSNorm(x))`, a final RMSNorm and the output layer.
Attention is grouped-query (multi_query_group_num KV heads), rotary positions touch the first
`rotary_dim` channels of each head (half of it; all of it in GLM-Edge), in interleaved pairs.
See ../shared/spec/chatglm3.md.

Two variants, both set by the config: GLM-4-0414's sandwich norms (`x + RMSNorm(Attention(RMSNorm(x)))`,
the same around the MLP) and GLM-Edge's tied embeddings (the output layer is the embedding).
The original ChatGLM-6B (glmchat.model_v1) is another network on this one's cache and decoding: it
swaps in its block, norm and rotary table, and places its tokens itself (`place`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GLMConfig


class ContextLengthError(ValueError):
    """The sequence would run past the model's context (seq_length) or the cache's size."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def rotary_table(config: GLMConfig, device=None) -> torch.Tensor:
    """cos/sin for every position: [seq_length, n/2, 2], computed in float32."""
    n = config.rotary_dim  # only the first n channels of each head rotate
    theta = 1.0 / (config.rope_base ** (torch.arange(0, n, 2, dtype=torch.float32, device=device) / n))
    positions = torch.arange(config.seq_length, dtype=torch.float32, device=device) / config.rope_position_divisor
    angles = torch.outer(positions, theta)
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; rope: [B, T, n/2, 2] in x's dtype. Pairs (x[2j], x[2j+1]) rotate."""
    rot_dim = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_rot = x_rot.unflatten(-1, (-1, 2))
    cos, sin = rope[:, None, ..., 0], rope[:, None, ..., 1]
    x0, x1 = x_rot[..., 0], x_rot[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


@dataclass
class Step:
    """What one forward pass needs from the cache: where the new tokens sit and what they see."""

    positions: torch.Tensor  # [B, T] rotary positions of the new tokens
    mask: torch.Tensor | None  # [B, 1, T, S] bool (True = attend), or None
    is_causal: bool  # with mask None: plain causal attention over a fresh prompt
    # Decode steps of rows at their own lengths (the server's slots): row b sees exactly its first
    # key_lengths[b] keys, and is attended alone so that its result never depends on the other rows.
    key_lengths: list[int] | None = None
    # PromptPieces: each prompt piece's own Step, in the order the pieces are laid end to end.
    pieces: list[Step] | None = None

    def piece_ends(self) -> list[int]:
        """Where each piece of a PromptPieces row ends (exclusive)."""
        ends, end = [], 0
        for piece in self.pieces:
            end += piece.positions.shape[1]
            ends.append(end)
        return ends


class KVCache:
    """Preallocated keys/values for every layer: [layers, batch, kv_heads, max_len, head_dim].

    Slots are shared by the batch (left padding keeps the ends aligned); `key_mask` marks which
    slots hold real tokens when some rows are padded, and is None when none are.
    Any object with `begin` and `update` like this one can stand in (the server's slot cache does);
    one with `decode_slots` too lets a decode step's kernels write the cache themselves.
    """

    def __init__(self, config: GLMConfig, batch_size: int, max_len: int, dtype, device):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # slots filled
        self.key_mask: torch.Tensor | None = None
        # Per-row facts of the prompt that later steps' positions depend on (ChatGLM-6B: where its
        # [gMASK] and <sop> sit), set by the model at prefill; None for the other networks.
        self.prompt_marks: torch.Tensor | None = None
        self._start = 0
        self._slots: torch.Tensor | None = None  # decode_slots' answer for the current step

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def begin(self, T: int, attention_mask: torch.Tensor | None) -> Step:
        """Reserve slots for T new tokens; attention_mask is [B, T] or [B, length + T], HF-style."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ContextLengthError(f"{end} positions exceed the KV cache's {self.max_len} slots")
        self.key_mask = _extend_key_mask(self.key_mask, attention_mask, self.k.shape[1], start, end, self.k.device)
        if start == 0:  # a new prompt: the previous one's facts no longer hold
            self.prompt_marks = None
        self._start, self.length, self._slots = start, end, None
        return _step(self.key_mask, start, end, self.k.device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put keys/values computed before, [layers, batch, kv_heads, n, head_dim], after the filled slots."""
        start, end = self.length, self.length + k.shape[3]
        if self.key_mask is not None:
            raise ValueError("append() is for unpadded caches")
        if end > self.max_len:
            raise ContextLengthError(f"{end} positions exceed the KV cache's {self.max_len} slots")
        self.k[:, :, :, start:end] = k
        self.v[:, :, :, start:end] = v
        self.length = end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self._start, self.length
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def decode_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For kernels that write a decode step's keys and values themselves (glmchat.kernels.block):
        this layer's keys and values [batch, kv_heads, max_len, head_dim] and each row's new slot
        (int64 [batch]); the step attends over the slots up to it."""
        if self._slots is None:
            self._slots = torch.full((self.k.shape[1],), self._start, dtype=torch.int64, device=self.k.device)
        return self.k[layer], self.v[layer], self._slots


class PromptPieces:
    """Several prompts' next pieces in one forward pass (the server prefills waiting prompts together):
    the pieces, each after what its own KVCache holds, are laid end to end as one row [1, T1 + T2 + ...].
    The products and the per-token ops see every piece's tokens at once, so the weights are read once
    for all of them; each piece's keys and values go to its own cache, and its queries attend to that
    cache exactly as the piece would alone. Where every product computes each row as if it were alone
    (glmchat.kernels.prompts_keep_rows_apart), each piece's keys, values and logits are bit for bit
    those of its forward pass alone."""

    def __init__(self, caches: list[KVCache], lengths: list[int]):
        self.caches, self.lengths = caches, lengths

    def begin(self, T: int, attention_mask: torch.Tensor | None) -> Step:
        if T != sum(self.lengths) or attention_mask is not None:
            raise ValueError("prompt pieces take their tokens end to end, without an attention mask")
        steps = [cache.begin(n, None) for cache, n in zip(self.caches, self.lengths)]
        return Step(torch.cat([s.positions for s in steps], dim=1), None, is_causal=False, pieces=steps)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each piece's keys and values to its cache; each cache's keys and values so far, as lists."""
        keys, values, start = [], [], 0
        for cache, n in zip(self.caches, self.lengths):
            piece_k, piece_v = cache.update(layer, k[:, :, start : start + n], v[:, :, start : start + n])
            keys.append(piece_k)
            values.append(piece_v)
            start += n
        return keys, values


class Attention(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, config.qkv_size, bias=config.add_qkv_bias)
        self.dense = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, rope, step: Step, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.heads(self.qkv(x), rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, step)
        return self.dense(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def heads(self, qkv: torch.Tensor, rope: torch.Tensor):
        """The fused projection [B, T, ...] split into q, k, v [B, heads, T, d], q and k rotated."""
        B, T, _ = qkv.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, rope), apply_rotary(k, rope), v

    def attend(self, q, k, v, step: Step) -> torch.Tensor:
        """softmax(q·kᵀ/√d)·v: q [B, heads, T, d], k and v [B, kv_heads, S, d] (PromptPieces: lists,
        one per piece)."""
        if step.pieces is not None:
            starts = [0, *step.piece_ends()]
            return torch.cat([self.attend(q[:, :, a:b], piece_k, piece_v, piece)
                              for a, b, piece_k, piece_v, piece in zip(starts, starts[1:], k, v, step.pieces)], dim=2)
        if step.key_lengths is None:
            return self.attention(q, k, v, step.mask, step.is_causal)
        return torch.cat([self.attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], None, False)
                          for b, n in enumerate(step.key_lengths)])

    def attention(self, q, k, v, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        # enable_gqa repeats each KV head for adjacent query heads (head h reads group h // rep).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            scale=1.0 / math.sqrt(self.head_dim), enable_gqa=self.n_kv_heads != self.n_heads,
        )


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.down = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down(self.activation(self.gate_up(x)))

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: silu(gate) * up, h = [..., gate | up]."""
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        eps = config.layernorm_epsilon
        self.attn_norm = RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)
        # GLM-4-0414's sandwich norms: each sublayer's output is normalized before its residual add.
        self.post_attn_norm = RMSNorm(config.hidden_size, eps) if config.sandwich_norms else None
        self.post_mlp_norm = RMSNorm(config.hidden_size, eps) if config.sandwich_norms else None

    def forward(self, x, rope, step, cache):
        h = self.attn(self.attn_norm(x), rope, step, cache)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h))


class GLMTransformer(nn.Module):
    # The parts another network of the family swaps in (glmchat.model_v1's ChatGLM-6B).
    block = Block
    norm_class = RMSNorm
    rotary_table = staticmethod(rotary_table)
    # Whether a prompt's keys and values depend only on the tokens up to them. ChatGLM-6B's prompt
    # attends both ways, so its prefix cannot be reused and its prompt is prefilled in one piece.
    prompt_is_causal = True

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.block(config, i) for i in range(config.num_layers))
        self.norm = self.norm_class(config.hidden_size, config.layernorm_epsilon)
        self.output = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.register_buffer("rope", self.rotary_table(config), persistent=False)
        self._compiled_decode = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings, make the output layer the embedding (one tensor; a quantized
        output layer gets the embedding quantized). Call again once the embedding is filled."""
        if not self.config.tie_word_embeddings:
            return
        if isinstance(self.output, nn.Linear):
            self.output.weight = self.embed.weight
        elif self.embed.weight.device.type != "meta":
            self.output.set_weight(self.embed.weight.detach())

    def reset_rotary(self) -> None:
        """Recompute the rotary table (after weights were materialized from the meta device)."""
        self.rope = self.rotary_table(self.config, self.rope.device).to(self.rope.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.seq_length:
            raise ContextLengthError(
                f"a cache of {max_len} positions is longer than the model's context of {self.config.seq_length}"
            )
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only) for input_ids [B, T]. With a
        PromptPieces cache and last_only: [pieces, 1, vocab], each piece's last position.

        attention_mask: [B, T] or [B, past + T] of 1 (token) / 0 (left padding), HF-style.
        position_ids: default 0.. for each row's real tokens, continuing after the cache.
        The cache, if given, is filled and advanced.
        """
        B, T = input_ids.shape
        if cache is not None:
            step = cache.begin(T, attention_mask)
        else:
            if T > self.config.seq_length:
                raise ContextLengthError(
                    f"{T} tokens exceed the model's context of {self.config.seq_length} by {T - self.config.seq_length}"
                )
            key_mask = _extend_key_mask(None, attention_mask, B, 0, T, input_ids.device)
            step = _step(key_mask, 0, T, input_ids.device)
        rope, step = self.place(input_ids, step, cache, position_ids)
        x = self.embed(input_ids)
        rope = rope.to(x.dtype)
        for layer in self.layers:
            x = layer(x, rope, step, cache)
        if last_only:
            x = x[:, -1:] if step.pieces is None else x[0, [end - 1 for end in step.piece_ends()], None]
        return self.output(self.norm(x))

    def place(self, input_ids, step: Step, cache, position_ids) -> tuple[torch.Tensor, Step]:
        """The rotary table at the new tokens' positions, and what they attend to (`step` as is
        here; ChatGLM-6B derives 2D positions and its prompt's mask from the ids)."""
        if position_ids is None:
            return self.rope[step.positions], step  # within the cache, so within seq_length
        return self.rope_at(position_ids), step

    def decode(self, input_ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step (a token per row, after the cache): `forward`, compiled if asked for
        (uncompiled through the module's call, so that forward hooks such as the CPU thread
        governor see decode steps too)."""
        step = self if self._compiled_decode is None else self._compiled_decode
        return step(input_ids, cache=cache, position_ids=position_ids)

    def compile_decode(self) -> None:
        """Run later decode steps through torch.compile (dynamic shapes: the cache grows each step).

        The first steps take tens of seconds to compile. On CPU it does not pay (the matrix-vector
        products dominate and stay eager; measured in the README), so it is off by default.
        """
        self._compiled_decode = torch.compile(self.forward, dynamic=True)

    @property
    def decode_is_compiled(self) -> bool:
        return self._compiled_decode is not None

    def rope_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The rotary table at caller-given positions, refusing those past the context."""
        if positions.shape[-1] and int(positions.max()) >= self.config.seq_length:
            raise ContextLengthError(
                f"position {int(positions.max())} is outside the model's context of {self.config.seq_length}"
            )
        return self.rope[positions]


def _extend_key_mask(past: torch.Tensor | None, attention_mask, B: int, start: int, end: int, device):
    """[B, end] bool of real (non-pad) slots, or None while no slot is padding."""
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if attention_mask.shape[1] == end and start:
            past, attention_mask = attention_mask[:, :start], attention_mask[:, start:]
        if past is None and bool(attention_mask.all()):
            attention_mask = None
    if past is None and attention_mask is None:
        return None
    if past is None:
        past = torch.ones(B, start, dtype=torch.bool, device=device)
    if attention_mask is None:
        attention_mask = torch.ones(B, end - start, dtype=torch.bool, device=device)
    return torch.cat((past[:, :start], attention_mask), dim=1)


def _step(key_mask: torch.Tensor | None, start: int, end: int, device) -> Step:
    """Positions and attention mask for slots start..end-1.

    Without padding: positions count on from `start`; decode (T == 1) attends to every slot and a
    fresh prompt uses SDPA's causal mode. With left padding, positions count real tokens only and
    rows of padded queries may attend anywhere: their outputs are never used, and this keeps them
    from becoming NaN.
    """
    T = end - start
    if key_mask is None:
        positions = torch.arange(start, end, device=device)[None]
        if T == 1 or start == 0:
            return Step(positions, None, is_causal=T > 1)
        return Step(positions, _causal(start, end, device)[None, None], is_causal=False)
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, start:end]
    mask = _causal(start, end, device)[None] & key_mask[:, None, :]
    mask = mask | ~key_mask[:, start:end, None]
    return Step(positions, mask[:, None], is_causal=False)


def _causal(start: int, end: int, device) -> torch.Tensor:
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]
