"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale activations.

A targeted layer y = W x + b gets one vector l per adapter. On attention keys and values (and other non-feedforward
targets) it rescales the output, y' = l * (W x + b); on feedforward layers it rescales the input, y' = W (l * x) + b.
Vectors start at 1, so training starts from the base model exactly. Both forms fold into the weights: the output
form scales W's rows (and the bias), the input form scales W's columns, so merging is multiplicative.

The vectors are stored as peft does: `<module>.ia3_l` of shape (out, 1) for output scaling and (1, in) for input
scaling, so adapter folders move between deltatune and peft unchanged.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config import PeftConfig, Regex
from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.inject import find_targets, is_linear, replace_module
from deltatune.layer import AdapterLayer, at_least_float32
from deltatune.method import Method, Variant
from deltatune.targets import DEFAULTS


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3 options, named as in the `peft` package (and only those, so peft reads the JSON as its own).

    `feedforward_modules` are the targets whose *input* is rescaled; it must be a subset of `target_modules`.
    Left unset, both come from the per-architecture defaults in deltatune.targets (peft's picks; Llama: k_proj,
    v_proj, down_proj).
    """

    target_modules: list[str | type] | Regex | None = None
    exclude_modules: list[str] | Regex | None = None
    feedforward_modules: list[str] | Regex | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    # find_targets reads these; IA3 has no per-layer selection in peft, so they are fixed and not saved.
    layers_to_transform = None
    layers_pattern = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "IA3"
        targets, feedforward = self.target_modules, self.feedforward_modules
        if (
            isinstance(targets, list)
            and isinstance(feedforward, list)
            and not set(feedforward) <= set(targets)
        ):
            extra = sorted(set(feedforward) - set(targets))
            raise ConfigError(
                f"feedforward_modules must be a subset of target_modules; {extra} are not targeted. "
                "Add them to target_modules or remove them from feedforward_modules."
            )

    def is_feedforward(self, key: str) -> bool:
        """peft's rule, kept exactly for interop: a regex over the full name, or a plain `endswith` (no dot
        boundary, so in BERT "output.dense" also marks `attention.output.dense` as feedforward)."""
        modules = self.feedforward_modules or []
        if isinstance(modules, str):
            return re.fullmatch(modules, key) is not None
        return any(key.endswith(m) for m in modules)


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """Vectors train in float32 on a half-precision or quantized base, else in the base's dtype."""
    weight = getattr(base, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


def _features(base: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear, GPT-2 Conv1D or convolution."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_linear(base):  # GPT-2 Conv1D stores its weight (in, out)
        return tuple(base.weight.shape)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return base.in_channels, base.out_channels
    raise UnsupportedModelError(
        f"IA3 cannot wrap a {type(base).__name__}; it supports Linear, GPT-2 Conv1D and Conv1d/2d/3d layers. "
        "Narrow target_modules (or use exclude_modules) to skip it."
    )


class IA3Layer(AdapterLayer):
    """A layer whose output (or, for feedforward layers, input) is multiplied by each active adapter's vector."""

    adapter_attrs = ("ia3_l",)
    merge_changes = ("weight", "bias")  # output scaling rescales the bias too

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = _features(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add(self, name: str, is_feedforward: bool, init_weights: bool) -> None:
        if name in self.adapter_names:
            raise ConfigError(f"Adapter {name!r} already exists on this layer.")
        groups = getattr(self.base_layer, "groups", 1)
        if is_feedforward and groups != 1:
            raise UnsupportedModelError(
                "IA3 input scaling on a grouped convolution is not supported; exclude this module."
            )
        size = self.in_features if is_feedforward else self.out_features
        shape = (1, size) if is_feedforward else (size, 1)
        kernel_dims = self.base_layer.weight.dim() - 2 if not is_linear(self.base_layer) else 0
        if kernel_dims:  # peft's conv layout: (1, channels, 1, ...) for either form
            shape = (1, size) + (1,) * kernel_dims
        weight = self.base_layer.weight
        vector = torch.ones(shape) if init_weights else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(
            vector.to(device=weight.device, dtype=_adapter_dtype(self.base_layer))
        )
        self.is_feedforward[name] = is_feedforward

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        name = adapter_name
        self.is_feedforward.pop(name, None)

    # --- forward -------------------------------------------------------------------------------
    def _activation_scale(self, name: str) -> torch.Tensor:
        """The vector shaped to broadcast over activations: last dim for linear layers, dim 1 for convs."""
        vector = self.ia3_l[name]
        return vector.flatten() if is_linear(self.base_layer) else vector

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running = self.running_adapters()
        in_scale = out_scale = None
        for name in running:
            scale = self._activation_scale(name)
            if self.is_feedforward[name]:
                in_scale = scale if in_scale is None else in_scale * scale
            else:
                out_scale = scale if out_scale is None else out_scale * scale
        if in_scale is not None:
            x = (x.to(in_scale.dtype) * in_scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = (result * out_scale).to(result.dtype)
        return result

    # --- merging -------------------------------------------------------------------------------
    def _weight_scale(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The vector shaped to broadcast over the (out, in, ...) weight: rows for output scaling, columns for
        input scaling."""
        shape = [1] * weight.dim()
        shape[1 if self.is_feedforward[name] else 0] = -1
        return self.ia3_l[name].reshape(shape)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        scale = self._weight_scale(name, weight)
        return (at_least_float32(weight) * at_least_float32(scale)).to(weight.dtype)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        scale = self._weight_scale(name, weight)
        return (at_least_float32(weight) / at_least_float32(scale)).to(weight.dtype)

    def _scale_bias(self, name: str, inverse: bool) -> None:
        """Output scaling multiplies the bias too (l * (W x + b)); input scaling leaves it alone."""
        bias = getattr(self.base_layer, "bias", None)
        if self.is_feedforward[name] or not isinstance(bias, torch.Tensor):
            return
        scale = at_least_float32(self.ia3_l[name].reshape(bias.shape))
        new = at_least_float32(bias) / scale if inverse else at_least_float32(bias) * scale
        bias.data.copy_(new.to(bias.dtype))

    def _merge_one(self, name: str) -> None:
        if not self.keeps_original and (self.ia3_l[name] == 0).any():
            warnings.warn(
                f"IA3 adapter {name!r} has zero entries and the original weights are not kept "
                "(keep_original=False); unmerging it cannot restore them.",
                stacklevel=4,
            )
        super()._merge_one(name)
        self._scale_bias(name, inverse=False)

    def _unmerge_one(self, name: str) -> None:
        super()._unmerge_one(name)
        self._scale_bias(name, inverse=True)


def _fill_feedforward(model: nn.Module, config: IA3Config) -> None:
    """Unset feedforward_modules: the architecture's defaults (deltatune.targets), none for an unknown one."""
    if config.feedforward_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        picks = DEFAULTS.get(model_type)
        config.feedforward_modules = list(picks.feedforward) if picks else []


def inject_ia3(peft_model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    """Add adapter `adapter_name` to every targeted module, wrapping it on first use (all or nothing)."""
    model = peft_model.get_base_model()
    _fill_feedforward(model, config)
    wrappers = []
    for key in find_targets(model, config):
        module = model.get_submodule(key)
        if not isinstance(module, IA3Layer):
            module = IA3Layer(module)
        module.add(adapter_name, config.is_feedforward(key), config.init_ia3_weights)
        wrappers.append((key, module))
    for key, module in wrappers:
        replace_module(model, key, module)
    # As peft does: the flag records whether the targets store their weight (in, out), like GPT-2's Conv1D.
    config.fan_in_fan_out = any(m.fan_in_fan_out for _, m in wrappers)


class IA3Method(Method):
    """Learned vectors that rescale chosen activations (Liu et al. 2022); merges into the weights."""

    peft_type = "IA3"
    config_class = IA3Config
    title = "IA3"
    variants = {"ia3": Variant()}
    typical_lr = 5e-3
    recipe_defaults = {"target_modules": "all-linear"}
    default_targets = "ia3"

    def inject(self, peft_model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        inject_ia3(peft_model, config, adapter_name)


METHOD = IA3Method()
