"""Batch-1 matrix-vector speed: glmchat's C kernels (glmchat/kernels/cpu.py) vs the PyTorch ops they
replace, per ChatGLM3-6B layer shape and weight format, as effective bandwidth (bytes of weights
and scales read per second) and as a multiple of the machine's memory read bandwidth B.

Each timing cycles through enough copies of the weight (≥ 1 GB in all) that none stays in the
last-level cache, as in a real decode step. The machine's bandwidth drifts on shared hosts, so
each row also re-measures B (a float32 sum over 1 GB) interleaved with its timings, and ×B is
relative to that row's B; "÷ read" is the kernel's speed over that of a plain sum over the very
bytes it reads (its operands, the same copies, in turns: 1 = as fast as reading them), the figure
the drift moves least.

    flock /tmp/glmchat-cpu.lock python3 benchmarks/gemv_kernels.py [--groups 32 64 128] [--threads 2] [--rows 1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from glmchat.kernels import cpu as cpu_kernels
from glmchat.bench import memory_bandwidth
from glmchat.quantize import quantize_int4, quantize_int8

SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696), (65024, 4096)]
COPY_BYTES = 1 << 30


def per_call(jobs: list, passes: int = 7) -> list[float]:
    """Per job (fn, argument tuples): best over `passes` of the mean seconds per call, going through
    the argument tuples (the weight copies). Jobs take turns within each pass, so a noisy moment
    on a shared machine hits them alike."""
    for fn, calls in jobs:
        fn(*calls[0])  # warm-up (first-use compile, allocations)
    best = [math.inf] * len(jobs)
    for _ in range(passes):
        for i, (fn, calls) in enumerate(jobs):
            start = time.perf_counter()
            for args in calls:
                fn(*args)
            best[i] = min(best[i], (time.perf_counter() - start) / len(calls))
    return best


def formats(n: int, k: int, groups: list[int], rows: int = 1):
    """(name, bytes read, weight tensors, kernel fn, torch fn, positions of the kernel's operands in
    the weight tensors) per format, for x of `rows` rows."""
    x = torch.randn(rows, k).to(torch.bfloat16)
    w = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    if rows == 1:  # the bf16 kernel takes one row
        yield ("bf16", n * k * 2, (w,),
               lambda w: cpu_kernels.bf16_gemv(x, w),
               lambda w: torch.mv(w, x[0]), (0,))
    q, s = quantize_int8(w, torch.bfloat16)
    blocked = cpu_kernels.block_int8(q)  # the kernel's layout (None without the kernels: not timed then)
    yield ("int8", n * k + n * 2, (q, s) if blocked is None else (q, blocked, s),
           lambda q, b, s: cpu_kernels.int8_gemm(x, b, s),
           lambda q, *rest: torch.ops.aten._weight_int8pack_mm(x, q, rest[-1]), (1, 2))
    for g in groups:
        q4, sz = quantize_int4(w, g, torch.bfloat16)
        blocked4 = cpu_kernels.block_int4(q4)
        yield (f"int4 g{g}", n * k // 2 + (k // g) * n * 4,
               (q4, sz) if blocked4 is None else (q4, sz, blocked4, cpu_kernels.block_int4_scales(sz)),
               lambda q, sz, b, bsz, g=g: cpu_kernels.int4_gemm(x, b, bsz, g),
               lambda q, sz, *blocked, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, g, sz), (2, 3))


def plain_read(*tensors: torch.Tensor) -> None:
    """Read every byte of the tensors once, as fast as PyTorch sums (int64 words; the sum itself is
    not used)."""
    for t in tensors:
        words = t.reshape(-1).view(torch.int64) if t.nbytes % 8 == 0 else t
        words.sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (a decode step of this many streams)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not cpu_kernels.available():
        print(f"C kernels unavailable: {cpu_kernels.unavailable_reason()}")
    B = memory_bandwidth()  # best of 5 here; weights were timed the same way, interleaved
    print(f"threads={args.threads}  rows of x={args.rows}  B = {B / 1e9:.1f} GB/s (float32 sum over 4 GB, best of 5)\n")
    probe = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    print(f"{'shape':>13} {'format':>9} {'B':>5} | {'kernel ms':>9} {'GB/s':>6} {'×B':>5} {'÷ read':>6} | {'torch ms':>8} {'GB/s':>6} {'×B':>5} | speed-up")
    for n, k in SHAPES:
        for name, nbytes, weight, kernel, reference, operands in formats(n, k, args.groups, args.rows):
            copies = [weight] + [tuple(t.clone() for t in weight) for _ in range(max(1, math.ceil(COPY_BYTES / nbytes)) - 1)]
            have_kernel = cpu_kernels.available()
            if have_kernel and kernel(*weight) is None:
                raise SystemExit(f"the {name} kernel declined {n}×{k} (its operands' layout?): nothing to time")
            reads = [tuple(c[i] for i in operands) for c in copies] if have_kernel else []
            jobs = [(probe.sum, [()]), (reference, copies)] + ([(kernel, copies), (plain_read, reads)] if have_kernel else [])
            times = per_call(jobs)
            B = probe.nbytes / times[0]
            ref_t, t = times[1], (times[2] if have_kernel else None)
            row = f"{n:>6}×{k:<6} {name:>9} {B / 1e9:5.1f} | "
            if t:
                row += f"{t * 1e3:9.3f} {nbytes / t / 1e9:6.1f} {nbytes / t / B:5.2f} {times[3] / t:6.2f} | "
            else:
                row += f"{'-':>9} {'-':>6} {'-':>5} {'-':>6} | "
            row += f"{ref_t * 1e3:8.3f} {nbytes / ref_t / 1e9:6.1f} {nbytes / ref_t / B:5.2f} | "
            row += f"{ref_t / t:.2f}×" if t else "-"
            print(row, flush=True)
            del copies


if __name__ == "__main__":
    main()
