"""Mixed-adapter batches for serving: row i of a batch runs adapter `row_adapters[i]` (None: the base alone), so
requests for different adapters share one forward pass of the base model.

`deltatune.apps.serve` (and `PeftModel.forward(adapter_names=...)`) set `row_adapters` on every LoRA layer for the
duration of one batch; the layer's forward then adds each adapter's update to its own rows only.

Why the cost depends only on the adapters in the batch (as in Punica's and S-LoRA's segmented matmul): the rows are
grouped by adapter once per forward pass (a `RowPlan`, shared by every layer), each layer looks the batch's adapters
up by name (a dict lookup, whatever the number of adapters loaded) and runs one pair of small matmuls per adapter
segment. Rows of one adapter that sit side by side are a slice (no gather, no scatter); the whole batch on one
adapter is one update over the whole batch.
"""

from __future__ import annotations

import torch

from deltatune.errors import ConfigError

Rows = slice | torch.Tensor  # the rows of one adapter: a slice when they are contiguous, else their indices


class RowPlan(list):
    """The adapter of each row of one batch, grouped once. A plain list of names works too (each layer then groups
    it again, still linear in the batch); the server hands every layer the same plan."""

    def __init__(self, names) -> None:
        super().__init__(names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self):
            if name is not None:
                groups.setdefault(name, []).append(i)
        self.groups = groups
        self._segments: dict[str, list[tuple[str, Rows]]] = {}

    def segments(self, device: torch.device) -> list[tuple[str, Rows]]:
        """(adapter, rows) per adapter in the batch; index tensors are made once per device."""
        key = str(device)
        if key not in self._segments:
            self._segments[key] = [(name, _rows(idx, device)) for name, idx in self.groups.items()]
        return self._segments[key]


def _rows(indices: list[int], device: torch.device) -> Rows:
    first, last = indices[0], indices[-1]
    if last - first + 1 == len(indices):
        return slice(first, last + 1)
    return torch.tensor(indices, dtype=torch.long, device=device)


def row_groups(layer, batch: int) -> list[tuple[str, Rows]]:
    """(adapter, rows) for each adapter named in `layer.row_adapters` that this layer holds."""
    plan = layer.row_adapters
    if not isinstance(plan, RowPlan):
        plan = RowPlan(plan)
    if len(plan) != batch:
        raise ConfigError(f"row_adapters names {len(plan)} rows but the batch has {batch}.")
    if layer.disable_adapters or layer.merged:
        return []
    device = layer.base_layer.weight.device if hasattr(layer.base_layer, "weight") else torch.device("cpu")
    return [(name, rows) for name, rows in plan.segments(device) if name in layer.r]


def mixed_forward(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """Add each row's own adapter update to the base output `result` (in place when no gradient is recorded: the
    base output is a fresh tensor)."""
    in_place = not torch.is_grad_enabled()
    for name, rows in row_groups(layer, x.shape[0]):
        update = layer._lora_update(name, x[rows]).to(result.dtype)
        if not in_place:
            index = torch.arange(x.shape[0], device=result.device)[rows] if isinstance(rows, slice) else rows
            result = result.index_add(0, index, update)
        elif isinstance(rows, slice):
            result[rows] += update
        else:
            result.index_add_(0, rows, update)
    return result
