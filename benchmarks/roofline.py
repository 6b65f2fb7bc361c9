"""Decode and prefill speed of ChatGLM3-6B against this machine's memory bandwidth (roofline).

Measures, with random weights of the full size, batch 1: decode tokens/s and the effective bandwidth
(bytes of weights and scales read per token × tokens/s, as a multiple of the memory read bandwidth
B, a float32 sum over 1 GB measured right before and after each timed decode: on shared hosts B
moves by 2× within minutes) for
16-bit, int8 and int4 weights (and, asked for, with a torch.compile'd decode step: bf16-compile);
prefill tokens/s for a 512-token prompt; and the same through transformers' GlmForCausalLM in bf16
as the baseline. One model in memory at a time; full size needs ~13 GB, so run it alone:
    flock /tmp/glmchat-bigmem.lock python benchmarks/roofline.py
"""

import argparse
import warnings
import gc
import json
import time

import torch

from glmchat.bench import memory_bandwidth, random_prompt, time_generation
from glmchat.config import GLMConfig
from glmchat.hub import DEFAULT_MODEL
from glmchat.kernels import install
from glmchat.loader import empty_model, weight_bytes
from glmchat.random_weights import init_random_weights
from glmchat.registry import KNOWN_CONFIGS

FORMATS = ["bf16", "fp16", "int8", "int4", "bf16-compile", "int4-compile", "transformers-bf16"]


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row of it)."""
    return weight_bytes(model, skip="embed")


def glmchat_model(config: GLMConfig, fmt: str, group_size: int):
    """fmt: a weight format, "-compile" added for a torch.compile'd decode step (the warm-up round compiles)."""
    weights = fmt.removesuffix("-compile")
    dtype = torch.float16 if weights == "fp16" else torch.bfloat16
    quant = {"method": weights, "group_size": group_size} if weights in ("int8", "int4") else None
    model = empty_model(config, dtype, "cpu", quant)
    init_random_weights(model)
    install(model)
    if fmt.endswith("-compile"):
        model.compile_decode()
    return model


def transformers_model(config: GLMConfig):
    from transformers import GlmConfig, GlmForCausalLM

    hf = GlmConfig(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.layernorm_epsilon,
        max_position_embeddings=config.seq_length, attention_bias=True, pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 0.5},
    )
    with torch.device("meta"):
        model = GlmForCausalLM(hf)
    model = model.to(torch.bfloat16).to_empty(device="cpu").eval().requires_grad_(False)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf)  # its float32 table, computed for real
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)
    return model


def time_transformers(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to prefill + first token, decode tokens/s) of a greedy loop with transformers' cache."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            int(token)
        end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first)


BANDWIDTH_BUFFER_BYTES = 10**9


def bandwidth() -> float:
    """B next to a decode: a float32 sum over 1 GB (far past the caches), best of 3 (~0.1 s)."""
    return memory_bandwidth(gigabytes=BANDWIDTH_BUFFER_BYTES / 1e9, passes=3)


def time_prompt(model, fmt: str, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s) of a greedy answer to `prompt`."""
    if fmt.startswith("transformers"):
        return time_transformers(model, prompt, new_tokens)
    timing = time_generation(model, prompt, new_tokens)[0]
    return timing.ttft_s, timing.decode_tok_s


def run_format(config, fmt, args) -> dict:
    start = time.perf_counter()
    model = transformers_model(config) if fmt.startswith("transformers") else glmchat_model(config, fmt, args.group_size)
    load_s = time.perf_counter() - start
    nbytes = bytes_per_token(model)
    vocab = config.padded_vocab_size - 1000
    prefill, decode = [], []  # decode: (tokens/s, B around that decode)
    for r in range(args.repeats + 1):  # the first round warms up
        ttft, _ = time_prompt(model, fmt, random_prompt(args.prefill_tokens, vocab, seed=r), 1)
        before = bandwidth()
        _, tok_s = time_prompt(model, fmt, random_prompt(64, vocab, seed=100 + r), args.new_tokens)
        if r:
            prefill.append(args.prefill_tokens / ttft)
            decode.append((tok_s, (before + bandwidth()) / 2))
    del model
    gc.collect()
    best_decode, B = max(decode)
    return {"format": fmt, "load_s": load_s, "bytes_per_token": nbytes, "B": B,
            "decode_tok_s": best_decode, "effective_bw": nbytes * best_decode, "x_B": nbytes * best_decode / B,
            "prefill_tok_s": max(prefill), "roofline_tok_s": B / nbytes}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4", "transformers-bf16"], choices=FORMATS)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layers", type=int, help="fewer layers than the real 28, for a quick check")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    raw = dict(KNOWN_CONFIGS[DEFAULT_MODEL], **({"num_layers": args.layers} if args.layers else {}))
    config = GLMConfig.from_dict(raw)
    B0 = memory_bandwidth()
    rows = [run_format(config, fmt, args) for fmt in args.formats]
    base = next((r["prefill_tok_s"] for r in rows if r["format"].startswith("transformers")), None)
    for r in rows:
        r["prefill_vs_transformers"] = r["prefill_tok_s"] / base if base else None
    if args.json:
        print(json.dumps({"B_start": B0, "threads": args.threads, "layers": config.num_layers, "rows": rows}, indent=2))
        return
    print(f"ChatGLM3-6B shapes, {config.num_layers} layers, random weights, batch 1, {args.threads} threads, "
          f"torch {torch.__version__}; B at start {B0 / 1e9:.1f} GB/s")
    print(f"{'format':18s} {'GB/token':>8s} {'B GB/s':>7s} {'decode tok/s':>12s} {'eff. GB/s':>9s} {'× B':>5s} "
          f"{'prefill' + str(args.prefill_tokens) + ' tok/s':>17s} {'vs transformers':>15s}")
    for r in rows:
        vs = f"{r['prefill_vs_transformers']:.2f}×" if base else "-"
        print(f"{r['format']:18s} {r['bytes_per_token'] / 1e9:8.2f} {r['B'] / 1e9:7.1f} {r['decode_tok_s']:12.2f} "
              f"{r['effective_bw'] / 1e9:9.1f} {r['x_B']:5.2f} {r['prefill_tok_s']:17.1f} {vs:>15s}")


if __name__ == "__main__":
    main()
