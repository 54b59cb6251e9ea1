"""The `peft.utils` names scripts import most, so `from deltatune.utils import ...` replaces `from peft.utils import
...` unchanged. Each is defined where it belongs in deltatune; this module only gathers them under peft's names."""

from __future__ import annotations

from torch import nn

from deltatune import checkpoint
from deltatune.config import CONFIG_NAME, TaskType
from deltatune.functional import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from deltatune.inject import get_parent
from deltatune.layer import ModulesToSave
from deltatune.quant import prepare_model_for_kbit_training
from deltatune.registry import PeftType
from deltatune.targets import DEFAULTS

SAFETENSORS_WEIGHTS_NAME = checkpoint.WEIGHTS_NAME  # "adapter_model.safetensors"
WEIGHTS_NAME = (
    checkpoint.LEGACY_WEIGHTS_NAME
)  # peft's name for the pickled "adapter_model.bin" (read-only here)
ModulesToSaveWrapper = ModulesToSave

# peft's per-architecture default target tables, read from deltatune.targets (the one table).
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING = {k: list(p.lora) for k, p in DEFAULTS.items()}
TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING = {
    k: list(p.adalora or p.lora) for k, p in DEFAULTS.items()
}
TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING = {k: list(p.ia3) for k, p in DEFAULTS.items() if p.ia3}
TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING = {
    k: list(p.feedforward) for k, p in DEFAULTS.items() if p.ia3
}


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name) of the module named `key` (peft's helper, used by diffusers)."""
    parent, name = get_parent(model, key)
    return parent, model.get_submodule(key), name


__all__ = [
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "WEIGHTS_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "TaskType",
    "_get_submodules",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
