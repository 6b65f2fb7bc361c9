"""How long a running stream waits between two tokens while the server admits a long prompt.

The real HTTP server (uvicorn on a loopback port) and the `openai` client: one greedy stream
decodes; after its third token a second request with a --prompt-tokens prompt arrives. Prefilled
in one piece, that prompt stops the stream for the whole prefill; prefilled in chunks between
decode steps (the server's default: 128-token chunks), the stream waits at most about one chunk.
Prints the stream's largest gap between two tokens and its median gap before the long prompt came,
and the long request's time to its answer, for each way, plus whether the stream's text was the
same both ways. Full size (random weights of THUDM/chatglm3-6b's shape, bf16) needs ~13 GB: run it
alone, e.g.
    flock /tmp/glmchat-bigmem.lock python benchmarks/admission_gap.py
"""

import argparse
import os
import statistics
import threading
import time

import openai
import torch

from glmchat.chat import load
from glmchat.hub import DEFAULT_MODEL
from glmchat.server import BackgroundServer, build_app
from glmchat.server.prefix_cache import BLOCK

PARAGRAPH = ("The Great Wall of China is a series of fortifications built across the historical northern "
             "borders of ancient Chinese states. 长城是中国古代的军事防御工程，修筑的历史可上溯到西周时期。 ")


def run(url: str, long_text: str, stream_tokens: int, bias: dict) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    arrivals, text, long_done = [], [], {}

    def ask_long():
        start = time.perf_counter()
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": long_text}],
                                           temperature=0, max_tokens=1, logit_bias=bias)
        long_done.update(seconds=time.perf_counter() - start, prompt_tokens=r.usage.prompt_tokens)

    chunks = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Tell me about the Great Wall."}], temperature=0,
        max_tokens=stream_tokens, logit_bias=bias, stream=True, stream_options={"include_usage": True})
    long_request = threading.Thread(target=ask_long)
    came = None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content is not None or chunk.usage:
            arrivals.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if len(arrivals) == 3 and came is None:
            came = time.perf_counter()
            long_request.start()
    long_request.join()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"max_gap": max(gaps), "median_before": statistics.median(gaps[:2]), "long": long_done,
            "text": "".join(text)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub id or directory (default: random weights of its shape)")
    ap.add_argument("--weights", action="store_true", help="load the checkpoint's weights instead of random ones")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="about this long a prompt arrives")
    ap.add_argument("--stream-tokens", type=int, default=40)
    args = ap.parse_args()

    chat_model = load(args.model, device="cpu", dtype=args.dtype, random_weights=not args.weights, progress=False)
    tokenizer = chat_model.tokenizer
    print(f"{args.model} ({'weights' if args.weights else 'random weights'}), {chat_model.dtype}, "
          f"{torch.get_num_threads()} threads, loaded in {chat_model.load_seconds:.0f} s; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    bias = {str(i): -100 for i in tokenizer.stop_token_ids}
    per_paragraph = len(tokenizer.encode(PARAGRAPH, add_special_tokens=False))
    long_text = PARAGRAPH * max(1, args.prompt_tokens // per_paragraph)
    results = {}
    for name, chunk in (("in one piece", chat_model.model.config.seq_length), (f"in {BLOCK}-token chunks", BLOCK)):
        app = build_app(chat_model.model, tokenizer, chat_model.family, model_id=args.model, cache_gb=0,
                        prefill_chunk=chunk, vocab_limit=tokenizer.vocab_size if chat_model.standin_tokenizer else None)
        with BackgroundServer(app) as server:
            results[name] = run(server.url, long_text, args.stream_tokens, bias)
        print(f"  prefill {name}: done", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"a {results[name]['long']['prompt_tokens']}-token prompt arrives while a stream decodes")
    print("long prompt prefilled | stream's largest gap | its median gap before | long request answered in")
    print("--------------------: | -------------------: | --------------------: | -----------------------:")
    for name, r in results.items():
        print(f"{name:>21} | {r['max_gap']:18.1f} s | {r['median_before']:19.2f} s | {r['long']['seconds']:22.1f} s")
    same = len({r["text"] for r in results.values()}) == 1
    print(f"the stream's text the same both ways: {same}")


if __name__ == "__main__":
    main()
