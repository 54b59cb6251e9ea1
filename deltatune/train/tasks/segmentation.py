"""Semantic segmentation: images plus mask PNGs (one class index per pixel) -> a class per pixel.

Data: CSV/JSONL rows of `image` and `mask` (paths; relative ones are taken from the data file's folder). Mask
value 255 means "no label" and counts nowhere. Class names come from the recipe's `labels` (index order); without
them the classes are the indices found in the training masks. The model is torchvision's LR-ASPP head on a
torchvision/timm backbone (`deltatune.integrations.vision.build_segmenter`): by default LoRA and IA3 adapt the
backbone's ungrouped convolutions (and linear layers) and the head (`classifier`, fresh) trains in full. Metrics: pixel accuracy,
mean IoU and IoU per class; `predict` writes coloured masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from deltatune.train import images as I
from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import ImageRowsTask, StepOutput, _batches, _device_of, evaluating, to_device

IGNORE = 255
MASK_COLUMN = "mask"


class SegmentationTask(ImageRowsTask):
    """A class per pixel; images (bilinear) and masks (nearest) are resized to `image_size` squared."""

    name = "segmentation"
    default_image_size = 128
    metric = "mean_iou"
    greater_is_better = True

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> SegmentationTask:
        folder = I.data_dir(run.train_file)
        return cls(labels, run.image_size, run.image_column or "image", data_dir=folder)

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap:
        """Without `labels` in the recipe: the class indices present in the training masks, 0..max."""
        folder = I.data_dir(run.train_file)
        found = set()
        for path in table[MASK_COLUMN] if MASK_COLUMN in table.column_names else []:
            found |= set(I.open_mask(path, folder).unique().tolist())
        found.discard(IGNORE)
        if not found:
            raise DataError("No class indices found in the training masks; give the class names as `labels`.")
        return LabelMap([str(i) for i in range(max(found) + 1)])

    @classmethod
    def row_columns(cls, run: Any) -> tuple[list[str], str | None]:
        return [run.image_column or "image"], None  # a row is its image

    @classmethod
    def build_model(cls, run: Any, labels: LabelMap | None) -> tuple[nn.Module, Any]:
        from deltatune.integrations.vision import build_segmenter

        return build_segmenter(run.model, len(labels), run.weights, run.model_options), None

    def default_targets(self, model: nn.Module) -> list[str]:
        from deltatune.integrations.vision import backbone_targets

        return backbone_targets(model, "backbone.body")

    def modules_to_save(self, model: nn.Module) -> list[str]:
        return ["classifier"]  # the LR-ASPP head starts fresh

    # --- data -----------------------------------------------------------------------------------
    def _mask(self, path: str, folder: str | None, where: str) -> torch.Tensor:
        mask = I.open_mask(path, folder)
        bad = (mask >= len(self.labels)) & (mask != IGNORE)
        if bad.any():
            raise DataError(
                f"{where}: mask value {int(mask[bad][0])} is not a class index 0..{len(self.labels) - 1} "
                f"(or {IGNORE} for no label); the labels are {self.labels.names}."
            )
        if mask.shape != (self.image_size, self.image_size):
            small = Image.fromarray(mask.to(torch.uint8).numpy()).resize(
                (self.image_size,) * 2, Image.NEAREST
            )
            mask = torch.from_numpy(np.asarray(small).astype(np.int64))
        return mask.to(torch.uint8)

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        for column in (self.image_column, MASK_COLUMN):
            if column not in table.column_names:
                raise DataError(f"{source} has no {column!r} column (columns: {table.column_names}).")
        folder, features = I.data_dir(source, self.data_dir), []
        for i, row in enumerate(table):
            image = I.open_image(row[self.image_column], folder, self.read_files)
            features.append(
                {
                    "pixels": I.to_tensor(image, self.image_size),
                    "labels": self._mask(row[MASK_COLUMN], folder, f"{source} row {i}"),
                }
            )
        return features

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pixel_values": torch.stack([f["pixels"] for f in features]).float() / 255,
            "labels": torch.stack([f["labels"] for f in features]).long(),
        }

    # --- training and scores --------------------------------------------------------------------
    def logits(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        from deltatune.integrations.vision import normalize

        return model(normalize(pixels))["out"]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        from deltatune.integrations.vision import freeze_norm_statistics

        freeze_norm_statistics(model)
        logits = self.logits(model, batch["pixel_values"])
        loss = F.cross_entropy(logits.float(), batch["labels"], ignore_index=IGNORE)
        return StepOutput(loss, None, None, len(logits))

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        device, predictions, total = _device_of(model), [], 0.0
        with torch.no_grad(), evaluating(model):
            for chunk in _batches(features, batch_size):
                batch = to_device(self.collate(chunk), device)
                logits = self.logits(model, batch["pixel_values"]).float()
                total += float(F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE)) * len(chunk)
                predictions += list(logits.argmax(1).cpu())
        result = M.segmentation_scores(
            predictions, [f["labels"] for f in features], self.labels.names, IGNORE
        )
        result["eval_loss"] = total / max(1, len(features))
        return result

    @torch.no_grad()
    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Per row (`image`, optional `output` path for the coloured mask PNG and `return_image` for it as base64):
        the share of pixels of each class, at the original image size."""
        device, results = _device_of(model), []
        for chunk in _batches(list(rows), batch_size):
            pictures = [I.open_image(r[self.image_column], None, self.read_files) for r in chunk]
            pixels = torch.stack([I.to_tensor(p, self.image_size) for p in pictures]).float().to(device) / 255
            with evaluating(model):
                logits = self.logits(model, pixels).float()
            for row, picture, one in zip(chunk, pictures, logits):
                width, height = picture.size
                mask = F.interpolate(one[None], size=(height, width), mode="bilinear")[0].argmax(0).cpu()
                counts = torch.bincount(mask.reshape(-1), minlength=len(self.labels)).double() / mask.numel()
                result: dict[str, Any] = {
                    "class_fractions": {
                        n: round(float(c), 4) for n, c in zip(self.labels.names, counts) if c > 0
                    }
                }
                coloured = I.colour_mask(mask, len(self.labels))
                self.deliver_image(result, coloured, row)
                results.append(result)
        return results
