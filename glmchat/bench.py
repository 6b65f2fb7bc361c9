"""Timing helpers and `glmchat bench`: the seed's workload of four bilingual prompt pairs, greedy."""

from __future__ import annotations

import platform
import resource
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from .generate import SamplingConfig, generate_tokens
from .quantize import quantization_of

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


def memory_bandwidth(gigabytes: float = 4.0, passes: int = 5, device="cpu") -> float:
    """B: the memory read bandwidth of `device` (this machine's by default) in bytes/s, the best of
    `passes` float32 sums over a buffer far larger than the caches (the yardstick the benchmarks
    state speeds against)."""
    device = torch.device(device)
    buf = torch.ones(int(gigabytes * 1e9) // 4, device=device)
    best = float("inf")
    for _ in range(passes):
        synchronize(device)
        start = time.perf_counter()
        buf.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return buf.nbytes / best


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far. On Linux from VmHWM: getrusage's ru_maxrss of a
    process started by a larger one reports the parent's peak (exec keeps it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
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


# ---------------------------------------------------------------------------------------------
# glmchat bench


def run_bench(chat_model, max_new_tokens: int = 256) -> dict:
    """The seed's workload on a loaded ChatModel: each prompt alone (history=[]), greedy.

    With random weights the stop tokens are ignored, so every prompt generates max_new_tokens.
    """
    model, tokenizer = chat_model.model, chat_model.tokenizer
    stop_ids = () if chat_model.random_weights else tokenizer.stop_token_ids
    time_generation(model, tokenizer.build_chat_input("warm up", history=[]).input_ids[0].tolist(), 4)  # and compile
    rows = []
    for prompt in bench_prompts():
        ids = tokenizer.build_chat_input(prompt, history=[]).input_ids[0].tolist()
        t, _ = time_generation(model, ids, max_new_tokens, stop_ids)
        rows.append({"prompt": prompt, "prompt_tokens": t.prompt_tokens, "generated_tokens": t.new_tokens,
                     "ttft_s": t.ttft_s, "decode_tok_s": t.decode_tok_s, "total_s": t.total_s})
    generated = sum(r["generated_tokens"] for r in rows)
    decode_s = sum(r["total_s"] - r["ttft_s"] for r in rows)
    return {
        **environment(model), "model": chat_model.source, "random_weights": chat_model.random_weights,
        "quantization": quantization_of(model), "compiled_decode": model.decode_is_compiled,
        "load_s": chat_model.load_seconds,
        "max_new_tokens": max_new_tokens, "prompts": rows,
        "total": {"prompt_tokens": sum(r["prompt_tokens"] for r in rows), "generated_tokens": generated,
                  "seconds": sum(r["total_s"] for r in rows),
                  "decode_tok_s": (generated - len(rows)) / decode_s if decode_s else float("nan")},
        "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(model.device),
    }


def format_table(result: dict) -> str:
    q = result["quantization"] or {"method": "none"}
    quant = q["method"] + (f" group {q['group_size']}" if "group_size" in q else "")
    lines = [
        f"model {result['model']}{' (random weights)' if result['random_weights'] else ''} on {result['device']}, "
        f"{result['dtype']}, quantization {quant}{', compiled decode' if result.get('compiled_decode') else ''}, "
        f"torch {result['torch']}, {result['threads']} threads; load {result['load_s']:.1f} s",
        f"{'prompt':42s} {'tokens in':>9s} {'out':>5s} {'first token s':>13s} {'decode tok/s':>12s} {'total s':>8s}",
    ]
    for r in result["prompts"]:
        lines.append(f"{_fit(r['prompt'], 42)} {r['prompt_tokens']:9d} {r['generated_tokens']:5d} {r['ttft_s']:13.2f} "
                     f"{r['decode_tok_s']:12.2f} {r['total_s']:8.2f}")
    t = result["total"]
    lines.append(f"{'total':42s} {t['prompt_tokens']:9d} {t['generated_tokens']:5d} {'':13s} "
                 f"{t['decode_tok_s']:12.2f} {t['seconds']:8.2f}")
    mem = f"peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB"
    if result["peak_device_bytes"]:
        mem += f", peak device memory {result['peak_device_bytes'] / 1e9:.2f} GB"
    lines.append(mem)
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    """Cut and pad `text` to `width` terminal columns (CJK characters take two)."""
    out, cols = "", 0
    for c in text:
        w = 2 if unicodedata.east_asian_width(c) in "WF" else 1
        if cols + w > width - 2:
            out, cols = out + "…", cols + 1
            break
        out, cols = out + c, cols + w
    return out + " " * (width - cols)


def checkpoint_available(path_or_id: str) -> bool:
    """A local checkpoint directory, or a hub id already in the local cache (no download)."""
    if Path(path_or_id).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import snapshot_download

        return (Path(snapshot_download(path_or_id, local_files_only=True)) / "config.json").exists()
    except Exception:  # not cached, or not a valid id
        return False


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'glmchat[plot]'") from None
    rows = result["prompts"]
    labels = [f"{i // 2 + 1}{'en' if i % 2 == 0 else 'zh'}" for i in range(len(rows))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(labels, [r["decode_tok_s"] for r in rows])
    ax1.set_ylabel("decode tokens/s")
    ax2.bar(labels, [r["ttft_s"] for r in rows], color="tab:orange")
    ax2.set_ylabel("time to first token (s)")
    q = result["quantization"]["method"] if result["quantization"] else result["dtype"]
    fig.suptitle(f"glmchat bench: {result['model']} on {result['device']} ({q})")
    fig.tight_layout()
    fig.savefig(path)
