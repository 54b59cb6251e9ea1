"""The benchmark's rows, derived from the registry: one per distinct variant (`registry.variants()`).

Aliases that build the same adapter (`prompt` and `prompt_tuning`, `bottleneck` and `houlsby` ...) are one row:
two names are the same row when the configs a recipe would build from them are equal and they quantize the base
alike. A variant limited to some task types (`Variant.task_types`) runs only on those. Adding a method to the
registry adds its rows here; nothing in the benchmark names a method.
"""

from __future__ import annotations

import json

from deltatune import registry
from deltatune.train.recipe import RunConfig, make_peft_config

BENCH_STEPS = 100  # what step-dependent options (AdaLoRA's schedule) are built with when comparing configs


def _fingerprint(name: str, task: str) -> str:
    _, variant = registry.resolve_variant(name)
    config = make_peft_config(RunConfig(model="bench", task=task, method=name), {}, BENCH_STEPS)
    return json.dumps([config.to_dict(), variant.quantize], sort_keys=True, default=str)


def bench_methods(task: str = "seq-cls", task_type: str | None = None) -> list[str]:
    """Variant names to benchmark for a trainer task ("seq-cls", "causal-lm"), in registry order.

    Among names that build the same adapter, the one that states the most options is kept (`houlsby` rather than
    its alias `bottleneck`), else the first (`prefix` rather than `ptuning_v2`)."""
    from deltatune.train.tasks import TASKS

    task_type = task_type or TASKS[task].task_type
    chosen: dict[str, tuple[str, int]] = {}  # fingerprint -> (name, options stated)
    order: list[str] = []
    for name, (_, variant) in registry.variants().items():
        if variant.task_types and task_type not in variant.task_types:
            continue
        key = _fingerprint(name, task)
        stated = len(variant.options) + (variant.quantize is not None)
        if key not in chosen:
            order.append(key)
            chosen[key] = (name, stated)
        elif stated > chosen[key][1]:
            chosen[key] = (name, stated)
    return [chosen[key][0] for key in order]


def typical_lr(name: str) -> float:
    """The centre of a method's learning-rate sweep (`Method.typical_lr`)."""
    return registry.resolve_variant(name)[0].typical_lr


def check_methods(names: list[str], available: list[str]) -> None:
    unknown = [n for n in names if registry.normalize_name(n) not in available]
    if unknown:
        raise ValueError(f"Unknown bench method(s) {unknown}; choose from: {', '.join(available)}.")
