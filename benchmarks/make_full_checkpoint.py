"""Write ChatGLM3-6B-shaped random weights to disk in the official layout, for load-time work.

config.json (the real one's fields) and float16 safetensors shards of ~2 GB with the official tensor
names and index, as the hub repository stores them (no tokenizer: load_model does not need one).
    python benchmarks/make_full_checkpoint.py /tmp/chatglm3-6b-random
    flock /tmp/glmchat-bigmem.lock python benchmarks/load_and_speed.py --checkpoint /tmp/chatglm3-6b-random
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmchat.loader import DEFAULT_MODEL, KNOWN_CONFIGS, load_model, official_name

SHARD_BYTES = 2 * 1024**3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    args = ap.parse_args()
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(DEFAULT_MODEL, random_weights=True, dtype=torch.float16)
    shards, current, size = [], {}, 0
    for name, tensor in model.state_dict().items():
        if current and size + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[official_name(name)] = tensor
        size += tensor.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        print(f"wrote {filename}", flush=True)
    total = sum(t.nbytes for t in model.state_dict().values())
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dst / "config.json").write_text(json.dumps(dict(KNOWN_CONFIGS[DEFAULT_MODEL], architectures=["ChatGLMModel"]), indent=2))


if __name__ == "__main__":
    main()
