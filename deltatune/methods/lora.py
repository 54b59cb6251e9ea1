"""LoRA (Hu et al. 2021) with rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

A frozen weight W gets a low-rank update: y = W x + s * B A x, with A (r x in), B (out x r), s = alpha / r
(rsLoRA: alpha / sqrt(r)). B starts at zero so training starts from the base model exactly. DoRA splits the
merged weight into a learned per-row magnitude m and a direction: W' = m * (W + s B A) / ||W + s B A||_row.

Layers: nn.Linear, transformers' GPT-2 Conv1D (weight stored transposed), nn.Embedding, nn.Conv1d, nn.Conv2d.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import TargetedConfig
from deltatune.inject import find_targets, is_linear, replace_module
from deltatune.layer import AdapterLayer
from deltatune.methods.lora_fused import lora_linear

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA options, named as in the `peft` package."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LORA"
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(
                f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}."
            )

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Per-module rank and alpha from rank_pattern/alpha_pattern (peft's rule: the pattern ends the name)."""
        return _pattern_value(self.rank_pattern, key, self.r), _pattern_value(
            self.alpha_pattern, key, self.lora_alpha
        )


def _pattern_value(patterns: dict, key: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in float32 on a half-precision base (small tensors, stable updates)."""
    weight = getattr(base, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


class LoraLayer(AdapterLayer):
    """Shared by every LoRA layer kind: per-adapter factors, scaling, dropout and the DoRA magnitude."""

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._merge_norms: dict[str, torch.Tensor] = {}

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        if name in self.adapter_names:
            raise ValueError(f"Adapter {name!r} already exists on this layer.")
        if config.use_dora and not self.supports_dora:
            raise TypeError(
                f"DoRA is supported on Linear and GPT-2 Conv1D layers, not {type(self.base_layer).__name__}."
            )
        self.r[name] = r
        self.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)
        self.dropout[name] = config.lora_dropout
        self.create_factors(name, r)
        self.initialize(name, config.init_lora_weights)
        if config.use_dora:
            with torch.no_grad():
                weight = self.base_weight().float() + self.delta_weight(name).float()
                self.lora_magnitude_vector[name] = nn.Parameter(weight.norm(p=2, dim=1).to(self._dtype))

    supports_dora = False

    @property
    def _dtype(self) -> torch.dtype:
        return _adapter_dtype(self.base_layer)

    def _factor_kwargs(self) -> dict:
        return {"device": self.base_layer.weight.device, "dtype": self._dtype}

    def initialize(self, name: str, init) -> None:
        """Standard init makes B A = 0, so the wrapped model starts equal to the base."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[name])
        elif init in ("pissa", "olora"):
            raise TypeError(f"init_lora_weights={init!r} is supported on Linear layers only.")
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A[name].weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        p = self.dropout[name]
        return F.dropout(x, p, training=True) if (p > 0 and self.training) else x

    # Mixed-adapter batches (serving): when set, row i of the batch runs adapter row_adapters[i] (None: the base
    # alone), so requests for different adapters share one forward pass of the base. Active adapters are ignored.
    row_adapters: list[str | None] | None = None

    def row_groups(self, batch: int) -> list[tuple[str, torch.Tensor]]:
        """(adapter, row indices) for each adapter named in `row_adapters` that this layer holds."""
        if len(self.row_adapters) != batch:
            raise ValueError(f"row_adapters names {len(self.row_adapters)} rows but the batch has {batch}.")
        if self.disabled or self.merged:
            return []
        held = self.adapter_names
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.row_adapters):
            if name is not None and name in held:
                groups.setdefault(name, []).append(i)
        return [(n, torch.tensor(rows, dtype=torch.long)) for n, rows in groups.items()]

    def _lora_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](self._input(name, x))) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            for name, rows in self.row_groups(x.shape[0]):
                rows = rows.to(x.device)
                result = result.index_add(0, rows, self._lora_update(name, x[rows]).to(result.dtype))
            return result
        for name in self.running_adapters():
            result = result + self._lora_update(name, x).to(result.dtype)
        return result


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (and on GPT-2's Conv1D, whose weight is stored (in, out))."""

    supports_dora = True

    def create_factors(self, name: str, r: int) -> None:
        out_features, in_features = self.base_weight().shape
        self.lora_A[name] = nn.Linear(in_features, r, bias=False, **self._factor_kwargs())
        self.lora_B[name] = nn.Linear(r, out_features, bias=False, **self._factor_kwargs())

    def initialize(self, name: str, init) -> None:
        if init in ("pissa", "olora"):
            self._init_from_weight(name, init)
        else:
            super().initialize(name, init)

    @torch.no_grad()
    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA (principal singular vectors) and OLoRA (QR) move the top of W into A, B and keep the residual in W,
        so the model's output is unchanged at step 0."""
        weight = self.base_weight()
        if not weight.is_floating_point():
            raise TypeError(
                f"init_lora_weights={init!r} needs a float base weight; quantize after initializing."
            )
        w = weight.float()
        r, s = self.r[name], self.scaling[name]
        if init == "pissa":
            u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
            root = torch.sqrt(sigma[:r] / s)
            a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r], q[:, :r]
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        self._write_weight((w - s * b @ a).to(weight.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def merges_additively(self, name: str) -> bool:
        return name not in self.lora_magnitude_vector

    # DoRA: W' = m / ||W + dW||_row * (W + dW); the norm is treated as a constant in backward (paper, sec. 4.3).
    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().merged_weight(name, weight)
        combined = weight.float() + self.delta_weight(name).float()
        norm = combined.norm(p=2, dim=1)
        self._merge_norms[name] = norm
        return (combined * (self.lora_magnitude_vector[name].float() / norm)[:, None]).to(weight.dtype)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().unmerged_weight(name, weight)
        ratio = self.lora_magnitude_vector[name].float() / self._merge_norms.pop(name)
        return (weight.float() / ratio[:, None] - self.delta_weight(name).float()).to(weight.dtype)

    def _can_fuse(self, x: torch.Tensor, running: list[str]) -> bool:
        """The fused op (lora_fused.py) covers the common case: one plain LoRA adapter on a float nn.Linear, no
        dropout at work, no autocast, one dtype throughout. Everything else takes the general path."""
        if len(running) != 1 or self.row_adapters is not None or type(self.base_layer) is not nn.Linear:
            return False
        # a subclass that changes the update (UniPELT's gates) needs the general path
        if type(self)._lora_update is not LoraLayer._lora_update:
            return False
        name = running[0]
        if name in self.lora_magnitude_vector or (self.dropout[name] > 0 and self.training):
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        dtype = self.base_layer.weight.dtype
        return dtype.is_floating_point and x.dtype == dtype and self.lora_A[name].weight.dtype == dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None and any(n in self.lora_magnitude_vector for n in self.row_adapters):
            raise TypeError(
                "Mixed-adapter batches (row_adapters) do not support DoRA adapters; serve them alone."
            )
        running = self.running_adapters()
        if self._can_fuse(x, running):
            name = running[0]
            base = self.base_layer
            return lora_linear(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
            )
        if self.row_adapters is not None or not any(n in self.lora_magnitude_vector for n in running):
            return super().forward(x, *args, **kwargs)
        base_out = self.base_layer(x, *args, **kwargs)
        result = base_out
        for name in running:
            h = self._input(name, x)
            update = self.lora_B[name](self.lora_A[name](h)) * self.scaling[name]
            if name not in self.lora_magnitude_vector:
                result = result + update.to(result.dtype)
                continue
            weight = self.base_weight()
            norm = (weight + self.delta_weight(name).to(weight.dtype)).norm(p=2, dim=1).detach()
            scale = self.lora_magnitude_vector[name] / norm
            bias = getattr(self.base_layer, "bias", None)
            plain = base_out - bias if bias is not None else base_out
            if h is not x and self.dropout[name] > 0 and self.training:
                plain = F.linear(h.to(weight.dtype), weight)
            result = result + ((scale - 1) * plain + scale * update).to(result.dtype)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A (r x vocab) is looked up like an embedding table, then B (dim x r) maps it."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create_factors(self, name: str, r: int) -> None:
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, vocab, **self._factor_kwargs()))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **self._factor_kwargs()))

    def initialize(self, name: str, init) -> None:
        if init in ("pissa", "olora"):
            raise TypeError(f"init_lora_weights={init!r} is supported on Linear layers only.")
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def _lora_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        looked_up = F.embedding(
            x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return looked_up @ b.T * self.scaling[name]


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d/nn.Conv2d: A is a conv with the base's kernel and stride into r channels, B a 1x1 conv."""

    def create_factors(self, name: str, r: int) -> None:
        base = self.base_layer
        if base.groups != 1 or any(d != 1 for d in base.dilation):
            raise TypeError("LoRA on grouped or dilated convolutions is not supported; exclude this module.")
        conv = type(base)
        kwargs = self._factor_kwargs()
        self.lora_A[name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False, **kwargs
        )
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, bias=False, **kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        conv = F.conv1d if a.dim() == 3 else F.conv2d
        # Composing the two convs: treat A's input channels as a batch and apply B as a 1x1 conv.
        return conv(a.transpose(0, 1), b).transpose(0, 1) * self.scaling[name]


def layer_class_for(module: nn.Module) -> type[LoraLayer]:
    if is_linear(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoraConv
    raise TypeError(
        f"LoRA cannot wrap a {type(module).__name__}; it supports Linear, Embedding, Conv1d, Conv2d and GPT-2 "
        "Conv1D. Narrow target_modules (or use exclude_modules) to skip it."
    )


def inject(
    peft_model: nn.Module, config: LoraConfig, adapter_name: str, layer_cls: type[LoraLayer] | None = None
) -> None:
    """Add adapter `adapter_name` to every targeted module, wrapping it on first use. `layer_cls` lets a composed
    method (UniPELT's gated LoRA) use a LoraLayer subclass."""
    model = peft_model.base_model
    keys = find_targets(model, config)
    wrappers = []
    for key in keys:
        module = model.get_submodule(key)
        if not isinstance(module, LoraLayer):
            module = (layer_cls or layer_class_for(module))(module)
        r, alpha = config.rank_and_alpha(key)
        module.add(adapter_name, r, alpha, config)
        wrappers.append((key, module))
    for key, module in wrappers:  # swap only once every layer accepted the adapter: nothing half-applied
        replace_module(model, key, module)
    if any(m.fan_in_fan_out for _, m in wrappers):
        config.fan_in_fan_out = True


CONFIG = LoraConfig
