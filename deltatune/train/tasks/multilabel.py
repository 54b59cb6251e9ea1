"""Multi-label classification: one text -> any subset of the labels (a label column holding lists)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import StepOutput, logits_of, model_inputs
from deltatune.train.tasks.classification import SequenceClassificationTask

THRESHOLD_GRID = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95


def label_list(value: Any, column: str, source: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise DataError(
            f'{source}: multi-label needs a list of labels in column {column!r} (JSON: ["a", "b"], or [] '
            f"for none), got {value!r}."
        )
    return list(value)


class MultiLabelClassificationTask(SequenceClassificationTask):
    """Each row has a list of labels (possibly empty): one sigmoid output per label, binary cross-entropy, and a
    decision threshold per label. Thresholds start at 0.5; `calibrate` picks each label's F1-best threshold on
    held-out data after training (a recipe does it on the validation split and reports the test split with them,
    so no score is measured on the data its thresholds were chosen on)."""

    name = "multi-label"
    metric = "f1_micro"
    greater_is_better = True

    @classmethod
    def model_task(cls, run: Any) -> str:
        return "seq-cls"

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> MultiLabelClassificationTask:
        return cls(
            tokenizer,
            run.text_column,
            run.label_column,
            run.text_pair_column,
            labels,
            run.max_length,
            run.thresholds,
        )

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap:
        source = run.train_file or "the training data"
        return LabelMap.from_values(
            [x for value in table[run.label_column] for x in label_list(value, run.label_column, source)]
        )

    @classmethod
    def head_kwargs(cls, labels: LabelMap | None) -> dict[str, Any]:
        return {**super().head_kwargs(labels), "problem_type": "multi_label_classification"}

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "text",
        label_column: str = "labels",
        text_pair_column: str | None = None,
        labels: LabelMap | None = None,
        max_length: int = 256,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        super().__init__(tokenizer, text_column, label_column, text_pair_column, labels, max_length)
        self.thresholds = list(thresholds) if thresholds else None
        if self.thresholds and labels is not None and len(self.thresholds) != len(labels):
            raise DataError(f"{len(self.thresholds)} thresholds given for {len(labels)} labels.")

    def _labels_for(self, table) -> LabelMap:
        if self.labels is None:
            self.labels = LabelMap.from_values(
                [x for v in table[self.label_column] for x in label_list(v, self.label_column, "the data")]
            )
        return self.labels

    def cutoffs(self) -> torch.Tensor:
        return torch.tensor(self.thresholds or [0.5] * len(self.labels))

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        texts = [str(t) if t is not None else "" for t in table[self.text_column]]
        pairs = [str(t) for t in table[self.text_pair_column]] if self.text_pair_column else None
        features = self.encode_texts(texts, pairs)
        if self.label_column in table.column_names:
            labels = self._labels_for(table)
            for f, value in zip(features, table[self.label_column]):
                hot = [0.0] * len(labels)
                for item in label_list(value, self.label_column, source):
                    hot[labels.encode(item, source)] = 1.0
                f["labels"] = hot
        return features

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        logits = logits_of(model(**model_inputs(batch))).float()
        loss = F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        return StepOutput(loss, None, None, int(batch["attention_mask"].sum()))

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-label probabilities (sigmoid, not softmax: the labels do not compete)."""
        return logits.sigmoid()

    def evaluate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        probs = self.scores(model, features, batch_size)
        refs = torch.tensor([f["labels"] for f in features])
        result = M.multilabel_scores(
            (probs >= self.cutoffs()).int().tolist(), refs.int().tolist(), self.labels.names
        )
        result["eval_loss"] = float(F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), refs))
        return result

    def calibrate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        """Each label's threshold: the one on THRESHOLD_GRID with the best F1 for that label on `features` (ties go
        to the threshold nearest 0.5)."""
        from sklearn.metrics import f1_score

        if not features:
            return {}
        probs = self.scores(model, features, batch_size)
        refs = torch.tensor([f["labels"] for f in features]).int()
        chosen = []
        for j in range(len(self.labels)):
            ranked = sorted(
                THRESHOLD_GRID,
                key=lambda t: (
                    -f1_score(refs[:, j], (probs[:, j] >= t).int(), zero_division=0),
                    abs(t - 0.5),
                ),
            )
            chosen.append(ranked[0])
        self.thresholds = chosen
        return {"thresholds": chosen}

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        texts, pairs = self.row_texts(rows)
        probs = self.scores(model, self.encode_texts(texts, pairs), batch_size)
        names, cutoffs = self.labels.names, self.cutoffs()
        return [
            {
                "labels": [n for n, p, t in zip(names, row, cutoffs) if p >= t],
                "scores": {n: float(p) for n, p in zip(names, row)},
            }
            for row in probs
        ]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "thresholds": self.thresholds}
