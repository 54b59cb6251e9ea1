"""What `deltatune inspect` shows: an adapter folder's config, targets and size, or a model's parameters and the
layers an adapter could target."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from deltatune import checkpoint
from deltatune.config import PeftConfig

# Suffixes that name an adapter's tensors inside a wrapped module; what is left is the targeted module's name.
_ADAPTER_PARTS = re.compile(r"\.(lora_[A-Za-z_]+|ia3_l|adapter_[a-z_]+|base_layer|modules_to_save)(\..*)?$")


def inspect_adapter(path: str) -> dict[str, Any]:
    config = PeftConfig.from_pretrained(path)
    state = checkpoint.read_adapter_file(path)
    targets = sorted({_ADAPTER_PARTS.sub("", k.removeprefix(checkpoint.PREFIX)) for k in state})
    info: dict[str, Any] = {
        "path": os.path.abspath(path),
        "method": config.peft_type,
        "task_type": config.task_type,
        "base_model": config.base_model_name_or_path,
        "adapter_params": sum(t.numel() for t in state.values()),
        "file_bytes": os.path.getsize(os.path.join(path, checkpoint.WEIGHTS_NAME))
        if os.path.exists(os.path.join(path, checkpoint.WEIGHTS_NAME))
        else None,
        "targets": targets,
        "config": {k: v for k, v in config.to_dict().items() if v not in (None, [], {}, "")},
    }
    metrics = os.path.join(path, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as fh:
            info["metrics"] = {k: v for k, v in json.load(fh).items() if not isinstance(v, dict)}
    return info


def inspect_model(name_or_path: str, task: str = "feature-extraction") -> dict[str, Any]:
    from deltatune.inject import candidate_modules, is_linear, output_head_names
    from deltatune.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(name_or_path, task=task)
    heads = output_head_names(model)
    linear = [name for name, m in candidate_modules(model) if is_linear(m) and name not in heads]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear})
    return {
        "model": name_or_path,
        "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "linear_layers": len(linear),
        "target_module_names": suffixes,
        "output_head": sorted(heads),
    }
