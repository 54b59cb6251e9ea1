"""Quantized base models for QLoRA (Dettmers et al. 2023): 4-bit NF4/FP4 and 8-bit LLM.int8() via bitsandbytes.

`quantize(model, "nf4")` swaps every `nn.Linear` (but the output head) for a bitsandbytes `Linear4bit` or
`Linear8bitLt`; the quantization itself is bitsandbytes' own (on CPU too, with bitsandbytes >= 0.45), never a copy of it.
LoRA then wraps the quantized layers like any other: the adapter factors stay float32, the base runs in its compute
dtype, and `AdapterLayer.base_weight()` returns the dequantized weight (for DoRA, PiSSA checks and merging).

Merging into a quantized base dequantizes: `merge_adapter()` / `merge_and_unload()` replace each affected bnb layer
by a plain `nn.Linear` holding dequant(W) + dW in the layer's compute dtype, and warn once. That merged model computes
what the unmerged adapter model computed (up to float rounding); `unmerge_adapter()` puts the original quantized
layer back (it is kept while merged). Re-quantizing W + dW would add fresh quantization error, so deltatune never
does it behind the user's back: call `quantize()` on the merged model to choose that trade-off explicitly.

CUDA-only parts, documented rather than imitated: paged optimizers (`bitsandbytes.optim.PagedAdamW`) page optimizer
state through CUDA unified memory and have no CPU meaning. Gradient checkpointing (`prepare_model_for_kbit_training`
turns it on) is plain torch recomputation and runs on CPU as well, but it trades compute for activation memory, which
is the scarce resource on a GPU, not on a CPU box.

CPU speed note: bitsandbytes' CPU kernels use the system libgomp while torch ships its own; both spin-wait for work,
and on a small machine they starve each other (measured on 2 cores: a tiny model's training step 1 s instead of
3 ms). Start Python with OMP_WAIT_POLICY=PASSIVE, or call torch.set_num_threads(1), when training on a 4-bit base.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deltatune.inject import (
    candidate_modules,
    is_gpt2_conv1d,
    name_matches,
    output_head_names,
    replace_module,
)

QUANT_TYPES = ("nf4", "fp4", "int8")
_BNB_LAYERS = ("Linear4bit", "Linear8bitLt")


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:  # optional dependency
        raise ImportError(
            "Quantized bases need bitsandbytes; install it with `pip install 'deltatune[quant]'` "
            "(or `pip install bitsandbytes`)."
        ) from err
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes' 4-bit and 8-bit linear layers (and subclasses), without importing bitsandbytes."""
    return any(
        cls.__name__ in _BNB_LAYERS and cls.__module__.startswith("bitsandbytes")
        for cls in type(module).__mro__
    )


def is_4bit(module: nn.Module) -> bool:
    return is_quantized(module) and type(module.weight).__name__ == "Params4bit"


def has_quantized_layers(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    skip: Iterable[str] | None = None,
    int8_threshold: float = 6.0,
) -> nn.Module:
    """Replace the model's linear layers by bitsandbytes quantized layers, in place; returns the model.

    quant_type: "nf4" (4-bit NormalFloat, the QLoRA default), "fp4" (4-bit float) or "int8" (LLM.int8()).
    compute_dtype: the dtype the 4-bit layers compute in (default: the dtype of the weight being replaced).
    double_quant: also quantize the per-block absmax constants (QLoRA's double quantization; 4-bit only).
    skip: module names left in full precision (suffix match, as target_modules); default: the output head.
    int8_threshold: LLM.int8() outlier threshold (activations above it run in float); 0 disables the split.
    """
    bnb = require_bitsandbytes()
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"Unknown quant_type {quant_type!r}; use one of: {', '.join(QUANT_TYPES)}.")
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError(
            "This model already has adapters; quantize the base model first, then add the adapter."
        )
    skipped = list(skip) if skip is not None else sorted(output_head_names(model))
    targets = [
        name
        for name, module in candidate_modules(model)
        if (isinstance(module, nn.Linear) or is_gpt2_conv1d(module)) and not name_matches(name, skipped)
    ]
    if not targets:
        raise ValueError(
            f"quantize() found no linear layer to quantize in {type(model).__name__} (skip={skipped})."
        )
    if quant_type != "int8":
        check_cpu_4bit_shapes({name: model.get_submodule(name) for name in targets})
    for name in targets:
        module = model.get_submodule(name)
        if quant_type == "int8":
            new = _int8_layer(bnb, module, int8_threshold)
        else:
            new = _4bit_layer(bnb, module, quant_type, compute_dtype, double_quant)
        replace_module(model, name, new)
    return model


CPU_4BIT_BLOCK = 64


def _in_features(module: nn.Module) -> int:
    if is_gpt2_conv1d(module):
        return module.weight.shape[0]
    return module.in_features


def check_cpu_4bit_shapes(layers: dict[str, nn.Module]) -> None:
    """Refuse 4-bit layers that bitsandbytes 0.50 gets wrong on CPU.

    Its CPU dequantization kernel reads the 64-value blocks row by row while the quantizer cuts the flattened weight
    into blocks; the two agree only when in_features is a multiple of 64 (true of real models: 576, 768, 4096...).
    Otherwise the dequantized weight is garbage (measured: 20-80 % relative error instead of NF4's ~9 %)."""
    bad = [
        f"{name} (in_features={_in_features(m)})"
        for name, m in layers.items()
        if getattr(m, "weight", None) is not None
        and m.weight.device.type == "cpu"
        and _in_features(m) % CPU_4BIT_BLOCK != 0
    ]
    if bad:
        raise ValueError(
            f"bitsandbytes' CPU 4-bit kernels give wrong results when in_features is not a multiple of "
            f"{CPU_4BIT_BLOCK}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Add these modules to skip=, "
            "use 'int8', or quantize on CUDA."
        )


def _float_weight(module: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or a GPT-2 Conv1D (stored (in, out))."""
    weight = module.weight.detach()
    return weight.T.contiguous() if is_gpt2_conv1d(module) else weight


def _copy_bias(new: nn.Module, module: nn.Module) -> None:
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)


def _4bit_layer(bnb, module: nn.Module, quant_type: str, compute_dtype, double_quant: bool) -> nn.Module:
    weight = _float_weight(module)
    out_features, in_features = weight.shape
    new = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype or weight.dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    new.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=double_quant, quant_type=quant_type
    )
    _copy_bias(new, module)
    new = new.to(weight.device)  # bitsandbytes quantizes when the layer moves to its device
    keep_standard_layout(new)
    return new


def _int8_layer(bnb, module: nn.Module, threshold: float) -> nn.Module:
    weight = _float_weight(module)
    out_features, in_features = weight.shape
    new = bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=module.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    new.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    _copy_bias(new, module)
    new = new.to(weight.device)
    new._deltatune_dtype = weight.dtype  # int8 layers do not record the dtype they came from
    return new


def keep_standard_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU inference kernel (and undo a repack).

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites the weight in place into another layout the first time
    the layer runs in eval mode on an input without grad. From then on every forward, training included, takes the
    inference kernel, which passes no gradient to the layer's input: adapters *below* that layer silently stop
    learning (measured: input grad None), and outputs shift by ~1e-3 (bf16 arithmetic). Adapter training must not
    depend on whether an evaluation ran first, so deltatune keeps the standard layout on every layer it touches."""
    if not is_4bit(module):
        return
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    state = weight.quant_state
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight a bitsandbytes layer computes with, via bitsandbytes' own dequantization."""
    bnb = require_bitsandbytes()
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        if weight.quant_state is None:  # not quantized yet (still on the meta/initial device)
            return weight.data
        keep_standard_layout(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if getattr(module.state, "has_fp16_weights", False) or weight.dtype != torch.int8:
        return weight.data
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    if scb is None:
        raise ValueError("This Linear8bitLt has no scale constants (SCB); it was never quantized.")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer's float equivalent should hold: what its forward computes in."""
    if is_4bit(module):
        return module.compute_dtype or module.weight.quant_state.dtype
    return getattr(module, "_deltatune_dtype", None) or torch.float32


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain nn.Linear that computes what the bitsandbytes layer `module` computes."""
    dtype = dtype or float_dtype(module)
    weight = dequantize_weight(module).to(dtype)
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
    return linear


def dequantize_for_merge(module: nn.Module) -> nn.Linear:
    """Called by `AdapterLayer.merge` on a quantized base: the float layer the adapter is merged into."""
    linear = dequantized_linear(module)
    warnings.warn(
        f"Merging into a quantized ({'4-bit' if is_4bit(module) else '8-bit'}) base: the merged layers are "
        f"dequantized to {linear.weight.dtype} nn.Linear, so the merged model is no longer quantized and uses more "
        "memory. deltatune does not re-quantize W + dW silently (that adds new quantization error); call "
        "deltatune.quantize(merged_model, ...) if you want that.",
        stacklevel=4,
    )
    return linear


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer by its float nn.Linear equivalent, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if name and is_quantized(module):
            replace_module(model, name, dequantized_linear(module, dtype))
    return model


def _make_inputs_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a quantized model ready for adapter training (the peft function of the same name).

    Freezes every parameter; casts the remaining half-precision float parameters (norms, embeddings, head) to
    float32, because their updates and statistics are fragile in 16 bits; and, if the model has quantized layers and
    `use_gradient_checkpointing`, turns on gradient checkpointing (transformers models) with input gradients enabled,
    which reentrant checkpointing needs when every base weight is frozen.
    """
    gradient_checkpointing_kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if is_quantized(module):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    if not (use_gradient_checkpointing and has_quantized_layers(model)):
        return model
    if gradient_checkpointing_kwargs.get("use_reentrant", True):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(_make_inputs_require_grad)
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); gradient checkpointing works with "
            "transformers models. Pass use_gradient_checkpointing=False for other models."
        )
    enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return model
