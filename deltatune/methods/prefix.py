"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trainable keys and values in every attention
layer, as if `num_virtual_tokens` tokens had been seen before the input.

The prefixes reach the model as a pre-filled transformers `DynamicCache` (`past_key_values`). With
`prefix_projection=True` they are produced during training by an MLP (embedding -> tanh -> keys and values of all
layers), the reparameterisation of the paper; the checkpoint stores only the resulting prefixes (key
`prompt_embeddings`, shape [num_virtual_tokens, num_layers * 2 * token_dim]), exactly like peft.

P-tuning v2 is the same mechanism used for NLU: deep prompts without projection plus a trained classification
head. `PTuningV2Config` sets those defaults and saves as PREFIX_TUNING, so peft loads it as prefix tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from deltatune.errors import ConfigError, UnsupportedModelError
from deltatune.method import Variant
from deltatune.methods import prompt_learning as pl
from deltatune.methods.prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning options, named as in peft. `encoder_hidden_size` (the projection MLP's width) defaults to
    token_dim; `init_weights="zero"` starts every prefix at zero."""

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PREFIX_TUNING"
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}.")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(
                f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}."
            )


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-tuning v2: deep prompts in every layer for classification (a SEQ_CLS head trains beside them), with no
    reparameterisation by default. Written to disk as PREFIX_TUNING, which is what it is in peft."""

    task_type: str | None = "SEQ_CLS"


class PrefixEncoder(nn.Module):
    """The prefixes of all layers, one row per virtual token: [n, num_layers * 2 * token_dim]. With projection (while
    training) a row is MLP(embedding); loaded for inference it is the saved row itself."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            nn.init.zeros_(last.weight)
            if getattr(last, "bias", None) is not None:
                nn.init.zeros_(last.bias)

    @property
    def reparameterised(self) -> bool:
        return self.transform is not None

    def forward(self) -> torch.Tensor:
        rows = self.embedding.weight
        return self.transform(rows) if self.transform is not None else rows

    def saved(self) -> torch.Tensor:
        if not self.reparameterised:
            return self.embedding.weight
        with torch.no_grad():
            return self.forward().detach()


# Models whose attention adds a relative position bias of (input x input) tokens and never widens it for cached keys:
# with prefixes the scores are (input x (prefix + input)), and torch fails deep inside the attention.
POSITION_BIAS_WITHOUT_CACHE = {"mpnet"}


def inject_prefix(peft_model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> None:
    """Build the adapter's prefix encoder on the PeftModel (the base model is not touched)."""
    if any(getattr(m, "gradient_checkpointing", False) for m in peft_model.get_base_model().modules()):
        raise ConfigError(
            "Prefix tuning does not work with gradient checkpointing (the checkpointed layers drop the cache that "
            "carries the prefixes); call model.gradient_checkpointing_disable() first."
        )
    model = peft_model.get_base_model()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in POSITION_BIAS_WITHOUT_CACHE:
        raise UnsupportedModelError(
            f"Prefix tuning (and MAM, UniPELT) cannot run on {type(model).__name__}: its attention adds a relative "
            "position bias sized to the input tokens only, so the prefix keys do not fit it. Use LoRA, prompt "
            "tuning or P-tuning on this model."
        )
    pl.fill_model_fields(config, model, kv_heads=True)
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(
            f"token_dim={config.token_dim} is not a multiple of num_attention_heads={config.num_attention_heads}."
        )
    head_dim = getattr(getattr(model, "config", None), "d_kv", None)  # T5 may size heads apart from d_model
    if head_dim is not None and head_dim != config.token_dim // config.num_attention_heads:
        raise ConfigError(
            f"{type(model).__name__}'s heads have d_kv={head_dim}, not token_dim / num_attention_heads = "
            f"{config.token_dim // config.num_attention_heads}; set token_dim={head_dim * config.num_attention_heads}."
        )
    if pl.is_encoder_decoder(model) and config.num_transformer_submodules != 2:
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model: prefix tuning needs task_type='SEQ_2_SEQ_LM' "
            "(num_transformer_submodules=2) on it, as in peft."
        )
    pl.add_encoder(peft_model, adapter_name, PrefixEncoder(config))


def prefix_cache(peft_model: nn.Module, adapter_name: str, config: PrefixTuningConfig, batch: int):
    """A DynamicCache holding every layer's prefix keys and values for `batch` rows."""
    rows = pl.encoder_of(peft_model, adapter_name)()
    dtype = getattr(peft_model.get_base_model(), "dtype", None)
    if dtype is not None:
        rows = rows.to(dtype)
    n, heads = config.num_virtual_tokens, config.num_attention_heads
    # [n, layers*2*heads*head_dim] -> [layers*2, batch, heads, n, head_dim], key and value of layer i at 2i, 2i+1
    kv = rows.view(n, config.num_layers * 2, heads, config.token_dim // heads).permute(1, 2, 0, 3)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1).contiguous()
    layers = config.num_layers
    if config.num_transformer_submodules == 1:
        return DynamicCache(ddp_cache_data=[(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
    # Encoder-decoder: peft reads the saved rows as [self key, self value, cross key, cross value] per layer over the
    # table repeated twice, then drops the cross-attention part. So decoder layer i reads the key and value saved for
    # layer 2i mod num_layers; the file means that, and we read it the same way.
    pairs = [(kv[(4 * i) % (2 * layers)], kv[(4 * i + 1) % (2 * layers)]) for i in range(layers)]
    return EncoderDecoderCache(DynamicCache(ddp_cache_data=pairs), DynamicCache())


def _prefixed(peft_model: nn.Module, inputs: dict[str, Any], cache_rows: int | None = None) -> dict[str, Any]:
    """The inputs plus the prefix cache, with the attention mask and position ids covering the prefix.
    generate() passes `cache_rows` (rows after beam expansion) and lets transformers count positions from the mask."""
    if inputs.get("past_key_values") is not None:
        raise ConfigError(
            "Prefix tuning supplies past_key_values itself; do not pass them (or use disable_adapter())."
        )
    base = peft_model.get_base_model()
    name, config = pl.active_adapter(peft_model)
    n = config.num_virtual_tokens
    batch, length, device = pl.batch_and_length(inputs)
    inputs["past_key_values"] = prefix_cache(peft_model, name, config, cache_rows or batch)
    if pl.is_encoder_decoder(base):
        # The prefixes sit in the decoder's self-attention only (peft gives the encoder and cross-attention none),
        # so only the decoder's mask grows.
        decoder_mask = inputs.get("decoder_attention_mask")
        if decoder_mask is not None:
            inputs["decoder_attention_mask"] = pl.extend_mask(decoder_mask, n)
        return inputs
    mask = inputs.get("attention_mask")
    if mask is None:  # encoders size their mask by the input unless told the keys are longer
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    inputs["attention_mask"] = pl.extend_mask(mask, n)
    position_ids = inputs.get("position_ids")
    if position_ids is not None:
        inputs["position_ids"] = pl.shift_positions(position_ids, batch, n, keep_virtual=False)
    elif cache_rows is None and pl.accepts(base, "position_ids"):
        inputs["position_ids"] = pl.positions_from_mask(inputs["attention_mask"])[:, n:]
    return inputs


def _expansion(base: nn.Module, kwargs: dict[str, Any]) -> int:
    """Rows per input in generate() (transformers expands by max(num_beams, num_return_sequences)): the cache must
    have that many."""
    config = kwargs.get("generation_config") or getattr(base, "generation_config", None)

    def pick(name: str) -> int:
        value = kwargs.get(name, getattr(config, name, None))
        return int(value or 1)

    return max(pick("num_beams"), pick("num_return_sequences"))


class PrefixTuningMethod(pl.PromptLearningMethod):
    """Trained keys and values in front of every attention layer's cache."""

    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    title = "prefix tuning, P-tuning v2"
    variants = {
        "prefix": Variant(),
        "prefix_tuning": Variant(),
        "ptuning_v2": Variant(config_class=PTuningV2Config),
        "p_tuning_v2": Variant(config_class=PTuningV2Config),
    }
    typical_lr = 1e-3  # 1e-2 and 3e-3 diverged to the majority class on MiniLM with projection (2026-11-23)

    def inject(self, peft_model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> None:
        inject_prefix(peft_model, config, adapter_name)

    def forward(self, peft_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run the base model with the prefixes in its cache (unchanged inputs inside disable_adapter())."""
        base = peft_model.get_base_model()
        if peft_model._disabled:
            return base(*args, **kwargs)
        if not pl.accepts(base, "past_key_values", or_var_keyword=True):
            raise UnsupportedModelError(
                f"{type(base).__name__}.forward takes no past_key_values, which prefix tuning needs."
            )
        inputs = _prefixed(peft_model, pl.bind_inputs(args, kwargs, seq2seq=pl.is_encoder_decoder(base)))
        cache = inputs["past_key_values"]
        prefix_length = cache.get_seq_length()
        output = base(**inputs)
        if cache.get_seq_length() == prefix_length:
            raise UnsupportedModelError(
                f"{type(base).__name__} ignored past_key_values, so the prefixes had no effect. Prefix tuning needs a "
                "model whose attention reads the cache (and no gradient checkpointing)."
            )
        return output

    def generate(self, peft_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Generate with the prefixes pre-filled in the KV cache; returns input_ids + new tokens."""
        base = peft_model.get_base_model()
        if peft_model._disabled:
            return base.generate(*args, **kwargs)
        inputs = pl.check_generate_args(args, kwargs)
        if inputs.get("use_cache") is False:
            raise ConfigError("Prefix tuning generates through the KV cache; do not pass use_cache=False.")
        batch, _, _ = pl.batch_and_length(inputs)
        embeds_only = inputs.get("input_ids") is None
        if embeds_only:
            pl.length_as_new_tokens(inputs)
        inputs = _prefixed(peft_model, inputs, cache_rows=batch * _expansion(base, inputs))
        if embeds_only:
            # transformers takes a pre-filled cache to hold the first embeddings and skips that many: give it n
            # placeholder rows to skip (they are never computed).
            embeds = inputs["inputs_embeds"]
            skipped = embeds.new_zeros(batch, inputs["past_key_values"].get_seq_length(), embeds.shape[-1])
            inputs["inputs_embeds"] = torch.cat([skipped, embeds], dim=1)
        return base.generate(**inputs)


METHOD = PrefixTuningMethod()
