"""SamplingConfig: how to pick tokens (no torch here: the command line reads its defaults for --help)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    """How to pick tokens. The defaults are the reference chat's (temperature and top_p 0.8, and
    transformers' top_k 50 under them): the one set of defaults the native API, the CLI and the
    server use when the caller says nothing."""

    greedy: bool = False
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 50  # 0: off
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
