"""Find a checkpoint (local directory or Hugging Face hub id), read its shards into a model.

Weights go shard by shard, tensor by tensor, straight into preallocated parameters of the target
dtype and device, so peak memory stays close to the model's own size.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm

from . import cpu_kernels
from .config import ConfigError, GLMConfig, read_config_json
from .families import detect_family, family_config
from .model import GLMTransformer
from .names import official_tensors
from .quantize import QuantizedLinear, check_method, quantize_model

DEFAULT_MODEL = "THUDM/chatglm3-6b"

# config.json of known hub models, so that random weights of the real shapes need no download.
KNOWN_CONFIGS = {
    "THUDM/chatglm3-6b": {
        "model_type": "chatglm", "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
        "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2,
        "ffn_hidden_size": 13696, "padded_vocab_size": 65024, "seq_length": 8192,
        "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
        "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": False, "torch_dtype": "float16", "eos_token_id": 2, "pad_token_id": 0,
    },
}
_CHATGLM_6B = KNOWN_CONFIGS["THUDM/chatglm3-6b"]
_GLM4_9B = {
    **_CHATGLM_6B, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072,
    "layernorm_epsilon": 1.5625e-07, "rope_ratio": 500, "torch_dtype": "bfloat16",
    "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}
# Shapes of the rest of the family (random weights need no download; the family comes from the id).
KNOWN_CONFIGS.update({
    "THUDM/chatglm3-6b-base": {**_CHATGLM_6B, "seq_length": 32768},
    "THUDM/chatglm3-6b-32k": {**_CHATGLM_6B, "seq_length": 32768, "rope_ratio": 50},
    "THUDM/chatglm3-6b-128k": {**_CHATGLM_6B, "seq_length": 131072, "rope_ratio": 500},
    "THUDM/chatglm2-6b": {**_CHATGLM_6B, "seq_length": 32768},
    "THUDM/chatglm2-6b-32k": {**_CHATGLM_6B, "seq_length": 32768, "rope_ratio": 16},
    "THUDM/codegeex2-6b": {**_CHATGLM_6B, "seq_length": 8192, "torch_dtype": "bfloat16"},
    "THUDM/glm-4-9b-chat": _GLM4_9B,
    "THUDM/glm-4-9b": {**_GLM4_9B, "seq_length": 8192},
    "THUDM/glm-4-9b-chat-1m": {**_GLM4_9B, "seq_length": 1048576, "rope_ratio": 10000},
    "THUDM/glm-4-9b-chat-hf": {
        "model_type": "glm", "hidden_size": 4096, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696, "vocab_size": 151552,
        "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07, "rope_theta": 5000000.0,
        "partial_rotary_factor": 0.5, "attention_bias": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
    },
})

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, downloaded or read. The message says what to do."""


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32") from None


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SINGLES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json")


def resolve_checkpoint(path_or_id: str | os.PathLike, *, weights: bool = True, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint: the path itself, or a hub snapshot."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{text} is a file; pass the checkpoint directory that holds config.json")
    if not _looks_like_hub_id(text):
        raise CheckpointError(
            f"no checkpoint directory at {text}; pass an existing directory with config.json "
            f"or a Hugging Face repo id like {DEFAULT_MODEL}"
        )
    return _download(text, weights=weights, revision=revision)


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/", "~"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(repo_id: str, *, weights: bool, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    if _hub_reachable():
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
            patterns = ["config.json", *_TOKENIZER_FILES]
            if weights:
                patterns += _weight_patterns(files, repo_id)
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except CheckpointError:
            raise
        except Exception as e:  # the hub's errors vary by version; all mean "could not fetch"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        reason = "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set)"
    try:  # a snapshot downloaded earlier still works offline
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if (cached / "config.json").exists():
            return cached
    except Exception:
        pass
    raise CheckpointError(
        f"could not download {repo_id!r} from the Hugging Face hub ({reason}). Download it where the "
        f"hub is reachable (e.g. `hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`) and pass "
        "that directory instead of the id, or use --random-weights (random_weights=True in Python) to try "
        "glmchat without it."
    )


def _weight_patterns(files: list[str], repo_id: str) -> list[str]:
    """Only one weight format: safetensors when the repo has it, else .bin shards."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors", "model.safetensors.index.json"]
    if any(f.endswith(".bin") for f in files):
        return ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    raise CheckpointError(f"{repo_id} on the hub has no .safetensors or .bin weights")


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files in load order; safetensors preferred over .bin."""
    for index_name in _WEIGHT_INDEXES:
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index} is not a valid weight index ({e!r})") from None
            files = [directory / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"shard {f.name} listed in {index} is missing from {directory}")
            return files
    for name in _WEIGHT_SINGLES:
        if (directory / name).exists():
            return [directory / name]
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin.index.json with its shards"
    )


def read_config(directory: Path, name: str = "", family: str | None = None):
    """The config and family of a checkpoint directory."""
    path = Path(directory) / "config.json"
    raw = read_config_json(path)
    found = detect_family(directory, raw, name=name, family=family)
    return family_config(raw, str(path), found), found


def load_config(path_or_id: str | os.PathLike) -> GLMConfig:
    """The model's config: from a local directory, a built-in table for known ids, or the hub."""
    return config_and_family(path_or_id)[0]


def config_and_family(path_or_id: str | os.PathLike):
    """(GLMConfig, Family) of a local directory, a known hub id (built in), or a hub download."""
    text = os.fspath(path_or_id)
    if not Path(text).expanduser().exists() and text in KNOWN_CONFIGS:
        raw = KNOWN_CONFIGS[text]
        family = detect_family(None, raw, name=text)
        return family_config(raw, f"{text} (built-in config)", family), family
    return read_config(resolve_checkpoint(text, weights=False), name=text)


# ---------------------------------------------------------------------------------------------
# Reading tensors

# official name -> our module name; {i} is the layer.
_NAME_PATTERNS = [
    (r"transformer\.embedding\.word_embeddings\.weight", "embed.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attn_norm.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", "layers.{}.attn.qkv.{}"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight", "layers.{}.attn.dense.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.mlp_norm.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", "layers.{}.mlp.gate_up.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", "layers.{}.mlp.down.weight"),
    (r"transformer\.encoder\.final_layernorm\.weight", "norm.weight"),
    (r"transformer\.output_layer\.weight", "output.weight"),
]
_NAME_PATTERNS = [(re.compile(p), target) for p, target in _NAME_PATTERNS]
_IGNORED = re.compile(r"transformer\.rotary_pos_emb\.inv_freq")  # recomputed in float32


_QUANTIZED_SUFFIXES = ("qweight", "scales", "scales_zeros")  # a quantized checkpoint's Linear buffers


def native_name(official: str) -> str | None:
    """Our parameter name for an official tensor name; None for tensors we recompute."""
    if _IGNORED.fullmatch(official):
        return None
    base, _, suffix = official.rpartition(".")
    if suffix in _QUANTIZED_SUFFIXES:
        return native_name(base + ".weight").removesuffix("weight") + suffix
    for pattern, target in _NAME_PATTERNS:
        m = pattern.fullmatch(official)
        if m:
            return target.format(*m.groups())
    raise KeyError(official)


def _reversed(pattern: re.Pattern, target: str) -> tuple[re.Pattern, str]:
    """(regex of our name, template of the official name) for one row of _NAME_PATTERNS."""
    return re.compile(re.escape(target).replace(r"\{\}", r"(\w+)")), re.sub(r"\([^)]*\)", "{}", pattern.pattern).replace("\\.", ".")


_OFFICIAL_NAMES = [_reversed(p, t) for p, t in _NAME_PATTERNS]


def official_name(native: str) -> str:
    """The checkpoint name of one of our tensors (the inverse of native_name)."""
    base, _, suffix = native.rpartition(".")
    if suffix in _QUANTIZED_SUFFIXES:
        return official_name(base + ".weight").removesuffix("weight") + suffix
    for pattern, template in _OFFICIAL_NAMES:
        m = pattern.fullmatch(native)
        if m:
            return template.format(*m.groups())
    raise KeyError(native)


def iter_tensors(file: Path):
    """(name, cpu tensor) for each tensor of a shard; corrupt or truncated files raise CheckpointError."""
    if file.suffix == ".safetensors":
        yield from _read_safetensors(file)
    else:
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:
            raise CheckpointError(f"{file} is corrupt or truncated ({type(e).__name__}: {e}); download it again") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file} does not hold a state dict of tensors")
        yield from state.items()


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
_ALIGN = 64


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors start 64-byte aligned (those whose sizes are multiples
    of 64 go first), so that loading can use them in place at full speed; the safetensors library's
    own writer aligns to 8 bytes only."""
    names = sorted(tensors, key=lambda n: (tensors[n].nbytes % _ALIGN != 0, n))
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


SHARD_BYTES = 2 * 1024**3


def save_shards(tensors: dict[str, torch.Tensor], dst: Path, write=save_safetensors) -> None:
    """Write tensors (official names) into dst as safetensors shards of ~2 GB each, in order, plus
    model.safetensors.index.json, the layout the hub repositories use. write: the file writer."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        if current and size + tensor.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write(shard, dst / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _read_safetensors(file: Path):
    """(name, tensor) for each tensor of a safetensors file, each in its own private (copy-on-write)
    mapping of the file: no copy, and a tensor's pages leave this process's memory once it is
    dropped, so quantizing or converting a 2 GB shard never holds more than one tensor of it."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is corrupt or truncated ({why}); download it again")

    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"a header of {header_len} bytes in a file of {size}")
            header = json.loads(f.read(header_len))
            entries = [(name, _DTYPES_BY_NAME[e["dtype"]], list(e["shape"]), *e["data_offsets"])
                       for name, e in header.items() if name != "__metadata__"]
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise corrupt(f"unreadable header: {type(e).__name__}: {e}") from None
        base = 8 + header_len
        for name, dtype, shape, begin, end in entries:
            count = math.prod(shape)
            if not 0 <= begin <= end or end - begin != count * dtype.itemsize:
                raise corrupt(f"tensor {name!r} has offsets {begin}..{end} for shape {shape}")
            if base + end > size:
                raise corrupt(f"tensor {name!r} ends at byte {base + end} of a {size}-byte file")
            if count == 0:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            start = base + begin
            page = start - start % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(f.fileno(), base + end - page, offset=page, access=mmap.ACCESS_COPY)
            yield name, torch.frombuffer(mapping, dtype=dtype, count=count, offset=start - page).view(shape)


def _file_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def load_weights(model: GLMTransformer, files: list[Path], progress: bool = True) -> None:
    """Copy each tensor into its place; float weights of quantized layers are quantized on the way."""
    params = model.state_dict(keep_vars=True)
    quantized = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    loaded: set[str] = set()
    pending: dict = {}  # q/k/v of transformers-layout checkpoints, joined into query_key_value
    with tqdm(total=_file_bytes(files), unit="B", unit_scale=True, desc="Loading weights",
              disable=not progress, leave=False) as bar:
        for file in files:
            for name, tensor in official_tensors(iter_tensors(file), pending):
                bar.update(tensor.numel() * tensor.element_size())
                try:
                    target = native_name(name)
                except KeyError:
                    raise CheckpointError(
                        f"{file.name}: unexpected tensor {name!r}; this does not look like a ChatGLM2/3 checkpoint"
                    ) from None
                if target is None:
                    continue
                if target in quantized:
                    _quantize_into(quantized[target], tensor, f"{file.name}: tensor {name!r}")
                    loaded.update(target.removesuffix("weight") + b for b in quantized[target]._buffer_names)
                    continue
                param = params.get(target)
                if param is None:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has no place in a model with this config.json")
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"config.json implies {tuple(param.shape)}"
                    )
                with torch.no_grad():
                    if _can_adopt(tensor, param):
                        param.data = tensor  # no copy: the weights stay in the shard's (private) mapping
                    else:
                        copy_converting(param, tensor)
                loaded.add(target)
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
            and tensor.data_ptr() % _ALIGN == 0)


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


def _quantize_into(layer: QuantizedLinear, tensor: torch.Tensor, what: str) -> None:
    try:
        layer.set_weight(tensor)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e}") from None


_RANDOM_BLOCK = 1_048_573  # a prime: rows of any width start at different places in the tiled block


def init_random_weights(model: GLMTransformer, seed: int = 0) -> None:
    """Random weights of the real shapes (std 0.02, norms at 1): for speed work only.

    Drawing 6 B normal numbers takes about a minute on 2 cores, so one block of ~1 M normal
    numbers is drawn per seed and every weight is that block tiled from an offset (and sign) set by
    the seed and the weight's name. A quantized layer gets the float weight the 16-bit model would
    have, quantized at once (one layer in memory), so a quantized random model is the 16-bit one,
    quantized.
    """
    block = torch.randn(_RANDOM_BLOCK, generator=torch.Generator().manual_seed(seed)).mul_(0.02)
    blocks = (block.to(model.device), (-block).to(model.device))  # copy_ converts ~7× faster than mul(out=)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                _fill_tiled(param, blocks, f"{name}:{seed}")
        for name, layer in model.named_modules():
            if isinstance(layer, QuantizedLinear):
                w = torch.empty(layer.out_features, layer.in_features, dtype=model.dtype, device=model.device)
                layer.set_weight(_fill_tiled(w, blocks, f"{name}.weight:{seed}"))


def _fill_tiled(t: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor], key: str) -> torch.Tensor:
    """t (contiguous) := one of `blocks` (its sign), tiled from a start, both set by `key`."""
    h = zlib.crc32(key.encode())
    block = blocks[h >> 31]
    start, flat, done = h % len(block), t.view(-1), 0
    while done < flat.numel():
        piece = block[start:start + flat.numel() - done]
        flat[done:done + len(piece)].copy_(piece)
        done, start = done + len(piece), 0
    return t


# ---------------------------------------------------------------------------------------------
# The entry point

@dataclass
class LoadInfo:
    path: str
    seconds: float
    weight_bytes: int
    random_weights: bool
    quantization: dict | None = None  # {"method": "int4", "group_size": 128}, None for 16/32-bit


def empty_model(config: GLMConfig, dtype: torch.dtype, device, quantization: dict | None = None) -> GLMTransformer:
    """A model whose parameters are allocated on `device` in `dtype` but not yet filled."""
    with torch.device("meta"):
        model = GLMTransformer(config)
    model = model.to(dtype)
    if quantization:
        quantize_model(model, quantization["method"], quantization.get("group_size", 128))
    model = model.to_empty(device=device)
    model.reset_rotary()
    return model.eval().requires_grad_(False)


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
) -> tuple[GLMTransformer, LoadInfo]:
    """Load a ChatGLM checkpoint. dtype None keeps the checkpoint's stored dtype.

    quantize "int8" / "int4" (group_size 32/64/128) quantizes the Linear weights tensor by tensor
    while loading; a checkpoint saved by `glmchat quantize` loads in its own quantization.
    """
    start = time.perf_counter()
    device = torch.device(device)
    check_method(quantize, group_size)
    stored = None
    if random_weights:
        config = load_config(path_or_id)
        files = []
    else:
        directory = resolve_checkpoint(path_or_id)
        config = read_config(directory, name=os.fspath(path_or_id))[0]
        stored = stored_quantization(directory)
        files = weight_files(directory)
    requested = quantization_entry(quantize, group_size) if quantize else None
    quantization = stored or requested
    if stored and requested and stored != requested:
        raise CheckpointError(
            f"{path_or_id} is already quantized ({stored['method']}); load it without a different quantization"
        )
    dtype = parse_dtype(dtype if dtype is not None else config.torch_dtype)
    model = empty_model(config, dtype, device, quantization)
    if random_weights:
        init_random_weights(model, seed)
    else:
        load_weights(model, files, progress=progress)
    if device.type == "cpu" and dtype == torch.bfloat16:  # the only dtype the kernels take
        cpu_kernels.available()  # compiles them on first use (seconds), here rather than in the first answer
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model, LoadInfo(os.fspath(path_or_id), time.perf_counter() - start, nbytes, random_weights, quantization)


def quantization_entry(method: str, group_size: int = 128) -> dict:
    """The config.json "quantization" entry for a method."""
    return {"method": method, "group_size": group_size} if method == "int4" else {"method": method}


def stored_quantization(directory: Path) -> dict | None:
    """The "quantization" entry of a checkpoint saved by `glmchat quantize`, or None."""
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("quantization")
    if raw is None:
        return None
    try:
        check_method(raw.get("method"), raw.get("group_size", 128))
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: unsupported quantization entry {raw!r} ({e})") from None
    return quantization_entry(raw["method"], raw.get("group_size", 128))


__all__ = [
    "CheckpointError", "ConfigError", "DEFAULT_MODEL", "LoadInfo", "load_config", "load_model",
    "parse_dtype", "resolve_checkpoint", "weight_files",
]
