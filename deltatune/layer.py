"""What every module-wrapping adapter layer shares: the wrapped base, which adapters are active, and merging.

A layer keeps each adapter's tensors in `nn.ModuleDict`/`nn.ParameterDict` attributes keyed by adapter name
(listed in `adapter_attrs`), so many adapters live side by side and the state-dict names look like peft's:
`<module>.lora_A.<adapter>.weight`. The wrapped module stays reachable as `base_layer`.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
from torch import nn

from deltatune.errors import ConfigError, MergeError, UnsupportedModelError
from deltatune.inject import is_gpt2_conv1d
from deltatune.quant import dequantize_for_merge, dequantize_weight, is_quantized, keep_standard_layout

# --- all or nothing ---------------------------------------------------------------------------------------------
# Adding or loading an adapter changes a model in place (modules wrapped, heads copied, requires_grad switched, a
# PiSSA init rewriting base weights). `unchanged_on_error` undoes all of it when the block fails, so a failed
# `get_peft_model`/`from_pretrained`/`load_adapter` leaves the user's model exactly as it was.
_OPEN_GUARDS: contextvars.ContextVar[tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], ...]] = (
    contextvars.ContextVar("deltatune_open_guards", default=())
)


def remember_before_write(tensor: torch.Tensor) -> None:
    """Called before a base weight is overwritten in place: inside `unchanged_on_error`, keep its old values."""
    for backups in _OPEN_GUARDS.get():
        if id(tensor) not in backups:
            backups[id(tensor)] = (tensor, tensor.detach().clone())


@contextlib.contextmanager
def unchanged_on_error(*roots: nn.Module):
    """If the block raises, put every module under `roots` back as it was: the same submodules, parameters and
    buffers in the same places, the same requires_grad and train/eval flags, and the old values of base weights
    written in place meanwhile (they go through `remember_before_write`). Nothing is copied unless written."""
    modules = _guarded_modules(roots)
    layout = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), m.training) for m in modules]
    grads = [(p, p.requires_grad) for m in modules for p in m._parameters.values() if p is not None]
    backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    token = _OPEN_GUARDS.set((*_OPEN_GUARDS.get(), backups))
    try:
        yield
    except BaseException:
        for module, children, params, buffers, training in layout:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            module.training = training
        for param, flag in grads:
            param.requires_grad_(flag)
        with torch.no_grad():
            for tensor, old in backups.values():
                tensor.copy_(old)
        raise
    finally:
        _OPEN_GUARDS.reset(token)


def _guarded_modules(roots) -> list[nn.Module]:
    """The modules `unchanged_on_error` keeps: every module under `roots`, except those inside a wrapper's
    per-adapter containers (`lora_A[name]`, a head's copy for one adapter). The containers themselves are kept,
    so an adapter added in the block goes away with its entries; the existing adapters' own modules are never
    restructured by adding or loading another. Why: a server holds hundreds of adapters, and walking all of their
    modules made every load cost more than the one before."""
    found: dict[int, nn.Module] = {}
    stack = list(roots)
    while stack:
        module = stack.pop()
        if id(module) in found:
            continue
        found[id(module)] = module
        children = [c for c in module._modules.values() if c is not None]
        if isinstance(module, Wrapper):
            wrapped = module._wrapped()
            for child in children:
                if child is wrapped:
                    stack.append(child)
                else:
                    found.setdefault(id(child), child)
        else:
            stack.extend(children)
    return list(found.values())


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 if it is in a narrower float type: merges compute in float32 and round once."""
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < 32:
        return tensor.float()
    return tensor


class Wrapper(nn.Module):
    """What every module deltatune puts in place of one of the model's own shares with peft's layers: the wrapped
    module stays reachable (`get_base_layer()`), and any attribute the wrapper lacks (`weight`, `bias`,
    `in_features`, `out_features`, `padding_idx`, ...) is read from it, so code that inspects the model's layers
    (T5's `wo.weight.dtype`, a ViT's patch projection, transformers' embedding resizing) sees the module it
    expects. One rule in one place, not a property per attribute."""

    wrapped_attr = "base_layer"  # the attribute holding the wrapped module

    def _wrapped(self) -> nn.Module:
        return self._modules[self.wrapped_attr]

    def get_base_layer(self) -> nn.Module:
        """The innermost original module (wrappers never nest, but peft's API follows the chain)."""
        module = self._wrapped()
        while isinstance(module, Wrapper):
            module = module._wrapped()
        return module

    def _attribute_source(self) -> nn.Module:
        """The module whose attributes the wrapper shows (ModulesToSave: the active adapter's copy)."""
        return self._wrapped()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or not self.__dict__.get("_modules"):
                raise
            try:
                source = self._attribute_source()
            except (AttributeError, KeyError):  # not built yet
                raise AttributeError(name) from None
            return getattr(source, name)


class AdapterLayer(Wrapper):
    """Base of adapter layers. Subclasses implement `add(...)`, `forward`, and (if mergeable) `delta_weight`.

    The public methods carry peft's names and signatures (`set_adapter`, `enable_adapters`, `delete_adapter`,
    `merge(safe_merge, adapter_names)`, `unmerge()`, `active_adapters`, `merged`), so code written against peft's
    `BaseTunerLayer` (transformers, diffusers, user scripts) drives deltatune layers unchanged."""

    adapter_attrs: tuple[str, ...] = ()
    mergeable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        keep_standard_layout(base_layer)  # bitsandbytes 4-bit: see deltatune.quant.keep_standard_layout
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._original: dict[str, object] | None = None  # the base tensors before the first merge, if kept
        self._disable_adapters = False

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        # dict.fromkeys: first-seen order without duplicates, linear in the number of adapters (a server holds
        # hundreds; a list-membership test here made every load and forward quadratic in them)
        return list(dict.fromkeys(name for attr in self.adapter_attrs for name in getattr(self, attr).keys()))

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        """peft's spelling: the name when one adapter is active, else the list."""
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def running_adapters(self) -> list[str]:
        """The adapters whose contribution the forward pass must add (none when disabled or merged)."""
        if self._disable_adapters or self.merged:
            return []
        return [a for a in self._active_adapters if a in self.adapter_names]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """The model's active adapters, kept as given (as peft's layers do); a layer runs those it holds."""
        self._active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise MergeError(
                f"Adapter {adapter_name!r} is merged into the weights; unmerge it before deleting it."
            )
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]

    # --- weights -------------------------------------------------------------------------------
    @property
    def fan_in_fan_out(self) -> bool:
        return is_gpt2_conv1d(self.base_layer)

    def base_weight(self) -> torch.Tensor:
        """The base weight in the (out, in, ...) layout, whatever layout the base module stores. A bitsandbytes
        4/8-bit base gives its dequantized float weight (a fresh tensor: writing to it changes nothing)."""
        if is_quantized(self.base_layer):
            return dequantize_weight(self.base_layer)
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter `name` makes to `base_weight()`, in the same layout, in float32 or wider
        (`at_least_float32`), so a merge into a half-precision weight rounds once."""
        raise MergeError(f"{type(self).__name__} cannot be merged into the base weights.")

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight after merging adapter `name` (additive by default; DoRA and IA3 override): computed in
        float32 and rounded once to the weight's dtype, the correctly rounded W + dW."""
        return (at_least_float32(weight) + self.delta_weight(name)).to(weight.dtype)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight`, used only when the originals were not kept (rounding makes it
        approximate: within one unit in the last place of the weight's dtype)."""
        return (at_least_float32(weight) - self.delta_weight(name)).to(weight.dtype)

    def _write_weight(self, weight: torch.Tensor) -> None:
        if is_quantized(self.base_layer):
            raise UnsupportedModelError(
                "The base layer is quantized (bitsandbytes); its weight cannot be overwritten in place. "
                "Initialize the adapter (e.g. PiSSA/OLoRA) on the float model, then quantize."
            )
        target = self.base_layer.weight
        remember_before_write(target)
        target.data.copy_(weight.T if self.fan_in_fan_out else weight)

    def merges_additively(self, name: str) -> bool:
        """Whether merging `name` is W + delta_weight (subclasses with another rule, like DoRA, say no)."""
        return type(self).merged_weight is AdapterLayer.merged_weight

    # --- merging -------------------------------------------------------------------------------
    # Rounding makes W + dW - dW differ from W in low precision (and in float32), so an unmerge that subtracts
    # drifts the base a little on every merge/unmerge cycle. With `keep_original` (the default) a layer keeps the
    # tensors merging changes (`merge_changes`; for a quantized base, the quantized module itself) as they were
    # before its first merge, and unmerging restores them bit for bit. `merge_and_unload` needs no way back and
    # keeps nothing.
    merge_changes: tuple[str, ...] = ("weight",)  # the base module's tensors a merge rewrites (IA3: and bias)

    @property
    def keeps_original(self) -> bool:
        """Whether `unmerge()` restores the base tensors bit-exactly (the originals were kept at the first merge)."""
        return self._original is not None

    def _snapshot(self) -> dict[str, object]:
        if is_quantized(self.base_layer):  # merging swaps in a float layer; keeping the module is free
            return {"module": self.base_layer}
        saved = {}
        for attr in self.merge_changes:
            tensor = getattr(self.base_layer, attr, None)
            if isinstance(tensor, torch.Tensor):
                saved[attr] = tensor.detach().clone()
        return saved

    def _restore(self, snapshot: dict[str, object]) -> None:
        if "module" in snapshot:
            self.base_layer = snapshot["module"]
            return
        for attr, tensor in snapshot.items():
            getattr(self.base_layer, attr).data.copy_(tensor)

    def _merge_one(self, name: str) -> None:
        """Fold adapter `name` into the base tensors: W + dW in place for a float additive merge, else the
        subclass's rule (`merged_weight`), each computed in float32 and rounded once."""
        if is_quantized(self.base_layer):  # merging dequantizes the layer; see deltatune/quant.py
            new = self.merged_weight(name, self.base_weight())
            self.base_layer = dequantize_for_merge(self.base_layer)
            self._write_weight(new)
        elif self.merges_additively(name):  # the common case: no second full-precision copy of W is kept
            remember_before_write(self.base_layer.weight)
            weight = self.base_layer.weight.data
            delta = self.delta_weight(name)
            delta = delta.T if self.fan_in_fan_out else delta
            if weight.dtype == delta.dtype:
                weight.add_(delta)
            else:
                weight.copy_((at_least_float32(weight) + delta).to(weight.dtype))
        else:
            self._write_weight(self.merged_weight(name, self.base_weight()))

    def _unmerge_one(self, name: str) -> None:
        """Undo one merge by its inverse rule (used only when the originals were not kept)."""
        self._write_weight(self.unmerged_weight(name, self.base_weight()))

    def _pending(self, adapter_names: list[str] | None) -> list[str]:
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [n for n in dict.fromkeys(names) if n in self.adapter_names and n not in self.merged_adapters]

    @torch.no_grad()
    def check_merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Raise MergeError if these adapters cannot be merged (or, with `safe_merge`, would put NaN/inf into
        the weights); changes nothing."""
        if not self.mergeable:
            raise MergeError(
                f"{type(self).__name__} adapters change activations, not weights, and cannot be merged."
            )
        if not safe_merge:
            return
        weight = self.base_weight()
        for name in self._pending(adapter_names):
            weight = self.merged_weight(name, weight)
            if not torch.isfinite(weight).all():
                raise MergeError(
                    f"Merging adapter {name!r} would put NaN/inf into the weights; nothing was merged."
                )

    @torch.no_grad()
    def merge(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, keep_original: bool = True
    ) -> None:
        """Fold adapters (default: the active ones) into the base weights, all or none of them.

        `safe_merge` checks for NaN/inf before anything is written. `keep_original` keeps the tensors as they were
        before the first merge so `unmerge()` restores them exactly (costs one copy of each merged weight)."""
        self.check_merge(adapter_names, safe_merge)
        names = self._pending(adapter_names)
        if not names:
            return
        if keep_original and not self.merged_adapters:
            self._original = self._snapshot()
        done = len(self.merged_adapters)
        try:
            for name in names:
                self._merge_one(name)
                self.merged_adapters.append(name)
        except BaseException:
            self.unmerge(len(self.merged_adapters) - done)
            raise

    @torch.no_grad()
    def unmerge(self, count: int | None = None) -> None:
        """Undo the last `count` merges (all by default). With the originals kept, the base tensors are restored
        bit-exactly and the merges that stay are redone (a merge is deterministic); otherwise each merge is undone
        by its inverse rule, newest first."""
        count = len(self.merged_adapters) if count is None else count
        if count <= 0:
            return
        stay = self.merged_adapters[: len(self.merged_adapters) - count]
        if self._original is None:
            for _ in range(count):
                self._unmerge_one(self.merged_adapters.pop())
            return
        self._restore(self._original)
        self.merged_adapters = []
        if not stay:
            self._original = None
        for name in stay:
            self._merge_one(name)
            self.merged_adapters.append(name)


class ModulesToSave(Wrapper):
    """A module trained in full (e.g. a classifier head): one trainable copy per adapter, the original untouched.

    State-dict names match peft's wrapper: `<name>.original_module.*` and `<name>.modules_to_save.<adapter>.*`.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._disable_adapters = False

    wrapped_attr = "original_module"

    def _attribute_source(self) -> nn.Module:
        return self.current()  # `model.classifier.weight` is the weight that runs, as in peft

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter is not None else []

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        chosen = [n for n in names if n in self.modules_to_save]
        if len(chosen) > 1:
            raise ConfigError(f"Only one adapter with modules_to_save can be active at a time; got {chosen}.")
        self.active_adapter = chosen[0] if chosen else None

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def current(self) -> nn.Module:
        if self._disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    # Mixed-adapter batches (serving): row i uses adapter row_adapters[i]'s copy (None: the original).
    row_adapters: list[str | None] | None = None

    def forward(self, *args, **kwargs):
        if self.row_adapters is None:
            return self.current()(*args, **kwargs)
        return self._forward_rows(args[0], *args[1:], **kwargs)

    def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run each group of rows through its adapter's copy and put the rows back in order."""
        if len(self.row_adapters) != x.shape[0]:
            raise ConfigError(
                f"row_adapters names {len(self.row_adapters)} rows but the batch has {x.shape[0]}."
            )
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(self.row_adapters):
            key = name if (name in self.modules_to_save and not self._disable_adapters) else None
            groups.setdefault(key, []).append(i)
        result = None
        for name, rows in groups.items():
            module = self.original_module if name is None else self.modules_to_save[name]
            index = torch.tensor(rows, dtype=torch.long, device=x.device)
            out = module(x[index], *args, **kwargs)
            if result is None:
                result = out.new_zeros((x.shape[0],) + out.shape[1:])
            result = result.index_copy(0, index, out)
        return result
