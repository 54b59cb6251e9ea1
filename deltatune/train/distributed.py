"""Training on several processes with PyTorch's own torch.distributed: the process group, sharding with FSDP2
(`fully_shard`), sharded checkpoints (`torch.distributed.checkpoint`) and full adapter tensors for saving.

Two strategies, chosen by `TrainConfig.strategy`:
- ddp (the default): every process holds the whole model; DistributedDataParallel averages the gradients.
- fsdp: every parameter (frozen base and adapter alike) is split along its first dimension across the processes.
  Each transformer block (the classes a transformers model lists in `_no_split_modules`, as accelerate's FSDP
  plugin picks them) is one unit that is all-gathered just before its forward and backward and freed after;
  everything else (embeddings, head, soft prompts) is the root unit. Frozen and trainable parameters share a
  unit; the optimizer is built over the trainable shards only, so its state is sharded too. Gradients are
  reduce-scattered (averaged, as under DDP), so N processes compute what one process computes on the whole batch.

Weights quantized by bitsandbytes (QLoRA) are not split: a 4-bit weight carries its quantization state beside the
packed bytes, which `fully_shard` cannot cut; they stay whole on every process (`ignored_params`), and the rest
of the model (adapters, embeddings, norms, head) is sharded.

Checkpoints: each process writes its own shards of the trainable weights and their optimizer state with
torch.distributed.checkpoint into a new folder `checkpoint-shards/step-N`; the trainer then atomically replaces
`checkpoint-last.pt`, which names that folder (the commit point), and drops the older ones. A checkpoint saved by
N processes loads into M processes (DCP re-shards on load). Only tensors go into the folder, so loading it never
unpickles anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from deltatune.errors import CheckpointError, ConfigError
from deltatune.method import Method
from deltatune.quant import is_quantized

STRATEGIES = ("ddp", "fsdp")
SHARDS = "checkpoint-shards"  # in a run's output_dir: one sub-folder of sharded tensors per saved step


def init_process_group(strategy: str) -> tuple[int, int, int]:
    """(rank, world size, local rank). Under torchrun (WORLD_SIZE > 1) the process group is started from its
    environment (gloo on CPU; on a GPU machine NCCL for GPU tensors and gloo for CPU ones, e.g. offloaded shards).
    `fsdp` without torchrun starts a one-process group, so the same sharding, mixed precision and offload run on
    one device and a multi-process checkpoint resumes there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # GPU tensors over NCCL; CPU tensors (offloaded shards, Python objects) over gloo in the same group
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group(backend)
        elif strategy == "fsdp":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def block_classes(model: nn.Module) -> set[str]:
    """The transformer block classes of a transformers model (its `_no_split_modules`), wherever it sits under
    a PeftModel; empty for other models (then the whole model is one unit)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(
    model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None, cpu_offload: bool = False
) -> nn.Module:
    """Apply `fully_shard` to each transformer block, then to the whole model (the root unit), in place.

    `param_dtype` (bf16): parameters are all-gathered and computed in that dtype while the shards, the
    gradients' reduction and the optimizer stay float32. `cpu_offload`: the shards (and their gradients and
    optimizer state) live in CPU memory and are copied to the device unit by unit."""
    if cpu_offload and device.type != "cuda":
        raise ConfigError("cpu_offload moves parameter shards off a GPU; it needs a CUDA device.")
    quantized_layers = [m for m in model.modules() if is_quantized(m)]
    quantized = {p for m in quantized_layers for p in m.parameters(recurse=False)}
    dtypes = {p.dtype for p in model.parameters() if p not in quantized}
    if param_dtype is None and len(dtypes) > 1:
        raise ConfigError(
            f"fsdp all-gathers a block's parameters in one dtype, but this model mixes "
            f"{', '.join(sorted(str(d) for d in dtypes))} (e.g. a bfloat16 base with float32 adapters); set "
            "precision: bf16 (parameters gathered in bf16, gradients reduced in float32)."
        )
    options = dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
        ignored_params=quantized or None,
    )
    for layer in quantized_layers:  # not sharded, so fully_shard does not move them (nor offload them)
        layer.to(device)
    blocks = block_classes(model)
    for module in reversed(list(model.modules())):  # inner units before the units that hold them
        if type(module).__name__ in blocks and module is not model:
            fully_shard(module, **options)
    fully_shard(model, **options)
    if hasattr(model, "generate"):  # generation runs through the root's parameters too
        register_fsdp_forward_method(model, "generate")
    return model


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every unit. The root unit keeps its gathered parameters after a forward
    (for the backward that usually follows); after an evaluation nothing follows, so free them."""
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds of `tensors` (its shard of a sharded tensor)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def compute_device(param: torch.Tensor) -> torch.device:
    """Where a parameter is used: a sharded one (maybe offloaded to the CPU) computes on its mesh's device."""
    if isinstance(param, DTensor) and param.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective: every process calls it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like `param`: this process's shard when `param` is sharded."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(param.device, param.dtype)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """torch's clip_grad_norm_ (sharded gradients give a sharded norm, made whole here)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(norm))


@contextlib.contextmanager
def whole_parameters(
    model: nn.Module, tensors: Iterable[torch.Tensor], update: bool = False
) -> Iterator[None]:
    """While inside, each sharded parameter among `tensors` is replaced in `model` by its whole value, so code
    written for a plain model reads full tensors: saving an adapter, a prompt encoder's output. With `update`,
    the whole gradients come along and changes made inside are written back to the shards on exit (AdaLoRA's
    rank allocator scores and masks whole matrices). Every process enters it: the gathering is collective."""
    reshard(model)
    wanted = {id(t) for t in tensors}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, shard in list(module._parameters.items()):
            if shard is None or id(shard) not in wanted or not isinstance(shard, DTensor):
                continue
            if id(shard) not in whole:
                param = nn.Parameter(shard.detach().full_tensor(), requires_grad=shard.requires_grad)
                if update and shard.grad is not None:
                    param.grad = shard.grad.full_tensor()
                whole[id(shard)] = param
            module._parameters[name] = whole[id(shard)]
            swapped.append((module, name, shard))
    try:
        yield
    finally:
        for module, name, shard in swapped:
            module._parameters[name] = shard
        if update:
            with torch.no_grad():
                for shard in {id(shard): shard for _, _, shard in swapped}.values():
                    shard.copy_(like_param(whole[id(shard)].detach(), shard))


def adapts_while_training(model: nn.Module) -> bool:
    """Whether the model's method changes its adapter after optimizer steps (AdaLoRA reallocates ranks)."""
    method = getattr(model, "method", None)
    return method is not None and type(method).on_optimizer_step is not Method.on_optimizer_step


def gather_full(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> whole tensor on the CPU (collective; a small adapter's weights, not a whole base model)."""
    return {name: full_tensor(p.detach()).cpu().clone() for name, p in params.items()}


# --- sharded checkpoints --------------------------------------------------------------------------
def save_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.Tensor],
    folder: str,
    step: int,
) -> str:
    """Write this process's shards of `params` and of their optimizer state to `folder/checkpoint-shards/step-N`
    (every process calls it); returns the sub-folder's name, which the caller commits in checkpoint-last.pt."""
    name = f"step-{step}"
    path = os.path.join(folder, SHARDS, name)
    if dist.get_rank() == 0 and os.path.exists(path):
        shutil.rmtree(path)  # a half-written folder of a run killed before its commit
    dist.barrier()
    optim_state = get_optimizer_state_dict(model, optimizer)["state"]
    dcp.save({"weights": dict(params), "optimizer": _tensors_only(optim_state)}, checkpoint_id=path)
    dist.barrier()
    return name


def load_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.Tensor],
    folder: str,
    name: str,
) -> None:
    """Read a folder `save_sharded` wrote (by any number of processes) into this process's shards."""
    path = os.path.join(folder, SHARDS, name)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint-last.pt names the sharded folder {SHARDS}/{name}, which is missing from {folder}; "
            "delete checkpoint-last.pt to start over."
        )
    optim = get_optimizer_state_dict(model, optimizer)  # allocates the state DCP reads into
    state = {"weights": dict(params), "optimizer": _tensors_only(optim["state"])}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as err:  # a folder of another model or method: DCP names the missing key
        raise CheckpointError(
            f"{path} does not fit this run ({type(err).__name__}: {str(err)[:300]}); it was written by another "
            "model or method. Delete checkpoint-last.pt to start over."
        ) from err
    set_optimizer_state_dict(
        model, optimizer, {"state": state["optimizer"], "param_groups": optim["param_groups"]}
    )


def drop_old_shards(folder: str, keep: str) -> None:
    """Delete the sharded folders but the committed one (rank 0, after the commit)."""
    for entry in os.listdir(os.path.join(folder, SHARDS)):
        if entry != keep:
            shutil.rmtree(os.path.join(folder, SHARDS, entry), ignore_errors=True)


def _tensors_only(optim_state: dict) -> dict:
    """The optimizer state's tensors; a value that is not one (some optimizers keep Python numbers) cannot be
    restored without unpickling, so it is refused by name."""
    for name, values in optim_state.items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise ConfigError(
                    f"The optimizer keeps {key}={value!r} for {name}, which sharded checkpoints cannot store; "
                    "use a torch optimizer (adamw, adam, sgd) with strategy: fsdp."
                )
    return optim_state
