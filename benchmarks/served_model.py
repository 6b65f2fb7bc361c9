"""What the serving benchmarks share: the model options and loading with the machine's context printed."""

import os

import torch

from glmchat.chat import ChatModel, load
from glmchat.hub import DEFAULT_MODEL

PARAGRAPH = ("The Great Wall of China is a series of fortifications built across the historical northern "
             "borders of ancient Chinese states. 长城是中国古代的军事防御工程，修筑的历史可上溯到西周时期。 ")


def add_model_arguments(ap) -> None:
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub id or directory (default: random weights of its shape)")
    ap.add_argument("--weights", action="store_true", help="load the checkpoint's weights instead of random ones")
    ap.add_argument("--dtype", default="bfloat16")


def load_model(args) -> ChatModel:
    """The model the options name, on the CPU; prints what was loaded, the threads and the load average."""
    chat_model = load(args.model, device="cpu", dtype=args.dtype, random_weights=not args.weights, progress=False)
    print(f"{args.model} ({'weights' if args.weights else 'random weights'}), {chat_model.dtype}, "
          f"{torch.get_num_threads()} threads, loaded in {chat_model.load_seconds:.0f} s; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    return chat_model
