"""BitFit (Ben Zaken et al. 2022): fine-tune only the bias terms of the model (about 0.1% of BERT's parameters).

Nothing is wrapped: the adapter's tensors are the base model's own biases (optionally also the LayerNorm/RMSNorm
weights), saved as `base_model.model.<module>.bias` and copied back into the base on loading. The original values
are kept aside so that `disable_adapter()` gives the base model's outputs exactly (see `_inplace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config import PeftConfig, Regex
from deltatune.errors import ConfigError
from deltatune.inject import is_under, name_matches
from deltatune.method import Variant
from deltatune.methods._inplace import InPlaceMethod


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit options (`peft_type` "BITFIT", deltatune's own).

    `target_modules` (names suffix-matched, or a full-name regex) limits training to those modules' biases, e.g.
    the paper's query and intermediate biases; None trains every bias. `include_layer_norm` also trains the
    normalization layers' weights (the only option on a model without biases, like Llama).
    """

    target_modules: list[str | type] | Regex | None = None
    include_layer_norm: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "BITFIT"


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def trained_tensors(model: nn.Module, config: BitFitConfig) -> dict[str, torch.Tensor]:
    """Parameter name -> base tensor BitFit trains; heads in `modules_to_save` are left to their copies."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if config.modules_to_save and is_under(name, config.modules_to_save):
            continue
        if config.target_modules and not name_matches(name, config.target_modules):
            continue
        prefix = f"{name}." if name else ""
        bias = module._parameters.get("bias")
        if bias is not None:
            out[prefix + "bias"] = bias
        weight = module._parameters.get("weight")
        if config.include_layer_norm and weight is not None and _is_norm(module):
            out[prefix + "weight"] = weight
    return out


def _nothing_to_train(model: nn.Module, config: BitFitConfig) -> str:
    if config.target_modules:
        return (
            f"target_modules={config.target_modules!r} selects no module with a bias in {type(model).__name__}. "
            "Fix target_modules, or leave it unset to train every bias."
        )
    return (
        f"{type(model).__name__} has no bias terms, so BitFit has nothing to train. Use include_layer_norm=True "
        "to train its normalization weights, or another method (LoRA, IA3)."
    )


class BitFitMethod(InPlaceMethod):
    """Train only the bias terms (and optionally the normalization weights) of the base model."""

    peft_type = "BITFIT"
    config_class = BitFitConfig
    title = "BitFit"
    variants = {"bitfit": Variant()}
    typical_lr = 5e-3

    def trained_tensors(self, model: nn.Module, config: BitFitConfig) -> dict[str, torch.Tensor]:
        return trained_tensors(model, config)

    def inject(self, peft_model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
        self.check_first_adapter(peft_model)
        model = peft_model.get_base_model()
        tensors = trained_tensors(model, config)
        if not tensors:
            raise ConfigError(_nothing_to_train(model, config))
        self.remember_originals(peft_model, tensors)


METHOD = BitFitMethod()
