"""peft's object tree: `PeftModel.base_model` is a tuner whose `.model` is the user's model.

Code written against peft reaches into this tree: trl and transformers' Trainer unwrap `model.base_model.model`,
scripts call `model.base_model.update_and_allocate(step)` (AdaLoRA) or `model.base_model.merge_and_unload()`,
and full `state_dict()` keys read `base_model.model.<module>.lora_A.default.weight`. One class serves every method
that changes modules of the model (peft has one per method); soft-prompt methods leave `base_model` the raw model,
as peft does.

The tuner holds no state of its own: adapter bookkeeping lives on the PeftModel that owns it, and the tuner's
methods are that model's, so either spelling does the same thing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# The PeftModel attributes a tuner answers too, under the same names (peft's LoraModel API).
SHARED = frozenset(
    {
        "active_adapter",
        "active_adapters",
        "add_weighted_adapter",
        "delete_adapter",
        "disable_adapter_layers",
        "enable_adapter_layers",
        "get_layer_status",
        "get_model_status",
        "merge_adapter",
        "merge_and_unload",
        "peft_config",
        "set_adapter",
        "unload",
        "unmerge_adapter",
        "update_and_allocate",
    }
)


class TunerModel(nn.Module):
    """`PeftModel.base_model` for methods that wrap modules. Calls run the wrapped model; unknown attributes are
    the model's, except peft's tuner methods, which are the owning PeftModel's."""

    def __init__(self, model: nn.Module, owner: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.__dict__["_owner"] = (
            owner  # not a submodule: the owner holds this tuner, not the other way round
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "_owner" not in self.__dict__:
                raise
            owner = self.__dict__["_owner"]
            if name in SHARED and (hasattr(type(owner), name) or name in owner.__dict__):
                return getattr(owner, name)
            return getattr(self._modules["model"], name)
