"""Adapter weights on disk, in the `peft` format.

Keys are the model's parameter names with the adapter name removed and `base_model.model.` in front, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; a module trained in full (`modules_to_save`) is
stored under its own name. Only safetensors (or a legacy `.bin` read with `weights_only=True`) is ever read.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.layer import AdapterLayer, ModulesToSave

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def adapter_entries(peft_model: nn.Module, adapter_name: str, config) -> dict[str, torch.Tensor]:
    """Checkpoint key -> live tensor, for everything adapter `adapter_name` owns. This one map drives saving,
    loading and which parameters train, so the three can never disagree."""
    from deltatune.methods import method_for

    method = method_for(config.peft_type)
    if hasattr(method, "state_dict"):
        return method.state_dict(peft_model, adapter_name, config)
    model = peft_model.base_model
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
            for sub, tensor in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                entries[f"{name}.{sub}"] = tensor
    entries.update(trained_biases(model, getattr(config, "bias", "none")))
    return {PREFIX + k: v for k, v in entries.items()}


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


def saved_entries(peft_model: nn.Module, adapter_name: str, config) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes: the live entries, unless the method stores something else."""
    from deltatune.methods import method_for

    entries = adapter_entries(peft_model, adapter_name, config)
    method = method_for(config.peft_type)
    if hasattr(method, "tensors_to_save"):  # e.g. AdaLoRA stores only the ranks its allocator kept
        entries = method.tensors_to_save(peft_model, adapter_name, config, entries)
    return entries


def save_adapter_weights(peft_model: nn.Module, adapter_name: str, config, directory: str) -> int:
    """Write `adapter_model.safetensors`; returns the bytes written. Tensors are cloned so shared storage is fine."""
    entries = saved_entries(peft_model, adapter_name, config)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in entries.items()}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return os.path.getsize(path)


def stored_bytes(peft_model: nn.Module, adapter_name: str, config) -> int:
    """Bytes of tensor data the adapter takes on disk (the safetensors header adds a few KB)."""
    return sum(t.numel() * t.element_size() for t in saved_entries(peft_model, adapter_name, config).values())


def resolve_adapter_file(path: str | os.PathLike, filename: str, revision: str | None = None) -> str:
    """A file of an adapter folder: local first, else fetched from the hub (only when online)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if not os.path.isfile(candidate):
            present = ", ".join(sorted(os.listdir(path))) or "nothing"
            raise FileNotFoundError(
                f"{path} has no {filename} (it holds: {present}); is it an adapter folder?"
            )
        return candidate
    if os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; pass the adapter folder that holds {filename}.")
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise FileNotFoundError(f"No adapter folder at {path!r}.")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, filename, revision=revision)
    except Exception as err:  # offline, missing repo, missing file: one clear message
        raise FileNotFoundError(
            f"No adapter folder at {path!r}, and fetching {filename} from the hub failed ({type(err).__name__}: {err})."
        ) from err


def load_adapter_weights(path: str | os.PathLike, revision: str | None = None) -> dict[str, torch.Tensor]:
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
            raise ValueError(
                f"Could not read {file} as plain tensors ({err}); it may be corrupt or unsafe."
            ) from err
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{file} is damaged or truncated ({err}); re-save or re-download the adapter."
        ) from err


def apply_adapter_weights(
    peft_model: nn.Module, adapter_name: str, config, state: dict[str, torch.Tensor]
) -> None:
    """Copy checkpoint tensors into the adapter's parameters, after checking every key and shape first.
    Base-model tensors in the file (peft saves a targeted embedding's base weight) are accepted too."""
    from deltatune.methods import method_for

    check = getattr(method_for(config.peft_type), "check_loadable", None)
    if check is not None:  # e.g. a P-tuning file cannot load into a training-mode prompt encoder
        check(peft_model, adapter_name, config, state)
    entries = adapter_entries(peft_model, adapter_name, config)
    base_params = {PREFIX + n: p for n, p in peft_model.base_model.named_parameters()}
    missing = sorted(set(entries) - set(state))
    extra = sorted(k for k in state if k not in entries and k not in base_params)
    if missing or extra:
        lines = []
        if missing:
            lines.append(f"{len(missing)} tensors the model expects are missing, e.g. {missing[:3]}")
        if extra:
            lines.append(f"{len(extra)} tensors in the file match nothing in the model, e.g. {extra[:3]}")
        raise ValueError(
            "The adapter does not fit this model: "
            + "; ".join(lines)
            + ". Was it trained for another base model?"
        )
    targets = {**{k: base_params[k] for k in state if k not in entries}, **entries}
    for key, tensor in state.items():
        if tuple(targets[key].shape) != tuple(tensor.shape):
            module = key.removeprefix(PREFIX)
            raise ValueError(
                f"The adapter was trained for a different base: {module} has shape {tuple(tensor.shape)} in the file "
                f"but {tuple(targets[key].shape)} in this model."
            )
    with torch.no_grad():
        for key, tensor in state.items():
            targets[key].copy_(tensor.to(dtype=targets[key].dtype, device=targets[key].device))
