"""Default `target_modules` per architecture, for configs that leave them unset.

peft users write `LoraConfig(task_type="CAUSAL_LM")` and get the attention query and value projections of whatever
model they pass; IA3 users get keys, values and the FFN output. This is one table for every method that targets
modules, keyed by `model.config.model_type`, with the same picks as peft for the families both know, so a bare config
adapts the same modules in either library (and the saved `adapter_config.json` names them explicitly).

Columns: `lora` (LoRA, DoRA, rsLoRA, and AdaLoRA unless `adalora` differs), `ia3` (IA3's targets) and `feedforward`
(the IA3 targets whose input, not output, is scaled). Families beyond peft's table (ViT and its relatives) pick
the same roles as their text counterparts (query and value; keys, values and the FFN output for IA3).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class Picks:
    lora: tuple[str, ...]
    ia3: tuple[str, ...] = ()
    feedforward: tuple[str, ...] = ()
    adalora: tuple[str, ...] | None = None  # None: the `lora` picks


_QV = ("q_proj", "v_proj")
_LLAMA = Picks(_QV, ("k_proj", "v_proj", "down_proj"), ("down_proj",))
_QWEN = Picks(_QV, ("q_proj", "v_proj", "down_proj"), ("down_proj",))
_BERT = Picks(("query", "value"), ("key", "value", "output.dense"), ("output.dense",))
_FALCON = Picks(("query_key_value",), ("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",))
_GPT2 = Picks(("c_attn",), ("c_attn", "mlp.c_proj"), ("mlp.c_proj",))
# transformers 5 names vision transformers' attention q/k/v/o_proj and their MLP fc1/fc2.
_VIT = Picks(_QV, ("k_proj", "v_proj", "mlp.fc2"), ("mlp.fc2",))
_ALL_ATTN_FFN_BART = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

DEFAULTS: dict[str, Picks] = {
    # decoders
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": Picks(_QV, ("k_proj", "v_proj", "w2"), ("w2",)),
    "llama4": _QWEN,
    "qwen2": _QWEN,
    "qwen3": _QWEN,
    "gemma": _QWEN,
    "gemma2": _QWEN,
    "gemma3_text": _QWEN,
    "phi": Picks(("q_proj", "v_proj", "fc1", "fc2"), ("q_proj", "v_proj", "fc2"), ("fc2",)),
    "stablelm": Picks(_QV),
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "gpt_neox": _FALCON,
    "falcon": _FALCON,
    "bloom": Picks(("query_key_value",), ("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "gpt_neo": Picks(_QV, ("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "gptj": Picks(_QV, ("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "opt": Picks(_QV, ("q_proj", "k_proj", "fc2"), ("fc2",), _ALL_ATTN_FFN_BART),
    "mpt": Picks(("Wqkv",)),
    "codegen": Picks(("qkv_proj",)),
    # encoders
    "bert": _BERT,
    "roberta": Picks(_BERT.lora, _BERT.ia3, _BERT.feedforward, ("query", "key", "value", "dense")),
    "xlm-roberta": Picks(("query", "value")),
    "electra": Picks(("query", "value")),
    "layoutlm": Picks(("query", "value")),
    "deberta": Picks(("in_proj",), ("in_proj", "output.dense"), ("output.dense",)),
    "deberta-v2": Picks(
        ("query_proj", "value_proj"),
        ("key_proj", "value_proj", "output.dense"),
        ("output.dense",),
        ("query_proj", "key_proj", "value_proj", "dense"),
    ),
    # encoder-decoders
    "t5": Picks(("q", "v"), ("k", "v", "wo"), ("wo",), ("q", "k", "v", "o", "wi", "wo")),
    "mt5": Picks(("q", "v"), ("k", "v", "wi_1"), (), ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
    "bart": Picks(_QV, ("q_proj", "v_proj", "fc2"), ("fc2",), _ALL_ATTN_FFN_BART),
    # vision (beyond peft's table: query and value, as for the text encoders they copy)
    "vit": _VIT,
    "deit": _VIT,
    "dinov2": _VIT,
    "beit": _VIT,
    "swin": _VIT,
}


def default_targets(model: nn.Module, column: str) -> list[str]:
    """The `column` picks ("lora", "adalora", "ia3" or "feedforward") for `model`'s architecture; a clear error
    naming the fix when the architecture is not in the table."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    picks = DEFAULTS.get(model_type)
    if picks is None:
        known = ", ".join(sorted(DEFAULTS))
        raise ConfigError(
            f"target_modules is not set and there is no default target_modules for model type {model_type!r} "
            f"({type(model).__name__}). Set target_modules (a list of module names, a regex, or 'all-linear'). "
            f"Architectures with defaults: {known}."
        )
    if column == "adalora":
        return list(picks.adalora or picks.lora)
    if column in ("ia3", "feedforward") and not picks.ia3:
        raise ConfigError(
            f"IA3 has no default target_modules for model type {model_type!r}; set target_modules and "
            "feedforward_modules, e.g. IA3Config(target_modules=['k_proj', 'v_proj', 'down_proj'], "
            "feedforward_modules=['down_proj'])."
        )
    return list(getattr(picks, column))
