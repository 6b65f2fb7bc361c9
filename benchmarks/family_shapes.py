"""Full-size random-weight loads of the family's real shapes: parameters, memory, one forward.

Each model is built from its built-in config (no download), filled with random weights in
bfloat16, run on a 16-token prompt plus 4 decode steps, and freed before the next. Needs RAM for
the largest model (GLM-4-9B: ~17.5 GiB) — one at a time.

    python benchmarks/family_shapes.py [THUDM/glm-4-9b-chat ...]
    python benchmarks/family_shapes.py --int4 THUDM/GLM-4-32B-0414   # int4 g128: what fits 24 GiB
"""

from __future__ import annotations

import gc
import resource
import sys
import time

import torch

from glmchat.generate import generate_tokens
from glmchat.loader import load_model
from glmchat.quantize import QuantizedLinear
from glmchat.registry import KNOWN_CONFIGS

DISTINCT = ["THUDM/chatglm-6b", "THUDM/chatglm3-6b", "THUDM/chatglm3-6b-128k", "THUDM/chatglm2-6b-32k", "THUDM/glm-4-9b-chat"]


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def main(ids: list[str], quantize: str | None = None) -> None:
    torch.set_num_threads(2)
    print(f"{'model':<26}{'params':>10}{'weights GiB':>13}{'RSS GiB':>9}{'context':>9}{'load s':>8}{'16+5 tok s':>12}")
    for model_id in ids:
        if model_id not in KNOWN_CONFIGS:
            sys.exit(f"{model_id}: no built-in config; known: {', '.join(KNOWN_CONFIGS)}")
        start = time.perf_counter()
        model, info = load_model(model_id, dtype=torch.bfloat16, random_weights=True, progress=False, quantize=quantize)
        load_s = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters()) + sum(  # quantized weights are buffers
            m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
        prompt = torch.randint(100, 60000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        if model.config.gmask_token_id is not None:  # ChatGLM-6B's prompts end in [gMASK] <sop>
            prompt[-2:] = [model.config.gmask_token_id, model.config.bos_token_id]
        t0 = time.perf_counter()
        tokens = list(generate_tokens(model, prompt, max_new_tokens=5))
        first = time.perf_counter()
        assert len(tokens) == 5 and all(0 <= t < model.config.padded_vocab_size for t in tokens)
        print(f"{model_id.removeprefix('THUDM/'):<26}{params / 1e9:>9.3f}B{info.weight_bytes / 2**30:>13.2f}"
              f"{current_rss_gib():>9.2f}{model.config.seq_length:>9}{load_s:>8.1f}{first - t0:>12.2f}",
              flush=True)
        del model
        gc.collect()


if __name__ == "__main__":
    int4 = "--int4" in sys.argv
    main([a for a in sys.argv[1:] if a != "--int4"] or DISTINCT, "int4" if int4 else None)
