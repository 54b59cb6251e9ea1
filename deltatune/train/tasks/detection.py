"""Object detection: images with boxes -> a detector whose backbone is adapted and whose heads train in full.

Data: COCO JSON (read by `deltatune.train.data`), or CSV/JSONL rows of `image` (path or base64), `boxes`
([[x1, y1, x2, y2], ...] in pixels) and `labels` (a class name per box). The model is torchvision's FCOS over a
feature pyramid on a torchvision/timm backbone (`deltatune.integrations.vision.build_detector`); by default LoRA
and IA3 adapt every ungrouped convolution (and linear layer) of the backbone, and the pyramid and head (fresh) train in full, saved
with the adapter as `modules_to_save`. Metrics are COCO's (mAP, mAP@50, recall@100) through torchmetrics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltatune.train import images as I
from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import ImageRowsTask, StepOutput, _batches, _device_of, evaluating, to_device

EXAMPLES = {"boxes": "[[10, 20, 50, 60]]", "labels": '["cat"]'}


def listed(value: Any, column: str, where: str) -> list[Any]:
    """A row's `boxes` or `labels`: a list, or its JSON text (a CSV cell holds `[[x1, y1, x2, y2], ...]` and
    `["cat", "dog"]`); nothing means no objects."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            example = EXAMPLES[column]
            raise DataError(
                f"{where}: {column} must be a JSON list, e.g. {example}; got {value[:60]!r}."
            ) from err
    if not isinstance(value, list):
        raise DataError(f"{where}: {column} must be a list, got {type(value).__name__}.")
    return value


class DetectionTask(ImageRowsTask):
    """Boxes and a class per box; images are resized to `image_size` squared (boxes scaled with them)."""

    name = "detection"
    default_image_size = 160
    metric = "map"
    greater_is_better = True
    default_columns = (None, "labels")

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> DetectionTask:
        folder = I.data_dir(run.train_file)
        return cls(labels, run.image_size, run.image_column or "image", data_dir=folder)

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap:
        return LabelMap.from_values([x for v in table[run.label_column] for x in cls.label_items(v)])

    @classmethod
    def label_items(cls, value: Any) -> list[Any]:
        return listed(value, "labels", "the data")

    @classmethod
    def row_columns(cls, run: Any) -> tuple[list[str], str | None]:
        return [run.image_column or "image"], None  # a row is its image

    @classmethod
    def build_model(cls, run: Any, labels: LabelMap | None) -> tuple[nn.Module, Any]:
        from deltatune.integrations.vision import build_detector

        model = build_detector(
            run.model, len(labels), run.image_size or cls.default_image_size, run.weights, run.model_options
        )
        return model, None

    def default_targets(self, model: nn.Module) -> list[str]:
        from deltatune.integrations.vision import backbone_targets

        return backbone_targets(model, "backbone.body")

    def modules_to_save(self, model: nn.Module) -> list[str]:
        return ["fpn", "head"]  # fresh: trained in full

    # --- data -----------------------------------------------------------------------------------
    def _boxes(self, row: dict[str, Any], size: tuple[int, int], where: str) -> torch.Tensor:
        given, labels = listed(row.get("boxes"), "boxes", where), listed(row.get("labels"), "labels", where)
        try:
            boxes = torch.tensor(given, dtype=torch.float32).reshape(-1, 4)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(
                f"{where}: boxes must be [[x1, y1, x2, y2], ...] in pixels, got {given!r:.80}."
            ) from err
        if len(boxes) != len(labels):
            raise DataError(f"{where}: {len(boxes)} boxes but {len(labels)} labels.")
        if len(boxes) and not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
            raise DataError(f"{where}: every box must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1.")
        width, height = size
        return boxes * torch.tensor([self.image_size / width, self.image_size / height] * 2)

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        if self.image_column not in table.column_names:
            raise DataError(f"{source} has no {self.image_column!r} column (columns: {table.column_names}).")
        if self.labels is None:
            self.labels = LabelMap.from_values([x for v in table["labels"] for x in self.label_items(v)])
        folder, features = I.data_dir(source, self.data_dir), []
        for i, row in enumerate(table):
            image = I.open_image(row[self.image_column], folder, self.read_files)
            where = f"{source} row {i}"
            features.append(
                {
                    "pixels": I.to_tensor(image, self.image_size),
                    "boxes": self._boxes(row, image.size, where),
                    "labels": torch.tensor(
                        [self.labels.encode(x, source) for x in listed(row["labels"], "labels", where)],
                        dtype=torch.long,
                    ),
                }
            )
        return features

    def lengths(self, features) -> list[int]:
        return [1] * len(features)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "images": [f["pixels"].float() / 255 for f in features],
            "targets": [{"boxes": f["boxes"], "labels": f["labels"]} for f in features],
        }

    # --- training and scores --------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        from deltatune.integrations.vision import freeze_norm_statistics

        freeze_norm_statistics(model)
        losses = model(
            batch["images"], batch["targets"]
        )  # FCOS in train mode: focal, GIoU and centerness losses
        return StepOutput(sum(losses.values()), None, None, len(batch["images"]))

    @torch.no_grad()
    def detect(
        self, model: nn.Module, pixels: Sequence[torch.Tensor], batch_size: int
    ) -> list[dict[str, Any]]:
        """Detections (boxes in `image_size` pixels, scores, class ids) for uint8 images, in eval mode."""
        device, out = _device_of(model), []
        with evaluating(model):
            for chunk in _batches(list(pixels), batch_size):
                images = to_device([p.float() / 255 for p in chunk], device)
                out += [{k: v.cpu() for k, v in d.items()} for d in model(images)]
        return out

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        found = self.detect(model, [f["pixels"] for f in features], batch_size)
        return M.detection_scores(found, features, self.labels.names)

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Per row (`image`, optional `min_score` (default 0.5), `output` path for the drawn image and
        `return_image` for it as base64 PNG): the detections in the original image's pixels."""
        pictures = [I.open_image(r[self.image_column], None, self.read_files) for r in rows]
        found = self.detect(model, [I.to_tensor(p, self.image_size) for p in pictures], batch_size)
        results = []
        for row, picture, det in zip(rows, pictures, found):
            keep = det["scores"] >= float(row.get("min_score", 0.5))
            width, height = picture.size
            boxes = det["boxes"][keep] * torch.tensor([width / self.image_size, height / self.image_size] * 2)
            ids = det["labels"][keep].tolist()
            names = [self.labels.names[c] for c in ids]
            result: dict[str, Any] = {
                "detections": [
                    {"label": n, "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
                    for n, s, b in zip(names, det["scores"][keep], boxes)
                ]
            }
            if row.get("output") or row.get("return_image"):
                captions = [f"{n} {float(s):.2f}" for n, s in zip(names, det["scores"][keep])]
                drawn = I.draw_boxes(I.to_tensor(picture), boxes, captions, len(self.labels), ids)
                self.deliver_image(result, drawn, row)
            results.append(result)
        return results
