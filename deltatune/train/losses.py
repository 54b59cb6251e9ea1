"""Causal-LM loss without the (tokens x vocabulary) logits tensor.

Why: on a small LLM the output head dominates training cost. SmolLM2-135M has a 49,152-word vocabulary over a
576-wide hidden state, so for every token the head costs as much as 3 of its 30 layers, and the float32 logits,
their log-softmax and its gradient take 3 x 196 KB per token. Instruction tuning scores only the response tokens,
yet the usual path computes logits for every position, prompt and padding included.

`causal_lm_loss` runs the model up to its last hidden state, keeps the positions whose next-token label is not
-100, and computes the head and the cross-entropy over those rows in chunks of `chunk_size`. The gradient with
respect to the hidden rows is computed in the same pass (softmax minus one-hot, times the head weight), so nothing
of size vocabulary is kept for backward and nothing is recomputed. The value equals
`F.cross_entropy(logits, labels, ignore_index=-100)` (mean over the scored tokens); tests check value and gradient.

It applies to models whose logits are `lm_head(hidden)` with a frozen nn.Linear head (LoRA, IA3, adapters, ...);
`fused_loss_parts` returns None for anything else (soft prompts, a trainable or wrapped head, logit soft-capping,
a DistributedDataParallel or FSDP wrapper) and the caller takes the usual path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from deltatune.method import Method
from deltatune.model import PeftModel


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, chunked over rows; weight is frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int):
        n = hidden.shape[0]
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        acc = (
            torch.float64 if hidden.dtype == torch.float64 else torch.float32
        )  # half precision: float32 softmax
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.t()).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            target = labels[rows]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if need_grad:  # d loss_i / d logits_i = softmax_i - onehot_i, computed in place
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(target), device=probs.device), target] -= 1
                grad_hidden[rows] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.n = n
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        grad = (
            grad_hidden * (grad_loss / max(ctx.n, 1)).to(grad_hidden.dtype)
            if grad_hidden is not None
            else None
        )
        return grad, None, None, None, None


def _unwrap(model: nn.Module) -> nn.Module | None:
    """The transformers model under a deltatune PeftModel, or None when the wrapper's forward does more than call
    it (soft prompts prepend virtual tokens) or when DDP / FSDP must see the forward call (to sync gradients, to
    gather the root's parameter shards)."""
    if isinstance(model, (DistributedDataParallel, FSDPModule)):  # their hooks run on the wrapper's forward
        return None
    if isinstance(model, PeftModel):
        if type(model.method).forward is not Method.forward:
            return None
        model = model.get_base_model()
    return model


def fused_loss_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, head) when the model's logits are exactly `head(backbone(...).last_hidden_state)`."""
    inner = _unwrap(model)
    if inner is None or not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or head.weight.requires_grad or not isinstance(backbone, nn.Module):
        return None
    config = getattr(inner, "config", None)
    for scaled in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, scaled, None) not in (None, 1, 1.0):
            return None
    if getattr(config, "is_encoder_decoder", False):
        return None
    return backbone, head


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], chunk_size: int = 1024) -> torch.Tensor | None:
    """Mean next-token cross-entropy over the labelled positions of `batch` (input_ids, attention_mask, labels
    aligned with input_ids; position_ids when packed), or None when the model does not allow the fused path (see the module docstring)."""
    parts = fused_loss_parts(model)
    if parts is None:
        return None
    backbone, head = parts
    out = backbone(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),  # packed rows restart their positions
        use_cache=False,
    )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    rows = hidden[:, :-1][keep]
    return LinearCrossEntropy.apply(rows, head.weight, head.bias, targets[keep], chunk_size)
