"""LoRA (Hu et al. 2021) with rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

config.py   the options (peft's names)          layers.py   the layers and their merge rules
dora.py     DoRA's magnitude, forward and merge  fused.py    one autograd op for the common training case
serving.py  mixed-adapter batches (one adapter per row)
"""

from __future__ import annotations

from torch import nn

from deltatune.inject import find_targets, replace_module
from deltatune.method import Method, Variant
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, layer_class_for


def inject_lora(
    peft_model: nn.Module, config: LoraConfig, adapter_name: str, layer_cls: type[LoraLayer] | None = None
) -> None:
    """Add adapter `adapter_name` to every targeted module, wrapping it on first use. `layer_cls` lets a composed
    method (UniPELT's gated LoRA) use a LoraLayer subclass."""
    model = peft_model.get_base_model()
    keys = find_targets(model, config)
    wrappers = []
    for key in keys:
        module = model.get_submodule(key)
        if not isinstance(module, LoraLayer):
            module = (layer_cls or layer_class_for(module))(module)
        r, alpha = config.rank_and_alpha(key)
        module.add(adapter_name, r, alpha, config)
        wrappers.append((key, module))
    for key, module in wrappers:  # swap only once every layer accepted the adapter: nothing half-applied
        replace_module(model, key, module)
    if any(m.fan_in_fan_out for _, m in wrappers):
        config.fan_in_fan_out = True


class LoraMethod(Method):
    """Low-rank updates of chosen weights; merges into them exactly."""

    peft_type = "LORA"
    config_class = LoraConfig
    title = "LoRA, rsLoRA, DoRA"
    variants = {
        "lora": Variant(),
        "rslora": Variant({"use_rslora": True}),
        "dora": Variant({"use_dora": True}),
        "qlora": Variant(quantize="nf4"),
    }
    typical_lr = 1e-3
    recipe_defaults = {"target_modules": "all-linear"}
    default_targets = "lora"
    mixed_batches = True

    def inject(self, peft_model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        inject_lora(peft_model, config, adapter_name)


METHOD = LoraMethod()

__all__ = [
    "METHOD",
    "LoraConfig",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMethod",
    "inject_lora",
]
