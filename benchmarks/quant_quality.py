"""How far int8 / int4 weight-only quantization moves the logits, measured in one run.

For each quantization: max and mean absolute logit difference against the unquantized model
(relative to the reference logits' standard deviation) and top-1 agreement, over every position of
a few prompts. Two models: a tiny checkpoint (float32 reference) and full-size ChatGLM3-6B shapes
with random weights (bfloat16 reference; needs ~19 GB free RAM).

    python benchmarks/quant_quality.py [--skip-full] [--prompts 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager

import torch
from torch import nn

from glmchat.bench import random_prompt
from glmchat.loader import DEFAULT_MODEL, load_model
from glmchat.quantize import quantized_layer
from glmchat.tiny import make_tiny_checkpoint

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
        yield model
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


def report(name: str, reference_dtype: str, model, prompts, methods) -> None:
    reference = logits_of(model, prompts)
    print(f"\n{name} (reference: {reference_dtype}, {len(prompts)} prompts × {len(prompts[0])} positions)")
    print(f"{'weights':<14}{'max |Δ|':>10}{'mean |Δ|':>10}{'mean/std':>10}{'top-1 agree':>13}")
    for method, group in methods:
        with quantized(model, method, group) as q:
            r = compare(reference, logits_of(q, prompts))
        label = method if method == "int8" else f"{method} g{group}"
        print(f"{label:<14}{r['max_abs']:>10.4f}{r['mean_abs']:>10.4f}{r['mean_abs'] / r['ref_std']:>10.3f}"
              f"{r['top1']:>12.1%}", flush=True)


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
        tiny, _ = load_model(ckpt, dtype=torch.float32, progress=False)
        prompts = [random_prompt(args.tokens, 1000, seed=i) for i in range(args.prompts)]
        report("tiny checkpoint (hidden 128, 4 layers, random weights)", "float32", tiny, prompts,
               [("int8", 128), ("int4", 128), ("int4", 32)])

    if not args.skip_full:
        # One bf16 model in memory; each quantized copy is made from it and dropped before the next.
        model, _ = load_model(DEFAULT_MODEL, dtype=torch.bfloat16, random_weights=True, progress=False)
        prompts = [random_prompt(args.tokens, model.config.padded_vocab_size, seed=i) for i in range(args.prompts)]
        report("ChatGLM3-6B shapes, random weights", "bfloat16", model, prompts, METHODS)


if __name__ == "__main__":
    main()
