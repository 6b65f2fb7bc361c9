"""Loading a checkpoint into a model: config and family read once, weights placed, kernels installed.

Weights go shard by shard, tensor by tensor, straight into preallocated parameters of the target
dtype and device, so peak memory stays close to the model's own size. Finding the checkpoint is
glmchat.hub's, reading its files glmchat.checkpoint's, tensor names glmchat.names'.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import kernels
from .checkpoint import ALIGN, CheckpointError, iter_tensors, weight_files
from .config import GLMConfig, read_config_json
from .families import Family, detect_family, family_config
from .hub import DEFAULT_MODEL, TOKENIZER_MODELS, resolve_checkpoint
from .model import GLMTransformer
from .model_v1 import ChatGLM6BTransformer
from .names import official_name, sanitize
from .quantize import QuantizedLinear, check_method, quantize_model
from .parallel import ShardingError, ShardPlan, check_same_checkpoint, connect, set_quantized_share
from .random_weights import init_random_weights
from .registry import KNOWN_CONFIGS

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32") from None


# ---------------------------------------------------------------------------------------------
# Config and family

def read_config(directory: Path, name: str = "", family: str | None = None) -> tuple[GLMConfig, Family]:
    """The config and family of a checkpoint directory."""
    return _read_directory(directory, name, family)[1:]


def _read_directory(directory: Path, name: str = "", family: str | None = None) -> tuple[dict, GLMConfig, Family]:
    """config.json parsed once: (its raw entries, GLMConfig, Family)."""
    path = Path(directory) / "config.json"
    raw = read_config_json(path)
    found = detect_family(directory, raw, name=name, family=family)
    return raw, family_config(raw, str(path), found), found


def load_config(path_or_id: str | os.PathLike) -> GLMConfig:
    """The model's config: from a local directory, a built-in table for known ids, or the hub."""
    return config_and_family(path_or_id)[0]


def config_and_family(path_or_id: str | os.PathLike) -> tuple[GLMConfig, Family]:
    """(GLMConfig, Family) of a local directory, a known hub id (built in), or a hub download."""
    return _locate(path_or_id, weights=False)[2:]


def _locate(path_or_id, *, weights: bool) -> tuple[Path | None, dict, GLMConfig, Family]:
    """(directory, raw config.json, GLMConfig, Family); without weights a known hub id needs no
    download (directory None: its config is built in)."""
    text = os.fspath(path_or_id)
    if not weights and not Path(text).expanduser().exists() and text in KNOWN_CONFIGS:
        raw = KNOWN_CONFIGS[text]
        family = detect_family(None, raw, name=text)
        return None, raw, family_config(raw, f"{text} (built-in config)", family), family
    directory = resolve_checkpoint(text, weights=weights)
    return directory, *_read_directory(directory, name=text)


# ---------------------------------------------------------------------------------------------
# Weights

NETWORKS: dict[str, type[GLMTransformer]] = {"glm": GLMTransformer, "chatglm-6b": ChatGLM6BTransformer}  # by config.network


def empty_model(config: GLMConfig, dtype: torch.dtype, device, quantization: dict | None = None) -> GLMTransformer:
    """A model whose parameters are allocated on `device` in `dtype` but not yet filled."""
    with torch.device("meta"):
        model = NETWORKS[config.network](config)
    model = model.to(dtype)
    if quantization:
        quantize_model(model, quantization["method"], quantization.get("group_size", 128))
    model = model.to_empty(device=device)
    model.reset_rotary()
    return model.eval().requires_grad_(False)


def load_weights(model: GLMTransformer, files: list[Path], progress: bool = True, part=None) -> None:
    """Copy each tensor into its place; float weights of quantized layers are quantized on the way.
    part(name, tensor): the part of each tensor to keep (a tensor-parallel rank's share), read from
    the file's mapping alone."""
    params = model.state_dict(keep_vars=True)
    quantized = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    loaded: set[str] = set()
    pending: dict = {}  # q/k/v of transformers-layout checkpoints, joined into query_key_value
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="Loading weights",
              disable=not progress, leave=False) as bar:
        for file in files:
            for target, tensor in sanitize(iter_tensors(file), pending, source=file.name):
                bar.update(tensor.numel() * tensor.element_size())
                if model.config.tie_word_embeddings and target.startswith("output."):
                    continue  # made from the embedding below, whatever the files hold
                what = f"{file.name}: tensor {official_name(target, model.config.network)!r}"
                if target in quantized:
                    _quantize_into(quantized[target], tensor, what, target, part)
                    loaded.update(target.removesuffix("weight") + b for b in quantized[target]._buffer_names)
                    continue
                param = params.get(target)
                if param is None:
                    raise CheckpointError(f"{what} has no place in a model with this config.json")
                if part is not None:
                    tensor = part(target, tensor)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(f"{what} has shape {tuple(tensor.shape)}, config.json implies {tuple(param.shape)}")
                with torch.no_grad():
                    if _can_adopt(tensor, param):
                        param.data = tensor  # no copy: the weights stay in the shard's (private) mapping
                    else:
                        copy_converting(param, tensor)
                loaded.add(target)
    if model.config.tie_word_embeddings:  # the output layer is the embedding
        model.tie_weights()
        loaded.update(name for name in params if name.startswith("output."))
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(
            f"tensors missing from {', '.join(f.name for f in files)}: "
            f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
        )


def _can_adopt(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether a checkpoint tensor can serve as the parameter itself: same dtype and device, and
    64-byte aligned (misaligned weights make CPU matrix-vector products ~15% slower)."""
    return (tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous()
            and tensor.data_ptr() % ALIGN == 0)


_CONVERT_CHUNK = 1 << 18


def copy_converting(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src), converting between float16 and bfloat16 on the CPU through cache-sized float32
    chunks: ~3× faster than PyTorch's direct conversion, which dominated loading an fp16 checkpoint."""
    sixteen = (torch.float16, torch.bfloat16)
    if not (dst.dtype in sixteen and src.dtype in sixteen and dst.dtype != src.dtype and dst.device.type == "cpu"
            and src.device.type == "cpu" and dst.is_contiguous() and src.is_contiguous()):
        return dst.copy_(src)
    d, s = dst.view(-1), src.view(-1)
    buf = torch.empty(min(_CONVERT_CHUNK, s.numel()), dtype=torch.float32)
    for i in range(0, s.numel(), _CONVERT_CHUNK):
        n = min(_CONVERT_CHUNK, s.numel() - i)
        d[i:i + n].copy_(buf[:n].copy_(s[i:i + n]))
    return dst


def _quantize_into(layer: QuantizedLinear, tensor: torch.Tensor, what: str, name: str, part=None) -> None:
    """Quantize a float weight into layer; with part (a ShardPlan), the rank's share of the whole's quantization."""
    try:
        if part is None:
            layer.set_weight(tensor)
        else:
            set_quantized_share(layer, name, tensor, part)
    except ShardingError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Quantization entries

def quantization_entry(method: str, group_size: int = 128) -> dict:
    """The config.json "quantization" entry for a method."""
    return {"method": method, "group_size": group_size} if method == "int4" else {"method": method}


def _stored_quantization(raw: dict, source: str) -> dict | None:
    """The "quantization" entry of a checkpoint saved by `glmchat quantize`, or None."""
    entry = raw.get("quantization")
    if entry is None:
        return None
    try:
        check_method(entry.get("method"), entry.get("group_size", 128))
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: unsupported quantization entry {entry!r} ({e})") from None
    return quantization_entry(entry["method"], entry.get("group_size", 128))


# ---------------------------------------------------------------------------------------------
# The entry points

@dataclass
class LoadInfo:
    path: str
    seconds: float
    weight_bytes: int
    random_weights: bool
    quantization: dict | None = None  # {"method": "int4", "group_size": 128}, None for 16/32-bit


@dataclass
class Loaded:
    """What load_checkpoint read: the model, its config and family, and its tokenizer."""

    model: GLMTransformer
    config: GLMConfig
    family: Family
    tokenizer: Any  # the family's tokenizer; None only for random weights without tokenizer files at hand
    info: LoadInfo
    directory: Path | None  # where the checkpoint (or, for random weights, its config/tokenizer) lies
    raw_config: dict = field(default_factory=dict)  # config.json as read (every key, for the drop-in's model.config)


def load_checkpoint(
    path_or_id: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype=None,
    random_weights: bool = False,
    seed: int = 0,
    quantize: str | None = None,
    group_size: int = 128,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> Loaded:
    """Load a GLM-family checkpoint (local directory or hub id) and its tokenizer; config.json is
    read and the family detected once. dtype None keeps the checkpoint's stored dtype.

    random_weights: the real shapes with random weights (seeded): no weight files needed, and for a
    known hub id no download; the tokenizer then comes from the directory or the hub's tokenizer
    files when they can be had, else it is None. quantize "int8" / "int4" (group_size 32/64/128)
    quantizes the Linear weights tensor by tensor while loading; a checkpoint saved by
    `glmchat quantize` loads in its own quantization. shard (rank, world): only this tensor-parallel
    rank's share of the weights is read and kept (glmchat.parallel); call it in every rank of an
    initialized torch.distributed group.
    """
    model, info, (directory, raw, config, family) = _load(
        path_or_id, device=device, dtype=dtype, random_weights=random_weights, seed=seed, quantize=quantize,
        group_size=group_size, progress=progress, shard=shard)
    if random_weights and directory is None:
        try:
            directory = resolve_checkpoint(path_or_id, weights=False)  # the hub's config and tokenizer files
        except CheckpointError:
            pass
    has_tokenizer = directory is not None and any((directory / f).exists() for f in TOKENIZER_MODELS)
    tokenizer = family.load_tokenizer(directory) if has_tokenizer or not random_weights else None
    return Loaded(model, config, family, tokenizer, info, directory, dict(raw))


def load_model(
    path_or_id: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype=None,
    random_weights: bool = False,
    seed: int = 0,
    progress: bool = True,
    quantize: str | None = None,
    group_size: int = 128,
    shard: tuple[int, int] | None = None,
    install_kernels: bool = True,
) -> tuple[GLMTransformer, LoadInfo]:
    """The model alone (no tokenizer), as load_checkpoint loads it; install_kernels=False leaves the
    portable layers (and their layouts) in place, for a caller that only saves the weights."""
    return _load(path_or_id, device=device, dtype=dtype, random_weights=random_weights, seed=seed,
                 quantize=quantize, group_size=group_size, progress=progress, shard=shard,
                 install_kernels=install_kernels)[:2]


def _load(path_or_id, *, device, dtype, random_weights: bool, seed: int, quantize: str | None, group_size: int,
          progress: bool, shard: tuple[int, int] | None = None,
          install_kernels: bool = True) -> tuple[GLMTransformer, LoadInfo, tuple]:
    """(model, LoadInfo, what _locate found)."""
    start = time.perf_counter()
    device = torch.device(device)
    check_method(quantize, group_size)
    located = _locate(path_or_id, weights=not random_weights)
    directory, raw, config, _ = located
    stored = None if random_weights else _stored_quantization(raw, str(directory / "config.json"))
    files = [] if random_weights else weight_files(directory)
    requested = quantization_entry(quantize, group_size) if quantize else None
    quantization = stored or requested
    if stored and requested and stored != requested:
        raise CheckpointError(
            f"{path_or_id} is already quantized ({stored['method']}); load it without a different quantization"
        )
    dtype = parse_dtype(dtype if dtype is not None else config.torch_dtype)
    plan = ShardPlan(config, *shard) if shard is not None else None
    if plan is not None:
        check_same_checkpoint({"config": raw, "weights": [(f.name, f.stat().st_size) for f in files],
                               "dtype": str(dtype), "quantization": quantization, "random_weights": random_weights,
                               "seed": seed if random_weights else None})
    if plan is not None and quantization and quantization["method"] == "int4":
        plan.check_int4(config, quantization["group_size"])
    model = empty_model(plan.config if plan else config, dtype, device, quantization)
    if random_weights:
        whole_shapes = None
        if plan is not None:  # each weight drawn whole, then the rank's share kept: the shares fit together
            with torch.device("meta"):
                whole_shapes = {n: p.shape for n, p in NETWORKS[config.network](config).named_parameters()}
        init_random_weights(model, seed, part=plan, whole_shapes=whole_shapes)
        model.tie_weights()
    else:
        load_weights(model, files, progress=progress, part=plan)
    if plan is not None:
        connect(model, plan)
    if install_kernels:
        kernels.install(model)
    info = LoadInfo(os.fspath(path_or_id), time.perf_counter() - start, weight_bytes(model), random_weights,
                    quantization)
    return model, info, located


def weight_bytes(model: torch.nn.Module, skip: str | None = None) -> int:
    """Bytes of the model's weights and persistent buffers as held in memory (a tied output layer
    counted once), leaving out names that contain `skip`. Not through state_dict, which would copy
    what a kernel holds in its own layout (FastInt8Linear's blocked codes) back into the portable one."""
    held = {}
    for prefix, module in model.named_modules():
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in tensors:
            if name not in module._non_persistent_buffers_set and not (skip and skip in f"{prefix}.{name}"):
                held[t.data_ptr()] = t.nbytes
    return sum(held.values())
