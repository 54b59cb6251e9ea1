"""Regression: one text (or a pair) -> one number, with a single-output head trained on the squared error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import StepOutput, logits_of, model_inputs
from deltatune.train.tasks.classification import SequenceClassificationTask


def numeric_target(value: Any, column: str, source: str) -> float:
    """A label as a float, or a DataError that says which value is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{source}: regression needs a number in column {column!r}, got {value!r}.")
    try:
        number = float(value)
    except ValueError:
        raise DataError(
            f"{source}: regression needs a number in column {column!r}, got {value!r}. For classes use "
            "task: seq-cls."
        ) from None
    if not math.isfinite(number):
        raise DataError(f"{source}: column {column!r} holds {value!r}; every target must be a finite number.")
    return number


class RegressionTask(SequenceClassificationTask):
    """Text -> a number (a rating, a similarity score): MSE loss on a one-output head; MSE, MAE, Pearson and
    Spearman. A recipe selects it with task: regression or with num_labels: 1."""

    name = "regression"
    metric = "mse"
    greater_is_better = False

    @classmethod
    def model_task(cls, run: Any) -> str:
        return "seq-cls"

    @classmethod
    def fit_labels(cls, run: Any, table) -> None:
        for value in table[run.label_column]:
            numeric_target(value, run.label_column, run.train_file or "the training data")
        return None

    @classmethod
    def head_kwargs(cls, labels: LabelMap | None) -> dict[str, Any]:
        return {"ignore_mismatched_sizes": True, "num_labels": 1, "problem_type": "regression"}

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        texts = [str(t) if t is not None else "" for t in table[self.text_column]]
        pairs = [str(t) for t in table[self.text_pair_column]] if self.text_pair_column else None
        features = self.encode_texts(texts, pairs)
        if self.label_column in table.column_names:
            for f, value in zip(features, table[self.label_column]):
                f["labels"] = numeric_target(value, self.label_column, source)
        return features

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        predictions = logits_of(model(**model_inputs(batch))).float().squeeze(-1)
        loss = F.mse_loss(predictions, batch["labels"].float())
        return StepOutput(loss, None, None, int(batch["attention_mask"].sum()))

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted value: the one-unit head's output, as is."""
        return logits.squeeze(-1)

    def evaluate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        predictions = self.scores(model, features, batch_size).tolist()
        result = M.regression_scores(predictions, [f["labels"] for f in features])
        result["eval_loss"] = result["mse"]
        return result

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        texts, pairs = self.row_texts(rows)
        values = self.scores(model, self.encode_texts(texts, pairs), batch_size)
        return [{"value": float(v)} for v in values]

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "text_column": self.text_column, "label_column": self.label_column}
