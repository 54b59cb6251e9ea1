"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): trainable virtual tokens in front of the input.

Prompt tuning learns `num_virtual_tokens` embeddings directly (initialised at random, from sampled vocabulary
embeddings, or from the embeddings of a text). P-tuning produces them with a small prompt encoder (an MLP, or a
bidirectional LSTM followed by an MLP) over learned inputs; the encoder is a training aid, so the checkpoint holds its
output, and a loaded adapter is a plain embedding table (as in peft, whose file format this is).

The base model runs on `[prompts; token embeddings]`, with the attention mask, position ids, token type ids and
(for token-level tasks) the labels extended to cover the virtual tokens.

Where the prompts go (`prompt_position`, deltatune's own option): "start" (the default, peft's layout) puts them in
front of everything. On an encoder classifier (BERT, MPNet) that is a poor place: the pooler and head read the first
position, which is then a virtual token instead of `[CLS]`, and the prompts barely beat the majority class on SST-2.
"after_first_token" keeps the first token (`[CLS]`) first and puts the prompts right after it, so the head reads the
real `[CLS]` again. The option is written to `adapter_config.json` only when it is not "start"; peft ignores it (with a
warning) and would put the prompts in front, so such a file gives other outputs in peft.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from deltatune.errors import ConfigError
from deltatune.method import Variant
from deltatune.methods import prompt_learning as pl
from deltatune.methods.prompt_learning import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


PROMPT_POSITIONS = ("start", "after_first_token")
# Tasks whose inputs are right-padded and start with a real token ([CLS]); generation pads on the left.
AFTER_FIRST_TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")


def _position_field() -> Any:
    return field(default="start", metadata={"deltatune_only": True})


def check_prompt_position(config: PromptLearningConfig) -> None:
    position = config.prompt_position
    if position not in PROMPT_POSITIONS:
        raise ConfigError(f"prompt_position must be one of {', '.join(PROMPT_POSITIONS)}, got {position!r}.")
    if position == "after_first_token" and config.task_type not in AFTER_FIRST_TASKS:
        raise ConfigError(
            f"prompt_position='after_first_token' is for encoder tasks ({', '.join(AFTER_FIRST_TASKS)}), whose "
            f"first token is [CLS]; task_type={config.task_type!r} pads on the left, so use prompt_position='start'."
        )


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning options, named as in peft.

    `prompt_tuning_init="TEXT"` starts the prompts at the embeddings of `prompt_tuning_init_text` (its tokens are
    repeated or cut to `num_virtual_tokens`), tokenized by `tokenizer_name_or_path`: a name or folder for
    `AutoTokenizer`, or a tokenizer object (only its `name_or_path` is written to the JSON).
    """

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | Callable | None = None
    tokenizer_kwargs: dict | None = None
    prompt_position: str = _position_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PROMPT_TUNING"
        check_prompt_position(self)
        choices = PromptTuningInit._value2member_map_
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in choices:
            raise ConfigError(f"prompt_tuning_init must be one of {', '.join(choices)}, got {init!r}.")
        self.prompt_tuning_init = PromptTuningInit(init)
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is not None and not isinstance(tokenizer, str):  # a tokenizer object (checked: callable)
            self._tokenizer = tokenizer
            self.tokenizer_name_or_path = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a name, folder or tokenizer)."
                )
            if self.prompt_tuning_init_text is None:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text, the text to start from."
                )
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'.")

    def tokenizer(self):
        """The tokenizer for TEXT init: the object given in code, else AutoTokenizer (never with remote code)."""
        given = getattr(self, "_tokenizer", None)
        if given is not None:
            return given
        kwargs = dict(self.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)
        return AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **kwargs)


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning options, named as in peft. `encoder_hidden_size` defaults to the model's hidden size.
    With the MLP encoder, `encoder_num_layers` is ignored (peft always uses three linear layers)."""

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    prompt_position: str = _position_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "P_TUNING"
        check_prompt_position(self)
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in PromptEncoderReparameterizationType._value2member_map_:
            raise ConfigError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}.")
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(kind)
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(
                f"encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}."
            )
        if not 0 <= self.encoder_dropout < 1:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ConfigError(
                f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}."
            )


# --- encoders -----------------------------------------------------------------------------------------------------
class PromptEmbedding(nn.Module):
    """Prompt tuning: the prompts are the rows of one embedding table."""

    def __init__(self, config: PromptTuningConfig, words: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode:
            return  # weights come from a checkpoint
        if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
            self._copy_rows(words, torch.randint(0, words.num_embeddings, (total,)))
        elif config.prompt_tuning_init == PromptTuningInit.TEXT:
            self._copy_rows(words, torch.tensor(_text_token_ids(config, total)))

    @torch.no_grad()
    def _copy_rows(self, words: nn.Module, token_ids: torch.Tensor) -> None:
        self.embedding.weight.copy_(words(token_ids.to(words.weight.device)).float())

    reparameterised = False

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def saved(self) -> torch.Tensor:
        return self.embedding.weight


def _text_token_ids(config: PromptTuningConfig, total: int) -> list[int]:
    """The init text's token ids, repeated or cut to `total` (peft's rule, special tokens included)."""
    ids = config.tokenizer()(config.prompt_tuning_init_text)["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to nothing; give a non-empty text.")
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptEncoder(nn.Module):
    """P-tuning: learned inputs go through an MLP (or a bidirectional LSTM + MLP) to give the prompts. Loaded for
    inference (`inference_mode=True`) it is only the embedding table, holding the saved prompts."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(total, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            layers, dropout = config.encoder_num_layers, config.encoder_dropout
            self.lstm_head = nn.LSTM(
                dim, hidden, layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    "encoder_num_layers is ignored by the MLP prompt encoder (it has 3 layers).", stacklevel=3
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    @property
    def reparameterised(self) -> bool:
        return self.mlp_head is not None

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]
        return self.mlp_head(x) if self.mlp_head is not None else x

    def saved(self) -> torch.Tensor:
        if not self.reparameterised:
            return self.embedding.weight
        with torch.no_grad():
            return self.forward().detach()


def inject_prompt(peft_model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> None:
    """Build the adapter's prompt encoder on the PeftModel (the base model is not touched)."""
    words = pl.word_embeddings(peft_model.get_base_model())
    pl.fill_model_fields(config, peft_model.get_base_model(), kv_heads=False)
    width = words.weight.shape[-1]
    if config.token_dim != width:
        raise ConfigError(
            f"token_dim={config.token_dim}, but the model's token embeddings have width {width}; set token_dim={width}."
        )
    if config.peft_type == "P_TUNING":
        encoder = PromptEncoder(config)
    else:
        encoder = PromptEmbedding(config, words)
    pl.add_encoder(peft_model, adapter_name, encoder)


# --- running ------------------------------------------------------------------------------------------------------
def _with_prompts(peft_model: nn.Module, inputs: dict[str, Any], for_generate: bool) -> dict[str, Any]:
    """The inputs with the prompts in front of the token embeddings and every per-token input extended to match.

    On an encoder-decoder model the prompts go in front of the encoder's input only: the table holds a second
    `num_virtual_tokens` rows for the decoder (num_transformer_submodules=2), which peft's prompt tuning and
    P-tuning never use, and neither do we; the decoder's inputs and the labels are left alone."""
    base = peft_model.get_base_model()
    name, config = pl.active_adapter(peft_model)
    seq2seq = pl.is_encoder_decoder(base)
    n = config.num_virtual_tokens
    batch, length, device = pl.batch_and_length(inputs)
    input_ids = inputs.get("input_ids")
    embeds = inputs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = pl.word_embeddings(base)(input_ids)
    prompts = pl.encoder_of(peft_model, name)()[:n].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    at = 1 if config.prompt_position == "after_first_token" else 0
    if at:
        _check_first_token_real(inputs.get("attention_mask"))

    def insert(tensor: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor[:, :at], filler, tensor[:, at:]], dim=1)

    inputs["inputs_embeds"] = insert(embeds, prompts)
    # A decoder-only generate() returns input_ids + new tokens, so it keeps them.
    if seq2seq or not for_generate:
        inputs.pop("input_ids", None)

    mask = inputs.get("attention_mask")
    if for_generate and mask is None:  # generate needs a mask as long as the embeddings
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if mask is not None:
        mask = inputs["attention_mask"] = insert(mask, mask.new_ones(batch, n))
    position_ids = inputs.get("position_ids")
    if position_ids is not None and at:  # the first token keeps its position; the prompts follow it
        position_ids = position_ids.expand(batch, -1)
        virtual = (
            position_ids[:, :1] + 1 + torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
        )
        inputs["position_ids"] = torch.cat([position_ids[:, :1], virtual, position_ids[:, 1:] + n], dim=1)
    elif position_ids is not None:
        inputs["position_ids"] = pl.shift_positions(position_ids, batch, n, keep_virtual=True)
    elif mask is not None and not for_generate and pl.accepts(base, "position_ids"):
        inputs["position_ids"] = pl.positions_from_mask(mask)
    token_types = inputs.get("token_type_ids")
    if token_types is not None:
        zeros = torch.zeros(batch, n, dtype=token_types.dtype, device=token_types.device)
        inputs["token_type_ids"] = insert(token_types, zeros)
    labels = inputs.get("labels")
    if labels is not None and not seq2seq and _token_level(config, labels, batch, length):
        ignored = torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device)
        inputs["labels"] = insert(labels, ignored)
    return inputs


def _check_first_token_real(mask: torch.Tensor | None) -> None:
    if mask is not None and bool((mask[:, 0] == 0).any()):
        raise ValueError(
            "prompt_position='after_first_token' puts the prompts after each row's first token, but some rows start "
            "with padding; pad on the right (tokenizer.padding_side = 'right')."
        )


def _token_level(config: PromptLearningConfig, labels: torch.Tensor, batch: int, length: int) -> bool:
    """Per-token labels (causal LM, token classification) get -100 for the virtual tokens; per-sequence ones don't."""
    if config.task_type in ("CAUSAL_LM", "TOKEN_CLS"):
        return True
    return config.task_type is None and tuple(labels.shape[:2]) == (batch, length)


class PromptTuningMethod(pl.PromptLearningMethod):
    """Trained virtual-token embeddings in front of the input (Lester et al. 2021)."""

    peft_type = "PROMPT_TUNING"
    config_class = PromptTuningConfig
    title = "prompt tuning"
    variants = {
        "prompt_tuning": Variant(),
        "prompt": Variant(),
        # An encoder classifier's head reads the first position: keep [CLS] there (see the module docstring).
        "prompt_tuning_cls": Variant({"prompt_position": "after_first_token"}, task_types=("SEQ_CLS",)),
    }
    typical_lr = 3e-2

    def inject(self, peft_model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> None:
        inject_prompt(peft_model, config, adapter_name)

    def forward(self, peft_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The base model on the prompted inputs (unchanged inputs inside disable_adapter())."""
        base = peft_model.get_base_model()
        if peft_model._disabled:
            return base(*args, **kwargs)
        inputs = pl.bind_inputs(args, kwargs, seq2seq=pl.is_encoder_decoder(base))
        return base(**_with_prompts(peft_model, inputs, for_generate=False))

    def generate(self, peft_model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Generate from the prompted embeddings. The returned ids are `input_ids` + new tokens, as with the base
        model (only the new tokens when called with inputs_embeds alone; an encoder-decoder model returns the
        decoder's tokens, as it always does)."""
        base = peft_model.get_base_model()
        if peft_model._disabled:
            return base.generate(*args, **kwargs)
        inputs = pl.check_generate_args(args, kwargs)
        if not pl.is_encoder_decoder(base):  # an encoder-decoder's max_length counts decoder tokens already
            pl.length_as_new_tokens(inputs)
        return base.generate(**_with_prompts(peft_model, inputs, for_generate=True))


class PTuningMethod(PromptTuningMethod):
    """Virtual tokens produced by a small MLP/LSTM encoder while training (Liu et al. 2021, "GPT understands, too");
    the saved file holds its output, as peft's does."""

    peft_type = "P_TUNING"
    config_class = PromptEncoderConfig
    title = "P-tuning (MLP/LSTM encoder)"
    variants = {
        "p_tuning": Variant(),
        "ptuning": Variant(),
        "p_tuning_cls": Variant({"prompt_position": "after_first_token"}, task_types=("SEQ_CLS",)),
    }
    typical_lr = 1e-2


PROMPT_TUNING = PromptTuningMethod()
P_TUNING = PTuningMethod()
