"""The method contract: everything `PeftModel` asks of a method, in one place, with the default behaviour.

A method is a `Method` subclass in its own file under `deltatune/methods/` plus one line in
`deltatune/registry.py`. It must implement `inject`; every other hook has the default that fits methods which
wrap modules of the model (LoRA, IA3, bottleneck adapters), and a method overrides only what differs:

| hook | default | overridden by |
| --- | --- | --- |
| `inject` | (required) add the adapter to the model | every method |
| `state_dict` | the adapter layers' tensors, `modules_to_save` copies, trained biases | in-place and soft-prompt methods |
| `tensors_to_save` | the live tensors | AdaLoRA (kept ranks only), soft prompts (the prompt itself) |
| `check_loadable` | nothing to check | soft prompts (a P-tuning file holds the encoder's output) |
| `remove` | nothing outside the wrapped modules | soft prompts (their encoder lives on the PeftModel) |
| `forward` / `generate` | the base model with its wrapped layers | soft prompts, in-place methods, AdaLoRA |
| `on_optimizer_step` | nothing | AdaLoRA (rank allocation) |

Class attributes describe the method to the rest of the project: the CLI, recipes, the benchmark and the README
table all read them from the registry, so none of them spells out a method name of its own.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.checkpoint import layer_entries
from deltatune.config import PeftConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    """A name users type in a recipe or on the command line (`dora`, `qlora`, `houlsby` ...) and what it means:
    config options it implies, a config class other than the method's own, and a quantized base."""

    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    config_class: type[PeftConfig] | None = None
    quantize: str | None = None  # "nf4" | "fp4" | "int8": quantize the base before adding the adapter
    # The task types the variant is meant for (empty: all), e.g. prompts after [CLS] only matter to encoder
    # classifiers; the benchmark runs a variant only on its task types.
    task_types: tuple[str, ...] = ()


class Method(abc.ABC):
    """One PEFT method: how its adapter is added, which tensors it owns, and how the model runs with it."""

    peft_type: ClassVar[str]  # as written in adapter_config.json
    config_class: ClassVar[type[PeftConfig]]
    title: ClassVar[str]  # for tables: "LoRA, rsLoRA, DoRA"
    variants: ClassVar[dict[str, Variant]]  # recipe / CLI names; the first is the method's main name
    mergeable: ClassVar[bool] = True  # can fold into the base weights (soft prompts cannot)
    wraps_base: ClassVar[bool] = (
        True  # PeftModel.base_model is a tuner holding `.model` (False: the raw model)
    )
    peft_format: ClassVar[bool] = True  # files load in the `peft` package (and peft's load here)
    typical_lr: ClassVar[float] = (
        1e-4  # a learning rate that works for this method (the benchmark's sweep centre)
    )
    recipe_defaults: ClassVar[dict[str, Any]] = {}  # config options a recipe gets when it leaves them out
    # The deltatune.targets column that fills an unset `target_modules` ("lora", "adalora", "ia3"); None: no default.
    default_targets: ClassVar[str | None] = None
    # `forward(adapter_names=[...])`: one adapter per row of a batch (the layers honour `row_adapters`).
    mixed_batches: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return next(iter(self.variants))

    # --- required ------------------------------------------------------------------------------
    @abc.abstractmethod
    def inject(self, peft_model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """Add adapter `adapter_name` to `peft_model.get_base_model()` (module wrappers) or to the PeftModel
        itself (e.g. a prompt encoder). On error, leave nothing half-applied."""

    # --- which tensors the adapter owns ----------------------------------------------------------
    def state_dict(
        self, peft_model: nn.Module, adapter_name: str, config: PeftConfig
    ) -> dict[str, torch.Tensor]:
        """Checkpoint key -> live tensor for everything the adapter owns. This one map drives saving, loading and
        which parameters train, so the three can never disagree."""
        bias = getattr(config, "bias", "none")
        return layer_entries(peft_model.get_base_model(), adapter_name, bias)

    def tensors_to_save(
        self, peft_model: nn.Module, adapter_name: str, config: PeftConfig, entries: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What `save_pretrained` writes, when it differs from the live tensors."""
        return entries

    def check_loadable(
        self, peft_model: nn.Module, adapter_name: str, config: PeftConfig, state: dict[str, torch.Tensor]
    ) -> None:
        """Raise a clear error when a file cannot load into the adapter as built."""
        return None  # the default: nothing to do

    def remove(self, peft_model: nn.Module, adapter_name: str) -> None:
        """Drop what `inject` put outside the wrapped modules (wrapped layers are cleaned up by the model)."""
        return None  # the default: nothing to do

    # --- running -------------------------------------------------------------------------------
    def forward(self, peft_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return peft_model.base_model(*args, **kwargs)

    def generate(self, peft_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return peft_model.get_base_model().generate(*args, **kwargs)

    def on_optimizer_step(self, peft_model: nn.Module, global_step: int) -> None:
        """Called after every optimizer step (by deltatune's trainer, or `base_model.update_and_allocate`)."""
        return None  # the default: nothing to do
