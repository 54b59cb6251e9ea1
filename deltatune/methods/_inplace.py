"""What BitFit, FREEZE and FULL share: they train tensors of the base model itself, in place.

The adapter's tensors are then the base's own parameters (checkpoint key `base_model.model.<parameter name>`):
- a model holds one such adapter (two would train, save and load the very same tensors);
- `disable_adapter()` must still give the base model's outputs, so the original values are copied (to CPU, so a
  FULL fine-tune does not double GPU memory) when the adapter is added, and used in their place while disabled;
- there is nothing to merge: the trained values already are the weights, `merge_and_unload()` returns them.
Trained heads (`modules_to_save`) are copies, as for every method, so the originals stay untouched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from deltatune.checkpoint import PREFIX, all_heads_entries
from deltatune.errors import ConfigError
from deltatune.method import Method

ORIGINALS = "_base_originals"


def _originals_on_device(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    base = peft_model.get_base_model()
    originals = peft_model.__dict__.get(ORIGINALS, {})
    out = {}
    for name, tensor in originals.items():
        param = base.get_parameter(name)
        out[name] = tensor.to(device=param.device, dtype=param.dtype)
    return out


@contextlib.contextmanager
def _swapped_in(peft_model: nn.Module):
    """Temporarily put the original values into the live parameters (used under no_grad only)."""
    base = peft_model.get_base_model()
    live = {}
    try:
        for name, original in _originals_on_device(peft_model).items():
            param = base.get_parameter(name)
            live[name] = param.data
            param.data = original
        yield
    finally:
        for name, data in live.items():
            base.get_parameter(name).data = data


class InPlaceMethod(Method):
    """Methods whose adapter is a set of the base model's own tensors. A subclass says which (`trained_tensors`)
    and checks its config in `inject` before calling `remember_originals`."""

    peft_format = False
    mergeable = True  # nothing to fold in: the trained values already are the weights

    def trained_tensors(self, model: nn.Module, config) -> dict[str, torch.Tensor]:
        """Parameter name (relative to the base model) -> the base tensor this adapter trains."""
        return {}

    def check_first_adapter(self, peft_model: nn.Module) -> None:
        if peft_model.peft_config:
            raise ConfigError(
                f"{self.title} trains the base model's own tensors, so a model holds one {self.title} adapter. "
                "Use a fresh base model (a separate PeftModel) for another one."
            )

    def remember_originals(self, peft_model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a CPU copy of the values the adapter is about to train (names relative to the base model). A model
        on the meta device (shapes only, e.g. for a memory estimate) has no values to copy."""
        peft_model.__dict__[ORIGINALS] = {
            name: t.detach() if t.is_meta else t.detach().to("cpu", copy=True) for name, t in tensors.items()
        }

    def state_dict(self, peft_model: nn.Module, adapter_name: str, config) -> dict[str, torch.Tensor]:
        model = peft_model.get_base_model()
        entries = {PREFIX + name: t for name, t in self.trained_tensors(model, config).items()}
        return {**entries, **all_heads_entries(model, adapter_name)}

    def forward(self, peft_model: nn.Module, *args, **kwargs):
        """The base model's forward; while disabled, with the original values substituted (autograd-safe)."""
        if not peft_model._disabled:
            return peft_model.base_model(*args, **kwargs)
        base = peft_model.get_base_model()
        return torch.func.functional_call(base, _originals_on_device(peft_model), args, kwargs)

    def generate(self, peft_model: nn.Module, *args, **kwargs):
        base = peft_model.get_base_model()
        if not peft_model._disabled:
            return base.generate(*args, **kwargs)
        with torch.no_grad(), _swapped_in(peft_model):
            return base.generate(*args, **kwargs)
