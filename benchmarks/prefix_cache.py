"""Time to first token of a long conversation's sixth turn, with the server's prefix cache and without.

A chat client resends the whole conversation every turn. Five turns, each a long user message
(~380 tokens: a document pasted into the chat) and a 32-token greedy answer, build up ~2000
tokens of history; the sixth turn asks a short question. The real HTTP server (uvicorn on a
loopback port), the `openai` client. With the cache (the default) the sixth turn's prompt finds
the earlier turns' prompts in it and prefills only what follows the last cached block; then a
server without the cache (--cache-gb 0) on the same model answers the same sixth-turn request.
Both must give the same greedy answer. Time to first token: until the first streamed text.
Full size (random weights of THUDM/chatglm3-6b's shape, bf16) needs ~13 GB: run it alone, e.g.
    flock /tmp/glmchat-bigmem.lock python benchmarks/prefix_cache.py
"""

import argparse
import os
import time

import httpx
import openai

from glmchat.server import BackgroundServer, build_app
from served_model import PARAGRAPH, add_model_arguments, load_model


def ask(url: str, messages: list[dict], max_tokens: int, bias: dict) -> tuple[float, float, str, int]:
    """(seconds to the first text, seconds in all, answer, prompt tokens) of one greedy streamed request."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    start, first, text, usage = time.perf_counter(), None, [], None
    for chunk in client.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=max_tokens,
                                                logit_bias=bias, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    end = time.perf_counter()
    return (first or end) - start, end - start, "".join(text), usage.prompt_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--paragraphs", type=int, default=3, help="paragraphs per long user message (~125 tokens each)")
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args()

    chat_model = load_model(args)
    tokenizer = chat_model.tokenizer
    bias = {str(i): -100 for i in tokenizer.stop_token_ids}  # every answer runs to its max_tokens

    def app(cache_gb: float):
        return build_app(chat_model.model, tokenizer, chat_model.family, model_id=args.model, cache_gb=cache_gb,
                         vocab_limit=tokenizer.vocab_size if chat_model.standin_tokenizer else None)

    messages = []
    with BackgroundServer(app(2.0)) as server:
        for turn in range(1, args.turns):
            messages.append({"role": "user", "content": f"Document {turn}: " + PARAGRAPH * args.paragraphs})
            ttft, seconds, answer, prompt_tokens = ask(server.url, messages, args.answer_tokens, bias)
            print(f"  turn {turn}: {prompt_tokens} prompt tokens, first text after {ttft:.1f} s, "
                  f"answered in {seconds:.1f} s", flush=True)
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": "总结一下上面的文件。Summarize them briefly."})
        warm_ttft, _, warm_answer, prompt_tokens = ask(server.url, messages, 8, bias)
        stats = httpx.get(server.url + "/health").json()["prefix_cache"]
    with BackgroundServer(app(0.0)) as server:
        cold_ttft, _, cold_answer, _ = ask(server.url, messages, 8, bias)
    print(f"\nturn {args.turns}: {prompt_tokens} prompt tokens; load average after: {os.getloadavg()[0]:.2f}")
    print(f"prefix cache: {stats['blocks']} blocks, {stats['bytes'] / 2**20:.0f} MiB, "
          f"{stats['hit_tokens']} of {stats['prompt_tokens']} prompt tokens served from it")
    print("prefix cache | time to first token of the last turn")
    print("-----------: | ----------------------------------:")
    print(f"          on | {warm_ttft:8.2f} s")
    print(f"         off | {cold_ttft:8.2f} s")
    print(f"ratio off/on: {cold_ttft / warm_ttft:.1f}x; same greedy answer: {warm_answer == cold_answer}")
    if warm_answer != cold_answer:
        raise SystemExit("the answers differ: the prefix cache changed the result")


if __name__ == "__main__":
    main()
