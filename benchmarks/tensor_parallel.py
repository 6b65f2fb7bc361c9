"""Tensor parallelism: each rank's peak memory and the decode/prefill speed at N = 1, 2, ... ranks.

Launches `torchrun --nproc-per-node N` of this script for each N (on the CPU: gloo, the cores split
among the ranks), every rank drawing only its share of full-size random ChatGLM3-6B weights (bf16;
--quantize int8/int4: the whole model's quantization, split).
Each run: a --prompt-tokens prompt prefilled, then --new-tokens decoded greedily; rank 0 reports the
speeds, every rank its peak resident memory (VmHWM). Prints one table and, with --json, the numbers.

    flock /tmp/glmchat-bigmem.lock python benchmarks/tensor_parallel.py --ranks 1 2
    python benchmarks/tensor_parallel.py --quantize int4 --group-size 64   # 2 ranks need whole groups: 6848 units each
"""

import argparse
import json
import os
import subprocess
import sys
import time


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from glmchat.bench import peak_rss_bytes
    from glmchat.generate import generate_tokens, prefill
    from glmchat.loader import load_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = load_model(args.model, dtype="bfloat16", random_weights=True, progress=False,
                       shard=(rank, world) if world > 1 else None, quantize=args.quantize, group_size=args.group_size)[0]
    prompt = torch.randint(5, 60000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dist.barrier()
        start = time.perf_counter()
        prefill(model, prompt, model.new_cache(1, args.prompt_tokens))
        prefill_seconds = time.perf_counter() - start
        ids = prompt[0, :64].tolist()
        list(generate_tokens(model, ids, max_new_tokens=2))  # warm-up
        dist.barrier()
        start = time.perf_counter()
        tokens = list(generate_tokens(model, ids, max_new_tokens=args.new_tokens))
        decode_seconds = time.perf_counter() - start
    peaks = [None] * world
    dist.all_gather_object(peaks, peak_rss_bytes())
    if rank == 0:
        print(json.dumps({"ranks": world, "threads_per_rank": torch.get_num_threads(),
                          "prefill_tok_s": args.prompt_tokens / prefill_seconds,
                          "decode_tok_s": len(tokens) / decode_seconds, "peak_rss_gb": [p / 2**30 for p in peaks],
                          "first_tokens": tokens[:8]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="THUDM/chatglm3-6b", help="a known hub id (random weights of its shape)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_main:
        return rank_main(args)
    results = []
    for n in args.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), __file__, "--rank-main",
               "--model", args.model, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--group-size", str(args.group_size), *(["--quantize", args.quantize] if args.quantize else [])]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{n} ranks failed:\n{run.stderr[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"  {n} rank(s): done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    weights = args.quantize + (f" g{args.group_size}" if args.quantize == "int4" else "") if args.quantize else "bf16"
    print(f"{args.model}, random weights, {weights}, CPU ({os.cpu_count()} cores), gloo; "
          f"prefill {args.prompt_tokens} tokens, decode {args.new_tokens} greedy")
    print("ranks | threads/rank | peak memory per rank, GB | prefill tok/s | decode tok/s | same tokens as 1 rank")
    print("----: | -----------: | -----------------------: | ------------: | -----------: | --------------------:")
    for r in results:
        same = r["first_tokens"] == results[0]["first_tokens"]
        print(f"{r['ranks']:5d} | {r['threads_per_rank']:12d} | {', '.join(f'{p:.1f}' for p in r['peak_rss_gb']):>24} | "
              f"{r['prefill_tok_s']:13.1f} | {r['decode_tok_s']:12.2f} | {str(same):>20}")


if __name__ == "__main__":
    main()
