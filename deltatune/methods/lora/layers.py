"""LoRA layers (Hu et al. 2021), with rsLoRA's scaling (Kalajdzievski 2023): a frozen weight W gets a low-rank
update, y = W x + s * B A x, with A (r x in), B (out x r), s = alpha / r (rsLoRA: alpha / sqrt(r)). B starts at zero,
so training starts from the base model exactly. `delta_weight` (the merge rule) sits next to each forward.

Layers: nn.Linear, transformers' GPT-2 Conv1D (weight stored transposed), nn.Embedding, nn.Conv1d, nn.Conv2d.
DoRA lives in dora.py, the fused training product in fused.py, mixed-adapter batches in serving.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.inject import is_linear
from deltatune.layer import AdapterLayer, at_least_float32
from deltatune.methods.lora import dora, serving
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.fused import can_fuse, lora_linear


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
            raise ConfigError(f"Adapter {name!r} already exists on this layer.")
        if config.use_dora and not self.supports_dora:
            raise UnsupportedModelError(f"DoRA is not supported on {type(self).__name__} layers.")
        self.r[name] = r
        self.scaling[name] = alpha / (math.sqrt(r) if config.use_rslora else r)
        self.dropout[name] = config.lora_dropout
        self.create_factors(name, r)
        self.initialize(name, config.init_lora_weights)
        if config.use_dora:
            dora.init_magnitude(self, name)

    supports_dora = True
    # Where the output features lie (DoRA's per-output magnitude runs along them): in `base_weight()`, and in the
    # layer's output.
    out_axis = 0
    feature_axis = -1

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
            raise UnsupportedModelError(f"init_lora_weights={init!r} is supported on Linear layers only.")
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    # --- the factors as matrices (adapter arithmetic, arithmetic.py) ------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name`'s (A, B) tensors as stored."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    def flat_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as matrices, (r x in·kernel) and (out x r), whose product times the scaling is the update."""
        a, b = self.factors(name)
        return a.flatten(1), b.flatten(1)

    @torch.no_grad()
    def set_flat_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write matrices of rank k <= r into adapter `name`'s factors; rows/columns k..r stay zero."""
        stored_a, stored_b = self.factors(name)
        stored_a.zero_()
        stored_b.zero_()
        stored_a.flatten(1)[: a.shape[0]].copy_(a)
        stored_b.flatten(1)[:, : b.shape[1]].copy_(b)

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A[name].weight.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        p = self.dropout[name]
        return F.dropout(x, p, training=True) if (p > 0 and self.training) else x

    # Mixed-adapter batches (serving.py): when set, row i of the batch runs adapter row_adapters[i] (None: the base
    # alone). Active adapters are ignored meanwhile.
    row_adapters: list[str | None] | None = None
    plain_update = (
        True  # the update is s * B A x (fused.py relies on it); a subclass that changes it says False
    )

    def _lora_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._update(name, self._input(name, x))

    def _update(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """s * B A h for the (dropped-out, cast) input h."""
        return self.lora_B[name](self.lora_A[name](h)) * self.scaling[name]

    def _plain(self, h: torch.Tensor) -> torch.Tensor:
        """W h without the bias (DoRA's rescaled base term, on a dropped-out input)."""
        return F.linear(h, self.base_weight())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:  # a mixed-adapter batch (serving.py): active adapters play no part
            if self.lora_magnitude_vector and any(
                n in self.lora_magnitude_vector for n in set(self.row_adapters)
            ):
                raise UnsupportedModelError(
                    "Mixed-adapter batches (row_adapters) do not support DoRA adapters; serve them alone."
                )
            return serving.mixed_forward(self, x, self.base_layer(x, *args, **kwargs))
        running = self.running_adapters()
        if any(n in self.lora_magnitude_vector for n in running):
            return dora.forward(self, x, running, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in running:
            result = result + self._lora_update(name, x).to(result.dtype)
        return result

    # DoRA (dora.py) changes the merge rule as well as the forward.
    def merges_additively(self, name: str) -> bool:
        return name not in self.lora_magnitude_vector

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.merged_weight(self, name, weight)
        return super().merged_weight(name, weight)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return dora.unmerged_weight(self, name, weight)
        return super().unmerged_weight(name, weight)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (and on GPT-2's Conv1D, whose weight is stored (in, out))."""

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
            raise UnsupportedModelError(
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
        b, a = at_least_float32(self.lora_B[name].weight), at_least_float32(self.lora_A[name].weight)
        return (b @ a) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:  # never fused; and no need to know the active adapters
            return super().forward(x, *args, **kwargs)
        running = self.running_adapters()
        if can_fuse(self, x, running):
            name, base = running[0], self.base_layer
            return lora_linear(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
            )
        return super().forward(x, *args, **kwargs)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A (r x vocab) is looked up like an embedding table, then B (dim x r) maps it."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    out_axis = 1  # the table is (vocab x dim): its outputs are the dim columns

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
            raise UnsupportedModelError(f"init_lora_weights={init!r} is supported on Linear layers only.")
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        b, a = at_least_float32(self.lora_embedding_B[name]), at_least_float32(self.lora_embedding_A[name])
        return (b @ a).T * self.scaling[name]

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x  # token ids: no cast, no dropout (as in peft)

    def _update(self, name: str, h: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        looked_up = F.embedding(
            h, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return looked_up @ b.T * self.scaling[name]


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d/nn.Conv2d: A is a conv with the base's kernel and stride into r channels, B a 1x1 conv."""

    feature_axis = 1  # outputs are (batch, channels, ...)

    def _plain(self, h: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(h, self.base_layer.weight, None)

    def create_factors(self, name: str, r: int) -> None:
        base = self.base_layer
        if base.groups != 1 or any(d != 1 for d in base.dilation):
            raise UnsupportedModelError(
                "LoRA on grouped or dilated convolutions is not supported; exclude this module."
            )
        conv = type(base)
        kwargs = self._factor_kwargs()
        self.lora_A[name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False, **kwargs
        )
        self.lora_B[name] = conv(r, base.out_channels, 1, 1, bias=False, **kwargs)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = at_least_float32(self.lora_A[name].weight), at_least_float32(self.lora_B[name].weight)
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
    raise UnsupportedModelError(
        f"LoRA cannot wrap a {type(module).__name__}; it supports Linear, Embedding, Conv1d, Conv2d and GPT-2 "
        "Conv1D. Narrow target_modules (or use exclude_modules) to skip it."
    )
