"""Learning-rate schedules: constant, linear, exponential and cosine decay, each after a linear warmup, and a
loss-adaptive rule.

A schedule is a pure function of the step (except the loss-adaptive one, which keeps the last loss), so a resumed
run only needs the step and, for the adaptive rule, two floats; `state_dict` holds exactly that.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deltatune.errors import ConfigError
from deltatune.quant import require_bitsandbytes

SCHEDULES = ("constant", "linear", "exponential", "cosine", "loss-adaptive")


class Schedule:
    """Sets the optimizer's learning rate before each step.

    - warmup: lr rises linearly from lr/warmup_steps to lr over `warmup_steps` steps (all schedules).
    - constant: lr.  linear: lr -> min_lr at `total_steps`.  cosine: half a cosine from lr to min_lr.
    - exponential: lr * gamma**t (t counted after warmup), never below min_lr.
    - loss-adaptive: lr_{t+1} = lr_t * L_t / L_{t-1}, clamped to [min_lr, max_lr]: the rate follows the loss
      ratio, so it shrinks while the loss falls and grows back when the loss rises.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str = "linear",
        total_steps: int = 1,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        gamma: float = 0.99,
        max_lr: float | None = None,
    ) -> None:
        if name not in SCHEDULES:
            raise ConfigError(f"Unknown schedule {name!r}; use one of: {', '.join(SCHEDULES)}.")
        if warmup_steps < 0 or total_steps < 1:
            raise ConfigError(
                f"Need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}."
            )
        if not 0 < gamma <= 1:
            raise ConfigError(f"The exponential schedule's gamma must be in (0, 1], got {gamma}.")
        self.optimizer = optimizer
        self.name = name
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.min_lr = min_lr
        self.gamma = gamma
        self.max_lr = max_lr if max_lr is not None else max(self.base_lrs)
        if min_lr < 0 or min_lr > self.max_lr:
            raise ConfigError(f"Need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={self.max_lr}.")
        self.step_count = 0
        self.adaptive_lr = list(self.base_lrs)  # the loss-adaptive rule's current rates
        self.last_loss: float | None = None
        self._apply()

    def factor(self, step: int) -> float:
        """Multiplier of the base lr at `step` for the closed-form schedules (warmup included)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        if self.name in ("constant", "loss-adaptive"):
            return 1.0
        if self.name == "linear":
            return max(0.0, 1.0 - t / span)
        if self.name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
        return self.gamma**t  # exponential

    def lr_at(self, step: int, base_lr: float) -> float:
        f = self.factor(step)
        if step < self.warmup_steps:
            return base_lr * f
        if self.name in ("linear", "cosine"):
            return self.min_lr + (base_lr - self.min_lr) * f
        if self.name == "exponential":
            return max(self.min_lr, base_lr * f)
        return base_lr * f

    def _apply(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if self.name == "loss-adaptive" and self.step_count >= self.warmup_steps:
                group["lr"] = self.adaptive_lr[i]
            else:
                group["lr"] = self.lr_at(self.step_count, self.base_lrs[i])

    def step(self, loss: float | None = None) -> None:
        """Advance one optimizer step; the loss-adaptive rule needs that step's loss."""
        self.step_count += 1
        if self.name == "loss-adaptive":
            if loss is None:
                raise ConfigError("The loss-adaptive schedule needs the step's loss: call step(loss).")
            if self.last_loss is not None and self.last_loss > 0 and self.step_count > self.warmup_steps:
                ratio = loss / self.last_loss
                self.adaptive_lr = [min(self.max_lr, max(self.min_lr, lr * ratio)) for lr in self.adaptive_lr]
            self.last_loss = float(loss)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "adaptive_lr": self.adaptive_lr, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        self.adaptive_lr = list(state["adaptive_lr"])
        self.last_loss = state["last_loss"]
        self._apply()


# bitsandbytes' optimizers, for memory: 8-bit states, and "paged" states that move to CPU memory when the GPU runs
# short (QLoRA's paged AdamW). Paged states need CUDA.
BNB_OPTIMIZERS = {
    "adamw_8bit": ("AdamW8bit", False),
    "paged_adamw": ("PagedAdamW", True),
    "paged_adamw_8bit": ("PagedAdamW8bit", True),
}
OPTIMIZERS = ("adamw", "adam", "sgd", *BNB_OPTIMIZERS)


def make_optimizer(
    params, name: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW, Adam, SGD, or one of bitsandbytes' 8-bit / paged AdamW over `params` (tensors or param groups)."""
    if lr is None or lr <= 0:
        raise ConfigError(f"The learning rate must be positive, got lr={lr}.")
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name in BNB_OPTIMIZERS:
        cls_name, paged = BNB_OPTIMIZERS[name]
        if paged and not torch.cuda.is_available():
            raise ConfigError(
                f"optimizer {name!r} pages its state through CUDA memory; use adamw_8bit or adamw here."
            )
        return getattr(require_bitsandbytes().optim, cls_name)(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"Unknown optimizer {name!r}; use one of: {', '.join(OPTIMIZERS)}.")
