"""Partial and full fine-tuning, the baselines every PEFT method is measured against.

- "FREEZE": train the top k transformer blocks, any named modules, and the output head; freeze the rest.
- "FULL": train every parameter; the checkpoint holds all weights (`base_model.model.<parameter name>`).

Both train the base model's tensors in place (see `_inplace`: one adapter per model, originals kept for
`disable_adapter()`, nothing to merge). A task head listed in `modules_to_save` (a classifier, by default for
classification tasks) trains as a copy, as with every other method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config import PeftConfig, Regex
from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.inject import candidate_modules, is_linear, is_under, name_matches
from deltatune.method import Variant
from deltatune.methods._inplace import InPlaceMethod


@dataclass
class FreezeConfig(PeftConfig):
    """Partial fine-tuning (`peft_type` "FREEZE", deltatune's own).

    `num_trainable_layers`: how many of the last numbered blocks train. The blocks are the model's longest
    `nn.ModuleList` (all of the longest, e.g. an encoder's and a decoder's), or the ones named by `layers_pattern`
    (a dotted-name suffix such as "layers" or "encoder.layer"). `trainable_modules` (names suffix-matched, or a
    full-name regex) train in full too. `train_head` trains the output head (`get_output_embeddings()`; for a model
    without one, its last linear layer); with tied embeddings that also trains the input embeddings.
    """

    num_trainable_layers: int = 2
    layers_pattern: str | None = None
    trainable_modules: list[str] | Regex | None = None
    train_head: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "FREEZE"
        if not isinstance(self.num_trainable_layers, int) or self.num_trainable_layers < 0:
            raise ConfigError(
                f"num_trainable_layers must be a non-negative integer, got {self.num_trainable_layers!r}."
            )


@dataclass
class FullConfig(PeftConfig):
    """Full fine-tuning (`peft_type` "FULL"): every parameter trains and is saved."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "FULL"


# --- which tensors train ---------------------------------------------------------------------------
def block_lists(model: nn.Module, layers_pattern: str | None) -> list[tuple[str, nn.ModuleList]]:
    """The stacks of numbered blocks: the named ones, or else the longest ModuleLists."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if layers_pattern:
        chosen = [(n, m) for n, m in lists if n == layers_pattern or n.endswith("." + layers_pattern)]
        if not chosen:
            names = ", ".join(n for n, _ in lists) or "none"
            raise ConfigError(
                f"layers_pattern={layers_pattern!r} names no ModuleList of {type(model).__name__} "
                f"(its ModuleLists: {names})."
            )
        return chosen
    longest = max((len(m) for _, m in lists), default=0)
    return [(n, m) for n, m in lists if len(m) == longest]


def _head_names(model: nn.Module) -> list[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        return [n for n, m in model.named_modules() if head is not None and m is head][:1]
    linear = [n for n, m in candidate_modules(model) if is_linear(m)]
    return linear[-1:]


def _selected_modules(model: nn.Module, config: FreezeConfig) -> list[str]:
    """Names of the modules FREEZE trains in full."""
    selected: list[str] = []
    if config.num_trainable_layers:
        stacks = block_lists(model, config.layers_pattern)
        if not stacks:
            raise ConfigError(
                f"{type(model).__name__} has no ModuleList of blocks; set num_trainable_layers=0 and name the "
                "modules to train in trainable_modules."
            )
        for name, stack in stacks:
            if config.num_trainable_layers > len(stack):
                raise ConfigError(
                    f"num_trainable_layers={config.num_trainable_layers} but {name} has {len(stack)} blocks; "
                    f"use at most {len(stack)} (or FullConfig to train everything)."
                )
            selected += [f"{name}.{i}" for i in range(len(stack) - config.num_trainable_layers, len(stack))]
    if config.trainable_modules:
        found = [n for n, _ in model.named_modules() if n and name_matches(n, config.trainable_modules)]
        if not found:
            raise ConfigError(
                f"trainable_modules={config.trainable_modules!r} matched no module of {type(model).__name__}."
            )
        selected += found
    if config.train_head:
        selected += _head_names(model)
    return selected


def freeze_tensors(model: nn.Module, config: FreezeConfig) -> dict[str, torch.Tensor]:
    """Parameter name -> base tensor FREEZE trains (a tensor tied to another appears once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name in _selected_modules(model, config):
        if config.modules_to_save and is_under(module_name, config.modules_to_save):
            continue
        for name, param in model.get_submodule(module_name).named_parameters(prefix=module_name):
            if id(param) not in seen and not (
                config.modules_to_save and is_under(name, config.modules_to_save)
            ):
                seen.add(id(param))
                out[name] = param
    return out


def full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


class FreezeMethod(InPlaceMethod):
    """Train chosen blocks of the base model (the top k, or named modules) plus the head; freeze the rest."""

    peft_type = "FREEZE"
    config_class = FreezeConfig
    title = "freeze (top k blocks / named modules + head)"
    variants = {"freeze": Variant()}

    def trained_tensors(self, model: nn.Module, config: FreezeConfig) -> dict[str, torch.Tensor]:
        return freeze_tensors(model, config)

    def inject(self, peft_model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self.check_first_adapter(peft_model)
        tensors = self.trained_tensors(peft_model.get_base_model(), config)
        not_float = [n for n, t in tensors.items() if not t.is_floating_point()]
        if not_float:
            raise UnsupportedModelError(
                f"{self.title} cannot train quantized weights ({not_float[0]} is {tensors[not_float[0]].dtype}); "
                "load the model in float, or use LoRA on the quantized model (QLoRA)."
            )
        if not tensors and not getattr(config, "modules_to_save", None):
            raise ConfigError(
                "FREEZE selects nothing to train; set num_trainable_layers, trainable_modules, train_head or "
                "modules_to_save."
            )
        self.remember_originals(peft_model, tensors)


class FullMethod(FreezeMethod):
    """Every parameter trains: the full fine-tuning baseline, through the same adapter API."""

    peft_type = "FULL"
    config_class = FullConfig
    title = "full fine-tuning"
    variants = {"full": Variant()}

    def trained_tensors(self, model: nn.Module, config: FullConfig) -> dict[str, torch.Tensor]:
        return full_tensors(model)


FREEZE = FreezeMethod()
FULL = FullMethod()
