"""One short GPU check (run by gpu_check.sh): memory bandwidth, then full-size random ChatGLM3-6B.

Measures, on one device:
- B: the device memory's read bandwidth (glmchat.bench.memory_bandwidth: a torch sum over 2 GB);
- bf16 and int4 decode at batch 1 (a 64-token prompt, then --new-tokens greedy tokens, stop ids
  ignored), with `--compile` off and on, each as tokens/s and as the fraction of B it reaches
  (bytes of weights read per token × tokens/s ÷ B);
- prefill of a 512-token prompt (bf16);
- the real server's aggregate tokens/s at 1, 16 and 64 concurrent streams (bf16), as a ratio to one.
Prints one table (and --json: the numbers). With --model PATH (e.g. a tiny checkpoint) and
--device cpu it runs anywhere, as a check of the script itself.

    python benchmarks/gpu_check.py [--json] [--device cuda] [--model THUDM/chatglm3-6b]
"""

import argparse
import gc
import json

import torch

from glmchat.bench import memory_bandwidth, random_prompt, time_generation
from glmchat.chat import load
from glmchat.hub import DEFAULT_MODEL
from glmchat.loader import weight_bytes
from glmchat.server import BackgroundServer, build_app
from serve_concurrency import run_level


def decode_rate(model, new_tokens: int) -> float:
    """Greedy tokens/s after a 64-token prompt, the prefill left out (best of 2, after a warm-up)."""
    prompt = random_prompt(64, model.config.padded_vocab_size)
    time_generation(model, prompt, 8)  # warm-up (and compilation)
    return max(time_generation(model, prompt, new_tokens)[0].decode_tok_s for _ in range(2))


def server_rates(chat_model, streams: list[int], tokens: int) -> list[dict]:
    tokenizer = chat_model.tokenizer
    app = build_app(chat_model.model, tokenizer, chat_model.family, model_id="gpu-check", max_batch=max(streams),
                    vocab_limit=tokenizer.vocab_size if chat_model.standin_tokenizer else None)
    bias = {str(i): -100 for i in tokenizer.stop_token_ids}
    with BackgroundServer(app) as server:
        run_level(server.url, 1, 4, bias)  # warm-up
        return [run_level(server.url, n, tokens, bias) for n in streams]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub id or directory; random weights of its shape")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode tokens per measurement")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--stream-tokens", type=int, default=32, help="tokens per server stream")
    ap.add_argument("--bandwidth-gb", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    B = memory_bandwidth(args.bandwidth_gb, device=device) / 1e9
    out = {"device": name, "torch": torch.__version__, "model": args.model, "B_read_gbs": B, "decode": []}
    for quantize in (None, "int4"):
        chat_model = load(args.model, device=args.device, dtype="bfloat16", random_weights=True, progress=False,
                          quantize=quantize)
        model, nbytes = chat_model.model, weight_bytes(chat_model.model)
        for compiled in (False, True):
            if compiled:
                model.compile_decode()
            rate = decode_rate(model, args.new_tokens)
            out["decode"].append({"weights": quantize or "bf16", "compile": compiled, "tok_s": rate,
                                  "weight_gb": nbytes / 1e9, "fraction_of_B": rate * nbytes / 1e9 / B})
        if quantize is None:
            model._compiled_decode = None  # the prefill and the server: eager, as served by default
            out["prefill_512_tok_s"] = time_generation(model, random_prompt(512, model.config.padded_vocab_size),
                                                       1)[0].prefill_tok_s
            out["server"] = server_rates(chat_model, args.streams, args.stream_tokens)
        del chat_model, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['device']}, torch {out['torch']}, {args.model} random weights; B = {B:.0f} GB/s (read)")
    print("| what | tok/s | × B |\n|---|---:|---:|")
    for d in out["decode"]:
        print(f"| decode batch 1, {d['weights']}, compile {'on' if d['compile'] else 'off'} | {d['tok_s']:.1f} | "
              f"{d['fraction_of_B']:.2f} |")
    print(f"| prefill 512, bf16 | {out['prefill_512_tok_s']:.0f} | |")
    base = out["server"][0]["tok_s"]
    for r in out["server"]:
        print(f"| server, {r['streams']} streams, bf16 (× one stream: {r['tok_s'] / base:.1f}) | {r['tok_s']:.1f} | |")


if __name__ == "__main__":
    main()
