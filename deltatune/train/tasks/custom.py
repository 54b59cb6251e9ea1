"""Any nn.Module with a user-written loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from deltatune.train.tasks.base import StepOutput, Task


class CustomTask(Task):
    """Any nn.Module with a user loss: `loss_fn(model, batch)` returns the loss (or (loss, logits)).

    Features are whatever the user's dataset yields; `collate_fn` defaults to torch's default_collate and
    `metrics_fn(model, features)` may add scores to the evaluation loss."""

    name = "custom"

    def __init__(
        self, loss_fn: Callable, collate_fn: Callable | None = None, metrics_fn: Callable | None = None
    ) -> None:
        super().__init__(None)
        from torch.utils.data import default_collate

        self.loss_fn, self.collate_fn, self.metrics_fn = loss_fn, collate_fn or default_collate, metrics_fn

    def prepare(self, data, source: str = "the data") -> list[Any]:
        return list(data)

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features):
        return self.collate_fn(list(features))

    def loss(self, model: nn.Module, batch: Any) -> StepOutput:
        out = self.loss_fn(model, batch)
        loss, logits = out if isinstance(out, tuple) else (out, None)
        size = len(batch[0]) if isinstance(batch, (list, tuple)) else 1
        return StepOutput(loss, logits, None, size)

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        result = {"eval_loss": self.eval_loss(model, features, batch_size)}
        if self.metrics_fn is not None:
            result.update(self.metrics_fn(model, features))
        return result
