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

from deltatune.checkpoint import PREFIX
from deltatune.layer import ModulesToSave

ORIGINALS = "_base_originals"


def check_first_adapter(peft_model: nn.Module, method: str) -> None:
    if peft_model.peft_config:
        raise ValueError(
            f"{method} trains the base model's own tensors, so a model holds one {method} adapter. "
            "Use a fresh base model (a separate PeftModel) for another one."
        )


def heads_entries(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint entries of the adapter's trained head copies (`modules_to_save`), named as peft names them."""
    entries = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for sub, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                entries[f"{PREFIX}{name}.{sub}"] = tensor
    return entries


def remember_originals(peft_model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Keep a CPU copy of the values the adapter is about to train (names relative to the base model)."""
    peft_model.__dict__[ORIGINALS] = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def _originals_on_device(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    base = peft_model.base_model
    originals = peft_model.__dict__.get(ORIGINALS, {})
    out = {}
    for name, tensor in originals.items():
        param = base.get_parameter(name)
        out[name] = tensor.to(device=param.device, dtype=param.dtype)
    return out


def forward(peft_model: nn.Module, *args, **kwargs):
    """The base model's forward; while disabled, with the original values substituted (autograd-safe)."""
    if not peft_model._disabled:
        return peft_model.base_model(*args, **kwargs)
    return torch.func.functional_call(peft_model.base_model, _originals_on_device(peft_model), args, kwargs)


@contextlib.contextmanager
def _swapped_in(peft_model: nn.Module):
    """Temporarily put the original values into the live parameters (used under no_grad only)."""
    base = peft_model.base_model
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


def generate(peft_model: nn.Module, *args, **kwargs):
    if not peft_model._disabled:
        return peft_model.base_model.generate(*args, **kwargs)
    with torch.no_grad(), _swapped_in(peft_model):
        return peft_model.base_model.generate(*args, **kwargs)
