"""Write ChatGLM3-6B-shaped random weights to disk in the official layout, for load-time work.

config.json (the real one's fields) and float16 safetensors shards of ~2 GB with the official tensor
names and index, written by the safetensors library as the hub repository's are (8-byte aligned, so
nothing loads in place). No tokenizer: load_model does not need one.
    python benchmarks/make_full_checkpoint.py /tmp/chatglm3-6b-random
    flock /tmp/glmchat-bigmem.lock python benchmarks/load_and_speed.py --checkpoint /tmp/chatglm3-6b-random
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmchat.checkpoint import save_shards
from glmchat.hub import DEFAULT_MODEL
from glmchat.loader import load_model
from glmchat.names import official_name
from glmchat.registry import KNOWN_CONFIGS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    args = ap.parse_args()
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(DEFAULT_MODEL, random_weights=True, dtype=torch.float16)
    save_shards({official_name(name): t for name, t in model.state_dict().items()}, dst, write=save_file)
    (dst / "config.json").write_text(json.dumps(dict(KNOWN_CONFIGS[DEFAULT_MODEL], architectures=["ChatGLMModel"]), indent=2))


if __name__ == "__main__":
    main()
