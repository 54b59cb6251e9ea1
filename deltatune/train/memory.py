"""Peak training memory: estimated from a model's config alone, and measured on a real step.

People pick a method and a machine from one number: will training fit? `estimate_training_memory` answers it for
any size (a 70B config is built on PyTorch's "meta" device, which holds shapes and no data, so the adapter's exact
parameter count comes from the library itself), broken into the four parts that add up to the peak:

- weights: every parameter of the model at its dtype (QLoRA: the 4-bit NF4 blocks and their double-quantized
  constants, 4.127 bits a weight, for the linear layers inside the blocks);
- gradients: one per trainable parameter, at its dtype;
- optimizer states: AdamW's two moments per trainable parameter, at that parameter's dtype (new adapter tensors are
  float32; full fine-tuning of a bfloat16 model keeps bfloat16 moments). Its foreach step also holds a
  parameter-sized temporary, which counts when the step is the peak; see `MemoryEstimate.total`;
- activations: what autograd keeps from the forward pass for the backward pass, from the shapes of a
  Llama-style decoder layer (see `activation_bytes`), with the output logits and the loss on top.

`measure_training_peak` measures the same quantity on a real model: every tensor allocated during training steps is
seen by a `TorchDispatchMode` and counted until its storage is freed, the same bookkeeping as
`torch.cuda.max_memory_allocated` but on any device. It is what the estimate is checked against (tests on tiny
Llama models, `bench/estimate_check.py` on the ladder).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

NF4_BITS = (
    4.127  # 4-bit codes + one 8-bit absmax per 64 weights, double-quantized (QLoRA, Dettmers et al. 2023)
)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes at the peak of a training step, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    trainable_params: int
    total_params: int
    step_temporaries: int = (
        0  # a foreach AdamW step's parameter-sized intermediate (PyTorch's default on CUDA)
    )

    @property
    def total(self) -> int:
        """The peak. Gradients fill in as backward frees the activations, so the two are not all live at once:
        the peak is the larger of the activations (start of backward) and the gradients plus the step's
        temporaries (the optimizer step), on top of the weights and the optimizer states."""
        return self.weights + self.optimizer + max(self.activations, self.gradients + self.step_temporaries)

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


# --- measuring ---------------------------------------------------------------------------------------------------
class _Allocations(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until that storage is freed; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if (
                    key and key not in self.live and key not in inputs
                ):  # a view or in-place result allocates nothing
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _ptr(tensor: torch.Tensor) -> int:
    return 0 if tensor.device.type == "meta" else tensor.untyped_storage().data_ptr()


def measure_training_peak(model: nn.Module, step: Callable[[], None], steps: int = 2) -> dict[str, int]:
    """Peak bytes of `steps` calls of `step` (forward, backward, optimizer step, zero_grad): the model's parameters
    and buffers, plus the peak of everything allocated while stepping (activations, gradients, optimizer states)."""
    static = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in _tensors(model)}.values())
    tracker = _Allocations()
    with tracker:
        for _ in range(steps):
            step()
    return {"static": static, "dynamic_peak": tracker.peak, "peak": static + tracker.peak}


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


# --- estimating --------------------------------------------------------------------------------------------------
# Llama 3 shapes (Llama-3.2-1B and 3B, Llama-3.1-8B and 70B), for `deltatune estimate --model llama-8b`.
LLAMA_SHAPES = {
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "llama-3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "llama-70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}


def load_config(name: str) -> Any:
    """A transformers config from a Llama shape name, a config.json, a model folder or alias, or a .gguf file."""
    import transformers

    from deltatune.models import resolve_model_path

    if name.lower() in LLAMA_SHAPES:
        return transformers.LlamaConfig(vocab_size=128256, **LLAMA_SHAPES[name.lower()])
    if name.endswith(".json") and os.path.isfile(name):
        return transformers.AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(name)) or ".")
    path = resolve_model_path(name)
    if path.endswith(".gguf"):
        return transformers.AutoConfig.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path)
        )
    return transformers.AutoConfig.from_pretrained(path)


def meta_model(config: Any) -> nn.Module:
    """The causal LM of a transformers config with shapes only (no memory), for counting parameters."""
    import transformers

    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _linear_in_blocks(model: nn.Module) -> int:
    """Elements of the linear layers QLoRA quantizes: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)


# Floats per token that autograd keeps, per decoder layer, by what trains, in a float32 model (fitted on
# `measure_training_peak` over 14 tiny Llama shapes each, max error 2%; see docs/method-selection.md): h hidden size,
# kv key/value width, i MLP width.
LAYER_FLOATS = {
    "frozen": {
        "h": 4.07,
        "kv": 1.97,
        "i": 2.97,
    },  # soft prompts, prefixes, IA3, BitFit ...: the norms' inputs and
    # outputs, the rotated keys/values, the MLP's gate/up/activation products, the attention output
    "lora": {"h": 5.47, "kv": 1.89, "i": 3.84},  # + the adapted layers' inputs and r-wide intermediates (r=8)
    "full": {"h": 5.47, "kv": 1.97, "i": 3.97},  # + every linear layer's input, for its weight gradient
    "ia3": {"h": 4.07, "kv": 4.04, "i": 5.75},  # + the scaled keys, values and MLP activations
}
NORM_FLOATS = 4  # of the h term: the two RMSNorms compute in float32 whatever the model's dtype
LOGIT_FLOATS = 4  # per token and vocabulary entry, in float32: logits, log-softmax, and their two gradients

# Bytes per token per decoder layer in a half-precision (bfloat16/float16) model, measured with
# `bench/estimate_probe.py` on an H100 (SDPA attention) at the Llama 3 1B, 8B and 70B widths, as the difference
# between 2 and 1 layers; the CPU keeps the same bytes. The mix differs from float32: the norms keep float32 inputs
# (8h of the 11.8h), and the tiny-model fits above underestimated real widths by up to 50% in half precision.
HALF_LAYER_BYTES = {
    "frozen": {"h": 11.8, "kv": 2.2, "i": 6.2},
    "full": {"h": 19.8, "kv": 4.0, "i": 8.1},
    "ia3": {"h": 15.9, "kv": 8.0, "i": 14.0},
}
# LoRA in a half-precision model: its float32 adapters see each adapted layer's input cast to float32, and that
# copy is what autograd keeps (one per adapted layer: q, k and v cast the same input three times), with the r-wide
# product. So a LoRA layer keeps the frozen bytes plus 4 x (in_features + r) per adapted linear layer.
ADAPTER_INPUT_BYTES = 4
# Half precision at the start of backward: the float32 log-softmax and two float32 gradients of the logits per
# token and vocabulary entry (measured 12.0-12.3), and the final norm's float32 input (4h).
HALF_LOGIT_BYTES = 12


def activation_bytes(
    config: Any,
    batch_size: int,
    seq_len: int,
    dtype_bytes: int,
    kind: str = "frozen",
    lora_rank: int = 8,
    adapted_inputs: int | None = None,
) -> int:
    """What autograd keeps for the backward pass of a Llama-style decoder, in bytes, from the shapes alone.

    `kind` is what trains: "frozen" (the base is frozen; only new inputs or scales train), "lora" (low-rank updates
    on linear layers), "ia3" or "full". `adapted_inputs`: for "lora" in half precision, the summed in_features + r of the adapted
    linear layers of one decoder layer (default: every linear layer, as `target_modules="all-linear"`). The layer
    terms are in the model's dtype; the loss works on float32 logits (transformers upcasts them)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    i = config.intermediate_size
    tokens = batch_size * seq_len
    if dtype_bytes == 4:
        if adapted_inputs is not None:  # float32 adapters read the base layer's own input: no copies to count
            raise ValueError("adapted_inputs applies to half-precision models only (dtype_bytes 2).")
        c = LAYER_FLOATS[kind]
        per_layer = (c["h"] - NORM_FLOATS) * h + c["kv"] * kv + c["i"] * i
        if kind == "lora":
            per_layer += 7 * (lora_rank - 8)  # seven adapted projections, each keeping an r-wide intermediate
        layer_bytes = per_layer * 4 + NORM_FLOATS * h * 4
        logit_bytes = config.vocab_size * LOGIT_FLOATS * 4
    else:
        c = HALF_LAYER_BYTES["frozen" if kind == "lora" else kind]
        layer_bytes = c["h"] * h + c["kv"] * kv + c["i"] * i
        if kind == "lora":
            if adapted_inputs is None:
                adapted_inputs = 6 * h + i + 7 * lora_rank  # q, k, v, o, gate, up read h; down reads i
            layer_bytes += ADAPTER_INPUT_BYTES * adapted_inputs
        logit_bytes = config.vocab_size * HALF_LOGIT_BYTES + 4 * h
    return int(tokens * (config.num_hidden_layers * layer_bytes + logit_bytes))


def _adapted_inputs_per_layer(peft_model: nn.Module, num_layers: int) -> int:
    """in_features + r, summed over the LoRA-adapted linear layers, per decoder layer (for `activation_bytes`)."""
    total = 0
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(module.lora_A):
            a = next(iter(module.lora_A.values()))
            a = getattr(a, "weight", a)  # an nn.Linear (LoRA) or a bare r x in parameter (AdaLoRA)
            total += a.shape[1] + a.shape[0]
    return round(total / max(num_layers, 1))


def estimate_training_memory(
    config: Any,
    method: str = "lora",
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bfloat16",
    options: dict[str, Any] | None = None,
    foreach: bool = True,
) -> MemoryEstimate:
    """Peak memory of one AdamW training step of a causal LM (a transformers config) with a registry method.

    `method` is any recipe method name (`lora`, `qlora`, `dora`, `full`, `prompt_tuning`, `ia3` ...); `options`
    are its config options (default: what a recipe gets, e.g. LoRA r=8 on every linear layer). `foreach`: whether
    AdamW updates all parameters at once (PyTorch's default on CUDA; on CPU it loops over them)."""
    from deltatune import registry
    from deltatune.model import get_peft_model
    from deltatune.train.recipe import RunConfig, make_peft_config

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}.")
    width = DTYPE_BYTES[dtype]
    _, variant = registry.resolve_variant(method)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    weights = total * width
    if variant.quantize in ("nf4", "fp4"):
        quantized = _linear_in_blocks(model)
        weights = (total - quantized) * width + math.ceil(quantized * NF4_BITS / 8)
    peft_config = make_peft_config(
        RunConfig(model="estimate", task="causal-lm", method=method), dict(options or {})
    )
    base_ids = {id(p) for p in model.parameters()}  # before injection: the adapters' are not the base's
    peft_model = get_peft_model(model, peft_config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    # Base tensors that train (full fine-tuning, BitFit ...) keep the model's dtype, and so do their gradients and
    # AdamW's states (PyTorch's `zeros_like`); new adapter tensors are float32.
    trained_bytes = sum(p.numel() * (width if id(p) in base_ids else 4) for p in trainable)
    added = sum(p.numel() for p in peft_model.parameters() if id(p) not in base_ids)
    weights += added * 4
    gradients = trained_bytes
    kinds = {"LORA": "lora", "ADALORA": "lora", "FULL": "full", "FREEZE": "full", "IA3": "ia3"}
    kind = kinds.get(peft_config.peft_type, "frozen")
    if peft_config.peft_type in ("PROMPT_TUNING", "P_TUNING"):
        seq_len += peft_config.num_virtual_tokens  # the virtual tokens run through every layer
    half_lora = kind == "lora" and width != 4
    adapted = _adapted_inputs_per_layer(peft_model, config.num_hidden_layers) if half_lora else None
    activations = activation_bytes(
        config, batch_size, seq_len, width, kind, getattr(peft_config, "r", 8), adapted_inputs=adapted
    )
    optimizer = 2 * trained_bytes  # AdamW's two moments
    temporaries = trained_bytes if foreach else 0
    return MemoryEstimate(weights, gradients, optimizer, activations, n_trainable, total + added, temporaries)
