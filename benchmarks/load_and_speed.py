"""Load ChatGLM3-6B (full size, random weights unless --checkpoint) and time it.

Prints load time, peak RSS, prefill tokens/s and decode tokens/s, batch 1, greedy.
Full size needs ~13 GB (bf16): run it alone, e.g.
    flock /tmp/glmchat-bigmem.lock python benchmarks/load_and_speed.py --threads 2
"""

import argparse
import json

import torch

from glmchat.bench import peak_rss_bytes, random_prompt, time_generation
from glmchat.hub import DEFAULT_MODEL
from glmchat.loader import load_model

GB = 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help=f"load this checkpoint instead of random weights of {DEFAULT_MODEL}'s shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", choices=["int8", "int4"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, info = load_model(args.checkpoint or DEFAULT_MODEL, random_weights=args.checkpoint is None,
                             dtype=args.dtype, quantize=args.quantize, group_size=args.group_size, progress=False)
    result = {
        "model": info.path, "random_weights": info.random_weights, "dtype": args.dtype,
        "quantization": info.quantization, "threads": args.threads, "weight_bytes": info.weight_bytes,
        "load_s": info.seconds, "peak_rss_after_load": peak_rss_bytes(), "runs": [],
    }
    time_generation(model, random_prompt(8, 60000), 3)  # warm-up
    for n in args.prompt_tokens:
        t, _ = time_generation(model, random_prompt(n, 60000, seed=n), args.new_tokens)
        result["runs"].append({"prompt_tokens": n, "new_tokens": t.new_tokens, "ttft_s": t.ttft_s,
                               "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s})
    result["peak_rss"] = peak_rss_bytes()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    q = info.quantization["method"] if info.quantization else "none"
    print(f"{info.path} ({'random weights' if info.random_weights else 'checkpoint'}), {args.dtype}, "
          f"quantization {q}, {args.threads} threads")
    print(f"load {info.seconds:.1f} s, weights {info.weight_bytes / GB:.2f} GB, peak RSS after load "
          f"{result['peak_rss_after_load'] / GB:.2f} GB ({result['peak_rss_after_load'] / info.weight_bytes:.2f}× weights)")
    for r in result["runs"]:
        print(f"prompt {r['prompt_tokens']:4d}: prefill {r['prefill_tok_s']:6.1f} tok/s, "
              f"decode {r['decode_tok_s']:5.2f} tok/s ({r['new_tokens']} new tokens)")
    print(f"peak RSS {result['peak_rss'] / GB:.2f} GB")


if __name__ == "__main__":
    main()
