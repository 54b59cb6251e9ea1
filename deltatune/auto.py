"""`AutoPeftModel*`: load an adapter folder and the base model its `adapter_config.json` names, in one call.

    model = AutoPeftModelForCausalLM.from_pretrained("outputs/my-lora")   # base from base_model_name_or_path

The transformers auto class comes from the class (`...ForCausalLM` -> `AutoModelForCausalLM`); `AutoPeftModel`
itself uses the config's `task_type`, or, with none, the class `auto_mapping` names (as peft writes it), or the
architecture in the base model's `config.json`.
Only transformers classes are ever instantiated from what a folder says.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers

from deltatune.config import CONFIG_NAME, PeftConfig
from deltatune.errors import ConfigError
from deltatune.hub import resolve_adapter_file
from deltatune.model import TASK_MODELS, PeftModel

# task_type -> the transformers auto class that builds its base model
AUTO_MODEL_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class AutoPeftModel:
    """Builds a PeftModel from an adapter folder; not instantiated itself (use `from_pretrained`)."""

    task_type: str | None = None  # None: from the adapter config

    def __init__(self) -> None:
        raise TypeError(f"Use {type(self).__name__}.from_pretrained(adapter_folder_or_repo).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Load the base model named by the adapter's config (`model_kwargs`, e.g. `dtype` or `device_map`, go to
        its `from_pretrained`), grow its vocabulary to the adapter folder's tokenizer if that is larger, and load
        the adapter onto it."""
        config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        base_path = config.base_model_name_or_path
        if not base_path:
            raise ConfigError(
                f"{pretrained_model_name_or_path} does not name its base model (base_model_name_or_path is empty); "
                "load the base yourself and use PeftModel.from_pretrained(base, folder)."
            )
        task_type = cls.task_type or config.task_type
        if cls.task_type and config.task_type not in (None, cls.task_type):
            raise ConfigError(
                f"This adapter is for task {config.task_type!r}, not {cls.task_type!r}; use "
                f"{_auto_peft_name(config.task_type)} instead."
            )
        model_class = _base_model_class(task_type, pretrained_model_name_or_path, base_path, revision, config)
        base = model_class.from_pretrained(base_path, revision=config.revision, **model_kwargs)
        _grow_vocabulary(base, pretrained_model_name_or_path)
        peft_class = TASK_MODELS.get(task_type, PeftModel)
        return peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name, is_trainable, config, revision
        )


def _auto_peft_name(task_type: str) -> str:
    return next(c.__name__ for c in AUTO_CLASSES if c.task_type == task_type)


def _base_model_class(
    task_type: str | None,
    adapter_path: str | os.PathLike,
    base_path: str,
    revision: str | None,
    config: PeftConfig,
):
    """The transformers class to build the base with: the task's auto class; with no task type, the class
    `auto_mapping` names (peft writes it) or else the architecture in the base's `config.json`. Only classes of
    transformers itself are ever built from what a folder says."""
    if task_type is not None:
        return getattr(transformers, AUTO_MODEL_CLASSES[task_type])
    with open(resolve_adapter_file(adapter_path, CONFIG_NAME, revision)) as fh:
        mapping = json.load(fh).get("auto_mapping") or {}
    if mapping:
        names = [mapping.get("base_model_class")]
        library = str(mapping.get("parent_library", ""))
        if library != "transformers" and not library.startswith("transformers."):
            raise ConfigError(
                f"The adapter's auto_mapping names a {library!r} class; AutoPeftModel builds transformers classes "
                "only. Build the base yourself and use PeftModel.from_pretrained(base, folder)."
            )
    else:
        names = (
            transformers.AutoConfig.from_pretrained(base_path, revision=config.revision).architectures or []
        )
    found = getattr(transformers, names[0], None) if names and names[0] else None
    if found is None:
        raise ConfigError(
            f"The adapter has no task_type and names no transformers class to build ({names}); use the "
            "AutoPeftModelFor* class of its task."
        )
    return found


def _grow_vocabulary(base: torch.nn.Module, adapter_path: str | os.PathLike) -> None:
    """An adapter trained after adding tokens ships its tokenizer; the base needs that many embedding rows."""
    if not os.path.isfile(os.path.join(os.fspath(adapter_path), "tokenizer_config.json")):
        return
    get_embeddings = getattr(base, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(adapter_path))
    if len(tokenizer) > get_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModelForCausalLM(AutoPeftModel):
    """A PeftModelForCausalLM on `AutoModelForCausalLM.from_pretrained(base)`."""

    task_type = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    """A PeftModelForSequenceClassification on `AutoModelForSequenceClassification.from_pretrained(base)`."""

    task_type = "SEQ_CLS"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    """A PeftModelForTokenClassification on `AutoModelForTokenClassification.from_pretrained(base)`."""

    task_type = "TOKEN_CLS"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    """A PeftModelForSeq2SeqLM on `AutoModelForSeq2SeqLM.from_pretrained(base)`."""

    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    """A PeftModelForQuestionAnswering on `AutoModelForQuestionAnswering.from_pretrained(base)`."""

    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    """A PeftModelForFeatureExtraction on `AutoModel.from_pretrained(base)`."""

    task_type = "FEATURE_EXTRACTION"


AUTO_CLASSES = (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForFeatureExtraction,
)
