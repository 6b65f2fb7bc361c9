"""Random weights of the real shapes, fast and seeded: for trying glmchat and measuring speed
without the download."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .parallel import set_quantized_share
from .quantize import QuantizedLinear

_RANDOM_BLOCK = 1_048_573  # a prime: rows of any width start at different places in the tiled block


def init_random_weights(model: nn.Module, seed: int = 0, part=None, whole_shapes: dict | None = None) -> None:
    """Random weights of the real shapes (std 0.02, norms at 1): for speed work only.

    Drawing 6 B normal numbers takes about a minute on 2 cores, so one block of ~1 M normal
    numbers is drawn per seed and every weight is that block tiled from an offset (and sign) set by
    the seed and the weight's name. A quantized layer gets the float weight the 16-bit model would
    have, quantized at once (one layer in memory), so a quantized random model is the 16-bit one,
    quantized. part / whole_shapes (a tensor-parallel rank's glmchat.parallel.ShardPlan and the whole
    model's parameter shapes): each weight is drawn whole, one at a time, and the rank keeps its
    share, so that the ranks' shares fit together.
    """
    block = torch.randn(_RANDOM_BLOCK, generator=torch.Generator().manual_seed(seed)).mul_(0.02)
    blocks = (block.to(model.device), (-block).to(model.device))  # copy_ converts ~7× faster than mul(out=)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif part is not None:  # the rank's share of the whole weight (zeros where another rank adds it)
                whole = torch.empty(whole_shapes[name], dtype=param.dtype, device=param.device)
                param.copy_(part(name, _fill_tiled(whole, blocks, f"{name}:{seed}")))
            else:
                _fill_tiled(param, blocks, f"{name}:{seed}")
        for name, layer in model.named_modules():
            if not isinstance(layer, QuantizedLinear):
                continue
            shape = whole_shapes[f"{name}.weight"] if part is not None else (layer.out_features, layer.in_features)
            w = _fill_tiled(torch.empty(shape, dtype=model.dtype, device=model.device), blocks, f"{name}.weight:{seed}")
            if part is not None:
                set_quantized_share(layer, f"{name}.weight", w, part)
            else:
                layer.set_weight(w)


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
