"""The `glmchat` command line: `glmchat chat`, `glmchat run`, ...

A subcommand is one function `cmd(args) -> exit status` plus one `register(...)` line in
`build_parser`. Commands that load a model take `add_model_options` and call `load_from_args`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
from typing import TYPE_CHECKING

# Only torch-free modules at the top: --help, --version and option mistakes answer without
# importing torch (seconds); each command imports what it needs when it runs.
from . import __version__
from .device import DEVICES, DeviceError
from .options import number
from .hub import DEFAULT_MODEL
from .sampling import SamplingConfig
from .server import add_server_options

if TYPE_CHECKING:
    from .chat import ChatModel


def user_errors() -> tuple[type[BaseException], ...]:
    """Mistakes a user can fix: reported as one line, never as a traceback (GLMCHAT_DEBUG=1 shows it)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .families import NotAChatModelError, TokenizerError, ToolCallParseError
    from .model import ContextLengthError
    from .parallel import ShardingError
    from .quantize import QuantizationError

    return (CheckpointError, ConfigError, TokenizerError, ContextLengthError, DeviceError, ToolCallParseError,
            QuantizationError, NotAChatModelError, ShardingError, OSError)


DTYPES = ("auto", "bfloat16", "float16", "float32")

HELP = """\
commands:
  /clear        forget the conversation (the system prompt stays)
  /system TEXT  set the system prompt; /system alone removes it
  /help         this list
  /quit         leave (or Ctrl-D);  Ctrl-C stops an answer"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Options


def _device(text):
    from .device import pick_device  # imports torch: only once the command line is parsed

    try:
        pick_device(text)  # fail at parse time, with the reason
    except DeviceError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def add_model_options(parser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="ID_OR_PATH",
                   help=f"Hugging Face id or local checkpoint directory (default {DEFAULT_MODEL})")
    g.add_argument("--device", default="auto", type=_device, metavar="|".join(DEVICES),
                   help="auto: CUDA/ROCm, then MPS, then CPU (default auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bfloat16 on CPU and on GPUs that support it, else float16 (default auto)")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization applied while loading (default: none)")
    g.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128,
                   help="int4 group size (default 128)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: the first answer waits tens of seconds to compile; "
                        "meant for GPUs, it does not pay on CPU (default off)")
    g.add_argument("--random-weights", action="store_true",
                   help="the real architecture with random weights: no download, meaningless text "
                        "(for trying glmchat and measuring speed)")
    g.add_argument("--tp", type=number(int, 1), default=1, metavar="N",
                   help="tensor parallelism over N processes, each holding 1/N of the weights: start it with "
                        "torchrun --nproc-per-node N -m glmchat run --tp N ... (run, bench and serve)")


def add_sampling_options(parser) -> None:
    d = SamplingConfig()  # the reference chat's defaults
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=1024, metavar="N",
                   help="stop an answer after N tokens (default 1024)")
    g.add_argument("--temperature", type=number(float, 0), default=d.temperature, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {d.temperature})")
    g.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=d.top_p, metavar="P",
                   help=f"nucleus sampling (default {d.top_p})")
    g.add_argument("--top-k", type=number(int, 0), default=d.top_k, metavar="K", help=f"0 = off (default {d.top_k})")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable answers")
    g.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    g.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    g.add_argument("--show-reasoning", action="store_true",
                   help="print a reasoning model's thinking (GLM-Z1) before its answer; hidden by default")


def load_from_args(args, announce: bool = True) -> ChatModel:
    """The model the options name, with notices on stderr."""
    from .chat import load

    if args.random_weights:
        _note(f"--random-weights: {args.model}'s architecture with random weights; the text is meaningless "
              "(for trying glmchat and measuring speed)")
    shard = _join_tensor_parallel_group(args) if args.tp > 1 else None
    model = load(args.model, device=args.device, dtype=args.dtype, random_weights=args.random_weights,
                 quantize=args.quantize, group_size=args.group_size, progress=sys.stderr.isatty(),
                 compile=args.compile, shard=shard)
    if model.standin_tokenizer:
        _note("no tokenizer for this model is available offline: using a small stand-in tokenizer, "
              "restricted to its own ids")
    if announce:
        _note(f"loaded {args.model} ({model.family.label}) on {model.device} ({str(model.dtype).removeprefix('torch.')}) "
              f"in {model.load_seconds:.1f} s")
    return model


def _join_tensor_parallel_group(args) -> tuple[int, int]:
    """(rank, world) of this torchrun process; only rank 0 prints and writes files. The ranks must
    sample alike, so without --seed rank 0's random seed is used by all."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise UsageError(f"--tp {args.tp} needs {args.tp} processes, this is one of {world}: start it with "
                         f"torchrun --nproc-per-node {args.tp} -m glmchat {args.command} --tp {args.tp} ...")
    cuda = args.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(args.device)  # NCCL's collectives, object broadcasts too, use the current device
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_leave_group)
    rank = dist.get_rank()
    if hasattr(args, "seed"):  # a command that samples: one seed for every rank
        seed = torch.tensor([args.seed if args.seed is not None else int(torch.randint(0, 2**62, ()))],
                            device=args.device if cuda else "cpu")  # NCCL sends only CUDA tensors
        dist.broadcast(seed, 0)
        args.seed = int(seed)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the whole process)
        if getattr(args, "plot", None):
            args.plot = None
    return rank, world


def _leave_group() -> None:
    """Every rank waits for the others before tearing the group down: a rank that left first would
    make the others' connections fail as they exit (gloo aborts the process then)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sampling_from_args(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, greedy=args.greedy)


def _is_text(text: str) -> bool:
    """False for text holding bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _checked_text(text: str | None, what: str) -> str | None:
    if text is not None and not _is_text(text):
        raise UsageError(f"{what} is not valid UTF-8 text")
    return text


def _note(text: str) -> None:
    print(f"glmchat: {text}", file=sys.stderr, flush=True)


def _stats(reply) -> str:
    return (f"{reply.completion_tokens} tokens in {reply.seconds:.1f} s, {reply.tokens_per_second:.1f} tokens/s, "
            f"first token after {reply.time_to_first_token:.2f} s")


# ---------------------------------------------------------------------------------------------
# glmchat chat


def _single_process(args) -> None:
    if getattr(args, "tp", 1) > 1:
        raise UsageError(f"--tp works with `glmchat run`, `bench` and `serve`; `glmchat {args.command}` "
                         "runs in one process")


def cmd_chat(args) -> int:
    """Interactive chat: history kept across turns, answers streamed as they are generated."""
    _single_process(args)
    model = load_from_args(args)
    model.family.check_chat()  # a base model: say so now, not after the first question
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    system = _checked_text(args.system, "--system")
    history: list[dict] = []
    print("Chat in English or 中文. /help lists commands; Ctrl-C stops an answer, Ctrl-D or /quit leaves.",
          flush=True)
    while True:
        try:
            line = input("\n>>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit leaves)")
            continue
        if not line:
            continue
        if not _is_text(line):
            print("glmchat: that line is not valid UTF-8 text; type it again")
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/clear":
                history.clear()
                print("(conversation cleared)")
            elif command == "/system":
                system = rest.strip() or None
                print(f"(system prompt {'set' if system else 'removed'})")
            elif command == "/help":
                print(HELP)
            else:
                print(f"unknown command {command}; /help lists them")
            continue
        turn = {"role": "user", "content": line}
        messages = ([{"role": "system", "content": system}] if system else []) + history + [turn]
        history += [turn, *_answer(model, messages, args)]


class Thinking:
    """Prints a reasoning model's thinking as it streams (dimmed on a terminal), then a blank line
    before the answer; prints nothing unless asked to."""

    def __init__(self, enabled: bool):
        self.enabled, self.open = enabled, False
        self.dim, self.plain = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")

    def show(self, chunk) -> None:
        if not self.enabled:
            return
        if chunk.reasoning:
            print(("" if self.open else self.dim) + chunk.reasoning, end="", flush=True)
            self.open = True
        if self.open and (chunk.text or chunk.reply is not None):
            print(self.plain + "\n", flush=True)
            self.open = False


def _answer(model: ChatModel, messages: list[dict], args) -> list[dict]:
    """Stream one answer; return the assistant messages to keep (a stopped answer keeps its part)."""
    from .families import NotAChatModelError
    from .model import ContextLengthError

    shown, thinking = [], Thinking(args.show_reasoning)
    stream = model.stream(messages, **sampling_from_args(args))
    try:
        with contextlib.closing(stream):
            for chunk in stream:
                thinking.show(chunk)
                print(chunk.text, end="", flush=True)
                shown.append(chunk.text)
                if chunk.reply is not None:
                    reply = chunk.reply
    except KeyboardInterrupt:
        print("\n(stopped)", flush=True)
        return [{"role": "assistant", "metadata": "", "content": "".join(shown)}] if shown else []
    except ContextLengthError as e:
        print(f"glmchat: {e} (/clear starts over)", flush=True)
        return []
    except NotAChatModelError:
        raise
    except ValueError as e:  # a conversation this model's format cannot express (e.g. ChatGLM2 and /system)
        print(f"glmchat: {e}", flush=True)
        return []
    if reply.tool_call is not None:
        print(f"\n[tool call] {json.dumps(reply.tool_call, ensure_ascii=False)}", end="")
    print(f"\n[{_stats(reply)}{', stopped at the token limit' if reply.finish_reason == 'length' else ''}]",
          flush=True)
    return reply.messages


# ---------------------------------------------------------------------------------------------
# glmchat run


def cmd_run(args) -> int:
    """One answer to stdout; the query is the arguments, or stdin when there are none (or "-")."""
    query = " ".join(args.query)
    if query in ("", "-"):
        query = sys.stdin.read()
    if not query.strip():
        raise UsageError("the query is empty: pass it as arguments or on stdin")
    _checked_text(query, "the query")
    _checked_text(args.system, "--system")
    model = load_from_args(args, announce=args.verbose)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": query.strip()}]
    reply, thinking = None, Thinking(args.show_reasoning and not args.json)
    for chunk in model.stream(messages, **sampling_from_args(args)):
        if not args.json:
            thinking.show(chunk)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        reply = chunk.reply or reply
    if args.json:
        print(json.dumps({
            "model": args.model, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
            "random_weights": model.random_weights, "text": reply.text, "reasoning": reply.reasoning,
            "tool_call": reply.tool_call,
            "finish_reason": reply.finish_reason, "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens, "load_seconds": round(model.load_seconds, 4),
            "time_to_first_token": round(reply.time_to_first_token, 4), "seconds": round(reply.seconds, 4),
            "tokens_per_second": round(reply.tokens_per_second, 2),
        }, ensure_ascii=False))
        return 0
    if reply.tool_call is not None and not reply.text:
        sys.stdout.write(json.dumps(reply.tool_call, ensure_ascii=False))
    print()
    if args.verbose:
        _note(_stats(reply))
    return 0


# ---------------------------------------------------------------------------------------------
# glmchat bench, glmchat quantize


def cmd_bench(args) -> int:
    """Time the seed's workload: four English/Chinese prompt pairs, greedy, each with history=[]."""
    from .bench import checkpoint_available, format_table, plot, run_bench

    if not args.random_weights and not checkpoint_available(args.model):
        _note(f"no local checkpoint of {args.model}: benchmarking random weights (--random-weights), "
              f"{args.max_new_tokens} tokens per prompt")
        args.random_weights = True
    result = run_bench(load_from_args(args), args.max_new_tokens)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_table(result))
    if args.plot:
        try:
            plot(result, args.plot)
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'glmchat[plot]'") from None
        _note(f"chart saved to {args.plot}")
    return 0


def cmd_quantize(args) -> int:
    """Save an int8/int4 copy of a checkpoint (safetensors + config.json) that loads directly."""
    from .device import default_dtype, pick_device
    from .export import save_quantized

    method = {8: "int8", 4: "int4"}[args.bits]
    out = save_quantized(args.src, args.dst, method, args.group_size,
                         dtype=default_dtype(pick_device("auto")) if args.dtype == "auto" else args.dtype,
                         progress=sys.stderr.isatty())
    _note(f"saved the {method} checkpoint to {out}")
    return 0


class UsageError(ValueError):
    """A command used wrongly in a way argparse cannot see."""


# ---------------------------------------------------------------------------------------------
# Wiring


def cmd_serve(args) -> int:
    """OpenAI-compatible HTTP API (chat completions, streaming, tool calls) with continuous batching,
    and a web chat page at /."""
    from .server import follow, missing_dependencies, serve

    if hint := missing_dependencies():
        raise UsageError(hint)
    model = load_from_args(args)
    if args.tp == 1:
        serve(model, args)
        return 0
    from .server.engine import Lockstep

    lockstep = Lockstep()
    if lockstep.leads:  # rank 0 serves HTTP and tells the others each step of its engine
        serve(model, args, lockstep)
    else:  # rank 0 decides when to stop (on its SIGTERM / Ctrl-C) and tells the others
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        follow(model, args, lockstep)
    return 0


def register(subparsers, name: str, func, help: str, *option_groups) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=func.__doc__)
    for add in option_groups:
        add(parser)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="glmchat", description="ChatGLM3 chat in native PyTorch (CUDA, ROCm, MPS, CPU).")
    parser.add_argument("--version", action="version", version=f"glmchat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub, "chat", cmd_chat, "interactive chat in the terminal", add_model_options, add_sampling_options)
    register(sub, "serve", cmd_serve, "OpenAI-compatible API server and web chat", add_model_options, add_server_options)
    run = register(sub, "run", cmd_run, "answer one query on stdout", add_model_options, add_sampling_options)
    run.add_argument("query", nargs="*", help='the query (several words are joined); none or "-": read stdin')
    run.add_argument("--json", action="store_true", help="print one JSON object with the answer, token counts and timings")
    run.add_argument("--verbose", "-v", action="store_true", help="load time and speed on stderr")
    bench = register(sub, "bench", cmd_bench, "time the seed's bilingual workload", add_model_options)
    bench.add_argument("--max-new-tokens", type=number(int, 1), default=256, metavar="N",
                       help="tokens per prompt; with random weights exactly N, stop tokens ignored (default 256)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="save a bar chart (needs glmchat[plot])")
    quant = register(sub, "quantize", cmd_quantize, "save an int8/int4 copy of a checkpoint")
    quant.add_argument("src", help="checkpoint directory or Hugging Face id")
    quant.add_argument("dst", help="directory to write")
    quant.add_argument("--bits", type=int, choices=(8, 4), required=True)
    quant.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128, help="int4 group size")
    quant.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="dtype of the scales and unquantized tensors (auto: what --dtype auto loads on this "
                            "machine, so the saved files load in place: bfloat16 on CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # never die on a character the terminal cannot show
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    args = build_parser().parse_args(argv)
    errors: tuple[type[BaseException], ...] = (UsageError,)
    try:
        errors += user_errors()
        return args.func(args)
    except BrokenPipeError:  # `glmchat run ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("\nglmchat: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, errors) or os.environ.get("GLMCHAT_DEBUG"):
            raise
        print(f"glmchat: error: {e}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
