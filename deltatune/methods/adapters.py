"""Bottleneck adapters: small two-layer networks inserted into a frozen transformer.

An adapter is f(h) = s * up(act(down(h))), with down: d -> d / reduction_factor and up back to d. Three placements:
- "houlsby" (Houlsby et al. 2019): serial, after the attention output projection and after the FFN output
  projection: h <- h + f(h).
- "pfeiffer" (Pfeiffer et al. 2021, AdapterFusion): serial, after the FFN output projection only.
- "parallel" (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"): beside the FFN,
  reading its input x: FFN(x) + f(x).
`up` starts at zero, so training starts from the base model exactly. Adapters change activations, not weights, so
they cannot be merged.

With `target_modules=None` the placement is found from module names (BERT/RoBERTa, DistilBERT, Llama-style decoders,
GPT-2); for another model name the modules yourself: a serial adapter follows each named module's output, a parallel
one reads the named module's input and adds to its output. peft has no bottleneck adapters, so the format is
deltatune's own: `<module>.adapter_down.{weight,bias}` and `<module>.adapter_up.{weight,bias}`.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import TargetedConfig
from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.inject import candidate_modules, find_targets, is_linear, replace_module
from deltatune.layer import AdapterLayer
from deltatune.method import Method, Variant

VARIANTS = ("houlsby", "pfeiffer", "parallel")

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
    "identity": lambda x: x,
}

# Full-name regexes of where each variant goes, one alternative per architecture family; the first family that
# matches any module of the model is used.
DEFAULT_PLACEMENT = {
    "houlsby": [
        r".*\.attention\.output\.dense|.*\.layer\.\d+\.output\.dense",  # BERT, RoBERTa
        r".*\.attention\.out_lin|.*\.ffn\.lin2",  # DistilBERT
        r".*\.self_attn\.o_proj|.*\.mlp\.down_proj",  # Llama, Mistral, Qwen2, Gemma
        r".*\.attn\.c_proj|.*\.mlp\.c_proj",  # GPT-2
    ],
    "pfeiffer": [
        r".*\.layer\.\d+\.output\.dense",
        r".*\.ffn\.lin2",
        r".*\.mlp\.down_proj",
        r".*\.mlp\.c_proj",
    ],
    "parallel": [
        r".*\.layer\.\d+\.output",  # BertOutput(hidden, input_tensor): see BottleneckLayer
        r".*\.layer\.\d+\.ffn",  # DistilBERT
        r".*\.layers\.\d+\.mlp",
        r".*\.h\.\d+\.mlp",
    ],
}


@dataclass
class BottleneckConfig(TargetedConfig):
    """Bottleneck adapter options (`peft_type` "BOTTLENECK", deltatune's own).

    `reduction_factor` sets the bottleneck size (features // reduction_factor, at least 1); `scaling` multiplies
    the adapter's output. `residual=False` drops the adapter's skip connection (a serial adapter's output then
    replaces the module's output, so the model no longer starts as the base).
    """

    variant: str = "houlsby"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    residual: bool = True
    scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "BOTTLENECK"
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {self.variant!r}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(
                f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}."
            )
        if not isinstance(self.reduction_factor, (int, float)) or self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be a positive number, got {self.reduction_factor!r}.")
        if self.variant == "parallel" and not self.residual:
            raise ConfigError(
                "A parallel adapter always adds to the FFN's output; residual=False applies to serial ones."
            )
        if not self.residual:
            warnings.warn(
                "residual=False: the adapter's output replaces the module's output, so the model does not start "
                "as the base model.",
                stacklevel=3,
            )


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a module: its own for a linear layer, else the first linear layer's input and the
    last linear layer's output (a Llama or GPT-2 MLP block, BERT's output block)."""
    linears = [m for m in module.modules() if is_linear(m)]
    if not linears:
        raise UnsupportedModelError(
            f"A bottleneck adapter needs to know the width of {type(module).__name__}, which holds no linear layer. "
            "Target a linear layer or a block that contains one."
        )

    def io(layer: nn.Module) -> tuple[int, int]:
        if isinstance(layer, nn.Linear):
            return layer.in_features, layer.out_features
        return tuple(layer.weight.shape)  # GPT-2 Conv1D stores (in, out)

    return io(linears[0])[0], io(linears[-1])[1]


def _takes_residual(module: nn.Module) -> bool:
    """BERT's FFN output block is called as `output(hidden_states, input_tensor)` and applies
    LayerNorm(dense(hidden_states) + input_tensor) itself; `input_tensor` is the FFN's input."""
    try:
        return "input_tensor" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class BottleneckLayer(AdapterLayer):
    """A module with bottleneck adapters on its output (serial) or beside it (parallel).

    Several active adapters add up: serial h + sum_i f_i(h), parallel M(x) + sum_i f_i(x). For BERT's output block
    the parallel adapter reads `input_tensor` and adds f(input_tensor) to it, which puts f(x) beside the FFN inside
    the block's residual LayerNorm: LayerNorm(FFN(x) + f(x) + x).
    """

    adapter_attrs = ("adapter_down", "adapter_up")
    mergeable = False

    def __init__(self, base_layer: nn.Module, parallel: bool) -> None:
        super().__init__(base_layer)
        self.parallel = parallel
        self.reads_residual = parallel and _takes_residual(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.residual: dict[str, bool] = {}

    def add(self, name: str, config: BottleneckConfig) -> None:
        if name in self.adapter_names:
            raise ConfigError(f"Adapter {name!r} already exists on this layer.")
        in_features, out_features = _features(self.base_layer)
        if not self.parallel or self.reads_residual:
            in_features = out_features
        size = max(1, int(in_features // config.reduction_factor))
        param = next(self.base_layer.parameters())
        # Small adapters train in float32 on a half-precision or quantized base.
        half = param.dtype in (torch.float16, torch.bfloat16) or not param.is_floating_point()
        dtype = torch.float32 if half else param.dtype
        self.adapter_down[name] = nn.Linear(in_features, size, device=param.device, dtype=dtype)
        self.adapter_up[name] = nn.Linear(size, out_features, device=param.device, dtype=dtype)
        if config.residual:  # zero up-projection: f(h) = 0 at the start, the model is the base model
            nn.init.zeros_(self.adapter_up[name].weight)
            nn.init.zeros_(self.adapter_up[name].bias)
        self.scaling[name] = config.scaling
        self.non_linearity[name] = config.non_linearity
        self.residual[name] = config.residual

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        name = adapter_name
        for table in (self.scaling, self.non_linearity, self.residual):
            table.pop(name, None)

    def adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """f(h) = s * up(act(down(h))), computed in the adapter's dtype and returned in h's."""
        down = self.adapter_down[name]
        hidden = ACTIVATIONS[self.non_linearity[name]](down(h.to(down.weight.dtype)))
        return (self.adapter_up[name](hidden) * self.scaling[name]).to(h.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        running = self.running_adapters()
        if not running:
            return self.base_layer(x, *args, **kwargs)
        if self.reads_residual:
            return self._forward_residual_input(running, x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        h, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        source = x if self.parallel else h
        result = h if all(self.residual[n] for n in running) else torch.zeros_like(h)
        for name in running:
            result = result + self.adapt(name, source)
        return (result, *rest) if rest is not None else result

    def _forward_residual_input(self, running: list[str], hidden_states, *args, **kwargs):
        args = list(args)
        residual = kwargs["input_tensor"] if "input_tensor" in kwargs else args[0]
        added = residual + sum(self.adapt(name, residual) for name in running)
        if "input_tensor" in kwargs:
            kwargs["input_tensor"] = added
        else:
            args[0] = added
        return self.base_layer(hidden_states, *args, **kwargs)


def default_targets(model: nn.Module, variant: str) -> list[str]:
    """Full names of the modules a variant goes on, found from module names; a clear error when none match."""
    names = [name for name, _ in candidate_modules(model)]
    for pattern in DEFAULT_PLACEMENT[variant]:
        found = [n for n in names if re.fullmatch(pattern, n)]
        if found:
            return found
    raise ConfigError(
        f"Could not find where {variant} adapters go in {type(model).__name__} (known: BERT, RoBERTa, DistilBERT, "
        "Llama-style decoders, GPT-2). Set target_modules: the attention-output and FFN-output modules for "
        "'houlsby', the FFN-output module for 'pfeiffer', the FFN block for 'parallel'."
    )


def _check_same_kind(model: nn.Module, parallel: bool) -> None:
    """Serial and parallel adapters wrap nested modules (a Llama block's mlp vs its down_proj); mixing them would
    rename one adapter's tensors, so a model holds one kind."""
    for module in model.modules():
        if isinstance(module, BottleneckLayer) and module.parallel != parallel:
            have, want = ("parallel", "serial") if module.parallel else ("serial", "parallel")
            raise ConfigError(
                f"This model holds {have} bottleneck adapters; a {want} one cannot join them. Use one kind per model."
            )


def inject_adapters(
    peft_model: nn.Module,
    config: BottleneckConfig,
    adapter_name: str,
    layer_cls: type[BottleneckLayer] | None = None,
) -> None:
    """Add adapter `adapter_name` at every placement, wrapping each module on first use (all or nothing).
    `layer_cls` lets a composed method (UniPELT's gated adapter) use a BottleneckLayer subclass."""
    layer_cls = layer_cls or BottleneckLayer
    model = peft_model.get_base_model()
    parallel = config.variant == "parallel"
    _check_same_kind(model, parallel)
    found_by_name = config.target_modules is None
    if found_by_name:
        config.target_modules = default_targets(model, config.variant)
    keys = find_targets(model, config)
    if found_by_name:  # the saved config then says exactly where the adapter went
        config.target_modules = keys
    wrappers = []
    for key in keys:
        module = model.get_submodule(key)
        if not isinstance(module, BottleneckLayer):
            module = layer_cls(module, parallel)
        module.add(adapter_name, config)
        wrappers.append((key, module))
    for key, module in wrappers:
        replace_module(model, key, module)


class BottleneckMethod(Method):
    """Small bottleneck MLPs inserted into the network (serial after a sub-layer, or parallel beside it)."""

    peft_type = "BOTTLENECK"
    config_class = BottleneckConfig
    title = "bottleneck adapters: Houlsby, Pfeiffer, parallel"
    variants = {
        "bottleneck": Variant(),
        "adapter": Variant(),
        "houlsby": Variant({"variant": "houlsby"}),
        "pfeiffer": Variant({"variant": "pfeiffer"}),
        "parallel": Variant({"variant": "parallel"}),
    }
    mergeable = False
    peft_format = False
    typical_lr = 1e-3

    def inject(self, peft_model: nn.Module, config: BottleneckConfig, adapter_name: str) -> None:
        inject_adapters(peft_model, config, adapter_name)


METHOD = BottleneckMethod()
