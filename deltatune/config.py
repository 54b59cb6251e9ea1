"""Adapter configs and their `adapter_config.json` form.

Every method's config is a dataclass that subclasses `PeftConfig`. The JSON written by `save_pretrained` holds the
dataclass fields under the same names the `peft` package uses, so either library can read the other's folders.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import ConfigError
from deltatune.hub import resolve_adapter_file

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """The kind of model an adapter is for; it decides which modules are trained beside the adapter."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# peft_type -> its config class. Filled by deltatune.registry (the one list of methods) when deltatune is imported,
# so that `PeftConfig.from_pretrained(folder)` returns the right subclass without this module importing methods.
CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


# Keys that peft writes and that change nothing when left at these values. Any other unknown key with a
# non-empty value means the adapter uses a feature deltatune lacks, and loading it would be silently wrong.
_INERT_FOREIGN_KEYS = {
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass
class PeftConfig:
    """Fields every adapter config shares; subclasses add their method's options."""

    peft_type: str | None = field(default=None, init=False)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    # Subclasses set these; they are not dataclass fields.
    is_prompt_learning = False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            valid = ", ".join(TaskType._value2member_map_)
            raise ConfigError(f"Unknown task_type {self.task_type!r}; use one of: {valid}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; sets become sorted lists so the file is stable."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, auto_mapping: dict | None = None) -> None:
        """Write `adapter_config.json`. `auto_mapping` (peft's key for adapters without a task type: the base
        model's class and module) tells `AutoPeftModel` which class to build."""
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the right config subclass from a dict, refusing features that would be silently dropped."""
        peft_type = data.get("peft_type")
        config_cls = cls
        if cls is PeftConfig:
            if peft_type not in CONFIG_CLASSES:
                raise ConfigError(
                    f"Unknown peft_type {peft_type!r}; deltatune supports: {', '.join(sorted(CONFIG_CLASSES))}."
                )
            config_cls = CONFIG_CLASSES[peft_type]
        names = {f.name for f in dataclasses.fields(config_cls) if f.init}
        unknown = {k: v for k, v in data.items() if k not in names and k != "peft_type"}
        unsupported = {k: v for k, v in unknown.items() if k not in _INERT_FOREIGN_KEYS and not _is_empty(v)}
        if unsupported:
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
            raise ConfigError(
                f"This {peft_type} adapter uses options deltatune does not support: {shown}. "
                "Loading it without them would give wrong outputs; retrain without these options."
            )
        return config_cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, revision: str | None = None) -> PeftConfig:
        """Read `adapter_config.json` from a local folder (or a hub repo when online)."""
        config_file = resolve_adapter_file(path, CONFIG_NAME, revision=revision)
        try:
            with open(config_file) as fh:
                data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{config_file} is not valid JSON ({err}); the adapter folder is damaged."
            ) from err
        if not isinstance(data, dict) or "peft_type" not in data:
            raise ConfigError(f"{config_file} has no 'peft_type'; it is not an adapter config.")
        return cls.from_dict(data)


@dataclass
class TargetedConfig(PeftConfig):
    """Options of methods that wrap chosen modules of the model (LoRA, IA3, bottleneck adapters, ...).

    `target_modules` is a list of module names (suffix match on dotted names), a regex matched against the whole
    name, or "all-linear". `layers_to_transform`/`layers_pattern` keep only some numbered blocks.
    `modules_to_save` lists modules (e.g. a classifier head) trained in full and stored with the adapter.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                "layers_pattern only makes sense with layers_to_transform; set both or neither."
            )
