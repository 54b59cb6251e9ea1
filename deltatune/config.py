"""Adapter configs and their `adapter_config.json` form.

Every method's config is a dataclass that subclasses `PeftConfig`. The JSON written by `save_pretrained` holds the
dataclass fields under the same names the `peft` package uses, so either library can read the other's folders.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, NewType

from deltatune.errors import ConfigError
from deltatune.hub import resolve_adapter_file

CONFIG_NAME = "adapter_config.json"

# A string that must compile as a regular expression (a field annotated with it is checked when the config is built).
Regex = NewType("Regex", str)


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


# --- field checks driven by the dataclass annotations ------------------------------------------------------------
# Every config (adapter configs, and the trainer's and recipes' settings) is a dataclass whose annotations say what
# each field holds. `check_fields` holds every value to its annotation when the config is built, so a careless or
# hostile `adapter_config.json` (`r: true`, `lora_alpha: "16"`, `target_modules: 3`, a broken regex, NaN) fails with
# the field's name and the fix instead of a TypeError from deep inside torch. Ranges are each config's own business.

_NAMES = {
    bool: ("true or false", "true/false values"),
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
    Regex: ("a valid regular expression", "valid regular expressions"),
    type(None): ("null", "nulls"),
    type: ("a module class", "module classes"),
    dict: ("a mapping", "mappings"),
    list: ("a list", "lists"),
    collections.abc.Callable: ("a callable object", "callable objects"),
}


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the string annotations of `from __future__ import annotations`)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a class whose annotations cannot be resolved is left to its own checks
        return {}


def _members(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)


def describe_type(hint: Any, plural: bool = False) -> str:
    """`list[str] | str | None` -> 'a list of strings, a string or null' (for error messages)."""
    members = _members(hint)
    if len(members) > 1:
        words = [describe_type(m, plural) for m in members]
        return ", ".join(words[:-1]) + " or " + words[-1]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args:
        return ("lists of " if plural else "a list of ") + describe_type(args[0], plural=True)
    if origin is dict and args:
        return ("mappings of " if plural else "a mapping of ") + (
            f"{describe_type(args[0], True)} to {describe_type(args[1], True)}"
        )
    if hint in _NAMES:
        return _NAMES[hint][plural]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return f"a {getattr(hint, '__name__', hint)}"


def type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the annotation `hint` (None when it fits)."""
    if hint is Any:
        return None
    members = _members(hint)
    if len(members) > 1:
        problems = [type_problem(value, m) for m in members]
        if None in problems:
            return None
        # a regex that fails to compile explains itself better than "is not a list"
        return next((p for p in problems if p and "regular expression" in p), "")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return None if value is None else ""
    if hint is bool:
        return None if isinstance(value, bool) else ""
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else ""
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return ""
        return None if math.isfinite(value) else "it is not finite"
    if hint is Regex:
        if not isinstance(value, str):
            return ""
        try:
            re.compile(value)
        except re.error as err:
            return f"it is not a valid regular expression ({err})"
        return None
    if hint is collections.abc.Callable:
        return None if callable(value) else ""
    if origin is list or hint is list:
        if not isinstance(value, list):
            return ""
        for item in value if args else ():
            problem = type_problem(item, args[0])
            if problem is not None:
                return problem or f"the item {item!r} is not {describe_type(args[0])}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return ""
        for key, item in value.items() if args else ():
            for part, part_hint in ((key, args[0]), (item, args[1])):
                problem = type_problem(part, part_hint)
                if problem is not None:
                    return (
                        problem
                        or f"the entry {key!r}: {item!r} holds {part!r}, not {describe_type(part_hint)}"
                    )
        return None
    if isinstance(hint, type):
        return None if isinstance(value, hint) else ""
    return None  # an annotation this checker does not know (a TypeVar, a Literal ...) is left to the class


def _as_list(value: Any, hint: Any) -> Any:
    """Tuples and sets given for a list field become lists (sets sorted, so the JSON is stable)."""
    if not isinstance(value, (tuple, set, frozenset)):
        return value
    if not any(typing.get_origin(m) is list or m is list for m in _members(hint)):
        return value
    try:
        return sorted(value)
    except TypeError:  # a set of mixed types cannot be sorted; its order does not matter then
        return list(value)


def check_fields(obj: Any, source: str | None = None) -> None:
    """Hold every dataclass field of `obj` to its annotation; a ConfigError names the field, what it must be and
    what was given. Tuples and sets given for list fields become lists."""
    hints = _field_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name not in hints:
            continue
        hint = hints[f.name]
        value = _as_list(getattr(obj, f.name), hint)
        if value is not getattr(obj, f.name):
            setattr(obj, f.name, value)
        problem = type_problem(value, hint)
        if problem is None:
            continue
        example = ""
        if f.default is not dataclasses.MISSING and f.default is not None:
            example = f" (the default is {getattr(f.default, 'value', f.default)!r})"
        where = f" in {source}" if source else ""
        raise ConfigError(
            f"{type(obj).__name__}.{f.name}{where} must be {describe_type(hint)}, got {value!r}"
            f"{f' ({type(value).__name__})' if not problem else ''}{'; ' + problem if problem else ''}. "
            f"Fix {f.name}{example}."
        )


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
        check_fields(self)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            valid = ", ".join(TaskType._value2member_map_)
            raise ConfigError(f"Unknown task_type {self.task_type!r}; use one of: {valid}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; sets become sorted lists so the file is stable. A deltatune-only option
        (`field(metadata={"deltatune_only": True})`) is written only when it differs from its default, so a file
        that does not use it is exactly what peft writes."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("deltatune_only") and value == f.default:
                continue
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
        if not isinstance(peft_type, str):
            raise ConfigError(f"peft_type must be a method name such as 'LORA', got {peft_type!r}.")
        config_cls = cls
        if cls is PeftConfig:
            if peft_type not in CONFIG_CLASSES:
                raise ConfigError(
                    f"Unknown peft_type {peft_type!r}; deltatune supports: {', '.join(sorted(CONFIG_CLASSES))}."
                )
            config_cls = CONFIG_CLASSES[peft_type]
        elif CONFIG_CLASSES.get(peft_type, cls) is not cls and not issubclass(CONFIG_CLASSES[peft_type], cls):
            raise ConfigError(
                f"This is a {peft_type} adapter, not a {cls.__name__}; read it with PeftConfig.from_pretrained."
            )
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
            with open(config_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
            raise ConfigError(
                f"{config_file} is not valid JSON ({type(err).__name__}: {err}); the adapter folder is damaged."
            ) from err
        if not isinstance(data, dict) or "peft_type" not in data:
            raise ConfigError(f"{config_file} has no 'peft_type'; it is not an adapter config.")
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{config_file}: {err}") from err


@dataclass
class TargetedConfig(PeftConfig):
    """Options of methods that wrap chosen modules of the model (LoRA, IA3, bottleneck adapters, ...).

    `target_modules` is a list of module names (suffix match on dotted names), a regex matched against the whole
    name, or "all-linear". `layers_to_transform`/`layers_pattern` keep only some numbered blocks.
    `modules_to_save` lists modules (e.g. a classifier head) trained in full and stored with the adapter.
    """

    target_modules: list[str | type] | Regex | None = None
    exclude_modules: list[str] | Regex | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[Regex] | Regex | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = self.layers_to_transform
        if any(
            i < 0 for i in (layers if isinstance(layers, list) else [layers] if layers is not None else [])
        ):
            raise ConfigError(f"layers_to_transform holds block indices (0, 1, ...), got {layers!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                "layers_pattern only makes sense with layers_to_transform; set both or neither."
            )
