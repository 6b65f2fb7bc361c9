"""Aggregate generation speed of the server at 1, 2, 4, 8, 16 concurrent streams.

The real HTTP server (uvicorn on a loopback port) with the batching engine, talked to with the
`openai` client: each stream asks for exactly --tokens tokens (stop tokens banned with logit_bias),
greedy. Prints, per concurrency, generated tokens/s end to end (prefills included) and in the
batched decode steps alone, each as a ratio to one stream. Full size (random weights of
THUDM/chatglm3-6b's shape, bf16; --quantize int8/int4) needs ~13 GB: run it alone, e.g.
    flock /tmp/glmchat-bigmem.lock python benchmarks/serve_concurrency.py
"""

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import torch

from glmchat.chat import load
from glmchat.hub import DEFAULT_MODEL
from glmchat.server import BackgroundServer, build_app

QUESTIONS = ["Tell me about the Great Wall.", "How do I sort a list in Python?", "写一首关于春天的诗",
             "What is the capital of France?", "解释一下量子计算", "Give me three tips for sleeping well."]


def stream(url: str, question: str, tokens: int, bias: dict) -> int:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    chunks = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=tokens,
        logit_bias=bias, stream=True, stream_options={"include_usage": True})
    return [c for c in chunks if c.usage][-1].usage.completion_tokens


def run_level(url: str, streams: int, tokens: int, bias: dict) -> dict:
    before = httpx.get(url + "/health").json()
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        counts = list(pool.map(lambda i: stream(url, QUESTIONS[i % len(QUESTIONS)], tokens, bias), range(streams)))
    seconds = time.perf_counter() - start
    after = httpx.get(url + "/health").json()
    assert counts == [tokens] * streams, counts
    decoded = after["decoded_tokens"] - before["decoded_tokens"]
    return {"streams": streams, "seconds": seconds, "tok_s": sum(counts) / seconds, "peak_batch": after["peak_batch"],
            "decode_tok_s": decoded / (after["decode_seconds"] - before["decode_seconds"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub id or directory (default: random weights of its shape)")
    ap.add_argument("--weights", action="store_true", help="load the checkpoint's weights instead of random ones")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per stream")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    chat_model = load(args.model, device=args.device, dtype=args.dtype, random_weights=not args.weights, progress=False,
                      quantize=args.quantize)
    tokenizer = chat_model.tokenizer
    print(f"{args.model} ({'weights' if args.weights else 'random weights'}), {chat_model.dtype}"
          f"{', ' + args.quantize if args.quantize else ''}, {chat_model.device}, "
          f"{torch.get_num_threads()} threads, loaded in {chat_model.load_seconds:.0f} s; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    app = build_app(chat_model.model, tokenizer, chat_model.family, model_id=args.model, max_batch=max(args.streams),
                    vocab_limit=tokenizer.vocab_size if chat_model.standin_tokenizer else None)
    bias = {str(i): -100 for i in tokenizer.stop_token_ids}  # every stream runs to --tokens
    with BackgroundServer(app) as server:
        run_level(server.url, 1, 4, bias)  # warm-up
        results = []
        for n in args.streams:
            results.append(run_level(server.url, n, args.tokens, bias))
            r = results[-1]
            print(f"  {n:2d} streams: {r['seconds']:6.1f} s", flush=True)
    base, base_decode = results[0]["tok_s"], results[0]["decode_tok_s"]
    print(f"\n{args.tokens} tokens per stream, greedy; load average after: {os.getloadavg()[0]:.2f}")
    print("streams | end-to-end tok/s | × one stream | decode-step tok/s | × one stream")
    print("------: | ---------------: | -----------: | ----------------: | -----------:")
    for r in results:
        print(f"{r['streams']:7d} | {r['tok_s']:16.2f} | {r['tok_s'] / base:11.2f}× | "
              f"{r['decode_tok_s']:17.2f} | {r['decode_tok_s'] / base_decode:11.2f}×")


if __name__ == "__main__":
    main()
