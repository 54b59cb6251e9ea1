"""`get_layer_status` / `get_model_status`: peft's reports on the adapter layers of a model.

They answer "is my model in the state I think it is?": which adapters each layer holds, which are active, merged
and trainable, on which devices. The fields are peft's (`TunerLayerStatus`, `TunerModelStatus`), so code that reads
them runs unchanged; `module_type` and `adapter_model_type` name deltatune's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deltatune.errors import UnsupportedModelError
from deltatune.layer import AdapterLayer, ModulesToSave

IRREGULAR = "irregular"  # the layers disagree: the model is in an inconsistent state


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"]


def _agree(values: list):
    """The one value all entries share, else "irregular"."""
    distinct = {repr(v): v for v in values}
    return next(iter(distinct.values())) if len(distinct) == 1 else IRREGULAR


def _adapter_tensors(layer: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Adapter name -> the layer's tensors of that adapter."""
    out: dict[str, list[torch.Tensor]] = {}
    containers = (
        [layer.modules_to_save]
        if isinstance(layer, ModulesToSave)
        else [getattr(layer, a) for a in layer.adapter_attrs]
    )
    for container in containers:
        for name, item in container.items():
            tensors = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            out.setdefault(name, []).extend(tensors)
    return out


def _quantization(layer: nn.Module) -> str | None:
    base = getattr(layer, "base_layer", None)
    kind = type(base).__name__ if base is not None else ""
    return {"Linear4bit": "bnb 4bit", "Linear8bitLt": "bnb 8bit"}.get(kind)


def _tuned_model(model: nn.Module) -> nn.Module:
    """Where the layer names start: a PeftModel's tuner (`model.model.layers.0...`, as peft names them)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if not getattr(model.method, "wraps_base", True):
            raise UnsupportedModelError(
                "get_layer_status() reports on adapter layers; soft-prompt adapters have none (as in peft)."
            )
        return model.base_model
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One report per adapter layer (and per module trained in full) of a PeftModel or a model with injected
    adapters."""
    report = []
    for name, layer in _tuned_model(model).named_modules():
        if not isinstance(layer, (AdapterLayer, ModulesToSave)):
            continue
        tensors = _adapter_tensors(layer)
        report.append(
            TunerLayerStatus(
                name=name,
                module_type=type(layer).__name__,
                enabled=not layer.disable_adapters,
                active_adapters=layer.active_adapters,
                merged_adapters=list(getattr(layer, "merged_adapters", [])),
                requires_grad={a: _agree([t.requires_grad for t in ts]) for a, ts in tensors.items()},
                available_adapters=sorted(layer.adapter_names),
                devices={a: sorted({t.device.type for t in ts}) for a, ts in tensors.items()},
                quantization_backend=_quantization(layer),
            )
        )
    if not report:
        raise UnsupportedModelError("The model has no adapter layers; add an adapter first (get_peft_model).")
    return report


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layer reports folded into one; a field is "irregular" where the layers disagree."""
    layers = get_layer_status(model)
    configs = getattr(model, "peft_config", {})
    merged = sorted({a for s in layers for a in s.merged_adapters})
    partly_merged = any(set(merged) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers)
    per_adapter: dict[str, list] = {}
    devices: dict[str, set[str]] = {}
    for s in layers:
        for a, flag in s.requires_grad.items():
            per_adapter.setdefault(a, []).append(flag)
        for a, kinds in s.devices.items():
            devices.setdefault(a, set()).update(kinds)
    is_peft_model = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
    base = model.get_base_model() if is_peft_model else model
    if is_peft_model:
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return TunerModelStatus(
        base_model_type=type(base).__name__ if is_peft_model or hasattr(base, "config") else "other",
        adapter_model_type=type(model.base_model).__name__ if is_peft_model else "None",
        peft_types={name: str(getattr(c.peft_type, "value", c.peft_type)) for name, c in configs.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_agree([s.enabled for s in layers]),
        active_adapters=_agree([s.active_adapters for s in layers]),
        merged_adapters=IRREGULAR if partly_merged else merged,
        requires_grad={a: _agree(flags) for a, flags in per_adapter.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(kinds) for a, kinds in devices.items()},
        quantization_backend=_agree([s.quantization_backend for s in layers]),
    )
