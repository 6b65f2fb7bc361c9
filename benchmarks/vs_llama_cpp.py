"""glmchat against llama.cpp on the CPU, side by side, on the same random ChatGLM3-6B weights.

The peer people pick for running a 6B model on a CPU is llama.cpp, so speed is judged against it,
on this machine, in the same minutes. This script:
  1. writes glmchat's full-size random weights (seeded, the ones `--random-weights` gives) as a
     float16 GGUF in llama.cpp's "chatglm" layout (benchmarks/to_gguf.py), and quantizes that file
     to q4_0 and q8_0 with llama.cpp's own quantizer (llama-cpp-python); the files are kept in
     --workdir and reused by later runs;
  2. runs each precision pair in turn (glmchat int4 g128 / llama.cpp q4_0, int8 / q8_0, bf16 / f16),
     one engine after the other, each in its own process: batch 1, greedy, a 16-token warm-up, then
     per repeat a 512-token prefill and a 64-token prompt with --new-tokens new tokens (best of the
     repeats), the memory read bandwidth B measured in the same process right before and after
     each of those decodes (on shared hosts B moves by 2× within minutes);
  3. prints decode tokens/s (and × B: bytes of weights read per token × tokens/s over B), prefill
     tokens/s at 64 and 512 tokens, time to first token of the 64-token prompt, peak RSS, and
     glmchat's speed over llama.cpp's for each; the bf16/f16 pair also compares the two engines'
     logits of one prompt (same weights, so they must agree: that checks the GGUF layout).

    pip install -e ".[compare]"       # llama-cpp-python builds llama.cpp from source (-march=native)
    python benchmarks/vs_llama_cpp.py  # full size: ~13 GB of RAM at a time, ~23 GB of disk, ~20 min

--busy-core runs a busy loop on core 0 next to every run (a user's machine is never idle);
--context N adds decoding after an N-token prompt (a long conversation); --layers N makes a quick
run on N of the 28 layers.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# pair -> (glmchat format, llama.cpp format)
PAIRS = {"int4": ("int4", "q4_0"), "int8": ("int8", "q8_0"), "bf16": ("bf16", "f16")}
QUANTIZED = ("q4_0", "q8_0")  # llama.cpp formats made from the f16 file by its quantizer
WARMUP_TOKENS = 16


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="precision pairs to run, in order")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated after the 64-token prompt")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="the long prompt's length")
    ap.add_argument("--context", type=int, default=0,
                    help="also measure decoding after a prompt of this many tokens (attention over a long cache)")
    ap.add_argument("--repeats", type=int, default=2, help="measured rounds per run (best taken)")
    ap.add_argument("--group-size", type=int, default=128, help="glmchat's int4 group size")
    ap.add_argument("--layers", type=int, help="fewer layers than the real 28, for a quick check")
    ap.add_argument("--busy-core", action="store_true", help="a busy loop on core 0 during every run")
    ap.add_argument("--workdir", default=str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                              / "glmchat" / "vs_llama_cpp"), help="where the GGUF files are kept")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--worker", choices=["glmchat", "llama.cpp", "gguf"], help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def chatglm3_config(layers: int | None):
    from glmchat.config import GLMConfig
    from glmchat.hub import DEFAULT_MODEL
    from glmchat.registry import KNOWN_CONFIGS

    return GLMConfig.from_dict(dict(KNOWN_CONFIGS[DEFAULT_MODEL], **({"num_layers": layers} if layers else {})))


# ---------------------------------------------------------------------------------------------
# One engine's run, in its own process: the same protocol for both


class GlmchatEngine:
    def __init__(self, args):
        import torch

        from roofline import bytes_per_token, glmchat_model

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.model = glmchat_model(chatglm3_config(args.layers), args.format, args.group_size)
        self.label = f"glmchat {args.format}" + (f" g{args.group_size}" if args.format == "int4" else "")
        self.bytes_per_token = bytes_per_token(self.model)

    def timed(self, prompt: list[int], new_tokens: int):
        from glmchat.bench import time_generation

        return time_generation(self.model, prompt, new_tokens)[0]

    def logits(self, prompt: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([prompt]), last_only=True)[0, -1]
        return out.float().numpy()


class LlamaCppEngine:
    def __init__(self, args):
        import gguf
        import llama_cpp

        self.llama_cpp = llama_cpp
        context = max(args.prefill_tokens, args.context, 64) + args.new_tokens + 8
        self.llm = llama_cpp.Llama(model_path=args.file, n_ctx=context, n_batch=args.prefill_tokens,
                                   n_ubatch=args.prefill_tokens, n_threads=args.threads,
                                   n_threads_batch=args.threads, verbose=False)
        self.label = f"llama.cpp {args.format}"
        tensors = gguf.GGUFReader(args.file).tensors
        self.bytes_per_token = sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight")

    def _last_logits(self, tokens: list[int]) -> np.ndarray:
        """Run tokens after what the cache holds; the last one's logits (a view into llama.cpp's buffer)."""
        self.llm.eval(tokens)
        return np.ctypeslib.as_array(self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def timed(self, prompt: list[int], new_tokens: int):
        from glmchat.bench import Timing

        self.llm.reset()  # eval() drops the cache past the first position it writes
        start = time.perf_counter()
        token = int(np.argmax(self._last_logits(prompt)))
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = int(np.argmax(self._last_logits([token])))
        return Timing(len(prompt), new_tokens, first - start, time.perf_counter() - first)

    def logits(self, prompt: list[int]) -> np.ndarray:
        self.llm.reset()  # eval() drops the cache past the first position it writes
        return np.array(self._last_logits(prompt), dtype=np.float32)


def run_worker(args) -> dict:
    from glmchat.bench import peak_rss_bytes, random_prompt
    from roofline import BANDWIDTH_BUFFER_BYTES, bandwidth

    engine = (GlmchatEngine if args.worker == "glmchat" else LlamaCppEngine)(args)
    vocab = chatglm3_config(args.layers).padded_vocab_size - 1000
    engine.timed(random_prompt(WARMUP_TOKENS, vocab, seed=999), 4)
    long_ttft, short, around = [], [], []
    for r in range(args.repeats):
        long_ttft.append(engine.timed(random_prompt(args.prefill_tokens, vocab, seed=r), 1).ttft_s)
        if r == 0:  # the engine's peak (loaded, past its longest prompt), before B's buffer adds to it
            peak_rss = peak_rss_bytes()
        before = bandwidth()
        short.append(engine.timed(random_prompt(64, vocab, seed=100 + r), args.new_tokens))
        around.append((before + bandwidth()) / 2)
    best = max(range(args.repeats), key=lambda r: short[r].decode_tok_s)
    long_context = [engine.timed(random_prompt(args.context, vocab, seed=200 + r), args.new_tokens)
                    for r in range(args.repeats)] if args.context else []
    if args.logits:
        np.save(args.logits, engine.logits(random_prompt(64, vocab, seed=100)))
    return {"engine": args.worker, "label": engine.label, "format": args.format,
            "bytes_per_token": engine.bytes_per_token,
            "decode_tok_s": short[best].decode_tok_s, "B": around[best], "B_samples": around,
            "ttft64_s": min(t.ttft_s for t in short),
            "prefill64_tok_s": max(t.prefill_tok_s for t in short),
            "prefill_long_tok_s": args.prefill_tokens / min(long_ttft),
            "decode_after_context_tok_s": max((t.decode_tok_s for t in long_context), default=None),
            "peak_rss_bytes": max(peak_rss, peak_rss_bytes() - BANDWIDTH_BUFFER_BYTES)}


def write_random_gguf(args) -> dict:
    """Worker: glmchat's random bf16 model of the real shapes, written as a float16 GGUF."""
    from roofline import glmchat_model
    from to_gguf import write_gguf

    model = glmchat_model(chatglm3_config(args.layers), "bf16", args.group_size)
    partial = Path(args.file + ".partial")
    write_gguf(model, Path(__file__).resolve().parents[1] / "glmchat" / "data" / "standin-tokenizer.model", partial)
    partial.rename(args.file)
    return {"file": args.file}


# ---------------------------------------------------------------------------------------------
# The parent: files, interleaved runs, the table


def require_extras() -> None:
    missing = [name for name, module in (("llama-cpp-python", "llama_cpp"), ("gguf", "gguf"))
               if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"vs_llama_cpp: {' and '.join(missing)} not installed; run: pip install -e \".[compare]\"")


def llama_cpp_crash_hint(returncode: int) -> str:
    """What to do when llama.cpp died of a segfault on a CPU with AMX: its AMX path crashes on some
    (ggml-org/llama.cpp#20824; llama-cpp-python 0.3.36 did here at its first prompt)."""
    from importlib.metadata import version

    from glmchat.kernels.cpu import cpu_fields

    if returncode != -11 or "amx_int8" not in cpu_fields().get("flags", "").split():
        return ""
    no_amx = "-mno-amx-tile -mno-amx-int8"
    return ("\nOn this Xeon with AMX that is most likely llama.cpp's AMX path, which crashes on some of them "
            "(ggml-org/llama.cpp#20824, ggml_backend_amx_mul_mat). Build llama-cpp-python without it (its "
            "AVX-512 kernels stay):\n"
            f"  CMAKE_ARGS=\"-DCMAKE_C_FLAGS='{no_amx}' -DCMAKE_CXX_FLAGS='{no_amx}'\" "
            f"pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python=={version('llama-cpp-python')}")


def child(args, worker: str, fmt: str, file: str | None = None, logits: str | None = None) -> dict:
    """Run one worker process and return its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--format", fmt,
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
           "--prefill-tokens", str(args.prefill_tokens), "--context", str(args.context), "--repeats", str(args.repeats),
           "--group-size", str(args.group_size)]
    cmd += (["--layers", str(args.layers)] if args.layers else []) + (["--file", file] if file else [])
    cmd += ["--logits", logits] if logits else []
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        hint = llama_cpp_crash_hint(out.returncode) if worker == "llama.cpp" else ""
        sys.exit(f"vs_llama_cpp: the {worker} {fmt} run failed (exit {out.returncode}); its error is above{hint}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextmanager
def busy_core(enabled: bool):
    """A spinning process pinned to core 0, for the length of the block."""
    if not enabled:
        yield
        return
    spin = subprocess.Popen([sys.executable, "-c",
                             "import os\ntry: os.sched_setaffinity(0, {0})\nexcept (AttributeError, OSError): pass\n"
                             "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spin.kill()
        spin.wait()


def gguf_files(args, workdir: Path) -> dict[str, Path]:
    """The float16 GGUF and its q4_0/q8_0 quantizations, written unless already there. The names carry
    a checksum of the code that makes the weights, so a change there makes new files."""
    key = zlib.crc32(b"".join(p.read_bytes() for p in (HERE / "to_gguf.py", HERE.parent / "glmchat" / "random_weights.py")))
    stem = f"chatglm3-6b-random-{args.layers or 28}L-{key:08x}"
    files = {"f16": workdir / f"{stem}-f16.gguf"}
    files.update({fmt: workdir / f"{stem}-{fmt}.gguf" for fmt in QUANTIZED})
    needed = {"f16"} | {PAIRS[p][1] for p in args.pairs}
    if not files["f16"].exists():
        _check_disk(workdir, 2.05 * (args.layers or 28) / 28 * 12.5e9)
        print(f"writing {files['f16']} (glmchat's random weights as float16 GGUF) ...", file=sys.stderr)
        child(args, "gguf", "f16", file=str(files["f16"]))
    for fmt in sorted(needed - {"f16"}):
        if not files[fmt].exists():
            print(f"quantizing to {files[fmt].name} with llama.cpp ...", file=sys.stderr)
            quantize_gguf(files["f16"], files[fmt], fmt, args.threads)
    return files


def _check_disk(workdir: Path, need: float) -> None:
    free = shutil.disk_usage(workdir).free
    if free < need:
        sys.exit(f"vs_llama_cpp: {workdir} has {free / 1e9:.1f} GB free, the GGUF files need ~{need / 1e9:.0f} GB; "
                 f"free some space or pass --workdir")


def quantize_gguf(src: Path, dst: Path, fmt: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt.upper()}")
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"vs_llama_cpp: llama.cpp could not quantize {src} (code {rc})")
    partial.rename(dst)


def machine() -> dict:
    import llama_cpp
    import torch

    from glmchat.kernels.cpu import cpu_fields

    fields = cpu_fields()
    cpu, flags = fields.get("model name", platform.processor() or platform.machine()), set(fields.get("flags", "").split())
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    return {"cpu": cpu, "features": features, "cores": os.cpu_count(), "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def compare_logits(a: Path, b: Path) -> dict:
    x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
    return {"correlation": float(np.corrcoef(x, y)[0, 1]), "same_top1": bool(x.argmax() == y.argmax()),
            "max_abs_diff": float(np.abs(x - y).max()), "logit_std": float(x.std())}


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.worker:
        print(json.dumps(write_random_gguf(args) if args.worker == "gguf" else run_worker(args)))
        return
    require_extras()
    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    files = gguf_files(args, workdir)
    info = machine()
    pairs = []
    for pair in args.pairs:
        ours, theirs = PAIRS[pair]
        logits = {"glmchat": workdir / "logits-glmchat.npy", "llama.cpp": workdir / "logits-llama.npy"} if pair == "bf16" else {}
        runs = []
        for engine, fmt, file in (("glmchat", ours, None), ("llama.cpp", theirs, str(files[theirs]))):
            print(f"running {engine} {fmt} ...", file=sys.stderr)
            with busy_core(args.busy_core):
                run = child(args, engine, fmt, file=file, logits=str(logits[engine]) if logits else None)
            run["x_B"] = run["bytes_per_token"] * run["decode_tok_s"] / run["B"]
            runs.append(run)
        g, l = runs
        ratio = {"decode": g["decode_tok_s"] / l["decode_tok_s"], "prefill64": g["prefill64_tok_s"] / l["prefill64_tok_s"],
                 "prefill_long": g["prefill_long_tok_s"] / l["prefill_long_tok_s"], "ttft64": l["ttft64_s"] / g["ttft64_s"],
                 "peak_rss": g["peak_rss_bytes"] / l["peak_rss_bytes"]}
        if args.context:
            ratio["decode_after_context"] = g["decode_after_context_tok_s"] / l["decode_after_context_tok_s"]
        pairs.append({"pair": pair, "glmchat": g, "llama.cpp": l, "ratio": ratio,
                      **({"logits_check": compare_logits(logits["glmchat"], logits["llama.cpp"])} if logits else {})})
    result = {"machine": info, "layers": args.layers or 28, "threads": args.threads, "busy_core": args.busy_core,
              "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens, "context": args.context,
              "repeats": args.repeats,
              "bandwidths": [b for p in pairs for e in ("glmchat", "llama.cpp") for b in p[e]["B_samples"]],
              "pairs": pairs}
    print(json.dumps(result, indent=2) if args.json else table(result))


def table(result: dict) -> str:
    m, n, c = result["machine"], result["prefill_tokens"], result.get("context")
    lines = [
        f"glmchat vs llama.cpp: ChatGLM3-6B shapes, {result['layers']} layers, the same random weights, batch 1, greedy, "
        f"{result['threads']} threads{', a busy loop on core 0' if result['busy_core'] else ''}",
        f"CPU {m['cpu']} ({m['cores']} cores; {' '.join(m['features']) or 'no AVX-512'}); torch {m['torch']}, "
        f"llama-cpp-python {m['llama_cpp_python']}",
        f"B (memory read bandwidth) measured right around each decode, in its process: {min(result['bandwidths']) / 1e9:.1f}–"
        f"{max(result['bandwidths']) / 1e9:.1f} GB/s; decode after a 64-token prompt, {result['new_tokens']} new tokens"
        f"{f' (and after a {c}-token prompt)' if c else ''}; best of {result['repeats']}",
        "",
        f"{'':22s} {'B GB/s':>6s} {'decode tok/s':>12s} {'× B':>5s} {'TTFT64 s':>8s} {'prefill64 tok/s':>15s} "
        f"{'prefill' + str(n) + ' tok/s':>16s} {'peak RSS GB':>11s}" + (f" {'decode@' + str(c) + ' tok/s':>16s}" if c else ""),
    ]
    for p in result["pairs"]:
        for engine in ("glmchat", "llama.cpp"):
            r = p[engine]
            lines.append(f"{r['label']:22s} {r['B'] / 1e9:6.1f} {r['decode_tok_s']:12.2f} {r['x_B']:5.2f} {r['ttft64_s']:8.2f} "
                         f"{r['prefill64_tok_s']:15.1f} {r['prefill_long_tok_s']:16.1f} {r['peak_rss_bytes'] / 1e9:11.2f}"
                         + (f" {r['decode_after_context_tok_s']:16.2f}" if c else ""))
        q = p["ratio"]
        lines.append(f"{'  glmchat ÷ llama.cpp':22s} {'':6s} {q['decode']:11.2f}× {'':5s} {q['ttft64']:7.2f}× "
                     f"{q['prefill64']:14.2f}× {q['prefill_long']:15.2f}× {q['peak_rss']:10.2f}×"
                     + (f" {q['decode_after_context']:15.2f}×" if c else ""))
        if "logits_check" in p:
            check = p["logits_check"]
            lines.append(f"  same weights, same logits? correlation {check['correlation']:.4f}, "
                         f"max |Δ| {check['max_abs_diff']:.3f} (logit std {check['logit_std']:.3f}), "
                         f"same top token: {'yes' if check['same_top1'] else 'no'}")
        lines.append("")
    lines.append("ratios are glmchat's speed over llama.cpp's (> 1: glmchat faster; TTFT as a speed too), "
                 "peak RSS glmchat's over llama.cpp's (< 1: glmchat smaller)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
