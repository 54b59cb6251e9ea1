"""Adapter weights on disk, in the `peft` format.

Keys are the model's parameter names with the adapter name removed and `base_model.model.` in front, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a module trained in full (`modules_to_save`) is
stored under its own name. Only safetensors (or a legacy `.bin` read with `weights_only=True`) is ever read.

Which tensors belong to an adapter is the method's call (`Method.state_dict`); this module holds the default
rule for module-wrapping methods (`layer_entries`) and the file I/O, and knows no method.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import CheckpointError, warn_at_caller
from deltatune.hub import resolve_adapter_file
from deltatune.inject import outer_modules
from deltatune.layer import AdapterLayer, ModulesToSave

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def layer_entries(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """Checkpoint key -> live tensor of adapter `adapter_name` in `model`'s adapter layers, its trained copies of
    `modules_to_save` and, per `bias`, the base biases trained beside it."""
    entries: dict[str, torch.Tensor] = {}
    for name, module in outer_modules(model):  # wrappers never nest: no need to walk inside them
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_attrs:
                container = getattr(module, attr)
                if adapter_name not in container:
                    continue
                item = container[adapter_name]
                if isinstance(item, torch.Tensor):
                    entries[f"{name}.{attr}"] = item
                else:
                    for sub, tensor in item.state_dict(keep_vars=True).items():
                        entries[f"{name}.{attr}.{sub}"] = tensor
        elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            entries.update(heads_entries(module, name, adapter_name, prefix=""))
    entries.update(trained_biases(model, bias))
    return {PREFIX + k: v for k, v in entries.items()}


def heads_entries(
    module: ModulesToSave, name: str, adapter_name: str, prefix: str = PREFIX
) -> dict[str, torch.Tensor]:
    """The trained copy of one `modules_to_save` module, under the names peft gives it."""
    copy = module.modules_to_save[adapter_name]
    return {f"{prefix}{name}.{sub}": t for sub, t in copy.state_dict(keep_vars=True).items()}


def all_heads_entries(model: nn.Module, adapter_name: str, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Every trained head copy (`modules_to_save`) adapter `adapter_name` has in `model`."""
    entries: dict[str, torch.Tensor] = {}
    for name, module in outer_modules(model):
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            entries.update(heads_entries(module, name, adapter_name, prefix))
    return entries


def trained_biases(model: nn.Module, bias: str) -> dict[str, torch.Tensor]:
    """Base biases trained beside the adapter: all of them (`"all"`) or the wrapped layers' (`"<method>_only"`)."""
    if bias == "none":
        return {}
    out = {}
    copies = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for name, module in model.named_modules():
        if bias == "all" and not any(name == c or name.startswith(c + ".") for c in copies):
            tensor = module._parameters.get("bias")
            if tensor is not None and not isinstance(module, AdapterLayer):
                out[f"{name}.bias" if name else "bias"] = tensor
        elif bias.endswith("_only") and isinstance(module, AdapterLayer):
            tensor = getattr(module.base_layer, "bias", None)
            if isinstance(tensor, torch.Tensor):
                out[f"{name}.base_layer.bias"] = tensor
    return out


def stored_bytes(entries: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data these entries take on disk (the safetensors header adds a few KB)."""
    return sum(t.numel() * t.element_size() for t in entries.values())


def write_adapter_file(entries: dict[str, torch.Tensor], directory: str) -> int:
    """Write `adapter_model.safetensors` atomically; returns the bytes written. Tensors are cloned, so shared
    storage is fine. A failed write leaves neither a partial file nor its temporary behind."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in entries.items()}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


def read_adapter_file(path: str | os.PathLike, revision: str | None = None) -> dict[str, torch.Tensor]:
    """Read adapter tensors safely: safetensors, or a legacy .bin with `weights_only=True` (never a pickle)."""
    try:
        file = resolve_adapter_file(path, WEIGHTS_NAME, revision)
    except FileNotFoundError:
        legacy = os.path.join(os.fspath(path), LEGACY_WEIGHTS_NAME)
        if not os.path.isfile(legacy):
            raise
        return _read_legacy_bin(legacy)
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{file} is damaged or truncated ({err}); re-save or re-download the adapter."
        ) from err


def _read_legacy_bin(file: str) -> dict[str, torch.Tensor]:
    """A peft `adapter_model.bin`, read with `weights_only=True`: plain tensors or nothing."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"Could not read {file} as plain tensors ({err}); it may be corrupt or unsafe."
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{file} is not a mapping of tensor names to tensors; it is not an adapter file."
        )
    return state


def embedding_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint key -> base tensor of the input and output embedding layers: the only base weights an adapter
    file may carry. peft writes them (`save_embedding_layers="auto"`) when an embedding layer is targeted (as
    `<name>.base_layer.weight`) or when the vocabulary was resized (as `<name>.weight`)."""
    out: dict[str, torch.Tensor] = {}
    layers = [
        getattr(model, g)() for g in ("get_input_embeddings", "get_output_embeddings") if hasattr(model, g)
    ]
    names = {id(m): n for n, m in outer_modules(model)}  # embeddings are never inside another wrapper
    for layer in layers:
        if not isinstance(layer, nn.Module) or id(layer) not in names:
            continue
        name, owner = names[id(layer)], layer
        if isinstance(layer, AdapterLayer):
            name, owner = f"{name}.base_layer", layer.base_layer
        for sub, tensor in owner.named_parameters(recurse=False):
            out[f"{PREFIX}{name}.{sub}"] = tensor
    return out


def _refusal(missing: list[str], extra: list[str], base_names: set[str]) -> CheckpointError:
    """The error for a file whose keys do not match the adapter, naming the keys that do not belong."""
    lines = []
    if missing:
        lines.append(f"{len(missing)} tensors the model expects are missing, e.g. {missing[:3]}")
    base = [k for k in extra if k in base_names]
    if base:
        lines.append(
            f"{len(base)} tensors would overwrite the base model's own weights, e.g. {base[:3]}; an adapter file "
            "may hold only the adapter's tensors (its factors, its modules_to_save copies, its trained biases), "
            "so it was refused"
        )
    other = [k for k in extra if k not in base_names]
    if other:
        lines.append(f"{len(other)} tensors in the file match nothing in the model, e.g. {other[:3]}")
    hint = "" if base else " Was it trained for another base model?"
    return CheckpointError("The adapter does not fit this model: " + "; ".join(lines) + "." + hint)


def non_finite_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors that hold a NaN or an infinity."""
    return [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def copy_into(
    entries: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    loadable_base: dict[str, torch.Tensor] | None = None,
    base_names: set[str] | frozenset[str] = frozenset(),
    allow_nonfinite: bool = False,
) -> None:
    """Copy checkpoint tensors into the adapter's live tensors (`entries`), all or nothing: every key, shape, dtype
    and value is checked and converted first, so a file that does not fit changes nothing.

    Besides the adapter's own tensors, only the base tensors in `loadable_base` (the embedding weights peft writes,
    see `embedding_entries`) may load; a key naming any other base weight (`base_names`) is refused by name. A
    tensor holding NaN or infinity is refused too, unless `allow_nonfinite` (then a warning names it)."""
    loadable_base = loadable_base or {}
    missing = sorted(set(entries) - set(state))
    extra = sorted(k for k in state if k not in entries and k not in loadable_base)
    if missing or extra:
        raise _refusal(missing, extra, set(base_names))
    targets = {**{k: loadable_base[k] for k in state if k not in entries}, **entries}
    for key, tensor in state.items():
        target = targets[key]
        if tuple(target.shape) != tuple(tensor.shape):
            module = key.removeprefix(PREFIX)
            raise CheckpointError(
                f"The adapter was trained for a different base: {module} has shape {tuple(tensor.shape)} in the file "
                f"but {tuple(target.shape)} in this model."
            )
        if target.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{key} holds {tensor.dtype} values in the file, but the model keeps it as {target.dtype}; "
                "the adapter file is damaged or was not written by peft/deltatune."
            )
    bad = non_finite_names(state)
    if bad:
        message = f"{len(bad)} tensors in the adapter file hold NaN or infinite values: {', '.join(bad[:5])}"
        if not allow_nonfinite:
            raise CheckpointError(
                message + ". Every output would be NaN; retrain or re-download the adapter "
                "(or pass allow_nonfinite=True to load it anyway)."
            )
        warn_at_caller(message + "; loaded anyway (allow_nonfinite=True).")
    converted = {k: t.to(dtype=targets[k].dtype, device=targets[k].device) for k, t in state.items()}
    with torch.no_grad():
        for key, tensor in converted.items():
            targets[key].copy_(tensor)
