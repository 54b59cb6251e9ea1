"""The method registry: `peft_type` -> the module that implements it.

A method module defines its config dataclass as `CONFIG` (a module serving several peft_types maps each to its
class in `CONFIGS`) and `inject(peft_model, config, adapter_name)`, which adds
the adapter (module wrappers go into `peft_model.base_model`; other modules, like a prompt encoder, may live on the
PeftModel itself). Optional hooks, each looked up with `hasattr` on the module:
- `state_dict(peft_model, adapter_name, config) -> {checkpoint_key: live tensor}`: full checkpoint keys, as in
  peft's files. Without it, every `AdapterLayer`'s per-adapter tensors, `modules_to_save` copies and trained biases
  are collected (checkpoint.adapter_entries). That same map decides what trains and what loads.
- `forward(peft_model, *args, **kwargs)` / `generate(peft_model, *args, **kwargs)`: for methods that change the
  model's inputs (soft prompts) or train base tensors in place (BitFit, FREEZE, FULL: they swap the originals back
  in while disabled); `peft_model._disabled` is True inside `disable_adapter()`.
- `on_optimizer_step(peft_model, global_step)`: called by the trainer after each optimizer step (AdaLoRA).
- `tensors_to_save(peft_model, adapter_name, config, entries) -> entries`: what `save_pretrained` writes, when it
  differs from the live tensors (AdaLoRA writes only the ranks its allocator kept).
- `check_loadable(peft_model, adapter_name, config, state)`: raise a clear error when a file cannot load into the
  adapter as built (a P-tuning file holds its encoder's output, not the encoder).
- `remove(peft_model, adapter_name)`: drop what `inject` put outside `base_model` (e.g. a prompt encoder).
- `MERGEABLE = False`: the adapter cannot be folded into the weights (soft prompts); merging then raises.
Adding a method = one file here + one line below.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "LORA": "deltatune.methods.lora",
    "ADALORA": "deltatune.methods.adalora",
    "IA3": "deltatune.methods.ia3",
    "BOTTLENECK": "deltatune.methods.adapters",
    "BITFIT": "deltatune.methods.bitfit",
    "FREEZE": "deltatune.methods.freeze",
    "FULL": "deltatune.methods.freeze",
    "PROMPT_TUNING": "deltatune.methods.prompt",
    "P_TUNING": "deltatune.methods.prompt",
    "PREFIX_TUNING": "deltatune.methods.prefix",
    "MAM": "deltatune.methods.mam",
    "UNIPELT": "deltatune.methods.unipelt",
}


def method_for(peft_type: str | None) -> ModuleType:
    key = getattr(peft_type, "value", peft_type)
    if key not in REGISTRY:
        raise ValueError(
            f"Unknown peft_type {peft_type!r}; deltatune supports: {', '.join(sorted(REGISTRY))}."
        )
    return importlib.import_module(REGISTRY[key])


def config_class_for(peft_type: str | None) -> type:
    module = method_for(peft_type)
    return getattr(module, "CONFIGS", {}).get(getattr(peft_type, "value", peft_type), module.CONFIG)
