"""peft's functional API: adapters in a model without the PeftModel wrapper, and adapter weights as plain dicts.

transformers (`model.add_adapter`), diffusers (`unet.add_adapter`, `pipe.load_lora_weights`) and training scripts
call these instead of `get_peft_model`: `inject_adapter_in_model` wraps the targeted layers in place and returns the
same model; `get_peft_model_state_dict` / `set_peft_model_state_dict` move an adapter's tensors in and out under the
file's key names (no adapter name in them); `load_peft_weights` reads a saved adapter's tensors.
"""

from __future__ import annotations

import copy
import os
from typing import NamedTuple

import torch
from torch import nn

from deltatune import checkpoint
from deltatune.config import PeftConfig
from deltatune.errors import AdapterNotFoundError, CheckpointError, ConfigError, UnsupportedModelError
from deltatune.model import PeftModel
from deltatune.registry import method_for


class IncompatibleKeys(NamedTuple):
    """What `set_peft_model_state_dict` could not place, as `torch.nn.Module.load_state_dict` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Injected:
    """What a method's hooks read from a PeftModel, for a plain model that holds injected adapters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.peft_config = getattr(model, "peft_config", {})

    def get_base_model(self) -> nn.Module:
        return self.model


def _holder(model: nn.Module) -> tuple[PeftModel | _Injected, str]:
    """(the adapter holder, the prefix to strip from its checkpoint keys): a PeftModel's file keys keep
    `base_model.model.`, an injected model's are its own module names (as peft names them for each)."""
    if isinstance(model, PeftModel):
        return model, ""
    if not getattr(model, "peft_config", None):
        raise UnsupportedModelError(
            f"{type(model).__name__} holds no adapters; use get_peft_model or inject_adapter_in_model first."
        )
    return _Injected(model), checkpoint.PREFIX


def _config(holder, adapter_name: str) -> PeftConfig:
    if adapter_name not in holder.peft_config:
        raise AdapterNotFoundError(
            f"No adapter named {adapter_name!r}; the model has: {', '.join(holder.peft_config)}."
        )
    return holder.peft_config[adapter_name]


def _live_entries(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint key (as this model's files name it) -> live tensor of adapter `adapter_name`."""
    holder, strip = _holder(model)
    config = _config(holder, adapter_name)
    entries = method_for(config.peft_type).state_dict(holder, adapter_name, config)
    return {k.removeprefix(strip): v for k, v in entries.items()}


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add adapter `adapter_name` to `model` in place (no PeftModel around it) and return `model`, with
    `model.peft_config[adapter_name]` set and only the new adapter trainable. With `state_dict`, the targets are the
    modules whose adapter tensors it holds (how diffusers loads a LoRA file)."""
    method = method_for(peft_config.peft_type)
    if not method.wraps_base:
        raise UnsupportedModelError(
            f"{peft_config.peft_type} adds prompts, not layers; use get_peft_model (peft refuses this too)."
        )
    config = copy.deepcopy(peft_config)
    if state_dict is not None:
        config.target_modules = _targets_in(state_dict, checkpoint.PREFIX)
    existing = dict(getattr(model, "peft_config", {}) or {})
    if adapter_name in existing:
        raise ConfigError(f"The model already has an adapter named {adapter_name!r}; pick another name.")
    holder = PeftModel(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    model.peft_config = {**existing, **holder.peft_config}
    return model


def _targets_in(state_dict: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The module names a LoRA-style state dict holds adapter tensors for (`<module>.lora_A.weight` -> module)."""
    names = {key.removeprefix(prefix).split(".lora_")[0] for key in state_dict if ".lora_" in key}
    if not names:
        raise CheckpointError(
            "The state_dict holds no adapter tensors (no '.lora_' keys), so it targets nothing."
        )
    return sorted(names)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s tensors under the names its saved file uses (no adapter name in them). `state_dict`
    (keyed like `model.state_dict()`) supplies the values instead of the live ones."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    holder, strip = _holder(model)
    if isinstance(holder, PeftModel):
        _config(holder, adapter_name)
        return holder.saved_entries(adapter_name, state_dict, save_embedding_layers)
    if save_embedding_layers is True:
        raise ConfigError(
            "save_embedding_layers=True needs a PeftModel; save the model's embeddings yourself."
        )
    entries = _live_entries(model, adapter_name)
    if state_dict:
        live_names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
        entries = {k: state_dict.get(live_names.get(id(t)), t) for k, t in entries.items()}
    return entries


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Copy tensors named as in an adapter file into adapter `adapter_name`. Keys that fit nothing come back as
    `unexpected_keys`; adapter tensors the dict lacks come back as `missing_keys` (named as in
    `model.state_dict()`). A shape that differs raises, or with `ignore_mismatched_sizes=True` is skipped and
    reported as missing."""
    if low_cpu_mem_usage:
        raise ConfigError("low_cpu_mem_usage=True is not supported; leave it False.")
    entries = _live_entries(model, adapter_name)
    live_names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    unexpected = [k for k in peft_model_state_dict if k not in entries]
    missing = [k for k in entries if k not in peft_model_state_dict]
    to_copy = {}
    for key, tensor in peft_model_state_dict.items():
        if key not in entries:
            continue
        if tuple(entries[key].shape) != tuple(tensor.shape):
            if not ignore_mismatched_sizes:
                raise CheckpointError(
                    f"{key} has shape {tuple(tensor.shape)} in the state dict but {tuple(entries[key].shape)} in "
                    "the model; was the adapter made for another base or rank?"
                )
            missing.append(key)
            continue
        to_copy[key] = tensor
    with torch.no_grad():
        for key, tensor in to_copy.items():
            entries[key].copy_(tensor.to(dtype=entries[key].dtype, device=entries[key].device))
    return IncompatibleKeys(
        missing_keys=[live_names.get(id(entries[k]), k) for k in missing], unexpected_keys=unexpected
    )


def load_peft_weights(
    model_id: str | os.PathLike, device: str | torch.device | None = None, revision: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (a local folder, or a hub repository when online), on `device`."""
    state = checkpoint.read_adapter_file(model_id, revision)
    return {k: v.to(device) for k, v in state.items()} if device is not None else state
