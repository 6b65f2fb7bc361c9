"""Token generation: sampling and the decode loop (prefill once, then one token per step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .model import ContextLengthError, GLMTransformer, KVCache


@dataclass
class SamplingConfig:
    greedy: bool = False
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.temperature == 0:
            self.greedy = True


class Sampler:
    """Picks the next token from float32 logits [B, vocab], in the reference's processor order."""

    def __init__(self, config: SamplingConfig, device):
        self.config = config
        self.generator = None
        if config.seed is not None and not config.greedy:
            self.generator = torch.Generator(device=device).manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        logits = logits.float()
        logits = _guard_invalid_scores(logits)
        if c.repetition_penalty != 1.0 and seen is not None:
            prev = logits.gather(-1, seen)
            logits = logits.scatter(-1, seen, torch.where(prev < 0, prev * c.repetition_penalty, prev / c.repetition_penalty))
        if c.greedy:
            return logits.argmax(-1)
        logits = logits / c.temperature
        if c.top_k:
            kth = torch.topk(logits, min(c.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if c.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove_sorted = cumulative <= 1 - c.top_p
            remove_sorted[..., -1] = False  # always keep the most likely token
            remove = remove_sorted.scatter(-1, order, remove_sorted)
            logits = logits.masked_fill(remove, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _guard_invalid_scores(logits: torch.Tensor) -> torch.Tensor:
    """The reference's InvalidScoreLogitsProcessor: a row with NaN/inf becomes 5e4 at id 5, else 0.

    Done with `where` rather than an `if`, so the decode loop does not wait on the device here.
    """
    bad = ~torch.isfinite(logits).all(-1, keepdim=True)
    guard = torch.zeros_like(logits)
    guard[..., 5] = 5e4
    return torch.where(bad, guard, logits)


def generate_tokens(
    model: GLMTransformer,
    prompt_ids: list[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    sampling: SamplingConfig | None = None,
    cache: KVCache | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (the stop token included, then it ends).

    With a `cache` that already holds earlier turns, the prompt continues after them.
    """
    sampling = sampling or SamplingConfig(greedy=True)
    device = model.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    past = cache.length if cache is not None else 0
    needed = past + prompt.shape[1] + max_new_tokens
    if past + prompt.shape[1] > model.config.seq_length:
        over = past + prompt.shape[1] - model.config.seq_length
        raise ContextLengthError(
            f"the prompt is {past + prompt.shape[1]} tokens, {over} more than the model's context of "
            f"{model.config.seq_length}; shorten it or clear the history"
        )
    max_new_tokens = min(max_new_tokens, model.config.seq_length - past - prompt.shape[1])
    if cache is None:
        cache = model.new_cache(1, min(needed, model.config.seq_length))
    sampler = Sampler(sampling, device)
    stop = set(stop_ids)
    seen = prompt if sampling.repetition_penalty != 1.0 else None

    with torch.inference_mode():
        logits = model(prompt, cache=cache, last_only=True)
        for i in range(max_new_tokens):
            token = sampler(logits[:, -1], seen)
            token_id = int(token)
            yield token_id
            if token_id in stop or i == max_new_tokens - 1:
                return
            next_input = token.view(1, 1)
            if seen is not None:
                seen = torch.cat((seen, next_input), dim=1)
            logits = model(next_input, cache=cache)
