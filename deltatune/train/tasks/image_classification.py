"""Image classification from a table of image paths and labels, an image folder or (tensor, label) pairs.

From a recipe, `model` is either a transformers model (ViT, ...) or a CNN named `torchvision:<arch>` /
`timm:<arch>` with pretrained `weights` (safetensors); the CNN's last linear layer is sized for the labels and
trains in full (`modules_to_save`), and LoRA/IA3 adapt its ungrouped convolutions and other linear layers by default. Batch-norm statistics
stay the pretrained ones while adapting (see `deltatune.integrations.vision.freeze_norm_statistics`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import images as I
from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import (
    StepOutput,
    Task,
    _batches,
    _device_of,
    evaluating,
    logits_of,
    to_device,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def image_folder(root: str) -> list[tuple[str, str]]:
    """(path, class name) for every image under root/<class name>/."""
    if not os.path.isdir(root):
        raise DataError(f"Image folder not found: {root}.")
    rows = [
        (os.path.join(root, cls, name), cls)
        for cls in sorted(os.listdir(root))
        if os.path.isdir(os.path.join(root, cls))
        for name in sorted(os.listdir(os.path.join(root, cls)))
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
    if not rows:
        raise DataError(f"{root} holds no images in class sub-folders (expected root/<class>/<image>.png).")
    return rows


def is_cnn_name(name: str) -> bool:
    return str(name).startswith(("torchvision:", "timm:"))


class ImageClassificationTask(Task):
    """Images -> one label. Features come from a table (`image` paths or base64, and `label`), a tensor dataset
    ((image tensor, label) pairs) or an image folder (root/<class>/*.png); an image processor, when given, turns
    PIL images into `pixel_values` (without one: resized to image_size and scaled to [0, 1])."""

    name = "image-cls"
    metric = "accuracy"
    greater_is_better = True
    default_columns = (None, "label")

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> ImageClassificationTask:
        folder = I.data_dir(run.train_file)
        return cls(
            tokenizer,
            labels,
            run.image_size or 224,
            run.image_column or "image",
            run.label_column,
            data_dir=folder,
        )

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap:
        return LabelMap.from_values(table[run.label_column])

    @classmethod
    def row_columns(cls, run: Any) -> tuple[list[str], str | None]:
        return [run.image_column or "image"], run.label_column  # a row is its image

    @classmethod
    def build_model(cls, run: Any, labels: LabelMap | None) -> tuple[nn.Module, Any] | None:
        if not is_cnn_name(run.model):
            return None  # a transformers model: loaded with its image processor
        from deltatune.integrations.vision import ImageTransform, build_classifier

        model, _ = build_classifier(run.model, len(labels), run.weights, run.model_options)
        return model, ImageTransform(run.image_size or 224)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        from deltatune.integrations.vision import backbone_targets

        if hasattr(model, "config"):  # a transformers model: the method's default (every linear layer)
            return None
        return backbone_targets(model, skip=tuple(self.modules_to_save(model)))  # a CNN: convolutions too

    def modules_to_save(self, model: nn.Module) -> list[str]:
        from deltatune.integrations.vision import last_linear_name

        return [last_linear_name(model)]  # the fresh classifier

    def __init__(
        self,
        processor: Any = None,
        labels: LabelMap | None = None,
        image_size: int = 32,
        image_column: str = "image",
        label_column: str = "label",
        read_files: bool = True,
        data_dir: str | None = None,
    ) -> None:
        super().__init__(None)
        self.processor, self.labels, self.image_size = processor, labels, image_size
        self.image_column, self.label_column = image_column, label_column
        self.read_files = read_files  # a server answering the network sets False: base64 images only
        self.data_dir = data_dir  # relative image paths of tables split from the training file start here

    def _pixels_of(self, image) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(image, return_tensors="pt")["pixel_values"][0]
        return I.to_tensor(image, self.image_size).float() / 255.0

    def _pixels(self, path: str, folder: str | None = None) -> torch.Tensor:
        return self._pixels_of(I.open_image(path, folder, self.read_files))

    def prepare(self, data, source: str = "the data") -> list[dict[str, Any]]:
        if isinstance(data, str):
            rows = image_folder(data)
            if self.labels is None:
                self.labels = LabelMap.from_values([cls for _, cls in rows])
            return [
                {"pixel_values": self._pixels(p), "labels": self.labels.encode(c, source)} for p, c in rows
            ]
        if hasattr(data, "column_names"):  # a table of image paths (or base64) and labels
            if self.image_column not in data.column_names:
                raise DataError(
                    f"{source} has no {self.image_column!r} column (columns: {data.column_names})."
                )
            folder = I.data_dir(source, self.data_dir)
            if self.labels is None:
                self.labels = LabelMap.from_values(data[self.label_column])
            return [
                {
                    "pixel_values": self._pixels(r[self.image_column], folder),
                    "labels": self.labels.encode(r[self.label_column], source),
                }
                for r in data
            ]
        pairs = [(x, int(y)) for x, y in data]
        if self.labels is None:
            self.labels = LabelMap.from_values([y for _, y in pairs])
        return [{"pixel_values": x, "labels": self.labels.encode(y, source)} for x, y in pairs]

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features):
        batch = {"pixel_values": torch.stack([f["pixel_values"] for f in features])}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    def logits(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return logits_of(model(pixel_values=pixels) if hasattr(model, "config") else model(pixels))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        from deltatune.integrations.vision import freeze_norm_statistics

        freeze_norm_statistics(model)
        pixels = batch["pixel_values"]
        logits = self.logits(model, pixels)
        return StepOutput(
            F.cross_entropy(logits.float(), batch["labels"]), logits, batch["labels"], len(pixels)
        )

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        device, preds, total = _device_of(model), [], 0.0
        with torch.no_grad(), evaluating(model):
            for chunk in _batches(features, batch_size):
                out = self.loss(model, to_device(self.collate(chunk), device))
                total += float(out.loss) * len(chunk)
                preds += out.logits.argmax(-1).tolist()
        result = M.classification_scores(preds, [f["labels"] for f in features], self.labels.names)
        result["eval_loss"] = total / max(1, len(features))
        return result

    @torch.no_grad()
    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Per row (`image`: a path or base64): the label, its probability and every label's."""
        device, results = _device_of(model), []
        for chunk in _batches(list(rows), batch_size):
            pixels = torch.stack([self._pixels(r[self.image_column]) for r in chunk]).to(device)
            with evaluating(model):
                probs = self.logits(model, pixels).float().softmax(-1).cpu()
            names = self.labels.names
            results += [
                {
                    "label": names[int(p.argmax())],
                    "score": float(p.max()),
                    "scores": dict(zip(names, p.tolist())),
                }
                for p in probs
            ]
        return results

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels.names if self.labels else None}
