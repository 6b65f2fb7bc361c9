"""Checkpoint files on disk: which files hold the weights, reading their tensors, writing safetensors.

Owns the weight-file discovery of a checkpoint directory, the readers (safetensors through private
copy-on-write mappings, `.bin` through torch.load with weights_only) and the aligned writers.
CheckpointError (the error every loading step raises for a checkpoint it cannot use) lives in
glmchat.errors, which needs no torch, and is re-exported here.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import struct
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError  # noqa: F401  (re-exported: its historic home)


_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_SINGLES = ("model.safetensors", "pytorch_model.bin")
ALIGN = 64  # bytes: where save_safetensors starts tensors, and what loading in place needs


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


def iter_tensors(file: Path):
    """(name, cpu tensor) for each tensor of a shard; corrupt or truncated files raise CheckpointError."""
    if file.suffix == ".safetensors":
        yield from _read_safetensors(file)
    else:
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as e:
            # Not torch's text: it advises weights_only=False, which would run the file's code.
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            refers = f"; this one refers to {found.group(1)}" if found else ""
            raise CheckpointError(f"{file} is damaged or not a plain weights file (only a state dict of tensors "
                                  f"loads{refers}; glmchat runs no code from a checkpoint): download it again") from None
        except Exception as e:
            reason = re.split(r"(?<=\.)\s", str(e).strip(), maxsplit=1)[0].rstrip(".")[:160]
            raise CheckpointError(f"{file} is corrupt or truncated ({type(e).__name__}: {reason}); download it again") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{file} does not hold a state dict of tensors")
        yield from state.items()


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors start 64-byte aligned (those whose sizes are multiples
    of 64 go first), so that loading can use them in place at full speed; the safetensors library's
    own writer aligns to 8 bytes only."""
    names = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGN != 0, n))
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
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
