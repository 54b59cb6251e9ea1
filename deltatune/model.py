"""PeftModel: a base model plus named adapters, with the API users of the `peft` package know.

The base model is modified in place (its targeted modules are wrapped); `PeftModel` keeps the configs, decides which
adapters run and which parameters train, and reads and writes adapter folders.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from deltatune import checkpoint, hub, status
from deltatune.config import PeftConfig, check_fields
from deltatune.errors import (
    AdapterNotFoundError,
    ConfigError,
    MergeError,
    UnsupportedModelError,
    warn_at_caller,
)
from deltatune.inject import candidate_modules, find_targets, outer_modules, replace_module
from deltatune.layer import AdapterLayer, ModulesToSave, unchanged_on_error
from deltatune.method import Method
from deltatune.methods.lora import arithmetic
from deltatune.registry import method_for
from deltatune.targets import default_targets
from deltatune.tuner import TunerModel
from deltatune.version import __version__

BASE_ADAPTER = "__base__"  # in `adapter_names`: this row runs the base model alone (peft's spelling)

# Task heads that are trained in full beside the adapter unless the user says otherwise (as in peft).
TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


class PeftModel(nn.Module):
    """A model with one or more adapters. Calls and unknown attributes go to the base model.

    As in peft, `base_model` is a tuner whose `.model` is the model passed in (for soft-prompt methods, the model
    itself), and `get_base_model()` returns that model."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if not autocast_adapter_dtype:
            raise ConfigError(
                "autocast_adapter_dtype=False is not supported: deltatune keeps adapter weights in float32 on a "
                "float16/bfloat16 base (as peft does by default), which is what makes their updates stable."
            )
        if low_cpu_mem_usage:
            raise ConfigError(
                "low_cpu_mem_usage=True is not supported: deltatune creates adapter weights on the base model's "
                "device directly. Leave it False."
            )
        method = method_for(peft_config.peft_type)
        self.base_model = TunerModel(model, self) if method.wraps_base else model
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
        """The user's model, with its adapted modules wrapped in place."""
        base = self._modules["base_model"]
        return base.model if isinstance(base, TunerModel) else base

    @property
    def method(self) -> Method:
        """The method in use (all adapters of one model share a method)."""
        return method_for(next(iter(self.peft_config.values())).peft_type)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model with the active adapters; `adapter_names=[...]` (one name per row, `"__base__"` for the
        base model) runs each row of the batch with its own adapter instead."""
        adapter_names = kwargs.pop("adapter_names", None)
        with self._rows_scope(adapter_names):
            return self.method.forward(self, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`generate` of the base model with the adapters; `adapter_names=[...]` as in `forward` (with beam search,
        each row's beams keep its adapter)."""
        adapter_names = kwargs.pop("adapter_names", None)
        with self._rows_scope(adapter_names, kwargs.get("num_beams")):
            return self.method.generate(self, *args, **kwargs)

    def _rows_scope(self, adapter_names: list[str] | None, num_beams: int | None = None):
        if adapter_names is None:
            return nullcontext()
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ConfigError(
                f"adapter_names must be a list with one adapter name per row, got {type(adapter_names).__name__}."
            )
        return self.row_adapters(list(adapter_names), num_beams)

    @contextmanager
    def row_adapters(self, names: list[str | None], num_beams: int | None = None):
        """Inside the block, row i of every batch runs adapter `names[i]` (None or "__base__": the base model
        alone), so requests for different adapters share one pass of the base model. The active adapters are
        ignored meanwhile. Unknown names raise before anything runs. `num_beams` > 1: each row's name is repeated
        for its beams in the decoder, as `generate` lays the rows out (an encoder sees the rows once)."""
        if not self.method.mixed_batches:
            raise UnsupportedModelError(
                f"Mixed-adapter batches (adapter_names) are supported for LoRA adapters, not "
                f"{self.active_peft_config.peft_type}; run each adapter in its own batch with set_adapter()."
            )
        rows = [None if n in (None, BASE_ADAPTER) else n for n in names]
        self._check_known([n for n in dict.fromkeys(rows) if n is not None])
        if any(isinstance(m, AdapterLayer) and m.merged for m in self.get_base_model().modules()):
            raise MergeError(
                "adapter_names cannot be used while adapters are merged; call unmerge_adapter() first."
            )
        beams = num_beams if isinstance(num_beams, int) and num_beams > 1 else 1
        decoder_rows = [n for n in rows for _ in range(beams)]
        base = self.get_base_model()
        two_stacks = getattr(getattr(base, "config", None), "is_encoder_decoder", False)
        encoder = base.get_encoder() if beams > 1 and two_stacks else None
        in_encoder = {id(m) for m in encoder.modules()} if isinstance(encoder, nn.Module) else set()
        layers = self.adapter_layers()
        for layer in layers:
            layer.row_adapters = list(rows if id(layer) in in_encoder else decoder_rows)
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    def on_optimizer_step(self, global_step: int) -> None:
        """The trainer calls this after every optimizer step (after `optimizer.step()`, before `zero_grad()`);
        methods that adapt while training hook in here."""
        self.method.on_optimizer_step(self, global_step)

    def update_and_allocate(self, global_step: int) -> None:
        """peft's AdaLoRA spelling (`model.base_model.update_and_allocate(step)`) of `on_optimizer_step`."""
        self.on_optimizer_step(global_step)

    def adapter_layers(self) -> list[nn.Module]:
        return [
            m for _, m in outer_modules(self.get_base_model()) if isinstance(m, (AdapterLayer, ModulesToSave))
        ]

    def adapter_entries(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Checkpoint key -> live tensor of everything adapter `adapter_name` owns (what trains, saves, loads)."""
        config = self.peft_config[adapter_name]
        return method_for(config.peft_type).state_dict(self, adapter_name, config)

    def saved_entries(
        self,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor] | None = None,
        save_embedding_layers: bool | str = "auto",
    ) -> dict[str, torch.Tensor]:
        """The tensors `save_pretrained` writes for adapter `adapter_name`. `state_dict` (keyed like this model's
        own `state_dict()`, e.g. what transformers' Trainer gathered) supplies the values instead of the live ones;
        `save_embedding_layers` is peft's option (see `embedding_entries`)."""
        config = self.peft_config[adapter_name]
        method = method_for(config.peft_type)
        entries = self.adapter_entries(adapter_name)
        entries = {**entries, **self.embedding_entries(config, save_embedding_layers)}
        if state_dict:
            live_names = {id(t): k for k, t in self.state_dict(keep_vars=True).items()}
            entries = {k: state_dict.get(live_names.get(id(t)), t) for k, t in entries.items()}
        return method.tensors_to_save(self, adapter_name, config, entries)

    def embedding_entries(
        self, config: PeftConfig, save_embedding_layers: bool | str
    ) -> dict[str, torch.Tensor]:
        """Base embedding weights that travel with the adapter, by peft's rule, so a vocabulary resized before
        training (new tokens with freshly initialised rows) loads back exactly: with "auto", when `target_modules`
        names `embed_tokens` or `lm_head` (the wrapped embeddings' base weights) or when the vocabulary differs from
        the base model's saved `config.json` (the input and output embeddings); with True, always."""
        if save_embedding_layers not in ("auto", True, False):
            raise ConfigError(
                f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}."
            )
        targets = getattr(config, "target_modules", None)
        targeted = isinstance(targets, (list, tuple)) and any(
            n in targets for n in ("embed_tokens", "lm_head")
        )
        if save_embedding_layers == "auto":
            save_embedding_layers = targeted or self._vocabulary_resized(config)
        if not save_embedding_layers:
            return {}
        base = self.get_base_model()
        if not callable(getattr(base, "get_input_embeddings", None)):
            raise ConfigError("save_embedding_layers=True needs a transformers model (get_input_embeddings).")
        get_output = getattr(base, "get_output_embeddings", None)
        entries: dict[str, torch.Tensor] = {}
        for layer in (base.get_input_embeddings(), get_output() if callable(get_output) else None):
            if layer is None or isinstance(layer, ModulesToSave):  # a trained copy is saved already
                continue
            if isinstance(layer, AdapterLayer):
                module = layer.get_base_layer()
            elif targeted:
                continue  # peft's rule: with embeddings targeted, only the wrapped ones' base weights
            else:
                module = layer
            name = next(n for n, m in base.named_modules() if m is module)
            entries.update(
                {f"{checkpoint.PREFIX}{name}.{k}": t for k, t in module.state_dict(keep_vars=True).items()}
            )
        return entries

    def _vocabulary_resized(self, config: PeftConfig) -> bool:
        """Whether the embeddings differ in size from the base model's saved config (a local folder only)."""
        path = config.base_model_name_or_path
        config_file = os.path.join(path, "config.json") if path else ""
        current = getattr(getattr(self.get_base_model(), "config", None), "vocab_size", None)
        if not os.path.isfile(config_file) or current is None:
            return False
        with open(config_file) as fh:
            saved = json.load(fh).get("vocab_size")
        return saved is not None and saved != current

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

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add an adapter (not active until `set_adapter`). On any error the model is left as it was."""
        if low_cpu_mem_usage:
            raise ConfigError("low_cpu_mem_usage=True is not supported; leave it False.")
        if adapter_name in self.peft_config:
            raise ConfigError(
                f"An adapter named {adapter_name!r} already exists; pick another name or delete it first."
            )
        if self.peft_config:
            existing = next(iter(self.peft_config.values())).peft_type
            if existing != peft_config.peft_type:
                raise ConfigError(
                    f"This model holds {existing} adapters; a {peft_config.peft_type} adapter cannot join them. "
                    "Use a separate PeftModel (or merge_and_unload first)."
                )
        check_fields(peft_config)  # a config changed after it was built is checked again
        config = copy.deepcopy(peft_config)
        method = method_for(config.peft_type)
        with unchanged_on_error(self):
            try:
                self._prepare_config(config)
                method.inject(self, config, adapter_name)
                self._add_modules_to_save(config, adapter_name)
            except Exception:
                self._remove_adapter_everywhere(adapter_name, method)
                raise
        self.peft_config[adapter_name] = config
        for layer in self.adapter_layers():
            layer.set_adapter(self._active)
        self._update_trainable(added=adapter_name)

    def _prepare_config(self, config: PeftConfig) -> None:
        if config.base_model_name_or_path is None:
            base_config = getattr(self.get_base_model(), "config", None)
            config.base_model_name_or_path = getattr(base_config, "_name_or_path", None) or None
        if hasattr(config, "modules_to_save") and config.task_type in TASK_HEADS:
            config.modules_to_save = list(
                dict.fromkeys((config.modules_to_save or []) + TASK_HEADS[config.task_type])
            )
        method = method_for(config.peft_type)
        if hasattr(config, "target_modules") and config.target_modules is None and method.default_targets:
            config.target_modules = default_targets(self.get_base_model(), method.default_targets)
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, (list, tuple)) and any(isinstance(t, type) for t in targets):
            # Types are a deltatune convenience; store the names they select so the JSON stays portable.
            config.target_modules = find_targets(self.get_base_model(), config)

    def _add_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        wanted = getattr(config, "modules_to_save", None)
        if not wanted:
            return
        model = self.get_base_model()
        found = False
        for key, _module in list(candidate_modules(model)):
            if not any(key == w or key.endswith("." + w) for w in wanted):
                continue
            wrapper = model.get_submodule(key)
            if not isinstance(wrapper, ModulesToSave):
                if isinstance(wrapper, AdapterLayer):
                    raise ConfigError(f"{key} is both adapted and in modules_to_save; choose one.")
                wrapper = ModulesToSave(wrapper)
                replace_module(model, key, wrapper)
            wrapper.add(adapter_name)
            found = True
        task_defaults = TASK_HEADS.get(config.task_type, [])
        if not found and any(w not in task_defaults for w in wanted):
            raise ConfigError(f"modules_to_save={wanted} matched no module of {type(model).__name__}.")

    def _remove_adapter_everywhere(self, adapter_name: str, method: Method | None = None) -> None:
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        method = method or (self.method if self.peft_config else None)
        if method is not None:  # parts living outside the wrapped modules (prompt encoders)
            method.remove(self, adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters the ones that run (several: their outputs add up) and the ones that train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        if any(isinstance(m, AdapterLayer) and m.merged for m in self.get_base_model().modules()):
            warn_at_caller("Adapters are merged into the weights; unmerging before switching.")
            self.unmerge_adapter()
        for layer in self.adapter_layers():
            layer.set_adapter(names)
        self._active = names
        self._update_trainable()

    def _update_trainable(self, added: str | None = None) -> None:
        """Only the active, trainable adapters' tensors (and their heads and biases) get gradients. After adding
        adapter `added`, only its new tensors need freezing (the rest already follows the rule), so adding an
        adapter does not cost more with every adapter already loaded."""
        for p in self.adapter_entries(added).values() if added is not None else self.parameters():
            p.requires_grad_(False)
        for name in self._active:
            config = self.peft_config[name]
            if config.inference_mode:
                continue
            for tensor in self.adapter_entries(name).values():
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(True)

    @contextmanager
    def disable_adapter(self):
        """Run the plain base model inside the block (merged adapters are unmerged first)."""
        if any(isinstance(m, AdapterLayer) and m.merged for m in self.get_base_model().modules()):
            raise MergeError(
                "Adapters are merged into the weights; call unmerge_adapter() before disabling them."
            )
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """Run the plain base model until `enable_adapter_layers()` (peft's tuner API; see `disable_adapter`)."""
        for layer in self.adapter_layers():
            layer.enable_adapters(False)
        self._disabled = True

    def enable_adapter_layers(self) -> None:
        for layer in self.adapter_layers():
            layer.enable_adapters(True)
        self._disabled = False

    def _check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNotFoundError(
                f"No adapter named {unknown[0]!r}; this model has: {', '.join(self.peft_config)}."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known([adapter_name])
        if len(self.peft_config) == 1:
            raise ConfigError("Cannot delete the only adapter; use unload() to get the base model back.")
        self._remove_adapter_everywhere(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            remaining = [a for a in self._active if a != adapter_name] or [next(iter(self.peft_config))]
            self.set_adapter(remaining)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> arithmetic.CombinationReport:
        """A new LoRA adapter from a weighted combination of others, by every combination type peft has (see
        `deltatune/methods/lora/arithmetic.py`). Returns a report of the new rank and each layer's relative error."""
        return arithmetic.add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank,
            svd_clamp,
            svd_full_matrices,
            svd_driver,
            density,
            majority_sign_method,
        )

    # --- merging -------------------------------------------------------------------------------
    def _weight_layers(self) -> list[AdapterLayer]:
        return [m for m in self.get_base_model().modules() if isinstance(m, AdapterLayer)]

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, keep_original: bool = True
    ) -> None:
        """Fold adapters (default: the active ones) into the base weights, all of them or none.

        Everything that can refuse is checked before a weight changes: unknown names, adapters that cannot merge,
        and (with `safe_merge`) NaN/inf in any merged weight. Each merged weight is computed in float32 and rounded
        once. With `keep_original` (the default) each layer keeps its weights as they were, so `unmerge_adapter()`
        and `unload()` restore them bit-exactly; that costs one copy of every merged weight until unmerged."""
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        names = list(names) if names is not None else list(self._active)
        self._check_known(names)
        if not self.method.mergeable:
            raise MergeError(
                f"{self.active_peft_config.peft_type} adapters change the model's inputs or activations, not its weights, so they "
                "cannot be merged; keep the PeftModel (or use unload() to get the plain base model back)."
            )
        layers = [layer for layer in self._weight_layers() if layer._pending(names)]
        for layer in layers:  # every refusal before the first weight changes
            layer.check_merge(names, safe_merge)
        done: list[tuple[AdapterLayer, int]] = []
        try:
            for layer in layers:
                before = len(layer.merged_adapters)
                layer.merge(adapter_names=names, keep_original=keep_original)
                done.append((layer, len(layer.merged_adapters) - before))
        except BaseException:
            for layer, count in done:
                layer.unmerge(count)
            raise

    def unmerge_adapter(self) -> None:
        """Undo every merge; bit-exact where the originals were kept (`merge_adapter`'s default)."""
        layers = [m for m in self._weight_layers() if m.merged]
        if not layers:
            raise MergeError("Nothing is merged, so there is nothing to unmerge.")
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active adapters and return the plain base model with the merged weights (no originals are
        kept: the wrappers, and any way back, go away)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge, keep_original=False)
        return self._remove_wrappers()

    def unload(self) -> nn.Module:
        """The base model without the adapter wrappers and with its original weights: merged adapters are unmerged
        first (bit-exactly where the originals were kept). Trained heads (modules_to_save) are kept."""
        for layer in self._weight_layers():
            if layer.merged:
                layer.unmerge()
        return self._remove_wrappers()

    def _remove_wrappers(self) -> nn.Module:
        model = self.get_base_model()
        for key, module in list(model.named_modules()):
            if isinstance(module, AdapterLayer):
                replace_module(model, key, module.base_layer)
            elif isinstance(module, ModulesToSave):
                replace_module(model, key, module.current())
        return model

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
                name: checkpoint.stored_bytes(self.saved_entries(name)) for name in self.peft_config
            },
        }

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """peft's per-layer report: enabled, active, merged and available adapters, requires_grad, devices."""
        return status.get_layer_status(self)

    def get_model_status(self) -> status.TunerModelStatus:
        """peft's model report: the layer reports folded into one ("irregular" where the layers disagree)."""
        return status.get_model_status(self)

    # --- disk ----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write each adapter as `adapter_config.json` + `adapter_model.safetensors` ("default" at the top level,
        others in sub-folders named after them, as peft does).

        `state_dict` (what transformers' Trainer passes) supplies the values to write, keyed like this model's
        own `state_dict()`; `is_main_process=False` writes nothing (the other ranks of a distributed run)."""
        if not safe_serialization:
            raise ConfigError("deltatune writes safetensors only (pickled .bin files are unsafe to load).")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ConfigError(f"{save_directory} is a file; save_pretrained needs a folder.")
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_known(names)
        if not is_main_process:
            return
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            entries = self.saved_entries(name, state_dict, save_embedding_layers)
            config = copy.copy(self.peft_config[name])
            config.inference_mode = True
            checkpoint.write_adapter_file(entries, out)
            config.save_pretrained(out, auto_mapping=self._auto_mapping(config))
        self.create_or_update_model_card(save_directory)

    def _auto_mapping(self, config: PeftConfig) -> dict[str, str] | None:
        """peft's record of the base class for adapters without a task type (AutoPeftModel builds it)."""
        if config.task_type is not None:
            return None
        base_class = type(self.get_base_model())
        return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}

    def create_or_update_model_card(self, output_dir: str | os.PathLike, location: str | None = None) -> None:
        """Write a short `README.md` (or update the one there, e.g. transformers' Trainer card): the Hub metadata
        that lists the folder as an adapter of its base model, and how to load it. `location` is the folder or
        repository its loading snippet names (default: `output_dir`)."""
        output_dir = os.fspath(output_dir)
        config = self.active_peft_config
        method = method_for(config.peft_type)
        base_model = config.base_model_name_or_path
        tags = ["deltatune", method.name] + ([f"base_model:adapter:{base_model}"] if base_model else [])
        if hasattr(self.get_base_model(), "config"):
            tags.append("transformers")
        hub.write_model_card(
            output_dir,
            base_model=base_model,
            method=method.title,
            library_name="peft" if method.peft_format else "deltatune",
            tags=tags,
            pipeline_tag="text-generation" if isinstance(self, PeftModelForCausalLM) else None,
            auto_class=AUTO_CLASS_NAMES.get(config.task_type, "AutoPeftModel"),
            version_line=f"- deltatune {__version__}",  # not installed metadata: a checkout may have none
            location=location or output_dir,
        )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str = "Upload adapter",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_description: str | None = None,
        selected_adapters: list[str] | None = None,
    ):
        """Upload the adapter folder `save_pretrained` writes (config, weights, model card), nothing of the base
        model, to hub repository `repo_id` (created if needed)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)
            # The card's loading snippet should name the repository, not this temporary folder.
            os.remove(os.path.join(folder, hub.CARD_NAME))
            self.create_or_update_model_card(folder, location=repo_id)
            return hub.upload_folder(
                folder,
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        allow_nonfinite: bool = False,
    ) -> PeftModel:
        """Load a saved adapter onto `model`. If anything does not fit, the model is left exactly as it was.

        Only the adapter's own tensors load (and the embedding weights peft saves beside them); a file that would
        overwrite other base weights, or that holds NaN/inf, is refused (`allow_nonfinite=True`: warn instead)."""
        state = checkpoint.read_adapter_file(model_id, revision)
        config = config or PeftConfig.from_pretrained(model_id, revision=revision)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = TASK_MODELS.get(config.task_type, PeftModel)
        with unchanged_on_error(model):
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
            peft_model._load_weights(adapter_name, state, allow_nonfinite)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        revision: str | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        """Add a saved adapter under a new name (not activated; call `set_adapter`). For a name that exists, as
        transformers' Trainer does when resuming, load the saved weights into that adapter instead. On any error
        the model is left exactly as it was (see `from_pretrained` for what a file may hold)."""
        if not autocast_adapter_dtype or low_cpu_mem_usage:
            raise ConfigError("autocast_adapter_dtype=False and low_cpu_mem_usage=True are not supported.")
        state = checkpoint.read_adapter_file(model_id, revision)
        if torch_device is not None:
            state = {k: v.to(torch_device) for k, v in state.items()}
        config = PeftConfig.from_pretrained(model_id, revision=revision)
        config.inference_mode = not is_trainable
        if adapter_name in self.peft_config:
            if type(config) is not type(self.peft_config[adapter_name]):
                raise ConfigError(
                    f"{model_id} holds a {config.peft_type} adapter; it cannot load into adapter {adapter_name!r} "
                    f"({self.peft_config[adapter_name].peft_type}). Pick another adapter_name."
                )
            self._load_weights(adapter_name, state, allow_nonfinite)
            return
        with unchanged_on_error(self):
            self.add_adapter(adapter_name, config)
            try:
                self._load_weights(adapter_name, state, allow_nonfinite)
            except Exception:
                self._remove_adapter_everywhere(adapter_name)
                del self.peft_config[adapter_name]
                raise

    def _load_weights(
        self, adapter_name: str, state: dict[str, torch.Tensor], allow_nonfinite: bool = False
    ) -> None:
        """Check a file's tensors against the adapter as built, then copy them in (all or nothing)."""
        config = self.peft_config[adapter_name]
        method_for(config.peft_type).check_loadable(self, adapter_name, config, state)
        base = self.get_base_model()
        entries, loadable = self.adapter_entries(adapter_name), checkpoint.embedding_entries(base)
        base_names: set[str] = set()
        if any(key not in entries and key not in loadable for key in state):  # the refusal names base weights
            names = [
                n for n, _ in base.named_parameters(remove_duplicate=False)
            ]  # tied weights under each name
            base_names = {checkpoint.PREFIX + n for n in names} | {
                "base_model." + n for n in names
            }  # soft prompts
        checkpoint.copy_into(entries, state, loadable, base_names, allow_nonfinite)


def _named_forward(*names: str):
    """A `forward` with peft's named parameters for a task class (the ones given are passed on, by name).

    Why: tools read a model's arguments from its signature: transformers finds the label columns with
    `inspect.signature(type(model).forward)` and keeps only the dataset columns the forward names. `task_ids`
    (peft's multitask prompt tuning) is named but refused, since deltatune has no such method."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"forward() takes at most {len(names)} positional arguments, got {len(args)}.")
        given = {**dict(zip(names, args)), **kwargs}
        if given.pop("task_ids", None) is not None:
            raise ConfigError(
                "task_ids is for peft's multitask prompt tuning, which deltatune does not have."
            )
        return PeftModel.forward(self, **{k: v for k, v in given.items() if k not in names or v is not None})

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    forward.__signature__ = inspect.Signature(params)
    return forward


_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states", "return_dict", "task_ids")
_TEXT_INPUTS = ("input_ids", "attention_mask", "inputs_embeds")


class PeftModelForCausalLM(PeftModel):
    """Decoder LMs; `generate()` runs with the adapter."""

    forward = _named_forward(*_TEXT_INPUTS, "labels", *_OUTPUT_FLAGS)


class PeftModelForSequenceClassification(PeftModel):
    """Classifiers; the head (`classifier`/`score`) trains in full beside the adapter."""

    forward = _named_forward(*_TEXT_INPUTS, "labels", *_OUTPUT_FLAGS)


class PeftModelForTokenClassification(PeftModel):
    """Taggers; the head trains in full beside the adapter."""

    forward = _named_forward(*_TEXT_INPUTS, "labels", *_OUTPUT_FLAGS)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder LMs."""

    forward = _named_forward(
        *_TEXT_INPUTS,
        "decoder_input_ids",
        "decoder_attention_mask",
        "decoder_inputs_embeds",
        "labels",
        *_OUTPUT_FLAGS,
    )


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA; `qa_outputs` trains in full beside the adapter."""

    forward = _named_forward(
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "inputs_embeds",
        "start_positions",
        "end_positions",
        *_OUTPUT_FLAGS,
    )


class PeftModelForFeatureExtraction(PeftModel):
    """Embedding models."""

    forward = _named_forward(*_TEXT_INPUTS, *_OUTPUT_FLAGS)


TASK_MODELS = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}

# The AutoPeftModel class that loads each task's adapters (named in model cards; defined in deltatune.auto).
AUTO_CLASS_NAMES = {
    "CAUSAL_LM": "AutoPeftModelForCausalLM",
    "SEQ_CLS": "AutoPeftModelForSequenceClassification",
    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction",
}


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config` (the model is changed in place)."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"get_peft_model needs a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, PeftModel):
        raise UnsupportedModelError(
            "This model already has adapters; use model.add_adapter(name, config) instead."
        )
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a deltatune config (e.g. LoraConfig), got {type(peft_config).__name__}."
        )
    if mixed:
        raise ConfigError(
            "mixed=True (peft's PeftMixedModel, adapters of different methods in one model) is not supported; "
            "use one method per PeftModel."
        )
    if revision is not None:
        peft_config = copy.copy(peft_config)
        peft_config.revision = revision
    cls = TASK_MODELS.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
