"""One autograd op for `base(x) + scaling * B(A(x))` on an nn.Linear base.

Why: written as four modules (base, A, B, scale, add) the LoRA layer makes autograd record five nodes, allocate the
LoRA branch's (tokens x out) output and its scaled copy, and in backward allocate a second (tokens x in) input
gradient only to add it to the first. Here the base and the LoRA products accumulate into one output buffer
(`addmm_` with alpha = scaling), the input gradient of both paths into one buffer, and the only tensors kept for
backward are the input `x` (shared by the base and the A path, saved once) and the rank-r product `x A^T`.
The math is exactly the unfused one; tests compare both (values and gradients) in float64.
"""

from __future__ import annotations

import torch
from torch import nn


def _fused_products(flat, weight, bias, lora_a, lora_b, scaling: float):
    """(out, x A^T) for 2-D `flat`: the base product, then the LoRA product added into the same buffer."""
    xa = flat @ lora_a.t()
    out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
    return out.addmm_(xa, lora_b.t(), alpha=scaling), xa


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        out, xa = _fused_products(flat, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.in_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        g_xa = (g @ lora_b).mul_(s) if (need_x or need_a) else None  # gradient at the rank-r product, (n, r)
        if need_x:
            grad_x = (g @ weight).addmm_(g_xa, lora_a).view(ctx.in_shape)
        if need_w:
            grad_w = g.t() @ flat
        if need_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = g_xa.t() @ flat
        if need_b:
            grad_b = (g.t() @ xa).mul_(s)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`x W^T + b + scaling * (x A^T) B^T` as one op (see the module docstring)."""
    if not torch.is_grad_enabled():  # inference: the same fused products, no graph to record
        out, _ = _fused_products(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling)
        return out.view(*x.shape[:-1], out.shape[-1])
    return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling)


def can_fuse(layer, x: torch.Tensor, running: list[str]) -> bool:
    """The fused op covers the common case: one plain LoRA adapter on a float nn.Linear, no dropout at work, no
    autocast, one dtype throughout. Everything else takes the layer's general path."""
    if len(running) != 1 or layer.row_adapters is not None or type(layer.base_layer) is not nn.Linear:
        return False
    if not layer.plain_update:  # a subclass that changes the update (UniPELT's gates) needs the general path
        return False
    name = running[0]
    if name in layer.lora_magnitude_vector or (layer.dropout[name] > 0 and layer.training):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    dtype = layer.base_layer.weight.dtype
    return dtype.is_floating_point and x.dtype == dtype and layer.lora_A[name].weight.dtype == dtype
