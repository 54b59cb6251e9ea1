"""A plain PyTorch training loop, written to be read top to bottom.

    trainer = Trainer(model, task, train_features, eval_features, TrainConfig(output_dir="out", epochs=3))
    summary = trainer.train()

What it does beyond `loss.backward(); optimizer.step()`:
- schedules (with warmup) and the loss-adaptive rule, gradient clipping and accumulation, autocast, gradient
  checkpointing, optional distillation from a teacher;
- evaluation every N steps, early stopping on a metric, the best weights kept and restored at the end;
- one checkpoint file, written atomically (temp file + os.replace), holding the trainable weights, optimizer,
  schedule, every RNG state and the position in the data, so a run killed at any moment resumes and produces
  the same loss curve as a run that was never stopped; it also holds a fingerprint of everything that shapes the
  run, and a resume with other settings is refused, naming each change (unless `resume_with_changes`);
- its own output folder: a folder holding another run's checkpoints is refused unless the run resumes it or
  `overwrite` clears it first, so a run never reads (or returns) another run's files;
- the final adapter saved before the final evaluation, so a failing evaluation never loses the training;
- data-parallel training under torchrun with DistributedDataParallel: each rank takes its share of the same global
  batch, so N processes compute what one process would with the whole batch; `strategy: fsdp` shards the model,
  the gradients and the optimizer state instead (FSDP2; deltatune/train/distributed.py), with sharded checkpoints
  that resume on any number of processes and the adapter gathered whole and saved once;
- a progress bar, a JSONL log of every metric, TensorBoard events, a PNG of the curves and a summary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from deltatune.config import check_fields
from deltatune.errors import CheckpointError, ConfigError, DataError, RunError
from deltatune.train import distributed
from deltatune.train.data import epoch_batches
from deltatune.train.distill import distillation_loss
from deltatune.train.schedules import Schedule, make_optimizer
from deltatune.train.tasks import Task, to_device

CHECKPOINT = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"
LOG = "log.jsonl"
SUMMARY = "train_summary.json"
# What a run writes into its output_dir (what `overwrite` clears), and what marks a folder as holding a run.
RUN_FILES = (
    CHECKPOINT,
    BEST,
    LOG,
    SUMMARY,
    "curves.png",
    "tensorboard",
    "adapter_config.json",
    "adapter_model.safetensors",
    distributed.SHARDS,
)
CHECKPOINTS = (CHECKPOINT, BEST)
# In the names of the task head's trainable copies (peft's ModulesToSaveWrapper): what head_lr applies to.
HEAD_MARK = ".modules_to_save."
# TrainConfig fields that change how a run is executed, logged or saved, not the numbers it computes; every other
# field is part of the fingerprint a resumed run must match.
NOT_IN_FINGERPRINT = {
    "output_dir",
    "eval_batch_size",
    "save_every",
    "log_every",
    "resume",
    "resume_with_changes",
    "overwrite",
    "keep_checkpoint",
    "progress",
    "tensorboard",
    "plot",
    "device",
    "num_threads",
    "gradient_checkpointing",
    "load_best_at_end",
    "strategy",  # how the same global batch is spread over the processes, not what it computes
    "cpu_offload",
}


def steps_per_epoch(config: TrainConfig, n_rows: int, world: int = 1) -> int:
    """Optimizer steps in one epoch, as `Trainer._batches_of_epoch` makes them: global batches of
    batch_size * world rows (under data parallelism the last short one is dropped), grad_accum per step."""
    global_rows = config.batch_size * world
    batches = n_rows // global_rows if world > 1 else math.ceil(n_rows / global_rows)
    return math.ceil(batches / config.grad_accum)


def planned_steps(config: TrainConfig, n_rows: int, world: int = 1) -> int:
    """Optimizer steps the run takes: the one rule the trainer's schedule and AdaLoRA's budget both use."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * steps_per_epoch(config, n_rows, world)))


@dataclass
class TrainConfig:
    """Everything that shapes a run. Steps are optimizer steps (one step = `grad_accum` micro-batches)."""

    output_dir: str = "runs/deltatune"
    epochs: float = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 8  # per process
    eval_batch_size: int = 0  # 0: 2 * batch_size
    grad_accum: int = 1
    lr: float = 1e-4
    head_lr: float | None = None  # the task head's own rate (modules_to_save: classifier, score); None: lr
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr: float = 0.0
    max_lr: float | None = None  # upper bound for the loss-adaptive rule (default: lr)
    gamma: float = 0.99  # exponential decay per step
    max_grad_norm: float = 1.0  # 0 switches clipping off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on CUDA only)
    gradient_checkpointing: bool = False
    seed: int = 0
    group_by_length: bool = False
    eval_every: int = 0  # steps; 0: at the end of each epoch
    save_every: int = 0  # steps between checkpoints; 0: at each evaluation
    log_every: int = 1
    metric: str | None = None  # metric for early stopping / best checkpoint (default: the task's)
    greater_is_better: bool | None = None
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    load_best_at_end: bool = True
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    resume: bool = False  # continue from output_dir's checkpoint-last.pt (a fresh start if there is none)
    resume_with_changes: bool = False  # resume even though the settings differ from the checkpoint's
    overwrite: bool = False  # clear a previous run's files from output_dir before starting
    keep_checkpoint: bool = True  # False: delete checkpoint-last.pt once the run has finished
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    device: str = "auto"
    strategy: str = (
        "ddp"  # with several processes: ddp (whole model on each) | fsdp (sharded; distributed.py)
    )
    cpu_offload: bool = False  # fsdp on a GPU: parameter shards, gradients and optimizer state in CPU memory
    num_threads: int = 0  # CPU threads for torch; 0 keeps torch's default. 1 is far faster on a busy machine.

    def __post_init__(self) -> None:
        check_fields(self, "the training settings")  # types, from the annotations above
        if self.lr <= 0:
            raise ConfigError(
                f"lr must be positive, got {self.lr}; a typical LoRA learning rate is 1e-4 to 1e-3."
            )
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(
                f"head_lr must be positive, got {self.head_lr}; leave it unset to train the head at lr."
            )
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        counts = ("max_steps", "eval_batch_size", "warmup_steps", "eval_every", "save_every", "log_every")
        for name in (*counts, "early_stopping_patience", "num_threads", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("Set epochs > 0 or max_steps > 0; otherwise there is nothing to train.")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.strategy not in distributed.STRATEGIES:
            raise ConfigError(
                f"strategy must be one of {', '.join(distributed.STRATEGIES)}, got {self.strategy!r}."
            )
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("cpu_offload offloads parameter shards; it needs strategy: fsdp.")
        if self.strategy == "fsdp" and self.optimizer.lower() not in ("adamw", "adam", "sgd"):
            raise ConfigError(
                f"optimizer {self.optimizer!r} keeps whole-tensor state (bitsandbytes); strategy: fsdp shards the "
                "parameters, so use adamw, adam or sgd (their state is sharded with them)."
            )
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite contradict each other: resume continues the run in output_dir, overwrite "
                "deletes it. Pass one of them."
            )


@dataclass
class _Position:
    """Where the run is: what a resumed run needs besides the tensors."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so the checkpoint loads with `weights_only=True`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    numpy_state.update(has_gauss=int(has_gauss), cached_gaussian=float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temp file, fsync, then rename: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, required: tuple[str, ...] = ("weights",)) -> dict[str, Any]:
    """Read a checkpoint this trainer wrote, never unpickling anything but tensors and plain Python values
    (`weights_only=True`); a damaged, foreign or unsafe file is a CheckpointError that says what to do."""
    fix = f"delete {path} to start the run over, or point output_dir at a fresh folder"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle of plain values at all: damaged
            raise CheckpointError(f"{path} is damaged (not a readable checkpoint); {fix}.") from err
        raise CheckpointError(  # objects other than tensors and plain values: never unpickled
            f"{path} cannot be read: it holds Python objects besides tensors and plain values, and loading them "
            f"could run code, so it was refused; {fix}."
        ) from err
    except Exception as err:  # truncated, empty, or not a torch file at all
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} cannot be read as a deltatune checkpoint ({type(err).__name__}: {reason}); {fix}."
        ) from err
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a deltatune checkpoint (it lacks {', '.join(missing)}); {fix}.")
    return state


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def claim_output_dir(
    folder: str,
    resume: bool,
    overwrite: bool,
    markers: Sequence[str] = CHECKPOINTS,
    owned: Sequence[str] = RUN_FILES,
    describe: Callable[[str, list[str]], str] | None = None,
) -> None:
    """Make sure a run reads and writes only its own files in `folder`.

    A folder holding any of `markers` holds another run: refused, naming it (`describe`), unless `overwrite`
    (the files in `owned` are deleted first, nothing else) or `resume` with a checkpoint to continue from (whose
    fingerprint the trainer then checks)."""
    if overwrite:
        for name in owned:
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        return
    held = [name for name in markers if os.path.lexists(os.path.join(folder, name))]
    if not held or (resume and os.path.exists(os.path.join(folder, CHECKPOINT))):
        return
    what = describe(folder, held) if describe else f"it has {', '.join(held)}"
    fix = (
        f"there is no {CHECKPOINT} to resume from; pass overwrite to start over there"
        if resume
        else "pass resume to continue it, overwrite to replace it, or choose another output_dir"
    )
    raise RunError(f"{folder} already holds another run ({what}); {fix}.")


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}: fingerprints compare (and report) field by field."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: old -> new' for every field whose value differs. A field missing on one side counts as None: a
    checkpoint written before an optional setting existed (head_lr) resumes when that setting is still unset."""
    return [
        f"{key}: {saved.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


class Trainer:
    """Trains `model` on `task` with `train_features`; see the module docstring for what it adds."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train_features: Sequence[Any],
        eval_features: Sequence[Any] | None = None,
        config: TrainConfig | None = None,
        teacher: nn.Module | None = None,
        callbacks: Sequence[Callable[[Trainer, dict[str, Any]], None]] = (),
        run_fingerprint: dict[str, Any] | None = None,
    ) -> None:
        """`run_fingerprint`: what else determines this run (model, method options, data files ...; a recipe
        passes them) beside the trajectory fields of `config`; a resume must match it."""
        self.config = config or TrainConfig()
        self.run_fingerprint = dict(run_fingerprint or {})
        if len(train_features) == 0:
            raise ValueError("The training set is empty; nothing to train on.")
        self.model, self.task, self.teacher = model, task, teacher
        self.train_features, self.eval_features = train_features, eval_features
        self.callbacks = list(callbacks)
        self.rank, self.world, self.local_rank = distributed.init_process_group(self.config.strategy)
        self.device = self._pick_device()
        self.pos = _Position()
        self._evaluated_at: int | None = None  # the step of the last evaluation
        self.history: list[dict[str, Any]] = []
        self.writer = None
        self.lengths = task.lengths(train_features)

    # --- setup ----------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        if self.config.device != "auto":
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """strategy: fsdp: parameters, gradients and optimizer state are split across the processes."""
        return self.config.strategy == "fsdp"

    @property
    def unwrapped(self) -> nn.Module:
        return (
            self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model
        )

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def _batches_of_epoch(self, epoch: int) -> list[list[list[int]]]:
        """This rank's optimizer steps of an epoch: each a list of micro-batches (row indices).

        Global batches of batch_size * world rows are built from (seed, epoch); rank r takes rows r, r+world, ...
        Under data parallelism the last short global batch is dropped so every rank gets an equal share."""
        c = self.config
        glob = epoch_batches(
            self.lengths,
            c.batch_size * self.world,
            c.seed,
            epoch,
            group_by_length=c.group_by_length,
            drop_last=self.world > 1,
        )
        local = [batch[self.rank :: self.world] for batch in glob]
        return [local[i : i + c.grad_accum] for i in range(0, len(local), c.grad_accum)]

    def _total_steps(self) -> int:
        if self.config.max_steps <= 0 and steps_per_epoch(self.config, len(self.lengths), self.world) == 0:
            raise DataError(
                f"The training set ({len(self.train_features)} rows) is smaller than one global batch "
                f"({self.config.batch_size} x {self.world} processes); lower batch_size."
            )
        return planned_steps(self.config, len(self.lengths), self.world)

    def _setup(self) -> None:
        c = self.config
        if c.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 autocast needs a CUDA device; use precision: bf16 on CPU.")
        if c.num_threads > 0:
            torch.set_num_threads(c.num_threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not self.sharded:
            self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval()
            if hasattr(self.task, "fused_loss"):
                self.task.fused_loss = False  # distillation compares full logits with the teacher's
        if c.gradient_checkpointing:
            base = getattr(self.unwrapped, "get_base_model", lambda: self.unwrapped)()
            if not hasattr(base, "gradient_checkpointing_enable"):
                raise ValueError(f"{type(base).__name__} does not support gradient checkpointing.")
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.sharded:  # before the optimizer: fully_shard replaces the parameters by their shards
            distributed.shard_model(
                self.model, self.device, torch.bfloat16 if c.precision == "bf16" else None, c.cpu_offload
            )
        self.total_steps = self._total_steps()
        warmup = c.warmup_steps or int(c.warmup_ratio * self.total_steps)
        self.optimizer = make_optimizer(self._param_groups(), c.optimizer, c.lr, c.weight_decay, c.momentum)
        self.schedule = Schedule(
            self.optimizer, c.scheduler, self.total_steps, warmup, c.min_lr, c.gamma, c.max_lr
        )
        self.scaler = torch.amp.GradScaler("cuda") if c.precision == "fp16" else None
        if self.world > 1 and not self.sharded:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.is_main:
            claim_output_dir(c.output_dir, c.resume, c.overwrite)
        os.makedirs(c.output_dir, exist_ok=True)

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group at `lr`, or, with `head_lr`, the task head in a group of its own.

        Why: a soft prompt learns at rates (1e-2 to 1e-1) a hundred times LoRA's, and the fresh task head trained
        beside it (on MPNet a 590k-parameter dense layer) gets that rate too unless it has its own
        (bench/results/scale_b2/head_lr.md measures it)."""
        trainable = self.trainable()
        if not trainable:
            raise ValueError("The model has no trainable parameters; check the method's options.")
        if self.config.head_lr is None:
            return [{"params": list(trainable.values())}]
        head = [p for n, p in trainable.items() if HEAD_MARK in n]
        if not head:
            raise ConfigError(
                "head_lr is set, but no task head is trained (no modules_to_save among the trainable parameters); "
                "remove head_lr, or train the head (a seq-cls task, or modules_to_save in the method's options)."
            )
        rest = [p for n, p in trainable.items() if HEAD_MARK not in n]
        head_group = {"params": head, "lr": self.config.head_lr}
        return [{"params": rest}, head_group] if rest else [head_group]

    def fingerprint(self) -> dict[str, Any]:
        """Everything that determines the run's trajectory: the config's trajectory fields, the world size, the
        size of the training set and of the trainable tensors, and the caller's `run_fingerprint`."""
        fields = {
            k: v for k, v in asdict(self.config).items() if k not in NOT_IN_FINGERPRINT | {"batch_size"}
        }
        trainable = self.trainable()
        global_batch, rows = self.config.batch_size * self.world, len(self.train_features)
        return flatten(
            {
                **fields,
                # the global batch and the batches of an epoch, not how many processes share them: a run saved
                # by 2 processes of batch 4 resumes on 1 process of batch 8
                "global_batch_size": global_batch,
                "batches_per_epoch": rows // global_batch
                if self.world > 1
                else math.ceil(rows / global_batch),
                "train_rows": rows,
                "trainable_tensors": len(trainable),
                "trainable_params": sum(p.numel() for p in trainable.values()),
                **self.run_fingerprint,
            }
        )

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """checkpoint-last.pt, replaced atomically. Under fsdp every process first writes its shards of the weights
        and optimizer state to a new folder, which checkpoint-last.pt then names (so the rename commits both)."""
        if self.sharded:
            tensors = {"sharded": self._save_shards()}
        elif self.is_main:
            tensors = {
                "weights": {n: p.detach().cpu().clone() for n, p in self.trainable().items()},
                "optimizer": self.optimizer.state_dict(),
            }
        if not self.is_main:
            return
        state = {
            **tensors,
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": _rng_state(),
            "position": asdict(self.pos),
            "config": asdict(self.config),
            "fingerprint": self.fingerprint(),
        }
        atomic_save(state, os.path.join(self.config.output_dir, CHECKPOINT))
        if self.sharded:
            distributed.drop_old_shards(self.config.output_dir, keep=state["sharded"])

    def _save_shards(self) -> str:
        return distributed.save_sharded(
            self.model, self.optimizer, self.trainable(), self.config.output_dir, self.pos.global_step
        )

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = self.trainable()
        missing = set(params) - set(weights)
        if missing:
            raise CheckpointError(
                f"The checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); "
                "it was written for a different model or method."
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(distributed.like_param(weights[name], p))

    def resume(self) -> bool:
        """Load checkpoint-last.pt if there is one; True when the run continues from it."""
        path = os.path.join(self.config.output_dir, CHECKPOINT)
        if not os.path.exists(path):
            return False
        # the weights and optimizer state are checked by _load_trained_state: under fsdp the file names its shards
        state = load_checkpoint(path, ("schedule", "scaler", "position", "rng"))
        self._check_fingerprint(state.get("fingerprint"))
        try:
            self._load_trained_state(state)
            self.schedule.load_state_dict(state["schedule"])
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self.pos = _Position(**state["position"])
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{path} does not fit this run ({type(err).__name__}: {err}); it was written by another model, "
                f"method or deltatune version. Delete it to start over."
            ) from err
        self.history = [r for r in self._read_log() if r.get("step", 0) <= self.pos.global_step]
        if self.is_main:  # drop what the killed run logged after its last checkpoint
            self._write_log(self.history)
        return True

    def _load_trained_state(self, state: dict[str, Any]) -> None:
        """The weights and optimizer state of a checkpoint: whole tensors (ddp, one process) or shards (fsdp)."""
        if ("sharded" in state) != self.sharded:
            written = "strategy: fsdp" if "sharded" in state else "strategy: ddp (or one process)"
            raise CheckpointError(
                f"{self.config.output_dir}'s checkpoint was written under {written}; resume it with that strategy."
            )
        if self.sharded:
            distributed.load_sharded(
                self.model, self.optimizer, self.trainable(), self.config.output_dir, state["sharded"]
            )
        else:
            self._load_weights(state["weights"])
            self.optimizer.load_state_dict(state["optimizer"])

    def _check_fingerprint(self, saved: dict[str, Any] | None) -> None:
        """Refuse to continue a checkpoint written with other settings (each change listed), unless asked to."""
        changes = (
            fingerprint_changes(saved, self.fingerprint())
            if saved is not None
            else ["the checkpoint has no fingerprint (an older deltatune wrote it)"]
        )
        if not changes:
            return
        listed = "; ".join(changes)
        if not self.config.resume_with_changes:
            raise RunError(
                f"{self.config.output_dir} holds a checkpoint of a run with other settings, so resuming would "
                f"continue its trajectory under a different recipe. Changed: {listed}. Restore those settings, "
                "pass overwrite to start over (or use another output_dir), or pass resume_with_changes to "
                "continue anyway."
            )
        if self.is_main:
            print(f"Resuming with changed settings (resume_with_changes): {listed}", file=sys.stderr)

    # --- logging --------------------------------------------------------------------------------
    def _read_log(self) -> list[dict[str, Any]]:
        path = os.path.join(self.config.output_dir, LOG)
        if not os.path.exists(path):
            return []
        records = []
        with open(path) as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill
        return records

    def _write_log(self, records: list[dict[str, Any]]) -> None:
        path = os.path.join(self.config.output_dir, LOG)
        with open(path + ".tmp", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)

    def log(self, record: dict[str, Any]) -> None:
        record = {"step": self.pos.global_step, **record}
        self.history.append(record)
        if not self.is_main:
            return
        with open(os.path.join(self.config.output_dir, LOG), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, self.pos.global_step)

    def _open_writer(self):
        if not (self.config.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("tensorboard is not installed; skipping TensorBoard events.", file=sys.stderr)
            return None
        return SummaryWriter(os.path.join(self.config.output_dir, "tensorboard"))

    # --- one optimizer step ---------------------------------------------------------------------
    def _autocast(self):
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _micro_loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        with self._autocast():
            out = self.task.loss(self.model, batch)
            loss = out.loss
            if self.teacher is not None:
                if out.logits is None:
                    raise ValueError("Distillation needs logits, but this task's loss returns none.")
                with torch.no_grad():
                    teacher_out = self.task.loss(self.teacher, batch)
                loss = distillation_loss(
                    out.logits,
                    teacher_out.logits,
                    out.loss,
                    self.config.distill_temperature,
                    self.config.distill_alpha,
                    out.distill_labels,
                )
        return loss, out.tokens

    def train_step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """Forward/backward over the micro-batches of one step, then one optimizer update."""
        self.model.train()
        total, tokens = 0.0, 0
        for i, rows in enumerate(micro_batches):
            batch = to_device(self.task.collate([self.train_features[j] for j in rows]), self.device)
            last = i == len(micro_batches) - 1
            ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
            sync = self.model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                loss, n = self._micro_loss(batch)
                scaled = loss / len(micro_batches)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += float(loss.detach()) / len(micro_batches)
            tokens += n
        grad_norm = self._clip()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # Methods that adapt while training (AdaLoRA) read the gradients here, so the hook runs before
        # zero_grad; it gets the 0-based index of the step just taken, as in peft's update_and_allocate loop.
        hook = getattr(self.unwrapped, "on_optimizer_step", None)
        if callable(hook):
            with self._whole_adapter_if_sharded():
                hook(self.pos.global_step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:  # every rank logs (and the loss-adaptive rule uses) the global batch's loss
            t = torch.tensor([total, float(tokens)], device=self.device)
            dist.all_reduce(t)
            total, tokens = float(t[0]) / self.world, int(t[1])
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step(total)
        self.pos.global_step += 1
        return {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    def _whole_adapter_if_sharded(self):
        """Under fsdp, a method that adapts while training (AdaLoRA) sees and edits whole adapter tensors."""
        if not (self.sharded and distributed.adapts_while_training(self.unwrapped)):
            return contextlib.nullcontext()
        model = self.unwrapped
        owned = [t for name in model.peft_config for t in model.adapter_entries(name).values()]
        return distributed.whole_parameters(model, owned, update=True)

    def _clip(self) -> float:
        params = list(self.trainable().values())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        return distributed.clip_grad_norm(params, max_norm)

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, features: Sequence[Any] | None = None, prefix: str = "eval") -> dict[str, Any]:
        """Scores on `features` (default: the eval set), computed on rank 0 and shared with every rank (under
        fsdp every rank computes them: each forward needs every rank's shards)."""
        features = self.eval_features if features is None else features
        result: list[Any] = [None]
        if (self.is_main or self.sharded) and features:
            model = self.unwrapped
            was_training = model.training
            model.eval()
            with self._autocast():
                scores = self.task.evaluate(
                    model, features, self.config.eval_batch_size or 2 * self.config.batch_size
                )
            model.train(was_training)
            distributed.reshard(model)
            result[0] = {f"{prefix}_{k.removeprefix('eval_')}": v for k, v in scores.items()}
        if self.world > 1 and not self.sharded:
            dist.broadcast_object_list(result, src=0)
        return result[0] or {}

    def _metric_name(self) -> tuple[str, bool]:
        name = self.config.metric or self.task.metric
        better = self.config.greater_is_better
        if better is None:
            better = self.task.greater_is_better if name == self.task.metric else "loss" not in name
        return (name if name.startswith("eval_") else f"eval_{name}"), better

    def _after_eval(self, scores: dict[str, Any]) -> None:
        """Keep the best weights; count evaluations without improvement for early stopping."""
        name, greater = self._metric_name()
        if name not in scores:
            raise ValueError(
                f"Metric {name!r} is not among the evaluation scores: {', '.join(sorted(scores))}."
            )
        value = float(scores[name])
        best = self.pos.best_metric
        if best is None or (value > best if greater else value < best):
            self.pos.best_metric, self.pos.bad_evals = value, 0
            if self.sharded or self.is_main:  # under fsdp, gathering the whole tensors takes every rank
                weights = distributed.gather_full(self.trainable())
            if self.is_main:
                atomic_save(
                    {"weights": weights, "step": self.pos.global_step, name: value},
                    os.path.join(self.config.output_dir, BEST),
                )
        else:
            self.pos.bad_evals += 1
            patience = self.config.early_stopping_patience
            self.pos.stopped_early = patience > 0 and self.pos.bad_evals >= patience

    def _eval_and_save(self) -> None:
        self._evaluated_at = self.pos.global_step
        if self.eval_features:
            scores = self.evaluate()
            self.log({k: v for k, v in scores.items() if not isinstance(v, dict)} | {"epoch": self.pos.epoch})
            self._after_eval(scores)
        self.save_checkpoint()

    # --- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        c = self.config
        self._setup()
        if c.resume and self.resume():
            if self.is_main:
                print(f"Resuming from step {self.pos.global_step} (epoch {self.pos.epoch}).", file=sys.stderr)
        else:
            if self.is_main:
                open(os.path.join(c.output_dir, LOG), "w").close()
            seed_everything(c.seed)  # the RNG stream a resumed run restores starts here
        self.writer = self._open_writer()
        if c.progress and (self.is_main or self.sharded) and not self._done():
            eta = self.eta_report()  # under fsdp every process runs the forward: each holds shards it needs
            if self.is_main:
                print(eta, file=sys.stderr)
        progress = self._progress()
        start, window_tokens, window_start = time.time() - self.pos.elapsed, 0, time.time()
        while not self._done():
            steps = self._batches_of_epoch(self.pos.epoch)
            for micro_batches in steps[self.pos.step_in_epoch :]:
                stats = self.train_step(micro_batches)
                self.pos.step_in_epoch += 1
                self.pos.elapsed = time.time() - start
                window_tokens += stats.pop("tokens")
                rate = window_tokens / max(1e-9, time.time() - window_start)
                record = {
                    **stats,
                    "epoch": self.pos.epoch + self.pos.step_in_epoch / len(steps),
                    "tokens_per_s": rate,
                    "elapsed_s": self.pos.elapsed,  # training time so far (resumes included): ETAs read it
                }
                if c.log_every and self.pos.global_step % c.log_every == 0:
                    self.log(record)
                    window_tokens, window_start = 0, time.time()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(
                        loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{rate:.0f}"
                    )
                evaluate_now = c.eval_every > 0 and self.pos.global_step % c.eval_every == 0
                if evaluate_now:
                    self._eval_and_save()
                elif c.save_every > 0 and self.pos.global_step % c.save_every == 0:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, record)
                if self._done():
                    break
            else:
                self.pos.epoch, self.pos.step_in_epoch = self.pos.epoch + 1, 0
                if c.eval_every == 0:
                    self._eval_and_save()
        if self.eval_features and self._evaluated_at != self.pos.global_step:
            # the last steps were never scored (the run ended mid-epoch, or on the last step of an epoch, which
            # leaves the epoch loop early): score them now, so the best checkpoint restored at the end can be
            # them; the adapter is on disk first, so an evaluation that fails never loses the training
            self.save_model()
            self._eval_and_save()
        if progress is not None:
            progress.close()
        return self._finish(time.time() - start)

    def save_model(self) -> None:
        """Write the trained model (a PeftModel: its adapter) to output_dir, if it can save itself. Under fsdp
        every rank gathers the adapter's whole tensors and rank 0 alone writes them: never a shard, never empty."""
        model = self.unwrapped
        if not hasattr(model, "save_pretrained"):
            return
        whole: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.sharded:  # the adapter's tensors (all of them, trainable or not), else the trained ones
            owned = [
                t for name in getattr(model, "peft_config", {}) for t in model.adapter_entries(name).values()
            ]
            whole = distributed.whole_parameters(model, owned or list(self.trainable().values()))
        with whole:
            if self.is_main:
                model.save_pretrained(self.config.output_dir)
                self.task.on_save(model, self.config.output_dir)  # extra files (diffusers' LoRA)

    @torch.no_grad()
    def eta_report(self) -> str:
        """A time estimate printed before the first step: the best of two forward passes of the next micro-batch
        (eval mode: no dropout, so no random number is drawn and the run is unchanged), times 3 for the backward
        pass, times the micro-batches still to run. The progress bar refines it once steps are timed."""
        steps = self._batches_of_epoch(self.pos.epoch)
        micro = (steps[self.pos.step_in_epoch :] or steps)[0]
        batch = to_device(self.task.collate([self.train_features[j] for j in micro[0]]), self.device)
        model = self.unwrapped
        was_training = model.training
        model.eval()
        times = []
        for _ in range(2):
            begin = time.perf_counter()
            with self._autocast():
                self.task.loss(model, batch)
            times.append(time.perf_counter() - begin)
        model.train(was_training)
        if self.sharded:
            distributed.reshard(model)  # no backward follows to free the gathered root unit
        remaining = self.total_steps - self.pos.global_step
        seconds = 3 * min(times) * len(micro) * remaining
        return (
            f"ETA: about {format_duration(seconds)} for {remaining:,} steps (estimated from a forward pass of "
            f"{min(times):.2f} s; evaluation not included)."
        )

    def _done(self) -> bool:
        c = self.config
        if self.pos.stopped_early or self.pos.global_step >= self.total_steps:
            return True
        return c.max_steps <= 0 and self.pos.epoch >= math.ceil(c.epochs)

    def _progress(self):
        if not (self.config.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.pos.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    # --- the end --------------------------------------------------------------------------------
    def _bytes_per_rank(self) -> dict[str, list[float]]:
        """What each process holds: parameter and optimizer-state bytes (its shards under fsdp) and peak memory."""
        mine = (
            distributed.local_bytes(self.unwrapped.parameters()),
            distributed.optimizer_bytes(self.optimizer),
            peak_memory_mb(self.device),
        )
        ranks = _gather(mine, self.world)
        return {
            "param_bytes_per_rank": [r[0] for r in ranks],
            "optimizer_bytes_per_rank": [r[1] for r in ranks],
            "peak_memory_mb_per_rank": [r[2] for r in ranks],
        }

    def _finish(self, wall_time: float) -> dict[str, Any]:
        c = self.config
        best_path = os.path.join(c.output_dir, BEST)
        if self.world > 1:  # every rank reads the best weights rank 0 may just have written
            dist.barrier()
        if (
            c.load_best_at_end and self.pos.best_metric is not None
        ):  # written by this run (or the one resumed)
            self._load_weights(load_checkpoint(best_path)["weights"])
        self.save_model()  # before the final evaluation: an evaluation that fails never loses the training
        final = self.evaluate() if self.eval_features else {}
        trainable = sum(p.numel() for p in self.trainable().values())
        total = sum(p.numel() for p in self.unwrapped.parameters())
        summary = {
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / max(1, total),
            "steps": self.pos.global_step,
            "stopped_early": self.pos.stopped_early,
            "wall_time_s": wall_time,
            "peak_memory_mb": peak_memory_mb(self.device),
            "world_size": self.world,
            "strategy": self.config.strategy,
            **self._bytes_per_rank(),
            "final": {k: v for k, v in final.items()},
        }
        if self.is_main:
            if not c.keep_checkpoint:
                for name in (CHECKPOINT, BEST):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(c.output_dir, name))
            with open(os.path.join(c.output_dir, SUMMARY), "w") as fh:
                json.dump(summary, fh, indent=2)
            if self.writer is not None:
                self.writer.close()
            if c.plot:
                plot_curves(self.history, os.path.join(c.output_dir, "curves.png"))
            if c.progress:
                print_summary(summary)
        return summary


def format_duration(seconds: float) -> str:
    """12 s, 4.5 min, 2.3 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _gather(value: Any, world: int) -> list[Any]:
    out = [value] * world
    if world > 1:
        dist.all_gather_object(out, value)
    return out


def plot_curves(history: list[dict[str, Any]], path: str) -> None:
    """Training loss (and every numeric eval score) against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    eval_keys = sorted(
        {k for r in history for k, v in r.items() if k.startswith("eval_") and isinstance(v, float)}
    )
    panels = (["loss"] if train else []) + eval_keys
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, panels):
        points = train if key == "loss" else [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if key != "loss" else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    table.add_row(
        "trainable / total params",
        f"{summary['trainable_params']:,} / {summary['total_params']:,} ({summary['trainable_percent']:.3f}%)",
    )
    table.add_row("steps", str(summary["steps"]) + (" (stopped early)" if summary["stopped_early"] else ""))
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    table.add_row("peak memory", f"{summary['peak_memory_mb']:.0f} MiB")
    for key, value in summary["final"].items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    Console(stderr=True).print(table)
