"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning"): LoRA on
the query and value projections, prefix tuning on the attention, and a bottleneck adapter after the FFN, each
switched on or off per token by a learned gate, so training picks the mix that suits the task.

- LoRA: W x + G_L(x) * s * B A x, with G_L(x) = sigmoid(W_GL x) read from the projection's input.
- Adapter: h + G_A(h) * up(act(down(h))), with G_A(h) = sigmoid(W_GA h) read from the adapter's input (the FFN
  output for the default serial "pfeiffer" placement).
- Prefix: the prefixes of `deltatune.methods.prefix`, NOT gated. The paper scales the prefix keys/values by a
  gate read from each query token, which needs a per-query factor inside the attention kernel; the prefixes here
  reach the model through the KV cache, which all query tokens share. An input-independent gate would be absorbed
  by the prefix itself, so none is added.

The pieces are the existing methods, composed: `lora.LoraLinear` and `adapters.BottleneckLayer` gain a gate through
small subclasses, the prefixes and all hooks come from `deltatune.methods.mam`.

peft has no UniPELT, so the on-disk format is deltatune's own: `peft_type` "UNIPELT"; in the safetensors file
`prompt_embeddings` (the prefixes), `base_model.model.<module>.lora_{A,B}.weight` and `.lora_gate.{weight,bias}`
for LoRA, `.adapter_{down,up,gate}.{weight,bias}` for the adapters. Gated updates depend on the input, so a
UniPELT adapter cannot be merged into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.config import Regex
from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.inject import is_linear
from deltatune.method import Variant
from deltatune.methods.adapters import VARIANTS, BottleneckConfig, BottleneckLayer
from deltatune.methods.lora import LoraConfig, LoraLinear, inject_lora
from deltatune.methods.mam import MAMMethod, inject_prefix_and_adapter
from deltatune.methods.prefix import PrefixTuningConfig

# The attention query and value projections, by family: Llama-style, BERT, DistilBERT, GPT-2 (fused qkv).
DEFAULT_LORA_TARGETS = ["q_proj", "v_proj", "query", "value", "q_lin", "v_lin", "c_attn"]


@dataclass
class UniPELTConfig(PrefixTuningConfig):
    """UniPELT options (`peft_type` "UNIPELT", deltatune's own format).

    Prefix fields are `PrefixTuningConfig`'s. LoRA: `r`, `lora_alpha`, `lora_dropout` on `target_modules` (None: the
    query and value projections, found by name). Adapter: `adapter_variant` ("pfeiffer": after the FFN, as in the
    paper; "houlsby"; "parallel"), `reduction_factor`, `non_linearity`, `adapter_scaling`, placed on
    `adapter_target_modules` (None: found by module name). The prefixes start at zero, as MAM's do (see there:
    bench/results/scale/prefix_init.md measured 0.561 +- 0.018 random, 0.635 +- 0.037 zero).
    """

    num_virtual_tokens: int | None = 10
    init_weights: str | None = "zero"
    target_modules: list[str | type] | Regex | None = None
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    adapter_target_modules: list[str | type] | Regex | None = None
    adapter_variant: str = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    adapter_scaling: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "UNIPELT"
        if self.adapter_variant not in VARIANTS:
            raise ConfigError(f"adapter_variant must be one of {VARIANTS}, got {self.adapter_variant!r}.")
        self.lora_config()  # validate both halves now, not when the model is wrapped
        self.adapter_config()

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            task_type=self.task_type,
            target_modules=self.target_modules or DEFAULT_LORA_TARGETS,
            modules_to_save=self.modules_to_save,
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
        )

    def adapter_config(self) -> BottleneckConfig:
        return BottleneckConfig(
            task_type=self.task_type,
            target_modules=self.adapter_target_modules,
            modules_to_save=self.modules_to_save,
            variant=self.adapter_variant,
            reduction_factor=self.reduction_factor,
            non_linearity=self.non_linearity,
            scaling=self.adapter_scaling,
        )


def _gate(in_features: int, like: torch.Tensor) -> nn.Linear:
    """A (features -> 1) gate in the adapter's dtype; sigmoid(0) = 0.5 at the start is harmless because the gated
    updates themselves start at zero."""
    return nn.Linear(in_features, 1, device=like.device, dtype=like.dtype)


class GatedLoraLinear(LoraLinear):
    """LoRA whose update is scaled per token by sigmoid(W_GL x)."""

    adapter_attrs = (*LoraLinear.adapter_attrs, "lora_gate")
    mergeable = False
    supports_dora = False
    plain_update = False  # the gate scales the update, so the fused op does not apply

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear(base_layer):
            raise UnsupportedModelError(
                f"UniPELT's gated LoRA wraps linear layers, not {type(base_layer).__name__}."
            )
        super().__init__(base_layer)
        self.lora_gate = nn.ModuleDict()

    def add(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        super().add(name, r, alpha, config)
        self.lora_gate[name] = _gate(self.lora_A[name].in_features, self.lora_A[name].weight)

    def _lora_update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        gate = self.lora_gate[name]
        return super()._lora_update(name, x) * torch.sigmoid(gate(x.to(gate.weight.dtype)))


class GatedBottleneckLayer(BottleneckLayer):
    """A bottleneck adapter whose output is scaled per token by sigmoid(W_GA h), h being the adapter's input."""

    adapter_attrs = (*BottleneckLayer.adapter_attrs, "adapter_gate")

    def __init__(self, base_layer: nn.Module, parallel: bool) -> None:
        super().__init__(base_layer, parallel)
        self.adapter_gate = nn.ModuleDict()

    def add(self, name: str, config: BottleneckConfig) -> None:
        super().add(name, config)
        down = self.adapter_down[name]
        self.adapter_gate[name] = _gate(down.in_features, down.weight)

    def adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        gate = self.adapter_gate[name]
        return super().adapt(name, h) * torch.sigmoid(gate(h.to(gate.weight.dtype))).to(h.dtype)


class UniPELTMethod(MAMMethod):
    """Gated prefixes, gated bottleneck adapters and gated LoRA together; runs and saves like MAM."""

    peft_type = "UNIPELT"
    config_class = UniPELTConfig
    title = "UniPELT"
    variants = {"unipelt": Variant()}
    typical_lr = 1e-3

    def inject(self, peft_model: nn.Module, config: UniPELTConfig, adapter_name: str) -> None:
        """Prefixes, gated adapters, then gated LoRA; the resolved placements go back into the config so the saved
        file says exactly where each piece went."""
        adapter_config = config.adapter_config()
        inject_prefix_and_adapter(peft_model, config, adapter_name, adapter_config, GatedBottleneckLayer)
        config.adapter_target_modules = adapter_config.target_modules
        inject_lora(peft_model, config.lora_config(), adapter_name, layer_cls=GatedLoraLinear)
        if config.target_modules is None:
            model = peft_model.get_base_model()
            config.target_modules = [n for n, m in model.named_modules() if isinstance(m, GatedLoraLinear)]


METHOD = UniPELTMethod()
