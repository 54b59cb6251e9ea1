"""Finding the modules an adapter targets, and swapping modules in place.

Matching follows the `peft` rules so that a config means the same thing in both libraries:
a list matches a module whose dotted name equals an entry or ends with "." + entry; a string is a regex that must
match the whole name; "all-linear" means every linear layer except the model's output head.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from torch import nn

from deltatune.errors import ConfigError

ALL_LINEAR = "all-linear"


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` is a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_gpt2_conv1d(module)


def name_matches(key: str, names: str | Iterable[str]) -> bool:
    """peft's matching rule: a regex over the full name, or a suffix match on dotted names."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(isinstance(n, str) and (key == n or key.endswith("." + n)) for n in names)


def type_matches(module: nn.Module, names) -> bool:
    """deltatune extension: classes in target_modules select modules by type (resolved to names on add)."""
    if isinstance(names, str):
        return False
    types = tuple(t for t in names if isinstance(t, type))
    return bool(types) and isinstance(module, types)


def is_wrapper(module: nn.Module) -> bool:
    """An adapter wrapper (a layer holding `base_layer`, or trained copies beside `original_module`)."""
    return hasattr(module, "base_layer") or hasattr(module, "original_module")


def outer_modules(module: nn.Module, prefix: str = "", seen: set[int] | None = None):
    """`named_modules()` without the insides of adapter wrappers: the wrappers themselves are yielded, their base
    layers and per-adapter weights are not. Why: a wrapper holds modules for every adapter, so a full walk costs
    more with each adapter loaded (a server holding hundreds would pay for all of them on every load)."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    if is_wrapper(module):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from outer_modules(child, f"{prefix}.{name}" if prefix else name, seen)


def candidate_modules(model: nn.Module):
    """(name, module) pairs a method may target. An existing adapter wrapper stands for the module it wraps, and
    its insides (base layer, adapter weights, trained copies) are never targets themselves."""
    for name, module in outer_modules(model):
        if not name:
            continue
        if is_wrapper(module):
            module = getattr(module, "base_layer", None) or module.original_module
        yield name, module


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The block number in a name like `model.layers.3.mlp.up_proj` (the first numbered segment)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
            if match:
                break
    return int(match.group(1)) if match else None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head, which "all-linear" leaves alone (it is tied or task-specific)."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        heads |= {name for name, module in candidate_modules(model) if module is head}
    else:
        linear_names = [name for name, module in candidate_modules(model) if is_linear(module)]
        if linear_names:
            heads.add(linear_names[-1])
    return heads


def resolve_all_linear(model: nn.Module, extra_excluded: Iterable[str] = ()) -> list[str]:
    """Full names of every linear layer but the output head and the modules trained in full."""
    heads = output_head_names(model)
    excluded = list(extra_excluded)
    return [
        name
        for name, module in candidate_modules(model)
        if is_linear(module) and name not in heads and not (excluded and name_matches(name, excluded))
    ]


def is_under(key: str, prefixes: Iterable[str]) -> bool:
    """True when `key` is one of `prefixes` or lives inside one of them (modules to save are not targeted)."""
    return any(re.match(rf"(^|.*\.){re.escape(p)}($|\..*)", key) for p in prefixes)


def find_targets(model: nn.Module, config) -> list[str]:
    """Dotted names of the modules `config` targets, in model order; a clear error when there are none."""
    targets = config.target_modules
    if targets is None:
        raise ConfigError(
            f"{type(config).__name__} needs target_modules: a list of module names, a regex, or 'all-linear'."
        )
    if targets == ALL_LINEAR:
        targets = resolve_all_linear(model, config.modules_to_save or ())
    selected = []
    for key, module in candidate_modules(model):
        if not (name_matches(key, targets) or type_matches(module, targets)):
            continue
        if config.exclude_modules and name_matches(key, config.exclude_modules):
            continue
        if config.modules_to_save and is_under(key, config.modules_to_save):
            continue
        if config.layers_to_transform is not None and not isinstance(targets, str):
            index = layer_index(key, config.layers_pattern)
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else wanted
            if index is None or index not in wanted:
                continue
        selected.append(key)
    if not selected:
        raise ConfigError(no_match_message(model, config.target_modules))
    return selected


def no_match_message(model: nn.Module, targets) -> str:
    """Explain a target that matched nothing, with the module names closest to what was asked for."""
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    asked = [targets] if isinstance(targets, str) else list(targets)
    hints = list(
        dict.fromkeys(
            m for t in asked for m in difflib.get_close_matches(str(t).rsplit(".", 1)[-1], leaves, n=5)
        )
    )
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})
    msg = f"target_modules={targets!r} matched no module of {type(model).__name__}."
    if hints:
        msg += f" Closest module names: {', '.join(hints)}."
    if linear:
        msg += f" Linear layers in this model: {', '.join(linear[:20])}."
    return msg + " Fix target_modules (names are suffix-matched, a string is a full-name regex)."


def get_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    """The module that owns `key`, and the attribute name under which it owns it."""
    parent_name, _, child = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, key: str, new: nn.Module) -> None:
    parent, child = get_parent(model, key)
    setattr(parent, child, new)
