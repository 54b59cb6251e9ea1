"""DoRA (Liu et al. 2024): the merged weight split into a learned per-output magnitude m and a direction,
W' = m * (W + dW) / ||W + dW||, the norm taken over everything but the output feature. The merge rule and the
forward it must agree with sit side by side.

One rule for every layer kind LoRA wraps, each seen as the linear map it is (as peft does):
- Linear (and GPT-2's Conv1D): one output per row of W (out x in).
- Conv1d/Conv2d: one output per output channel, the norm over (in, kernel...). peft stores m as (1, out, 1[, 1]),
  and so do we, so the files match.
- Embedding: the table E (vocab x dim) is the map one-hot(token) -> E^T one-hot, so its outputs are the `dim`
  columns of E: one magnitude per embedding dimension, the norm over the vocabulary.

The norm is treated as a constant in backward (paper, sec. 4.3), as peft does.
"""

from __future__ import annotations

import torch
from torch import nn


def rows(layer, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (in the layer's `base_weight()` layout) as a matrix with one row per output feature."""
    return weight.movedim(layer.out_axis, 0).flatten(1)


def along(factor: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-output vector shaped to broadcast against `like` along `axis` (the layer's `out_axis` for a weight,
    its `feature_axis` for an output)."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return factor.reshape(shape)


def magnitude(layer, name: str) -> torch.Tensor:
    """m as a flat (out,) vector, whatever shape it is stored in."""
    return layer.lora_magnitude_vector[name].reshape(-1)


@torch.no_grad()
def init_magnitude(layer, name: str) -> None:
    """m starts at the output norms of the base weight plus the initial update, so the model starts unchanged."""
    weight = layer.base_weight().float() + layer.delta_weight(name).float()
    norm = rows(layer, weight).norm(p=2, dim=1).to(layer._dtype)
    if layer.base_weight().dim() > 2:  # conv: peft's (1, out, 1[, 1])
        norm = norm.reshape(1, -1, *[1] * (layer.base_weight().dim() - 2))
    layer.lora_magnitude_vector[name] = nn.Parameter(norm)


def merged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    combined = weight.float() + layer.delta_weight(name).float()
    norm = rows(layer, combined).norm(p=2, dim=1)
    layer._merge_norms[name] = norm
    scale = magnitude(layer, name).float() / norm
    return (combined * along(scale, combined, layer.out_axis)).to(weight.dtype)


def unmerged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    scale = magnitude(layer, name).float() / layer._merge_norms.pop(name)
    restored = weight.float() / along(scale, weight, layer.out_axis)
    return (restored - layer.delta_weight(name).float()).to(weight.dtype)


def forward(layer, x: torch.Tensor, running: list[str], *args, **kwargs) -> torch.Tensor:
    """base(x) plus, per running adapter, the plain LoRA update or DoRA's rescaled one:
    (m / ||W + dW|| - 1) * W x + (m / ||W + dW||) * dW x (the same function as merged_weight, unmerged).
    W x is the base output without its bias; under dropout, W applied to the dropped input the update saw."""
    base_out = layer.base_layer(x, *args, **kwargs)
    bias = getattr(layer.base_layer, "bias", None)
    plain = base_out if bias is None else base_out - along(bias, base_out, layer.feature_axis)
    result = base_out
    for name in running:
        h = layer._input(name, x)
        update = layer._update(name, h)
        if name not in layer.lora_magnitude_vector:
            result = result + update.to(result.dtype)
            continue
        weight = layer.base_weight()
        norm = rows(layer, weight + layer.delta_weight(name).to(weight.dtype)).norm(p=2, dim=1).detach()
        scale = along(magnitude(layer, name) / norm, base_out, layer.feature_axis)
        dropped = h is not x and layer.dropout[name] > 0 and layer.training
        seen = layer._plain(h.to(weight.dtype)) if dropped else plain
        result = result + ((scale - 1) * seen + scale * update).to(result.dtype)
    return result
