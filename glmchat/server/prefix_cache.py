"""Automatic prefix caching: the KV of prompt prefixes computed for earlier requests, reused.

A chat client resends the whole conversation every turn. The engine prefills every prompt in
chunks that end at multiples of BLOCK positions (glmchat.generate.prefill_chunks), and keeps each full
chunk's keys and values here as a block, keyed by its tokens and by the block before it (a chain
from the prompt's start, like vLLM's block hashes). A later prompt that starts with the same
tokens takes those blocks and prefills only the rest, chunk by chunk as before: the same
computations in the same shapes, so the logits and the answer are bit for bit those of a
prefill from scratch.

Bounded in bytes; the least recently used blocks go first, and a prompt's blocks are touched
from its last to its first, so a block always outlives the blocks that continue it. Only the
engine's thread uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# Tokens per block = per prefill chunk. Each chunk reads all the weights once more (~0.5 s at
# ChatGLM3-6B's size in bf16 on a 25 GB/s machine), so chunks should be long against their compute;
# a hit leaves up to a block's worth of the prompt to compute again.
BLOCK = 128


@dataclass
class Block:
    id: int
    k: torch.Tensor  # [layers, kv_heads, BLOCK, head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.block = block
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()  # (previous id, tokens)
        self._next_id = 1
        self.hit_tokens = 0  # prompt tokens taken from the cache
        self.prompt_tokens = 0  # prompt tokens looked up

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, previous: int, prompt: list[int], i: int) -> tuple[int, tuple[int, ...]]:
        return previous, tuple(prompt[i * self.block : (i + 1) * self.block])

    def match(self, prompt: list[int]) -> list[Block]:
        """The cached blocks that begin `prompt`, leaving at least its last token to compute."""
        found, keys, previous = [], [], 0
        for i in range((len(prompt) - 1) // self.block):
            key = self._key(previous, prompt, i)
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
            keys.append(key)
            previous = block.id
        self._touch(keys)
        self.prompt_tokens += len(prompt)
        self.hit_tokens += len(found) * self.block
        return found

    def store(self, prompt: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the full blocks of a prefilled prompt: k, v [layers, kv_heads, >= len(prompt), head_dim]."""
        if self.max_bytes <= 0:
            return
        keys, previous = [], 0
        for i in range(len(prompt) // self.block):
            key = self._key(previous, prompt, i)
            block = self._blocks.get(key)
            if block is None:
                span = slice(i * self.block, (i + 1) * self.block)
                block = self._blocks[key] = Block(self._next_id, k[:, :, span].clone(), v[:, :, span].clone())
                self._next_id += 1
                self.bytes += block.nbytes
            keys.append(key)
            previous = block.id
        self._touch(keys)
        while self.bytes > self.max_bytes:
            self.bytes -= self._blocks.popitem(last=False)[1].nbytes

    def _touch(self, keys: list) -> None:
        """Mark a chain used, its first block last: the least recently used blocks end chains."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)
