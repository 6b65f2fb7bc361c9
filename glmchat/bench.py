"""Timing helpers and `glmchat bench`: the seed's workload of four bilingual prompt pairs, greedy."""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .generate import SamplingConfig, generate_tokens

SUFFIX_EN = " .Provide answer in English"
SUFFIX_ZH = " 请提供答案，并使用中文语言"
PROMPT_PAIRS = [
    ("What is ChatGLM? What are some similarities and differences between ChatGLM and ChatGPT?",
     "什么是ChatGLM？ChatGLM和ChatGPT之间有哪些相似和不同之处？"),
    ("Explain the recent developments in natural language processing", "解释自然语言处理领域的最近发展。"),
    ("Implement code for binary search in Python", "在Python中实现二分查找的代码"),
    ("Summarize the paper 'Attention Is All You Need'", "总结论文 'Attention Is All You Need'"),
]


def bench_prompts() -> list[str]:
    """The eight prompts in the seed's order: each English question, then its Chinese twin."""
    return [p for en, zh in PROMPT_PAIRS for p in (en + SUFFIX_EN, zh + SUFFIX_ZH)]


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timing:
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prefill + first token
    decode_s: float  # the remaining new_tokens - 1 tokens

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else float("nan")

    @property
    def total_s(self) -> float:
        return self.ttft_s + self.decode_s


def time_generation(model, prompt_ids, max_new_tokens: int, stop_ids=()) -> tuple[Timing, list[int]]:
    """Greedy generation of up to max_new_tokens (exactly that many with no stop ids), timed."""
    device = model.device
    synchronize(device)
    start = time.perf_counter()
    tokens = []
    first_at = None
    for token in generate_tokens(model, prompt_ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                 sampling=SamplingConfig(greedy=True)):
        tokens.append(token)
        if first_at is None:
            first_at = time.perf_counter()
    end = time.perf_counter()
    return Timing(len(prompt_ids), len(tokens), first_at - start, end - first_at), tokens


def random_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def environment(model) -> dict:
    return {
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
