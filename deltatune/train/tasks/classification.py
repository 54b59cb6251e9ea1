"""Sequence classification: one text (or a pair of texts) -> one label, with a per-class report."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import Task, _batches, _device_of, logits_of, to_device


class SequenceClassificationTask(Task):
    """One text (or a pair) -> one label, e.g. sentiment (SST-2) or entailment (pairs)."""

    name = "seq-cls"
    metric = "accuracy"
    greater_is_better = True
    task_type = "SEQ_CLS"
    default_columns = ("text", "label")

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> SequenceClassificationTask:
        return cls(tokenizer, run.text_column, run.label_column, run.text_pair_column, labels, run.max_length)

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap:
        return class_labels(table[run.label_column], run.label_column)

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "text",
        label_column: str = "label",
        text_pair_column: str | None = None,
        labels: LabelMap | None = None,
        max_length: int = 256,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.text_column, self.text_pair_column, self.label_column = (
            text_column,
            text_pair_column,
            label_column,
        )
        self.labels = labels

    def _labels_for(self, table) -> LabelMap:
        if self.labels is None:
            self.labels = class_labels(table[self.label_column], self.label_column)
        return self.labels

    def row_texts(self, rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str] | None]:
        """(texts, pairs) of `predict`'s rows; a row without the run's text column is an error naming it."""
        needed = [c for c in (self.text_column, self.text_pair_column) if c]
        for i, row in enumerate(rows):
            missing = [c for c in needed if c not in row]
            if missing:
                raise DataError(
                    f"Row {i} has no {missing[0]!r}; this run reads {', '.join(map(repr, needed))}."
                )
        texts = [str(r[self.text_column]) for r in rows]
        pairs = [str(r[self.text_pair_column]) for r in rows] if self.text_pair_column else None
        return texts, pairs

    def encode_texts(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[dict[str, Any]]:
        enc = self.tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            truncation=True,
            max_length=self.max_length,
        )
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        texts = [str(t) if t is not None else "" for t in table[self.text_column]]
        pairs = [str(t) for t in table[self.text_pair_column]] if self.text_pair_column else None
        features = self.encode_texts(texts, pairs)
        if self.label_column in table.column_names:
            labels = self._labels_for(table)
            for f, value in zip(features, table[self.label_column]):
                f["labels"] = labels.encode(value, source)
        return features

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """A row's scores from the head's logits: class probabilities (softmax); regression and multi-label
        override this one line and share the batching in `scores`."""
        return logits.softmax(-1)

    @torch.no_grad()
    def scores(self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int) -> torch.Tensor:
        device, out = _device_of(model), []
        for chunk in _batches(features, batch_size):
            batch = to_device(
                self.collate([{k: v for k, v in f.items() if k != "labels"} for f in chunk]), device
            )
            out.append(self.outputs(logits_of(model(**batch)).float()).cpu())
        return torch.cat(out)

    def evaluate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        probs = self.scores(model, features, batch_size)
        refs = [f["labels"] for f in features]
        result = M.classification_scores(probs.argmax(-1).tolist(), refs, self.labels.names)
        result["eval_loss"] = float(F.nll_loss(probs.clamp_min(1e-12).log(), torch.tensor(refs)))
        return result

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        texts, pairs = self.row_texts(rows)
        probs = self.scores(model, self.encode_texts(texts, pairs), batch_size)
        names = self.labels.names
        return [
            {
                "label": names[int(p.argmax())],
                "score": float(p.max()),
                "scores": {n: float(v) for n, v in zip(names, p)},
            }
            for p in probs
        ]

    def report(self, scores: dict[str, Any], folder: str) -> None:
        """Per split (eval_, test_, ...): the per-class table on stderr and confusion_matrix_<split>.png."""
        from rich.console import Console

        for key in [k for k in scores if k.endswith("confusion_matrix")]:
            split = key.removesuffix("confusion_matrix").rstrip("_") or "eval"
            split_scores = {
                "per_class": scores[key.replace("confusion_matrix", "per_class")],
                "confusion_matrix": scores[key],
            }
            Console(file=sys.stderr).print(M.report_table(split_scores, f"classification report ({split})"))
            M.plot_confusion_matrix(
                split_scores,
                os.path.join(folder, f"confusion_matrix_{split}.png"),
                f"confusion matrix ({split})",
            )

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "text_column": self.text_column,
            "text_pair_column": self.text_pair_column,
            "label_column": self.label_column,
            "labels": self.labels.names if self.labels else None,
        }


def class_labels(values: Sequence[Any], column: str) -> LabelMap:
    """The classes of a label column, refusing columns that hold something other than classes: numbers with a
    fractional part (regression targets) and lists (several labels per row)."""
    values = list(values)
    if any(isinstance(v, (list, tuple)) for v in values):
        raise DataError(
            f"Label column {column!r} holds lists: several labels per row. Use task: multi-label for that."
        )
    missing = next((i for i, v in enumerate(values) if v is None or (isinstance(v, float) and v != v)), None)
    if missing is not None:
        raise DataError(
            f"Label column {column!r} is empty in row {missing}; every training row needs a label."
        )
    fractional = next((v for v in values if isinstance(v, float) and not v.is_integer()), None)
    if fractional is not None:
        raise DataError(
            f"Label column {column!r} holds numbers such as {fractional!r}, not classes. For numeric targets use "
            "task: regression (or num_labels: 1); for classes write them as integers or names."
        )
    return LabelMap.from_values(values)
