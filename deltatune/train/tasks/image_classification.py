"""Image classification from an image folder or (tensor, label) pairs."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import StepOutput, Task, _batches, _device_of, logits_of, to_device

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


class ImageClassificationTask(Task):
    """Images -> one label. Features come from a tensor dataset ((image tensor, label) pairs) or an image folder
    (root/<class>/*.png); an image processor, when given, turns PIL images into `pixel_values`."""

    name = "image-cls"
    metric = "accuracy"
    greater_is_better = True

    def __init__(self, processor: Any = None, labels: LabelMap | None = None, image_size: int = 32) -> None:
        super().__init__(None)
        self.processor, self.labels, self.image_size = processor, labels, image_size

    def _pixels(self, path: str) -> torch.Tensor:
        from PIL import Image

        image = Image.open(path).convert("RGB")
        if self.processor is not None:
            return self.processor(image, return_tensors="pt")["pixel_values"][0]
        image = image.resize((self.image_size, self.image_size))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255.0

    def prepare(self, data, source: str = "the data") -> list[dict[str, Any]]:
        if isinstance(data, str):
            rows = image_folder(data)
            if self.labels is None:
                self.labels = LabelMap.from_values([cls for _, cls in rows])
            return [
                {"pixel_values": self._pixels(p), "labels": self.labels.encode(c, source)} for p, c in rows
            ]
        pairs = [(x, int(y)) for x, y in data]
        if self.labels is None:
            self.labels = LabelMap.from_values([y for _, y in pairs])
        return [{"pixel_values": x, "labels": self.labels.encode(y, source)} for x, y in pairs]

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features):
        return {
            "pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        pixels = batch["pixel_values"]
        logits = logits_of(model(pixel_values=pixels) if hasattr(model, "config") else model(pixels))
        return StepOutput(
            F.cross_entropy(logits.float(), batch["labels"]), logits, batch["labels"], len(pixels)
        )

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        device, preds, total = _device_of(model), [], 0.0
        with torch.no_grad():
            for chunk in _batches(features, batch_size):
                out = self.loss(model, to_device(self.collate(chunk), device))
                total += float(out.loss) * len(chunk)
                preds += out.logits.argmax(-1).tolist()
        result = M.classification_scores(preds, [f["labels"] for f in features], self.labels.names)
        result["eval_loss"] = total / max(1, len(features))
        return result

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels.names if self.labels else None}
