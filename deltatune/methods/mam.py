"""MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"): prefix tuning on
the attention plus a scaled parallel adapter beside the FFN ("Mix-And-Match"; the paper's best setting is 30 prefix
tokens and a parallel adapter with scaling 4).

Nothing is reimplemented here: the prefixes are `deltatune.methods.prefix` (keys and values pre-filled in the KV
cache, the reparameterisation MLP while training), the adapter is `deltatune.methods.adapters`' parallel
`BottleneckLayer`. This module only composes them; `deltatune.methods.unipelt` composes the same way.

peft has no MAM adapter, so the on-disk format is deltatune's own: `adapter_config.json` with `peft_type` "MAM",
and in `adapter_model.safetensors` the prefixes under `prompt_embeddings` (as prefix tuning stores them) beside the
adapter tensors under `base_model.model.<module>.adapter_{down,up}.{weight,bias}`. Prefixes change the attention
inputs and adapters change activations, so a MAM adapter cannot be merged into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.checkpoint import layer_entries
from deltatune.config import Regex
from deltatune.method import Variant
from deltatune.methods import prompt_learning as pl
from deltatune.methods.adapters import BottleneckConfig, BottleneckLayer, inject_adapters
from deltatune.methods.prefix import PrefixTuningConfig, PrefixTuningMethod, inject_prefix


@dataclass
class MAMConfig(PrefixTuningConfig):
    """MAM adapter options (`peft_type` "MAM", deltatune's own format).

    The prefix-tuning fields are `PrefixTuningConfig`'s (`num_virtual_tokens`, `prefix_projection`, ...). The
    parallel adapter reads the FFN's input and adds `scaling * up(act(down(x)))` to its output, with
    `features // reduction_factor` hidden units. `target_modules` names the FFN blocks; None finds them by module
    name (BERT, DistilBERT, Llama-style, GPT-2).

    The prefixes start at zero (`init_weights="zero"`), unlike plain prefix tuning's N(0, 1) (peft's): random
    prefixes move a classifier's `[CLS]` by about its own norm at init, and with the adapter's scaling some seeds then
    never leave the majority class (bench/results/scale/prefix_init.md: 0.611 +- 0.093 random, 0.722 +- 0.019 zero).
    """

    num_virtual_tokens: int | None = 30
    init_weights: str | None = "zero"
    target_modules: list[str | type] | Regex | None = None
    reduction_factor: float = 2
    scaling: float = 4.0
    non_linearity: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "MAM"
        self.adapter_config()  # validate the adapter options now, not when the model is wrapped

    def adapter_config(self) -> BottleneckConfig:
        """The adapter half of this config, as the bottleneck method takes it."""
        return BottleneckConfig(
            task_type=self.task_type,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            variant="parallel",
            reduction_factor=self.reduction_factor,
            non_linearity=self.non_linearity,
            scaling=self.scaling,
        )


def inject_prefix_and_adapter(
    peft_model: nn.Module,
    config: PrefixTuningConfig,
    adapter_name: str,
    adapter_config: BottleneckConfig,
    layer_cls: type[BottleneckLayer] = BottleneckLayer,
) -> None:
    """Add the prefixes, then the adapters (as `layer_cls` layers). Used by MAM and UniPELT."""
    inject_prefix(peft_model, config, adapter_name)
    inject_adapters(peft_model, adapter_config, adapter_name, layer_cls=layer_cls)


class MAMMethod(PrefixTuningMethod):
    """Prefixes on the attention (the KV cache) plus parallel adapters inside the FFN modules: the forward and
    generate hooks are prefix tuning's, and the adapters run inside the wrapped modules."""

    peft_type = "MAM"
    config_class = MAMConfig
    title = "MAM adapter"
    variants = {"mam": Variant()}
    wraps_base = True
    peft_format = False
    typical_lr = 3e-4

    def inject(self, peft_model: nn.Module, config: MAMConfig, adapter_name: str) -> None:
        """Prefixes on every attention layer and a parallel adapter beside every FFN. The resolved placement is
        written back into the config, so the saved file says exactly where the adapters went."""
        adapter_config = config.adapter_config()
        inject_prefix_and_adapter(peft_model, config, adapter_name, adapter_config)
        config.target_modules = adapter_config.target_modules

    def state_dict(
        self, peft_model: nn.Module, adapter_name: str, config: PrefixTuningConfig
    ) -> dict[str, torch.Tensor]:
        """The prefix entries (`prompt_embeddings`, or the reparameterisation MLP while training) plus every
        module-wrapper tensor of the adapter (adapters, gates, LoRA factors, trained heads)."""
        prompt = {
            k: v
            for k, v in super().state_dict(peft_model, adapter_name, config).items()
            if not k.startswith(pl.HEAD_PREFIX)
        }
        return {**prompt, **layer_entries(peft_model.get_base_model(), adapter_name)}


METHOD = MAMMethod()
