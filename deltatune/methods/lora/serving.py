"""Mixed-adapter batches for serving: row i of a batch runs adapter `row_adapters[i]` (None: the base alone), so
requests for different adapters share one forward pass of the base model.

`deltatune.apps.serve` (and `PeftModel.forward(adapter_names=...)`) set `row_adapters` on every LoRA layer for the
duration of one batch; the layer's forward then adds each adapter's update to its own rows only.
"""

from __future__ import annotations

import torch

from deltatune.errors import ConfigError


def row_groups(layer, batch: int) -> list[tuple[str, torch.Tensor]]:
    """(adapter, row indices) for each adapter named in `layer.row_adapters` that this layer holds."""
    if len(layer.row_adapters) != batch:
        raise ConfigError(f"row_adapters names {len(layer.row_adapters)} rows but the batch has {batch}.")
    if layer.disable_adapters or layer.merged:
        return []
    held = layer.adapter_names
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(layer.row_adapters):
        if name is not None and name in held:
            groups.setdefault(name, []).append(i)
    return [(n, torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items()]


def mixed_forward(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Add each row's own adapter update to the base output `result`."""
    for name, rows in row_groups(layer, x.shape[0]):
        rows = rows.to(x.device)
        result = result.index_add(0, rows, layer._lora_update(name, x[rows]).to(result.dtype))
    return result
