"""The one list of methods. Everything else that names methods (the `PeftType` enum, config lookup when reading
`adapter_config.json`, recipe and CLI method names, the benchmark, the README table) is derived from it.

Adding a method = one file in deltatune/methods/ (a `Method` subclass and its config) + one line below.
"""

from __future__ import annotations

import enum

from deltatune import config as _config
from deltatune.config import PeftConfig
from deltatune.errors import ConfigError
from deltatune.method import Method, Variant
from deltatune.methods import adalora, adapters, bitfit, freeze, ia3, lora, mam, prefix, prompt, unipelt

METHODS: tuple[Method, ...] = (
    lora.METHOD,
    adalora.METHOD,
    ia3.METHOD,
    prompt.PROMPT_TUNING,
    prompt.P_TUNING,
    prefix.METHOD,
    adapters.METHOD,
    bitfit.METHOD,
    freeze.FREEZE,
    freeze.FULL,
    mam.METHOD,
    unipelt.METHOD,
)

BY_PEFT_TYPE: dict[str, Method] = {m.peft_type: m for m in METHODS}

# Method names as written in adapter_config.json (`peft_type`); a str enum like peft's.
PeftType = enum.Enum("PeftType", {m.peft_type: m.peft_type for m in METHODS}, type=str)
PeftType.__doc__ = "Method names as written in `adapter_config.json` (`peft_type`)."

_config.CONFIG_CLASSES.update({m.peft_type: m.config_class for m in METHODS})


def method_for(peft_type: str | enum.Enum | None) -> Method:
    key = getattr(peft_type, "value", peft_type)
    if key not in BY_PEFT_TYPE:
        raise ConfigError(
            f"Unknown peft_type {peft_type!r}; deltatune supports: {', '.join(sorted(BY_PEFT_TYPE))}."
        )
    return BY_PEFT_TYPE[key]


def config_class_for(peft_type: str | enum.Enum | None) -> type[PeftConfig]:
    return method_for(peft_type).config_class


def normalize_name(name: str) -> str:
    """How recipe and CLI method names compare: case and `-`/`_` do not matter."""
    return str(name).lower().replace("-", "_")


def variants() -> dict[str, tuple[Method, Variant]]:
    """Every name a recipe or the command line accepts for a method -> (method, what the name implies)."""
    out: dict[str, tuple[Method, Variant]] = {}
    for method in METHODS:
        for name, variant in method.variants.items():
            out[normalize_name(name)] = (method, variant)
        out.setdefault(normalize_name(method.peft_type), (method, Variant()))
    return out


def resolve_variant(name: str) -> tuple[Method, Variant]:
    """(method, variant) for a recipe's method name; a clear error lists the names there are."""
    table = variants()
    key = normalize_name(name)
    if key not in table:
        raise ConfigError(f"Unknown method {name!r}. Available: {', '.join(sorted(table))}.")
    return table[key]


def methods_table() -> str:
    """The README's methods table (a test checks the README holds exactly this)."""
    rows = [
        "| method | recipe names | config | merge | files |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        names = ", ".join(f"`{n}`" for n in method.variants)
        configs = sorted(
            {method.config_class.__name__}
            | {v.config_class.__name__ for v in method.variants.values() if v.config_class}
        )
        merge = "yes" if method.mergeable else "no"
        files = "peft format, both ways" if method.peft_format else "deltatune format"
        rows.append(
            f"| {method.title} | {names} | {', '.join(f'`{c}`' for c in configs)} | {merge} | {files} |"
        )
    return "\n".join(rows)
