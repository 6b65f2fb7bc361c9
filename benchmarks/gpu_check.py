"""One short GPU check (run by gpu_check.sh): memory bandwidth, then full-size random ChatGLM3-6B.

Measures, on one device:
- B: the device memory's read bandwidth (torch sum over a 2 GiB tensor) and copy bandwidth;
- bf16 and int4 decode at batch 1 (a 64-token prompt, --new-tokens greedy tokens, stop ids never
  hit with random weights), with `--compile` off and on, each as tokens/s and as the fraction of B
  it reaches (bytes of weights read per token × tokens/s ÷ B);
- prefill of a 512-token prompt (bf16);
- the real server's aggregate tokens/s at 1, 16 and 64 concurrent streams (bf16), as a ratio to one.
Prints one table (and --json: the numbers). With --model PATH (e.g. a tiny checkpoint) and
--device cpu it runs anywhere, as a check of the script itself.

    python benchmarks/gpu_check.py [--json] [--device cuda] [--model THUDM/chatglm3-6b]
"""

import argparse
import gc
import json
import time

import torch

from glmchat.chat import load
from glmchat.generate import SamplingConfig, generate_tokens, prefill
from glmchat.hub import DEFAULT_MODEL
from glmchat.server import BackgroundServer, build_app
from serve_concurrency import run_level


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, gib: float) -> tuple[float, float]:
    """(read, copy) GB/s: a sum over, and a copy of, a tensor of `gib` GiB, best of 5."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    reads, copies = [], []
    for _ in range(5):
        synchronize(device)
        t = time.perf_counter()
        x.sum()
        synchronize(device)
        reads.append(x.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        copies.append(2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x, y
    return max(reads), max(copies)


def weight_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def decode_rate(chat_model, new_tokens: int) -> float:
    """Greedy tokens/s after a 64-token prompt, stop ids never sampled (best of 2, after a warm-up)."""
    model, device = chat_model.model, chat_model.model.device
    prompt = list(range(100, 164))
    never = [*chat_model.processors, _banning(chat_model.tokenizer.stop_token_ids)]
    list(generate_tokens(model, prompt, max_new_tokens=8, processors=never))  # warm-up (and compilation)
    best = 0.0
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        tokens = list(generate_tokens(model, prompt, max_new_tokens=new_tokens, processors=never,
                                      sampling=SamplingConfig(greedy=True)))
        synchronize(device)
        best = max(best, len(tokens) / (time.perf_counter() - start))
    return best


def _banning(ids):
    ids = torch.tensor(sorted(ids))
    return lambda seen, scores: scores.index_fill(-1, ids.to(scores.device), torch.finfo(scores.dtype).min)


def prefill_rate(chat_model, tokens: int = 512) -> float:
    model = chat_model.model
    ids = torch.arange(100, 100 + tokens, device=model.device)[None] % model.config.padded_vocab_size
    with torch.inference_mode():
        prefill(model, ids, model.new_cache(1, tokens))  # warm-up
        synchronize(model.device)
        start = time.perf_counter()
        prefill(model, ids, model.new_cache(1, tokens))
        synchronize(model.device)
    return tokens / (time.perf_counter() - start)


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
    ap.add_argument("--bandwidth-gib", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    read_gbs, copy_gbs = bandwidth(device, args.bandwidth_gib)
    out = {"device": name, "torch": torch.__version__, "model": args.model, "B_read_gbs": read_gbs,
           "B_copy_gbs": copy_gbs, "decode": []}
    for quantize in (None, "int4"):
        chat_model = load(args.model, device=args.device, dtype="bfloat16", random_weights=True, progress=False,
                          quantize=quantize)
        nbytes = weight_bytes(chat_model.model)
        for compiled in (False, True):
            if compiled:
                chat_model.model.compile_decode()
            rate = decode_rate(chat_model, args.new_tokens)
            out["decode"].append({"weights": quantize or "bf16", "compile": compiled, "tok_s": rate,
                                  "weight_gb": nbytes / 1e9, "fraction_of_B": rate * nbytes / 1e9 / read_gbs})
        if quantize is None:
            chat_model.model._compiled_decode = None  # the prefill and the server: eager, as served by default
            out["prefill_512_tok_s"] = prefill_rate(chat_model)
            out["server"] = server_rates(chat_model, args.streams, args.stream_tokens)
        del chat_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['device']}, torch {out['torch']}, {args.model} random weights; "
          f"B = {read_gbs:.0f} GB/s read (copy {copy_gbs:.0f} GB/s)")
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
