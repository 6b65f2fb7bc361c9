"""How long a running stream waits between two tokens while the server admits a long prompt.

The server's engine (glmchat.server.engine, what `glmchat serve` runs): one greedy request decodes;
after its third token a request with a --prompt-tokens prompt arrives. Prefilled in one piece, that
prompt stops the stream for the whole prefill; prefilled in chunks between decode steps (the
server's default: 128-token chunks), the stream waits about one chunk at a time. Token times are
taken as the engine hands each token over (text shown to an HTTP client can lag behind tokens that
do not complete a character yet, so it would blur the measure). Prints the stream's largest gap
between two tokens and its median gap before the long prompt came, and the long request's time to
its first token, for each way, plus whether the stream's tokens were the same both ways. Full size
(random weights of THUDM/chatglm3-6b's shape, bf16) needs ~13 GB: run it alone, e.g.
    flock /tmp/glmchat-bigmem.lock python benchmarks/admission_gap.py
"""

import argparse
import os
import statistics
import threading
import time

from glmchat.server.engine import Engine
from glmchat.server.prefix_cache import BLOCK
from served_model import PARAGRAPH, add_model_arguments, load_model


def run(engine: Engine, stream_prompt: list[int], long_prompt: list[int], stream_tokens: int, bias: dict) -> dict:
    times, tokens, done = [], [], threading.Event()
    long_first = threading.Event()

    def on_stream(record):
        if record.token is not None:
            times.append(time.perf_counter())
            tokens.append(record.token)
        if record.finish_reason is not None:
            done.set()

    engine.submit(stream_prompt, max_new_tokens=stream_tokens, emit=on_stream, logit_bias=bias)
    while len(times) < 3:
        time.sleep(0.01)
    came = time.perf_counter()
    def on_long(record):
        if record.token is not None:
            long_first.set()

    engine.submit(long_prompt, max_new_tokens=1, emit=on_long, logit_bias=bias)
    long_first.wait()
    long_seconds = time.perf_counter() - came
    done.wait()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"max_gap": max(gaps), "median_before": statistics.median(gaps[:2]), "long_seconds": long_seconds,
            "tokens": tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--prompt-tokens", type=int, default=2000, help="about this long a prompt arrives")
    ap.add_argument("--stream-tokens", type=int, default=40)
    args = ap.parse_args()

    chat_model = load_model(args)
    tokenizer = chat_model.tokenizer
    bias = {i: -100 for i in tokenizer.stop_token_ids}  # the stream runs to its length
    vocab_limit = tokenizer.vocab_size if chat_model.standin_tokenizer else None
    per_paragraph = len(tokenizer.encode(PARAGRAPH, add_special_tokens=False))
    messages = [{"role": "user", "content": PARAGRAPH * max(1, args.prompt_tokens // per_paragraph)}]
    long_prompt = chat_model.family.prompt_ids(tokenizer, messages)
    stream_prompt = chat_model.family.prompt_ids(tokenizer, [{"role": "user", "content": "Tell me about the Great Wall."}])
    results = {}
    for name, chunk in (("in one piece", chat_model.model.config.seq_length), (f"in {BLOCK}-token chunks", BLOCK)):
        engine = Engine(chat_model.model, cache_bytes=0, prefill_chunk=chunk, vocab_limit=vocab_limit).start()
        try:
            results[name] = run(engine, stream_prompt, long_prompt, args.stream_tokens, bias)
        finally:
            engine.stop()
        print(f"  prefill {name}: done", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"a {len(long_prompt)}-token prompt arrives while a stream decodes")
    print("long prompt prefilled | stream's largest gap | its median gap before | long request's first token after")
    print("--------------------: | -------------------: | --------------------: | -------------------------------:")
    for name, r in results.items():
        print(f"{name:>21} | {r['max_gap']:18.1f} s | {r['median_before']:19.2f} s | {r['long_seconds']:29.1f} s")
    same = len({tuple(r["tokens"]) for r in results.values()}) == 1
    print(f"the stream's tokens the same both ways: {same}")


if __name__ == "__main__":
    main()
