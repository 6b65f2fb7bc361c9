"""Prompt-sized products (many rows of x): glmchat's int8/int4 prompt kernels against what a prompt
would take without them (the weight dequantized into a buffer, int4 by glmchat's C kernel, then
PyTorch's bf16 GEMM) and against a bf16 weight through the same GEMM, per ChatGLM3-6B layer shape, as GOP/s (2·M·N·K operations per product).

These products are bound by arithmetic, not memory, so no copies of the weights are cycled; the
three take turns within each pass (best of --passes), so a noisy moment on a shared host hits them
alike.

    python3 benchmarks/prompt_kernels.py [--rows 64 512] [--threads 2] [--group-size 128]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from gemv_kernels import SHAPES, per_call
from glmchat.kernels import cpu as cpu_kernels
from glmchat.kernels import install
from glmchat.quantize import Int4Linear, Int8Linear


def layers(n: int, k: int, group_size: int):
    """(name, quantized layer with glmchat's CPU paths installed) per format, the same random weight in each."""
    weight = torch.randn(n, k) * 0.02
    int8 = Int8Linear(k, n, dtype=torch.bfloat16)
    int8.set_weight(weight)
    int4 = Int4Linear(k, n, group_size=group_size, dtype=torch.bfloat16)
    int4.set_weight(weight)
    return weight.bfloat16(), [("int8", install(int8)), (f"int4 g{group_size}", install(int4))]


def prompt_kernel(layer):
    if layer.method == "int8":
        return lambda x: cpu_kernels.int8_gemm(x, layer.qweight, layer.scales)
    return lambda x: cpu_kernels.int4_gemm(x, layer.qweight, layer.scales_zeros, layer.group_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512], help="rows of x (prompt tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not cpu_kernels.available():
        raise SystemExit(f"glmchat's C kernels are unavailable here: {cpu_kernels.unavailable_reason()}")
    print(f"{platform.processor() or platform.machine()}, AMX: {cpu_kernels.HAS_AMX}, threads={args.threads}, "
          f"torch {torch.__version__}\n")
    print(f"{'shape':>13} {'rows':>5} {'format':>9} | {'kernel ms':>9} {'GOP/s':>6} | {'deq+GEMM ms':>11} {'GOP/s':>6} "
          f"| {'bf16 ms':>8} {'GOP/s':>6} | kernel ÷ bf16")
    for n, k in SHAPES[:4]:  # the layers' shapes (the output layer sees one row per prompt)
        bf16_weight, quantized = layers(n, k, args.group_size)
        for rows in args.rows:
            x = torch.randn(rows, k).bfloat16()
            ops = 2 * rows * n * k
            for name, layer in quantized:
                jobs = [
                    (prompt_kernel(layer), [(x,)]),
                    (layer._dequantized_linear, [(x,)]),  # the path prompts take where the kernels do not apply
                    (lambda x: F.linear(x, bf16_weight), [(x,)]),
                ]
                kernel, dequantized, bf16 = per_call(jobs, passes=args.passes)
                print(f"{n:>6}×{k:<6} {rows:>5} {name:>9} | {kernel * 1e3:9.1f} {ops / kernel / 1e9:6.0f} | "
                      f"{dequantized * 1e3:11.1f} {ops / dequantized / 1e9:6.0f} | {bf16 * 1e3:8.1f} "
                      f"{ops / bf16 / 1e9:6.0f} | {bf16 / kernel:.2f}×", flush=True)


if __name__ == "__main__":
    main()
