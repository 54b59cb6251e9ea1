"""DoRA (Liu et al. 2024): the merged weight split into a learned per-row magnitude m and a direction,
W' = m * (W + s B A) / ||W + s B A||_row. The merge rule and the forward it must agree with sit side by side.

The norm is treated as a constant in backward (paper, sec. 4.3), as peft does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def init_magnitude(layer, name: str) -> None:
    """m starts at the row norms of the base weight plus the initial update, so the model starts unchanged."""
    weight = layer.base_weight().float() + layer.delta_weight(name).float()
    layer.lora_magnitude_vector[name] = nn.Parameter(weight.norm(p=2, dim=1).to(layer._dtype))


def merged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    combined = weight.float() + layer.delta_weight(name).float()
    norm = combined.norm(p=2, dim=1)
    layer._merge_norms[name] = norm
    return (combined * (layer.lora_magnitude_vector[name].float() / norm)[:, None]).to(weight.dtype)


def unmerged_weight(layer, name: str, weight: torch.Tensor) -> torch.Tensor:
    ratio = layer.lora_magnitude_vector[name].float() / layer._merge_norms.pop(name)
    return (weight.float() / ratio[:, None] - layer.delta_weight(name).float()).to(weight.dtype)


def forward(layer, x: torch.Tensor, running: list[str], *args, **kwargs) -> torch.Tensor:
    """base(x) plus, per running adapter, the plain LoRA update or DoRA's rescaled one:
    (m / ||W + dW|| - 1) * W x + (m / ||W + dW||) * dW x (the same function as merged_weight, unmerged)."""
    base_out = layer.base_layer(x, *args, **kwargs)
    result = base_out
    for name in running:
        h = layer._input(name, x)
        update = layer.lora_B[name](layer.lora_A[name](h)) * layer.scaling[name]
        if name not in layer.lora_magnitude_vector:
            result = result + update.to(result.dtype)
            continue
        weight = layer.base_weight()
        norm = (weight + layer.delta_weight(name).to(weight.dtype)).norm(p=2, dim=1).detach()
        scale = layer.lora_magnitude_vector[name] / norm
        bias = getattr(layer.base_layer, "bias", None)
        plain = base_out - bias if bias is not None else base_out
        if h is not x and layer.dropout[name] > 0 and layer.training:
            plain = F.linear(h.to(weight.dtype), weight)
        result = result + ((scale - 1) * plain + scale * update).to(result.dtype)
    return result
