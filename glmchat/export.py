"""Saving quantized checkpoints (`glmchat quantize`): a checkpoint loaded with quantization, written
back in the official layout with a "quantization" entry in its config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import save_shards
from .hub import TOKENIZER_FILES, resolve_checkpoint
from .loader import load_model
from .names import official_name
from .quantize import QuantizationError

_COPIED_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "generation_config.json")


def save_quantized(src, dst, method: str, group_size: int = 128, dtype=None, progress: bool = True) -> Path:
    """Quantize checkpoint `src` (shard by shard) and save it to directory `dst` as safetensors
    shards, config.json (with a "quantization" entry) and the tokenizer files. Returns dst."""
    src_dir, dst = resolve_checkpoint(src), Path(dst)
    if dst.resolve() == src_dir.resolve():  # the loaded model reads the source files in place
        raise QuantizationError(f"{dst} is the checkpoint being quantized; save the quantized copy to another directory")
    model, info = load_model(src_dir, dtype=dtype, quantize=method, group_size=group_size, progress=progress,
                             install_kernels=False)  # the portable layouts: saved as they are, no conversion
    dst.mkdir(parents=True, exist_ok=True)
    network = model.config.network
    save_shards({official_name(name, network): t for name, t in model.state_dict().items()}, dst)  # aligned: loads in place
    config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    config["quantization"] = info.quantization
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    for name in _COPIED_FILES:
        if (src_dir / name).exists():
            shutil.copy(src_dir / name, dst / name)
    return dst
