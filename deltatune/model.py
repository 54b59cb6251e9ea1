"""PeftModel: a base model plus named adapters, with the API users of the `peft` package know.

The base model is modified in place (its targeted modules are wrapped); `PeftModel` keeps the configs, decides which
adapters run and which parameters train, and reads and writes adapter folders.
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from typing import Any

from torch import nn

from deltatune import checkpoint
from deltatune.config import PeftConfig
from deltatune.inject import candidate_modules, find_targets, replace_module
from deltatune.layer import AdapterLayer, ModulesToSave
from deltatune.methods import method_for

# Task heads that are trained in full beside the adapter unless the user says otherwise (as in peft).
TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


class PeftModel(nn.Module):
    """A model with one or more adapters. Calls and unknown attributes go to the base model."""

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **_: Any
    ) -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._disabled = False
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # --- plumbing ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules") or name.startswith("__"):
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def method(self):
        """The module of the method in use (all adapters of one model share a method)."""
        return method_for(next(iter(self.peft_config.values())).peft_type)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if hasattr(self.method, "forward"):
            return self.method.forward(self, *args, **kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if hasattr(self.method, "generate"):
            return self.method.generate(self, *args, **kwargs)
        return self.base_model.generate(*args, **kwargs)

    def on_optimizer_step(self, global_step: int) -> None:
        """The trainer calls this after every optimizer step; methods that adapt while training hook in here."""
        hook = getattr(self.method, "on_optimizer_step", None)
        if hook is not None:
            hook(self, global_step)

    def adapter_layers(self):
        return [m for m in self.base_model.modules() if isinstance(m, (AdapterLayer, ModulesToSave))]

    # --- adapters ------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else self._active  # peft returns the name

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self._active[0]]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, **_: Any) -> None:
        """Add an adapter (not active until `set_adapter`). On any error the model is left as it was."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists; pick another name or delete it first."
            )
        if self.peft_config:
            existing = next(iter(self.peft_config.values())).peft_type
            if existing != peft_config.peft_type:
                raise ValueError(
                    f"This model holds {existing} adapters; a {peft_config.peft_type} adapter cannot join them. "
                    "Use a separate PeftModel (or merge_and_unload first)."
                )
        config = copy.deepcopy(peft_config)
        self._prepare_config(config)
        method = method_for(config.peft_type)
        try:
            method.inject(self, config, adapter_name)
            self._add_modules_to_save(config, adapter_name)
        except Exception:
            self._remove_adapter_everywhere(adapter_name, method)
            raise
        self.peft_config[adapter_name] = config
        for layer in self.adapter_layers():
            layer.set_active(self._active)
        self._update_trainable()

    def _prepare_config(self, config: PeftConfig) -> None:
        if config.base_model_name_or_path is None:
            base_config = getattr(self.base_model, "config", None)
            config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
        if hasattr(config, "modules_to_save") and config.task_type in TASK_HEADS:
            config.modules_to_save = list(
                dict.fromkeys((config.modules_to_save or []) + TASK_HEADS[config.task_type])
            )
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, (list, tuple)) and any(isinstance(t, type) for t in targets):
            # Types are a deltatune convenience; store the names they select so the JSON stays portable.
            config.target_modules = find_targets(self.base_model, config)

    def _add_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        wanted = getattr(config, "modules_to_save", None)
        if not wanted:
            return
        found = False
        for key, _module in list(candidate_modules(self.base_model)):
            if not any(key == w or key.endswith("." + w) for w in wanted):
                continue
            wrapper = self.base_model.get_submodule(key)
            if not isinstance(wrapper, ModulesToSave):
                if isinstance(wrapper, AdapterLayer):
                    raise ValueError(f"{key} is both adapted and in modules_to_save; choose one.")
                wrapper = ModulesToSave(wrapper)
                replace_module(self.base_model, key, wrapper)
            wrapper.add(adapter_name)
            found = True
        task_defaults = TASK_HEADS.get(config.task_type, [])
        if not found and any(w not in task_defaults for w in wanted):
            raise ValueError(
                f"modules_to_save={wanted} matched no module of {type(self.base_model).__name__}."
            )

    def _remove_adapter_everywhere(self, adapter_name: str, method=None) -> None:
        for layer in self.adapter_layers():
            layer.delete(adapter_name)
        method = method or (self.method if self.peft_config else None)
        if method is not None and hasattr(
            method, "remove"
        ):  # parts living outside base_model (prompt encoders)
            method.remove(self, adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the ones that run (several: their outputs add up) and the ones that train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"No adapter named {unknown[0]!r}; this model has: {', '.join(self.peft_config)}."
            )
        if any(isinstance(m, AdapterLayer) and m.merged for m in self.base_model.modules()):
            warnings.warn("Adapters are merged into the weights; unmerging before switching.", stacklevel=2)
            self.unmerge_adapter()
        for layer in self.adapter_layers():
            layer.set_active(names)
        self._active = names
        self._update_trainable()

    def _update_trainable(self) -> None:
        """Only the active, trainable adapters' tensors (and their heads and biases) get gradients."""
        for p in self.parameters():
            p.requires_grad_(False)
        for name in self._active:
            config = self.peft_config[name]
            if config.inference_mode:
                continue
            for tensor in checkpoint.adapter_entries(self, name, config).values():
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(True)

    @contextmanager
    def disable_adapter(self):
        """Run the plain base model inside the block (merged adapters are unmerged first)."""
        if any(isinstance(m, AdapterLayer) and m.merged for m in self.base_model.modules()):
            raise ValueError(
                "Adapters are merged into the weights; call unmerge_adapter() before disabling them."
            )
        layers = self.adapter_layers()
        for layer in layers:
            layer.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            self._disabled = False

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"No adapter named {adapter_name!r}; this model has: {', '.join(self.peft_config)}."
            )
        if len(self.peft_config) == 1:
            raise ValueError("Cannot delete the only adapter; use unload() to get the base model back.")
        self._remove_adapter_everywhere(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            remaining = [a for a in self._active if a != adapter_name] or [next(iter(self.peft_config))]
            self.set_adapter(remaining)

    # --- merging -------------------------------------------------------------------------------
    def _weight_layers(self) -> list[AdapterLayer]:
        return [m for m in self.base_model.modules() if isinstance(m, AdapterLayer)]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapters into the base weights (inference gets the base model's speed). All or nothing."""
        if not getattr(self.method, "MERGEABLE", True):
            raise ValueError(
                f"{self.active_peft_config.peft_type} adapters change the model's inputs or activations, not its weights, so they "
                "cannot be merged; keep the PeftModel (or use unload() to get the plain base model back)."
            )
        names = adapter_names if adapter_names is not None else self._active
        done: list[tuple[AdapterLayer, int]] = []
        try:
            for layer in self._weight_layers():
                before = len(layer.merged_adapters)
                layer.merge(names, safe_merge=safe_merge)
                done.append((layer, len(layer.merged_adapters) - before))
        except Exception:
            for layer, count in done:
                layer.unmerge(count)
            raise

    def unmerge_adapter(self) -> None:
        layers = [m for m in self._weight_layers() if m.merged]
        if not layers:
            raise ValueError("Nothing is merged, so there is nothing to unmerge.")
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active adapters and return the plain base model with the merged weights."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter wrapper without merging; returns the base model (with trained heads kept)."""
        for key, module in list(self.base_model.named_modules()):
            if isinstance(module, AdapterLayer):
                replace_module(self.base_model, key, module.base_layer)
            elif isinstance(module, ModulesToSave):
                replace_module(self.base_model, key, module.current())
        return self.base_model

    # --- reports -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = 0, 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte
                n = n * 2 * p.element_size()
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def parameter_report(self) -> dict[str, Any]:
        """Trainable and total parameter counts, and what each adapter takes on disk."""
        trainable, total = self.get_nb_trainable_parameters()
        return {
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total if total else 0.0,
            "active_adapters": self.active_adapters,
            "stored_bytes": {
                name: checkpoint.stored_bytes(self, name, config) for name, config in self.peft_config.items()
            },
        }

    # --- disk ----------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **_: Any
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors` ("default" at the top level,
        others in sub-folders named after them, as peft does)."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save_pretrained needs a folder.")
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise ValueError(
                    f"No adapter named {name!r} to save; this model has: {', '.join(self.peft_config)}."
                )
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            config = copy.copy(self.peft_config[name])
            config.inference_mode = True
            checkpoint.save_adapter_weights(self, name, config, out)
            config.save_pretrained(out)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **_: Any,
    ) -> PeftModel:
        """Load a saved adapter onto `model`. If anything does not fit, the model is returned to how it was."""
        state = checkpoint.load_adapter_weights(model_id, revision)
        config = config or PeftConfig.from_pretrained(model_id, revision=revision)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = TASK_MODELS.get(config.task_type, PeftModel)
        peft_model = cls(model, config, adapter_name)
        try:
            checkpoint.apply_adapter_weights(
                peft_model, adapter_name, peft_model.peft_config[adapter_name], state
            )
        except Exception:
            peft_model.unload()
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> None:
        """Add a saved adapter under a new name (not activated; call `set_adapter`)."""
        state = checkpoint.load_adapter_weights(model_id, kwargs.get("revision"))
        config = PeftConfig.from_pretrained(model_id, revision=kwargs.get("revision"))
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        try:
            checkpoint.apply_adapter_weights(self, adapter_name, self.peft_config[adapter_name], state)
        except Exception:
            self._remove_adapter_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            raise


class PeftModelForCausalLM(PeftModel):
    """Decoder LMs; `generate()` runs with the adapter."""


class PeftModelForSequenceClassification(PeftModel):
    """Classifiers; the head (`classifier`/`score`) trains in full beside the adapter."""


class PeftModelForTokenClassification(PeftModel):
    """Taggers; the head trains in full beside the adapter."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder LMs."""


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA; `qa_outputs` trains in full beside the adapter."""


class PeftModelForFeatureExtraction(PeftModel):
    """Embedding models."""


TASK_MODELS = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (the model is changed in place)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model needs a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, PeftModel):
        raise TypeError("This model already has adapters; use model.add_adapter(name, config) instead.")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a deltatune config (e.g. LoraConfig), got {type(peft_config).__name__}."
        )
    cls = TASK_MODELS.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, **kwargs)
