"""How far int8 / int4 weight-only quantization moves the logits, measured in one run.

For each quantization: max and mean absolute logit difference against the unquantized model
(relative to the reference logits' standard deviation) and top-1 agreement, over every position of
a few prompts. Two models: a tiny checkpoint (float32 reference, bfloat16 as the floor of rounding
noise) and full-size ChatGLM3-6B shapes with random weights (bfloat16 reference). The full-size
models are loaded one at a time with the same seed (a quantized random load holds the bf16 model's
weights, quantized), so it needs ~13 GB; run it alone:

    flock /tmp/glmchat-bigmem.lock python benchmarks/quant_quality.py [--skip-full] [--prompts 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from contextlib import contextmanager

import torch
from torch import nn

from glmchat.bench import random_prompt
from glmchat.hub import DEFAULT_MODEL
from glmchat.kernels import install
from glmchat.loader import load_model
from glmchat.quantize import quantized_layer
from glmchat.testing import make_tiny_checkpoint

METHODS = [("int8", 128), ("int4", 128), ("int4", 32)]


def logits_of(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([p]))[0].float() for p in prompts])


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (other - reference).abs()
    scale = reference.std().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "ref_std": scale,
            "top1": (other.argmax(-1) == reference.argmax(-1)).float().mean().item()}


@contextmanager
def quantized(model: nn.Module, method: str, group: int):
    """The model with its Linear layers swapped for quantized twins, restored afterwards.

    The originals stay in memory (a deep copy would need twice the model; this needs the model plus
    its quantized weights)."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            q = quantized_layer(child, method, group) if isinstance(child, nn.Linear) else None
            if q is None:
                continue
            q.set_weight(child.weight.detach())
            if child.bias is not None:
                q.bias.copy_(child.bias.detach())
            setattr(parent, name, q)
            swaps.append((parent, name, child))
    try:
        yield install(model)
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


def print_header(name: str, reference_dtype: str, prompts) -> None:
    print(f"\n{name} (reference: {reference_dtype}, {len(prompts)} prompts × {len(prompts[0])} positions)")
    print(f"{'weights':<14}{'max |Δ|':>10}{'mean |Δ|':>10}{'mean/std':>10}{'top-1 agree':>13}")


def print_row(label: str, r: dict) -> None:
    print(f"{label:<14}{r['max_abs']:>10.4f}{r['mean_abs']:>10.4f}{r['mean_abs'] / r['ref_std']:>10.3f}"
          f"{r['top1']:>12.1%}", flush=True)


def label_of(method: str, group: int) -> str:
    return method if method == "int8" else f"{method} g{group}"


def report_tiny(ckpt, prompts) -> None:
    model, _ = load_model(ckpt, dtype=torch.float32, progress=False)
    reference = logits_of(model, prompts)
    print_header("tiny checkpoint (hidden 128, 4 layers, random weights)", "float32", prompts)
    print_row("bf16", compare(reference, logits_of(install(model.to(torch.bfloat16)), prompts)))
    model.float()
    for method, group in METHODS:
        with quantized(model, method, group) as q:
            print_row(label_of(method, group), compare(reference, logits_of(q, prompts)))


def report_full(prompts_n: int, tokens: int, seed: int = 0) -> None:
    """One full-size model in memory at a time: bf16 first, then each quantization of the same weights."""
    load = dict(dtype=torch.bfloat16, random_weights=True, seed=seed, progress=False)
    model, _ = load_model(DEFAULT_MODEL, **load)
    prompts = [random_prompt(tokens, model.config.padded_vocab_size, seed=i) for i in range(prompts_n)]
    reference = logits_of(model, prompts)
    del model
    gc.collect()
    print_header("ChatGLM3-6B shapes, random weights", "bfloat16", prompts)
    for method, group in METHODS:
        model, _ = load_model(DEFAULT_MODEL, quantize=method, group_size=group, **load)
        print_row(label_of(method, group), compare(reference, logits_of(model, prompts)))
        del model
        gc.collect()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-full", action="store_true", help="only the tiny checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(tmp, hidden_size=128, num_layers=4, num_attention_heads=4, kv_channels=32,
                                    ffn_hidden_size=256)
        report_tiny(ckpt, [random_prompt(args.tokens, 1000, seed=i) for i in range(args.prompts)])
    if not args.skip_full:
        report_full(args.prompts, args.tokens)


if __name__ == "__main__":
    main()
