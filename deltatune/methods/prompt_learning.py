"""What prompt tuning, P-tuning and prefix tuning share: the config fields, the prompt-encoder bookkeeping on the
PeftModel, the checkpoint keys, and the input bookkeeping around virtual tokens.

These methods leave the base model's modules alone. Each adapter is one "prompt encoder" in
`peft_model.prompt_encoder[adapter_name]`; its `saved()` tensor is what goes to disk under the key
`prompt_embeddings` (peft's format), and a head trained beside it (SEQ_CLS) is stored as `base_model.<name>.*`.

Virtual tokens sit in front of the real ones, so the attention mask gets `num_virtual_tokens` ones in front, and
position ids are counted over the extended mask (`cumsum - 1`, as transformers' `generate` does): a left-padded row
sees the same positions as the row alone.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.errors import CheckpointError, ConfigError, UnsupportedModelError
from deltatune.layer import ModulesToSave
from deltatune.method import Method

SAVED_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # peft keeps the raw model as `base_model` for prompt learning


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods, named as in peft. Leave the model-shape fields at None:
    they are read from the model when the adapter is added (`num_layers`, `token_dim`, `num_attention_heads`)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    is_prompt_learning = True

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer (e.g. 20), got {n!r}.")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(
                    f"{name} must be a positive integer (or null: read from the model), got {value!r}."
                )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ConfigError(
                "num_transformer_submodules is 1 (decoder-only and encoder models) or 2 (encoder-decoder models, "
                f"the default with task_type='SEQ_2_SEQ_LM'); got {self.num_transformer_submodules!r}."
            )


# --- setting an adapter up --------------------------------------------------------------------------------------
def word_embeddings(model: nn.Module) -> nn.Module:
    """The base model's token embedding layer (what prompt embeddings are concatenated with)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Module):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no get_input_embeddings(); prompt methods need a transformers-style model "
            "whose token embeddings can be looked up."
        )
    return embeddings


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _first_attr(config, names: Iterable[str]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def fill_model_fields(config: PromptLearningConfig, model: nn.Module, kv_heads: bool) -> None:
    """Fill num_layers/token_dim/num_attention_heads from the model's config, by peft's rules
    (`_prepare_prompt_learning_config`). With `kv_heads` (prefix tuning) a grouped-query model's prefixes are sized
    for its key/value heads: token_dim = head_dim * num_key_value_heads."""
    model_config = _model_config(model)
    wanted = {
        "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
        "token_dim": ("hidden_size", "n_embd", "d_model"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
    }
    for field_name, sources in wanted.items():
        if getattr(config, field_name) is None:
            value = _first_attr(model_config, sources) if model_config is not None else None
            if value is None:
                raise ConfigError(
                    f"Cannot read {field_name} from {type(model).__name__}'s config; set {field_name} in the "
                    f"{type(config).__name__} yourself."
                )
            setattr(config, field_name, value)
    kv = getattr(model_config, "num_key_value_heads", None)
    if kv_heads and kv is not None:
        head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv
        config.num_attention_heads = kv
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_transformer_submodules is None:  # peft's default
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.num_transformer_submodules == 2 and not is_encoder_decoder(model):
        raise ConfigError(
            f"num_transformer_submodules=2 (task_type='SEQ_2_SEQ_LM') is for encoder-decoder models, and "
            f"{type(model).__name__} is not one; use task_type='CAUSAL_LM' (or another) for it."
        )


def is_encoder_decoder(model: nn.Module) -> bool:
    """T5, BART and their kind: the prompts go to the encoder's input, prefixes to the decoder's self-attention."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def add_encoder(peft_model: nn.Module, adapter_name: str, encoder: nn.Module) -> None:
    """Register the adapter's prompt encoder on the PeftModel, on the device of the base model's embeddings."""
    if "prompt_encoder" not in peft_model._modules:
        peft_model.prompt_encoder = nn.ModuleDict()
    device = word_embeddings(peft_model.get_base_model()).weight.device
    peft_model.prompt_encoder[adapter_name] = encoder.to(device)


def encoder_of(peft_model: nn.Module, adapter_name: str) -> nn.Module:
    return peft_model._modules["prompt_encoder"][adapter_name]


def active_adapter(peft_model: nn.Module) -> tuple[str, PromptLearningConfig]:
    names = peft_model.active_adapters
    if len(names) != 1:
        raise ConfigError(
            f"Prompt-learning adapters run one at a time, but {names} are active; call set_adapter(name) with one name."
        )
    return names[0], peft_model.peft_config[names[0]]


# --- checkpoint ---------------------------------------------------------------------------------------------------
def _head_modules(peft_model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    return {
        name: module.modules_to_save[adapter_name]
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save
    }


# --- inputs -------------------------------------------------------------------------------------------------------
_POSITIONAL = ("input_ids", "attention_mask", "inputs_embeds", "labels")  # peft's forward order
_POSITIONAL_SEQ2SEQ = (
    "input_ids",
    "attention_mask",
    "inputs_embeds",
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_inputs_embeds",
    "labels",
)


def bind_inputs(args: tuple, kwargs: dict[str, Any], seq2seq: bool = False) -> dict[str, Any]:
    """Positional arguments as peft's prompt-learning forward names them (its seq2seq forward has its own order)."""
    order = _POSITIONAL_SEQ2SEQ if seq2seq else _POSITIONAL
    if len(args) > len(order):
        raise TypeError(f"Pass at most {len(order)} positional inputs ({', '.join(order)}); use keywords.")
    kwargs = dict(kwargs)
    for name, value in zip(order, args):
        if name in kwargs:
            raise TypeError(f"Got two values for {name!r} (positional and keyword).")
        kwargs[name] = value
    return kwargs


def batch_and_length(inputs: dict[str, Any]) -> tuple[int, int, torch.device]:
    tensor = inputs.get("input_ids")
    if tensor is None:
        tensor = inputs.get("inputs_embeds")
    if tensor is None:
        raise ValueError("Pass input_ids or inputs_embeds.")
    return tensor.shape[0], tensor.shape[1], tensor.device


def accepts(model: nn.Module, name: str, or_var_keyword: bool = False) -> bool:
    """Whether the model's forward names this argument (or, with `or_var_keyword`, takes **kwargs)."""
    params = inspect.signature(model.forward).parameters
    if name in params:
        return True
    return or_var_keyword and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def extend_mask(mask: torch.Tensor, num_virtual: int) -> torch.Tensor:
    ones = torch.ones(mask.shape[0], num_virtual, dtype=mask.dtype, device=mask.device)
    return torch.cat([ones, mask], dim=1)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over attended tokens only (padding gets 0), as transformers' generate() does."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def shift_positions(
    position_ids: torch.Tensor, batch: int, num_virtual: int, keep_virtual: bool
) -> torch.Tensor:
    """User-given positions move past the virtual tokens; `keep_virtual` also returns positions 0..n-1 for them."""
    position_ids = position_ids.expand(batch, -1) + num_virtual
    if not keep_virtual:
        return position_ids
    virtual = torch.arange(num_virtual, device=position_ids.device, dtype=position_ids.dtype).expand(
        batch, -1
    )
    return torch.cat([virtual, position_ids], dim=1)


def check_generate_args(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate(input_ids, **options): options are keywords, as in transformers."""
    if len(args) > 1:
        raise TypeError("Pass generate() options as keywords; only input_ids may be positional.")
    kwargs = dict(kwargs)
    if args:
        if "input_ids" in kwargs or "inputs" in kwargs:
            raise TypeError("Got input_ids both positionally and as a keyword.")
        kwargs["input_ids"] = args[0]
    if "inputs" in kwargs:
        kwargs["input_ids"] = kwargs.pop("inputs")
    return kwargs


def length_as_new_tokens(inputs: dict[str, Any]) -> None:
    """`max_length` counts the caller's tokens; transformers would count the longer prompted embeddings instead, so
    it is turned into the equivalent `max_new_tokens`."""
    if inputs.get("max_new_tokens") is not None:
        return
    _, length, _ = batch_and_length(inputs)
    config = inputs.get("generation_config")
    if inputs.get("max_length") is not None:
        inputs["max_new_tokens"] = inputs.pop("max_length") - length
    elif config is not None and config.max_new_tokens is None and config.max_length is not None:
        inputs["generation_config"] = config = copy.deepcopy(config)
        config.max_new_tokens, config.max_length = config.max_length - length, None


class PromptLearningMethod(Method):
    """The hooks the soft-prompt methods share: the encoder lives on the PeftModel (peft's `prompt_encoder`), the
    base model is left untouched (so `base_model` is the raw model, as in peft), and nothing can be merged."""

    mergeable = False
    wraps_base = False
    recipe_defaults = {"num_virtual_tokens": 20}

    def remove(self, peft_model: nn.Module, adapter_name: str) -> None:
        """Drop the adapter's prompt encoder (delete_adapter, or a failed add_adapter)."""
        encoders = peft_model._modules.get("prompt_encoder")
        if encoders is not None and adapter_name in encoders:
            del encoders[adapter_name]

    def state_dict(
        self, peft_model: nn.Module, adapter_name: str, config: PromptLearningConfig
    ) -> dict[str, torch.Tensor]:
        """The live tensors (what trains and loads). A plain encoder is peft's `prompt_embeddings` itself; a
        reparameterised one lists its parameters, turned into `prompt_embeddings` by `tensors_to_save`."""
        encoder = encoder_of(peft_model, adapter_name)
        if encoder.reparameterised:
            entries = {f"prompt_encoder.{k}": v for k, v in encoder.state_dict(keep_vars=True).items()}
        else:
            entries = {SAVED_KEY: encoder.embedding.weight}
        for name, head in _head_modules(peft_model, adapter_name).items():
            for sub, tensor in head.state_dict(keep_vars=True).items():
                entries[f"{HEAD_PREFIX}{name}.{sub}"] = tensor
        return entries

    def tensors_to_save(
        self,
        peft_model: nn.Module,
        adapter_name: str,
        config: PromptLearningConfig,
        entries: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The file holds the prompts (a reparameterised encoder's output), never the encoder."""
        kept = {k: v for k, v in entries.items() if not k.startswith("prompt_encoder.")}
        return {SAVED_KEY: encoder_of(peft_model, adapter_name).saved(), **kept}

    def check_loadable(
        self, peft_model: nn.Module, adapter_name: str, config: PromptLearningConfig, state: dict
    ) -> None:
        """A saved file holds prompts, which a training-mode MLP/LSTM encoder cannot take."""
        if encoder_of(peft_model, adapter_name).reparameterised:
            raise CheckpointError(
                f"A saved {config.peft_type} adapter holds the prompts its encoder produced, not the encoder, so it "
                "cannot be loaded for further training with the encoder (peft refuses this too). Load it with "
                "is_trainable=False, or train a new adapter."
            )
