"""Optional C kernels for CPU: y = x·Wᵀ (+ b) for bf16 rows x, with W in bf16, int8 or int4 (the
layouts of glmchat.quantize). Each row of x goes through the same arithmetic whatever the other
rows are, so a row's result does not depend on how many rows share the call (the server's batch
invariance rests on this). See csrc/gemv.c for the data layouts.

bf16 decode steps (bf16_gemv, a few rows): sums in float32. Integer products (int8 and int4, decode
steps and prompts alike) take x in 8 bits per group of columns (128, or the int4 group), with exact
int32 sums per group and float across groups: each entry of x is off by at most 1/254 of its
group's largest magnitude, as with llama.cpp's 8-bit activations, and each weight costs one
integer product per row of x (a batch of decode rows is compute-bound on few cores), by VNNI or,
on Xeons with AMX, by AMX's tiles from 6 rows of x on (the same sums, so the same results).
int8 and int4 codes are held in blocked layouts (block_int8, block_int4: 4 columns of 16 rows per
lane, the operand of the integer products), so that they stream from memory straight into them
(int4's nibbles taken apart in registers). The weights are never dequantized as a whole.

The C source for this CPU is compiled at first use with the system compiler (`$CC`, `cc` or `gcc`,
-O3 -march=native -fopenmp) into the user cache (~/.cache/glmchat/kernels) and loaded with
ctypes: csrc/gemv.c where the CPU has AVX-512 (F, BW, BF16, VBMI, VNNI), else csrc/gemv_avx2.c
where it has AVX2 and FMA (the same kernels and layouts but the decode steps' attention, which
stays PyTorch's there). Anything that goes wrong (no compiler, an older CPU,
another platform, GLMCHAT_NO_KERNELS=1) leaves the kernels unavailable: every function then
returns None and the callers use PyTorch's ops instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# Each kernel source and the CPU flags (/proc/cpuinfo's names) it needs, the widest first.
SOURCES = {CSRC / "gemv.c": {"avx512f", "avx512bw", "avx512_bf16", "avx512vbmi", "avx512_vnni"},
           CSRC / "gemv_avx2.c": {"avx2", "fma"}}
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
enabled = os.environ.get("GLMCHAT_NO_KERNELS", "") in ("", "0")  # tests and users may switch it off

_lib: ctypes.CDLL | None = None
_source: Path | None = None  # the kernel source _lib was compiled from
_provided: set[str] = set()  # the functions of _SIGNATURES it has
_loaded = False
_lock = threading.Lock()
_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "glm_gemv_bf16": (_int, [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]),
    "glm_block_int8": (None, [_ptr, _ptr, _i64, _i64, _int]),
    "glm_block_int4": (None, [_ptr, _ptr, _i64, _i64, _int]),
    "glm_gemm_int8": (_int, [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]),
    "glm_gemm_int4": (_int, [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int]),
    "glm_rotary_heads": (_int, [_ptr] * 5 + [_i64] * 5),
    "glm_swiglu": (_int, [_ptr, _ptr, _i64, _i64, _int]),
    "glm_rmsnorm": (_int, [_ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float, _int]),
    "glm_decode_attention": (_int, [_ptr] * 5 + [_i64] * 6 + [ctypes.c_float, _int]),
    "glm_decode_block": (_int, [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _int]),
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glmchat" / "kernels"


def cpu_fields() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU ("model name", "vendor_id", "flags", ...), empty where
    there is no such file."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu.splitlines())}


_CPU = cpu_fields()
_FLAGS = set(_CPU.get("flags", platform.processor()).split())
# gemv.c's INT4_ONE_ROW_PREFETCH: off where the CPU's own prefetchers followed one row's stream of
# int4 codes faster (AMD: a Zen 4 EPYC), on elsewhere (a Xeon with AMX); see csrc/common.h.
DEFINES = ["-DINT4_ONE_ROW_PREFETCH=0"] if _CPU.get("vendor_id") == "AuthenticAMD" else []
HAS_AMX = "amx_bf16" in _FLAGS
# An x86 CPU without bf16 instructions (AVX2; AVX-512 before BF16), where PyTorch's bf16 matrix
# products run at a fraction of its float32 ones (measured on AVX2, glmchat.kernels.linear.float32_linear;
# taken to hold for AVX-512 without BF16, where PyTorch emulates bf16 too).
SLOW_BF16_MATMUL = "sse2" in _FLAGS and not _FLAGS & {"avx512_bf16", "amx_bf16"}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout


def _candidates() -> list[Path]:
    """The kernel sources this CPU can run, the widest first (all of them where its flags are unknown:
    the compiler's -march=native then decides); GLMCHAT_KERNELS=avx2 keeps gemv_avx2.c alone (tests
    check it on AVX-512 CPUs too)."""
    known = "sse2" in _FLAGS
    sources = [source for source, needs in SOURCES.items() if not known or needs <= _FLAGS]
    if os.environ.get("GLMCHAT_KERNELS") == "avx2":
        sources = [source for source in sources if source.name == "gemv_avx2.c"]
    return sources


def _build() -> tuple[Path, Path]:
    """(source, compiled library) of the first candidate source that compiles, compiling it into the
    cache unless already there."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found")
    sources = _candidates()
    if not sources:
        raise RuntimeError("this CPU has neither AVX-512 (F, BW, BF16, VBMI, VNNI) nor AVX2 and FMA")
    errors = []
    for source in sources:
        try:
            return source, _compiled(cc, source)
        except RuntimeError as exc:
            errors.append(str(exc))
    raise RuntimeError("; ".join(errors))


def _compiled(cc: str, source: Path) -> Path:
    code = b"".join(path.read_bytes() for path in [source, *sorted(CSRC.glob("*.h"))])
    key = hashlib.sha256(b"\0".join(
        [code, " ".join(CFLAGS + DEFINES).encode(), _compiler_version(cc).encode(), " ".join(sorted(_FLAGS)).encode()]
    )).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([cc, *CFLAGS, *DEFINES, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: concurrent first uses each publish a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    if _loaded:
        return _lib
    with _lock:
        if not _loaded:
            _lib = _try_load()
            _loaded = True
    return _lib


def _try_load() -> ctypes.CDLL | None:
    if sys.platform not in ("linux", "darwin") or platform.machine().lower() not in ("x86_64", "amd64"):
        log.debug("glmchat CPU kernels: not built for %s/%s", sys.platform, platform.machine())
        return None
    try:
        global _source, _provided
        _source, built = _build()
        lib = ctypes.CDLL(str(built))
        _provided = {name for name in _SIGNATURES if hasattr(lib, name)}
        for name in _provided:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = _SIGNATURES[name]
        return lib
    except Exception as exc:  # never break a run: fall back to PyTorch's ops
        log.debug("glmchat CPU kernels unavailable: %s", exc)
        return None


def available() -> bool:
    return enabled and _load() is not None


def provides(name: str) -> bool:
    """Whether the kernels are available and include `name` (each source's build lists what it has)."""
    return available() and name in _provided


def kernel_source() -> str | None:
    """The name of the kernel source this CPU runs (for benchmarks' reports), None without kernels."""
    return _source.name if available() else None


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here (None when they can)."""
    if not enabled:
        return "disabled (GLMCHAT_NO_KERNELS or glmchat.kernels.cpu.enabled = False)"
    if _load() is None:
        try:
            _build()
        except Exception as exc:
            return str(exc)
        return "not supported on this platform"
    return None


def on_cpu(module: torch.nn.Module) -> bool:
    """Whether a layer's tensors are on the CPU (where these kernels and their callers apply)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor is not None and tensor.device.type == "cpu"


def _grad_wanted(*tensors: torch.Tensor) -> bool:
    """Whether autograd would track these inputs (the kernels leave it to PyTorch's ops then)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _usable(x: torch.Tensor, k: int, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernels apply: bf16 CPU rows of k values, contiguous CPU operands."""
    if not enabled or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[-1] != k:
        return False
    if _grad_wanted(x):
        return False
    return all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors) and _load() is not None


def _row(x: torch.Tensor) -> torch.Tensor:
    """x contiguous (the caller must hold the result while the kernel reads it)."""
    return x if x.is_contiguous() else x.contiguous()


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bf16_or_none(t: torch.Tensor | None) -> bool:
    return t is None or t.dtype == torch.bfloat16


def _call(kernel, x: torch.Tensor, weights: tuple, sizes: tuple) -> torch.Tensor | None:
    """y [..., N] = kernel(x, *weights, y, rows, *sizes) where sizes = (N, K[, group]); None when
    the kernel declines (non-finite x, an unsupported shape, no memory)."""
    y = torch.empty(*x.shape[:-1], sizes[0], dtype=torch.bfloat16)
    x = _row(x)
    rc = kernel(x.data_ptr(), *weights, y.data_ptr(), x.numel() // x.shape[-1], *sizes, torch.get_num_threads())
    return y if rc == 0 else None


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] · weight[N, K]ᵀ + bias, all bf16, as a [..., N] bf16 tensor; None when the kernel
    does not apply (unavailable, other dtypes). The weights are read once for all rows of x, but each
    row costs a pass over them from cache: for the few rows of decode steps, not for prompts."""
    N, K = weight.shape
    if not (_usable(x, K, weight, bias) and weight.dtype == torch.bfloat16 and _bf16_or_none(bias)):
        return None
    return _call(_lib.glm_gemv_bf16, x, (weight.data_ptr(), _addr(bias)), (N, K))


def block_int8(codes: torch.Tensor) -> torch.Tensor | None:
    """int8 codes [N, K] (row-major) in the blocked layout int8_gemm reads: uint8
    [ceil(N/64), ceil(K/4), 256], byte (b, t, 4r + j) = codes[64b + r, 4t + j] + 128 (128 past N or
    K); None where the kernels are unavailable."""
    N, K = codes.shape
    if not (enabled and codes.device.type == "cpu" and codes.dtype == torch.int8 and _load() is not None):
        return None
    codes = _row(codes)
    blocked = torch.empty(-(-N // 64), -(-K // 4), 256, dtype=torch.uint8)
    _lib.glm_block_int8(codes.data_ptr(), blocked.data_ptr(), N, K, torch.get_num_threads())
    return blocked


def unblock_int8(blocked: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The row-major int8 codes [N, K] of a blocked tensor (any device: PyTorch's ops)."""
    words = blocked.view(torch.int32).view(blocked.shape[0], blocked.shape[1], 64) ^ -0x7F7F7F80  # - 128 per byte
    rows = words.transpose(1, 2).reshape(-1).view(torch.int8).view(blocked.shape[0] * 64, -1)
    return rows[:N, :K].contiguous()


def int8_gemm(x: torch.Tensor, blocked: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every int8 product, decode steps and prompts: bf16 x [..., K] times int8 codes in the blocked
    layout of block_int8 with bf16 scales [N] (+ bias), x in 8 bits per group of 128 columns:
    [..., N] bf16, or None."""
    N, K = scales.shape[0], x.shape[-1]
    if not (_usable(x, K, blocked, scales, bias) and blocked.dtype == torch.uint8
            and tuple(blocked.shape) == (-(-N // 64), -(-K // 4), 256)
            and scales.dtype == torch.bfloat16 and _bf16_or_none(bias)):
        return None
    return _call(_lib.glm_gemm_int8, x, (blocked.data_ptr(), scales.data_ptr(), _addr(bias)), (N, K))


def block_int4(packed: torch.Tensor) -> torch.Tensor | None:
    """int4 codes in PyTorch's CPU layout (uint8 [N, K/2], N a multiple of 64, K of 4) in the blocked
    layout int4_gemm reads: uint8 [N/64, K/4, 128], each 128 bytes of the packed layout (4 columns of
    a 64-row block) reordered by INT4_ORDER; None where the kernels are unavailable."""
    N, K = packed.shape[0], packed.shape[1] * 2
    if not (enabled and packed.device.type == "cpu" and packed.dtype == torch.uint8 and N % 64 == 0 and K % 4 == 0
            and _load() is not None):
        return None
    packed = _row(packed)
    blocked = torch.empty(N // 64, K // 4, 128, dtype=torch.uint8)
    _lib.glm_block_int4(packed.data_ptr(), blocked.data_ptr(), N, K, torch.get_num_threads())
    return blocked


# Byte 64i + 4j + c of a blocked 128-byte chunk is byte 32c + 16i + j of the packed layout's (column
# c of 4, rows 16i + j and 32 + 16i + j): see csrc/gemv.c.
INT4_ORDER = torch.tensor([32 * c + 16 * i + j for i in range(2) for j in range(16) for c in range(4)])


def unblock_int4(blocked: torch.Tensor) -> torch.Tensor:
    """The codes [N, K/2] in PyTorch's CPU int4 layout of a blocked tensor (any device: PyTorch's ops)."""
    packed = torch.empty_like(blocked)
    packed.view(-1, 128)[:, INT4_ORDER.to(blocked.device)] = blocked.view(-1, 128)
    return packed.view(blocked.shape[0] * 64, -1)


def block_int4_scales(scales_zeros: torch.Tensor) -> torch.Tensor:
    """int4 scales_zeros [K/group, N, 2] in the blocked layout int4_gemm reads: [N/64, K/group, 64, 2],
    each 64-row block's scales together in the order its groups are read (any device)."""
    groups, N, _ = scales_zeros.shape
    return scales_zeros.view(groups, N // 64, 64, 2).transpose(0, 1).contiguous()


def unblock_int4_scales(blocked: torch.Tensor) -> torch.Tensor:
    """scales_zeros [K/group, N, 2] of blocked ones (any device)."""
    blocks, groups = blocked.shape[:2]
    return blocked.transpose(0, 1).reshape(groups, blocks * 64, 2)


def int4_gemm(x: torch.Tensor, blocked: torch.Tensor, scales_zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every int4 product, decode steps and prompts: bf16 x [..., K] times int4 codes in the blocked
    layout of block_int4 with bf16 scales_zeros in that of block_int4_scales [N/64, K/group, 64, 2]
    (+ bias), x in 8 bits per quantization group (a multiple of 4 up to 128): [..., N] bf16, else
    None."""
    N, K = scales_zeros.shape[0] * 64, x.shape[-1]
    if not (_usable(x, K, blocked, scales_zeros, bias) and blocked.dtype == torch.uint8
            and tuple(blocked.shape) == (N // 64, K // 4, 128)
            and scales_zeros.dtype == torch.bfloat16 and _bf16_or_none(bias)
            and group_size % 4 == 0 and group_size <= 128
            and tuple(scales_zeros.shape) == (N // 64, K // group_size, 64, 2) and K % group_size == 0):
        return None
    return _call(_lib.glm_gemm_int4, x, (blocked.data_ptr(), scales_zeros.data_ptr(), _addr(bias)), (N, K, group_size))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                     scale: float) -> torch.Tensor | None:
    """A decode step's attention, bf16: q [B, H, 1, D] over k and v [B, G, S, D] (views of a cache:
    rows and heads at any stride, each head's slots contiguous), row b over its first lengths[b]
    keys, query heads g*H/G.. reading KV head g. [B, H, 1, D], or None where it does not apply
    (then PyTorch's ops)."""
    B, H, T, D = q.shape
    if not (enabled and T == 1 and q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and k.shape == v.shape and k.stride() == v.stride()
            and k.stride(3) == 1 and k.stride(2) == D and len(lengths) == B
            and max(lengths) <= k.shape[2] and not _grad_wanted(q, k, v) and provides("glm_decode_attention")):
        return None
    q = _row(q)
    out = torch.empty_like(q)
    rows = torch.tensor(lengths, dtype=torch.int64)
    rc = _lib.glm_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), rows.data_ptr(), out.data_ptr(), B, H,
                                   k.shape[1], D, k.stride(0), k.stride(1), scale, torch.get_num_threads())
    return out if rc == 0 else None


def rotary_heads(qkv: torch.Tensor, rope: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """A decode step's fused projection qkv [B, 1, (heads + 2 kv_heads) * head_dim] split into
    q [B, heads, 1, head_dim], k and v [B, kv_heads, 1, head_dim], q and k rotated by rope
    [B, 1, rot/2, 2] (see glmchat.model.apply_rotary), bit for bit as PyTorch's bf16 ops do it;
    None where it does not apply."""
    B = qkv.shape[0]
    if not (enabled and qkv.dim() == 3 and qkv.shape[1] == 1 and qkv.shape[2] == (heads + 2 * kv_heads) * head_dim
            and qkv.dtype == rope.dtype == torch.bfloat16 and qkv.device.type == rope.device.type == "cpu"
            and rope.shape[:2] == (B, 1) and not _grad_wanted(qkv) and provides("glm_rotary_heads")):
        return None
    qkv, rope = _row(qkv), _row(rope)
    q = torch.empty(B, heads, 1, head_dim, dtype=torch.bfloat16)
    k, v = (torch.empty(B, kv_heads, 1, head_dim, dtype=torch.bfloat16) for _ in range(2))
    rc = _lib.glm_rotary_heads(qkv.data_ptr(), rope.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), B, heads,
                               kv_heads, head_dim, rope.shape[2] * 2)
    return (q, k, v) if rc == 0 else None


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for h = [..., gate | up] in bf16, as F.silu(gate) * up computes it (silu
    rounded to bf16, then the product) up to the last bit of the silu's exponential; None where it
    does not apply."""
    if not (enabled and h.dtype == torch.bfloat16 and h.device.type == "cpu" and h.shape[-1] % 2 == 0
            and not _grad_wanted(h) and provides("glm_swiglu")):
        return None
    h = _row(h)
    F = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], F, dtype=torch.bfloat16)
    _lib.glm_swiglu(h.data_ptr(), y.data_ptr(), h.numel() // h.shape[-1], F, torch.get_num_threads())
    return y


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of bf16 rows x [..., D] with a bf16 weight [D], as glmchat.model.RMSNorm computes it
    (float32, the same order of operations; the sum of squares in another order); None where it
    does not apply."""
    D = x.shape[-1]
    if not (enabled and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.shape == (D,) and weight.is_contiguous() and not _grad_wanted(x, weight) and provides("glm_rmsnorm")):
        return None
    x = _row(x)
    y = torch.empty_like(x)
    _lib.glm_rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // D, D, eps, torch.get_num_threads())
    return y


class Product(ctypes.Structure):
    """A decode product's operands for glm_decode_block (csrc/decode_block.h's glm_product): kind
    BF16 (w: a bf16 weight [N, K]), INT8 or INT4 (w: blocked codes, scales their blocked scales),
    each with an optional bf16 bias."""

    BF16, INT8, INT4 = 0, 1, 2
    _fields_ = [("kind", _i64), ("w", _ptr), ("scales", _ptr), ("bias", _ptr), ("N", _i64), ("K", _i64), ("G", _i64)]

    @classmethod
    def of(cls, kind: int, w: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None, N: int, K: int,
           G: int = 0) -> Product:
        return cls(kind, w.data_ptr(), _addr(scales), _addr(bias), N, K, G)


class BlockOperands(ctypes.Structure):
    """A Block's weights, sizes and this layer's cache for glm_decode_block (csrc/decode_block.h)."""

    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("post_attn_norm", _ptr), ("post_mlp_norm", _ptr),
                ("qkv", Product), ("dense", Product), ("gate_up", Product), ("down", Product),
                ("k_cache", _ptr), ("v_cache", _ptr), ("rows", _i64), ("slots", _i64), ("row_stride", _i64),
                ("head_stride", _i64),
                ("H", _i64), ("G", _i64), ("D", _i64), ("rot", _i64), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def decode_block(x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, operands: BlockOperands) -> torch.Tensor | None:
    """One decode step of a whole block (see csrc/decode_block.h) for bf16 rows x [B, 1, hidden]:
    row b's key and value go to slot positions[b] (int64 [B]) of the cache in `operands`, rope is
    [B, 1, rot/2, 2] bf16 at those positions. The block's output [B, 1, hidden], or None where a
    kernel declines (the cache slots may have been written: the caller's other way rewrites them)."""
    B = x.shape[0]
    if not (enabled and x.dtype == rope.dtype == torch.bfloat16 and x.is_contiguous() and rope.is_contiguous()
            and rope.shape[:2] == (B, 1) and positions.shape == (B,) and positions.dtype == torch.int64
            and positions.is_contiguous() and provides("glm_decode_block")):
        return None
    y = torch.empty_like(x)
    rc = _lib.glm_decode_block(ctypes.byref(operands), x.data_ptr(), y.data_ptr(), rope.data_ptr(), positions.data_ptr(),
                               B, torch.get_num_threads())
    return y if rc == 0 else None
