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

from deltatune.errors import CheckpointError
from deltatune.hub import resolve_adapter_file
from deltatune.layer import AdapterLayer, ModulesToSave

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def layer_entries(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """Checkpoint key -> live tensor of adapter `adapter_name` in `model`'s adapter layers, its trained copies of
    `modules_to_save` and, per `bias`, the base biases trained beside it."""
    entries: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
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
    for name, module in model.named_modules():
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
    storage is fine."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in entries.items()}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_adapter_file(path: str | os.PathLike, revision: str | None = None) -> dict[str, torch.Tensor]:
    """Read adapter tensors safely: safetensors, or a legacy .bin with `weights_only=True` (never a pickle)."""
    try:
        file = resolve_adapter_file(path, WEIGHTS_NAME, revision)
    except FileNotFoundError:
        if not os.path.isfile(os.path.join(os.fspath(path), LEGACY_WEIGHTS_NAME)):
            raise
        file = os.path.join(os.fspath(path), LEGACY_WEIGHTS_NAME)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"Could not read {file} as plain tensors ({err}); it may be corrupt or unsafe."
            ) from err
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{file} is damaged or truncated ({err}); re-save or re-download the adapter."
        ) from err


def copy_into(
    entries: dict[str, torch.Tensor], state: dict[str, torch.Tensor], base_params: dict[str, torch.Tensor]
) -> None:
    """Copy checkpoint tensors into the adapter's live tensors (`entries`), after checking every key and shape
    first, so a file that does not fit changes nothing. Base-model tensors in the file (peft saves a targeted
    embedding's base weight) are accepted when `base_params` names them."""
    missing = sorted(set(entries) - set(state))
    extra = sorted(k for k in state if k not in entries and k not in base_params)
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"{len(missing)} tensors the model expects are missing, e.g. {missing[:3]}")
        if extra:
            lines.append(f"{len(extra)} tensors in the file match nothing in the model, e.g. {extra[:3]}")
        raise CheckpointError(
            "The adapter does not fit this model: "
            + "; ".join(lines)
            + ". Was it trained for another base model?"
        )
    targets = {**{k: base_params[k] for k in state if k not in entries}, **entries}
    for key, tensor in state.items():
        if tuple(targets[key].shape) != tuple(tensor.shape):
            module = key.removeprefix(PREFIX)
            raise CheckpointError(
                f"The adapter was trained for a different base: {module} has shape {tuple(tensor.shape)} in the file "
                f"but {tuple(targets[key].shape)} in this model."
            )
    with torch.no_grad():
        for key, tensor in state.items():
            targets[key].copy_(tensor.to(dtype=targets[key].dtype, device=targets[key].device))
