"""Padding-free packing for causal-LM training (`packing: true`).

Why: a padded batch spends compute on pad tokens, as much as the rows' lengths differ. Packing puts the rows of a
micro-batch end to end in one sequence, with position ids restarting at 0 for every row, and keeps attention
within each row, so the packed batch computes exactly what the padded one computes, without the padding.

- `pack(features)`: one row of all the tokens; `labels` as they were, except that each row's first label becomes
  -100. (The loss predicts token t+1 at position t; in a padded batch a row's first token is never a target, and
  here it would be the target of the previous row's last token.) The response-only loss is thereby unchanged.
- `attention_inputs(model, position_ids)`: how the model keeps rows apart. Flash-attention implementations take the
  position ids alone and run their variable-length kernel on the rows (transformers finds the row boundaries where
  the positions restart). Every other implementation gets a block-diagonal causal mask built here: boolean for SDPA,
  additive for the eager path, as transformers' own 4D masks are. Passing the mask explicitly does not rely on a
  model noticing the restarting positions, which transformers skips whenever a key-value cache is in play.

Soft prompts cannot be packed: their virtual tokens are prepended once per row of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError


def pack(features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """input_ids, labels and position_ids of `features` (token lists) concatenated into one row."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        n = len(f["input_ids"])
        input_ids += list(f["input_ids"])
        labels += [-100] + list(f["labels"][1:n])  # a row's first token is nobody's target
        positions += range(n)
    return {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
    }


def _config(model: nn.Module) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "config", None)


def check_packable(model: nn.Module) -> None:
    """Refuse models whose adapter adds tokens per row (prompt tuning, P-tuning, prefixes, MAM, UniPELT)."""
    configs = getattr(model, "peft_config", {}) or {}
    prompted = [name for name, c in configs.items() if getattr(c, "num_virtual_tokens", 0)]
    if prompted:
        raise ConfigError(
            "packing puts several rows in one sequence, but this model's adapter prepends virtual tokens to each "
            "row (soft prompts or prefixes), which cannot be split inside a packed sequence; set packing: false."
        )


def attention_inputs(model: nn.Module, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keyword arguments (besides input_ids) that keep a packed row's sequences from seeing each other."""
    check_packable(model)
    implementation = str(getattr(_config(model), "_attn_implementation", None) or "eager")
    if "flash" in implementation:  # variable-length kernels, from the restarting position ids
        return {"position_ids": position_ids}
    return {"position_ids": position_ids, "attention_mask": block_causal_mask(position_ids, implementation)}


def block_causal_mask(position_ids: torch.Tensor, implementation: str = "sdpa") -> torch.Tensor:
    """(batch, 1, T, T) mask: token i sees token j when j <= i within the same packed row. Boolean (True =
    attend) for SDPA; additive float (0 or the most negative float) for the eager path."""
    starts = position_ids == 0
    row = starts.cumsum(-1)  # which packed row each token belongs to
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (row[:, :, None] == row[:, None, :]) & causal
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
