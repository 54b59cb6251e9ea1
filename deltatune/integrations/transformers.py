"""transformers' `Trainer` (and trl's trainers, which build on it) treat a deltatune model as the peft model it is.

Why a hook: transformers decides whether a model is a peft model with `isinstance(model, peft.PeftModel)`
(`transformers.trainer_utils._is_peft_model`; accelerate's `is_peft_model`, which trl uses, does the same), and
`Trainer._save` calls `save_pretrained` only for `PreTrainedModel` or `peft.PeftModel` instances. A deltatune model is
neither, so without help the Trainer keeps no dataset column (it reads the wrapper's `forward(*args, **kwargs)`),
finds no labels (no `eval_loss`, no `compute_metrics`) and saves checkpoints as one full `model.safetensors`. Neither
check can be satisfied without importing peft, so `import deltatune` extends three functions and one name:

- `transformers.trainer_utils._is_peft_model` and `accelerate.utils.is_peft_model` also answer True for a deltatune
  PeftModel, so transformers and trl take their peft paths: columns and labels from `get_base_model()`, resuming
  with `load_adapter`, `base_model.model` for the backbone;
- `transformers.Trainer._save` writes a deltatune model with its own `save_pretrained` (adapter folder + model card),
  then the tokenizer and the training arguments as it does for any model;
- `trl.trainer.sft_trainer.BaseTunerLayer` (peft's layer class, which SFTTrainer uses to refuse an adapter on the LM
  head) also matches deltatune's layers, and exists when peft is not installed;
- `SFTTrainer(peft_config=<deltatune config>)` is refused with the fix (wrap the model first): trl builds the adapter
  itself with peft's `get_peft_model` after an `isinstance(peft_config, peft.PeftConfig)` check, so it would
  otherwise fail with "must be a peft.PeftConfig instance ... got LoraConfig" or ask to install peft.

Everything else in those libraries is untouched, and for any other model these behave exactly as before. The patches are applied when those modules are imported (or at once if they already are), so importing
deltatune never imports transformers' trainer stack itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
from types import ModuleType

import torch

from deltatune.config import PeftConfig
from deltatune.layer import AdapterLayer
from deltatune.model import PeftModel

_PATCHED = "__deltatune_patched__"


def _recognising(original):
    """`original(model)` (a peft-model check), also True for a deltatune PeftModel."""
    if getattr(original, _PATCHED, False):
        return original

    def is_peft_model(model) -> bool:
        inner = getattr(model, "module", model)  # DistributedDataParallel
        inner = getattr(inner, "_orig_mod", inner)  # torch.compile
        return isinstance(inner, PeftModel) or original(model)

    is_peft_model.__wrapped__ = original
    setattr(is_peft_model, _PATCHED, True)
    return is_peft_model


def _saving_adapters(original):
    """`Trainer._save`, writing a deltatune model as an adapter folder."""
    if getattr(original, _PATCHED, False):
        return original

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return original(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(
            self.args, os.path.join(output_dir, "training_args.bin")
        )  # transformers' TRAINING_ARGS_NAME
        return None

    _save.__wrapped__ = original
    setattr(_save, _PATCHED, True)
    return _save


def _patch_function(module: ModuleType, name: str, wrap) -> None:
    """Replace `module.name` with `wrap(it)`, and every copy of it that modules imported earlier bound by name."""
    original = getattr(module, name, None)
    if original is None:
        return
    patched = wrap(original)
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if namespace is None:
            continue
        for key, value in list(namespace.items()):
            if value is original:
                setattr(other, key, patched)


def _patch_trainer_utils(module: ModuleType) -> None:
    _patch_function(module, "_is_peft_model", _recognising)


def _patch_accelerate(module: ModuleType) -> None:
    _patch_function(module, "is_peft_model", _recognising)


def _patch_trainer(module: ModuleType) -> None:
    trainer = module.Trainer
    trainer._save = _saving_adapters(trainer.__dict__["_save"])


def _refusing_deltatune_configs(original):
    """`SFTTrainer.__init__`, refusing a deltatune `peft_config` with the fix rather than trl's type error."""
    if getattr(original, _PATCHED, False):
        return original
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        config = signature.bind_partial(self, *args, **kwargs).arguments.get("peft_config")
        if isinstance(config, PeftConfig):
            raise TypeError(
                "SFTTrainer(peft_config=...) builds the adapter with peft's own get_peft_model and accepts only "
                f"peft's config classes, not deltatune's {type(config).__name__}. Wrap the model first: "
                "model = deltatune.get_peft_model(model, config), then SFTTrainer(model=model, ...) without "
                "peft_config."
            )
        original(self, *args, **kwargs)

    setattr(__init__, _PATCHED, True)
    return __init__


def _patch_trl_sft(module: ModuleType) -> None:
    """trl refuses a peft adapter on the LM head (its fused loss reads `lm_head.weight` directly, so the adapter
    would never train) by testing for peft's `BaseTunerLayer`; make that test see deltatune's layers too (and
    exist at all when peft is not installed). A deltatune config passed as `peft_config` is refused clearly."""
    peft_layer = module.__dict__.get("BaseTunerLayer")
    if peft_layer is None:
        module.BaseTunerLayer = AdapterLayer
    elif isinstance(peft_layer, type):
        module.BaseTunerLayer = (peft_layer, AdapterLayer)
    trainer = module.__dict__.get("SFTTrainer")
    if isinstance(trainer, type):
        trainer.__init__ = _refusing_deltatune_configs(trainer.__dict__["__init__"])


PATCHES = {
    "transformers.trainer_utils": _patch_trainer_utils,
    "accelerate.utils.modeling": _patch_accelerate,
    "transformers.trainer": _patch_trainer,
    "trl.trainer.sft_trainer": _patch_trl_sft,
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the modules in PATCHES it lets the normal finders locate the module, then runs the
    patch right after the module's own code."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            PATCHES[fullname](module)

        spec.loader.exec_module = exec_then_patch  # this loader object serves this one import only
        return spec


def install() -> None:
    """Patch the modules already imported; patch the others when they are (idempotent)."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
