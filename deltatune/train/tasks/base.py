"""What every task shares: the `Task` contract the trainer talks to, and small batch helpers.

The trainer knows nothing about text, tags or images; it asks its task for five things:
`prepare(table, source)` -> features, `lengths(features)`, `collate(features)` -> batch,
`loss(model, batch)` -> StepOutput, and `evaluate(model, features, batch_size)` -> metrics.
A task used from recipes also says how to build itself from a recipe (`from_run`), which columns it reads by
default and which labels it learns (`fit_labels`); `deltatune.train.tasks.TASKS` lists them by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import images as I
from deltatune.train.data import LabelMap, pad_batch
from deltatune.train.distributed import compute_device


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor | None = None
    distill_labels: torch.Tensor | None = None  # aligned with logits' leading dims; -100 = leave out
    tokens: int = 0  # tokens (or examples) processed, for throughput


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def real_token_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token logits without the soft prompt's positions: prompt tuning and P-tuning return logits for their
    virtual tokens too (in front, as peft does), which no label belongs to."""
    if labels.dim() == 2 and logits.dim() == 3 and logits.shape[1] > labels.shape[1]:
        return logits[:, -labels.shape[1] :]
    return logits


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch minus the fields only the loss needs."""
    return {k: v for k, v in batch.items() if k not in ("labels", "label_ids")}


def _batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _device_of(model: nn.Module) -> torch.device:
    try:
        return compute_device(
            next(model.parameters())
        )  # a sharded model's CPU-offloaded shards compute on the GPU
    except StopIteration:
        return torch.device("cpu")


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode inside the block (dropout off, batch norm on its running statistics), the old mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Task:
    """Shared defaults: token features padded per batch, loss is the cross-entropy on `labels`."""

    name = "task"
    metric = "eval_loss"  # the default metric for early stopping / best checkpoint
    greater_is_better = False
    task_type: str | None = None  # the adapter config's task_type (peft's TaskType value)
    default_columns: tuple[str | None, str | None] = (None, None)  # (text, label) when a recipe names none
    default_pair_column: str | None = None  # a second text column the task reads (QA: the context)

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> Task:
        """Build the task a recipe describes (`run` is a deltatune.train.recipe.RunConfig)."""
        raise TypeError(
            f"Task {cls.name!r} is available from Python (deltatune.train.tasks), not from recipes."
        )

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap | None:
        """The label set a run learns from its training table (None: the task has no label set)."""
        return None

    # --- what a task may change about a recipe's run (each default is what the other tasks do) ----------------
    recipe_paths: tuple[str, ...] = ()  # dotted recipe keys of further files, resolved like train_file

    @classmethod
    def load_splits(cls, run: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]] | None:
        """(tables, data report, sources) for a task that reads its data itself (the report's `summary` is what
        the terminal shows); None: the recipe's train/eval/test files."""
        return None

    @classmethod
    def model_task(cls, run: Any) -> str:
        """Which head `load_model_and_tokenizer` loads (a key of deltatune.models.TASK_AUTO_CLASS)."""
        return run.task

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the adapter is added to (and loaded onto): the base model, or a module built around it."""
        return model

    def modules_to_save(self, model: nn.Module) -> list[str]:
        """Modules of `model` (`wrap_model`'s result) that train in full beside the adapter and are saved with it
        (heads that start fresh)."""
        return []

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """The modules of `model` an adapter targets when a recipe leaves `target_modules` out (for methods that
        target modules by default, like LoRA and IA3); None: the method's default (every linear layer)."""
        return None

    @classmethod
    def label_items(cls, value: Any) -> list[Any]:
        """The labels one cell of the label column holds (a list for token tags)."""
        return value if isinstance(value, list) else [value]

    @classmethod
    def row_columns(cls, run: Any) -> tuple[list[str], str | None]:
        """The columns that make a row's input (two rows with the same input are copies, and one in both train
        and eval is a leak) and its answer (None: no answer to compare)."""
        return [c for c in (run.text_column, run.text_pair_column) if c], run.label_column

    @classmethod
    def build_model(cls, run: Any, labels: LabelMap | None) -> tuple[nn.Module, Any] | None:
        """(model, processor) for a recipe, when this task builds its own model (vision backbones, diffusion
        pipelines); None: a transformers model with the task's head is loaded from `run.model`."""
        return None

    @classmethod
    def adapter_task_type(cls, run: Any) -> str | None:
        """The adapter config's task_type for this run (it decides which head is saved with the adapter)."""
        return cls.task_type

    @classmethod
    def head_kwargs(cls, labels: LabelMap | None) -> dict[str, Any]:
        """from_pretrained kwargs that size a fresh head for the labels the run learns (a checkpoint's own head of
        another size is replaced, not an error: the run trains the head it needs)."""
        if labels is None:
            return {}
        return {
            "ignore_mismatched_sizes": True,
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels.names)),
            "label2id": {n: i for i, n in enumerate(labels.names)},
        }

    def __init__(self, tokenizer: Any = None, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def lengths(self, features: Sequence[dict[str, Any]]) -> list[int]:
        return [len(f["input_ids"]) if "input_ids" in f else 1 for f in features]

    def collate(self, features: Sequence[Any]) -> Any:
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        return pad_batch(list(features), pad_id)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        labels = batch["labels"]
        logits = real_token_logits(logits_of(model(**model_inputs(batch))), labels)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
        )
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.shape[0]
        return StepOutput(loss, logits, labels if labels.dim() == logits.dim() - 1 else None, tokens)

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, features: Sequence[Any], batch_size: int) -> float:
        device, total, count = _device_of(model), 0.0, 0
        for chunk in _batches(features, batch_size):
            out = self.loss(model, to_device(self.collate(chunk), device))
            total += float(out.loss) * len(chunk)
            count += len(chunk)
        return total / max(1, count)

    def evaluate(self, model: nn.Module, features: Sequence[Any], batch_size: int) -> dict[str, Any]:
        return {"eval_loss": self.eval_loss(model, features, batch_size)}

    def on_save(self, model: nn.Module, output_dir: str) -> None:
        """Called after a run saves its adapter: a task may write extra files (text-to-image writes the LoRA in
        diffusers' format too)."""
        return None

    def calibrate(self, model: nn.Module, features: Sequence[Any], batch_size: int) -> dict[str, Any]:
        """Fit what the task decides after training on held-out features (multi-label: the per-label thresholds);
        returns the recipe keys to save with the run. Most tasks have nothing to fit."""
        return {}

    def report(self, scores: dict[str, Any], folder: str) -> None:
        """Write what a reader wants to see beside the numbers (classification: the per-class table in the log and
        the confusion matrix as a PNG in the run folder). Most tasks have nothing beyond their metrics."""
        return None

    def describe(self) -> dict[str, Any]:
        """What `eval` and `predict` need to rebuild this task (kept in the run's saved config)."""
        return {"task": self.name}


class ImageRowsTask(Task):
    """A task whose rows name images (paths, or base64 when served) with per-image targets: detection and
    segmentation share how they are built; each sets its own `default_image_size`."""

    default_image_size = 224

    def __init__(
        self,
        labels: LabelMap | None = None,
        image_size: int | None = None,
        image_column: str = "image",
        read_files: bool = True,
        data_dir: str | None = None,
    ) -> None:
        super().__init__(None)
        self.labels, self.image_column = labels, image_column
        self.image_size = image_size or self.default_image_size
        self.read_files = read_files  # a server answering the network sets False: base64 images only
        self.data_dir = data_dir  # relative image paths of tables split from the training file start here

    def deliver_image(self, result: dict[str, Any], image: Any, row: dict[str, Any]) -> None:
        """Add a drawn picture to a prediction as the row asks: written to `output` and/or returned as base64."""
        if row.get("output"):
            result["output"] = I.save_image(image, row["output"])
        if row.get("return_image"):
            result["image_png_base64"] = I.png_base64(image)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels.names if self.labels else None}
