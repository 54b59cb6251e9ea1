"""Token classification (NER): one BIO tag per word."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import Task, _batches, _device_of, to_device


class TokenClassificationTask(Task):
    """A list of words -> one tag per word (BIO). Only each word's first sub-token carries the label."""

    name = "token-cls"
    metric = "entity_f1"
    greater_is_better = True
    task_type = "TOKEN_CLS"
    default_columns = ("tokens", "tags")

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> TokenClassificationTask:
        return cls(tokenizer, run.text_column, run.label_column, labels, run.max_length)

    @classmethod
    def fit_labels(cls, run: Any, table) -> LabelMap:
        return LabelMap.from_values([t for row in table[run.label_column] for t in row])

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "tokens",
        label_column: str = "tags",
        labels: LabelMap | None = None,
        max_length: int = 256,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.text_column, self.label_column, self.labels = text_column, label_column, labels

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        words = list(table[self.text_column])  # datasets returns a lazy Column; token-cls indexes it
        if words and not isinstance(words[0], list):
            raise DataError(f"{source}: column {self.text_column!r} must hold lists of words for token-cls.")
        tags = list(table[self.label_column]) if self.label_column in table.column_names else None
        if tags is not None and self.labels is None:
            self.labels = LabelMap.from_values([t for row in tags for t in row])
        enc = self.tokenizer(
            list(words), is_split_into_words=True, truncation=True, max_length=self.max_length
        )
        features = []
        for i in range(len(words)):
            f = {k: enc[k][i] for k in enc.keys()}
            word_ids = enc.word_ids(i)
            f["word_ids"] = [-1 if w is None else w for w in word_ids]
            if tags is not None:
                if len(tags[i]) != len(words[i]):
                    raise DataError(f"{source}: row {i} has {len(words[i])} words but {len(tags[i])} tags.")
                previous, labels = None, []
                for w in word_ids:
                    labels.append(
                        -100 if w is None or w == previous else self.labels.encode(tags[i][w], source)
                    )
                    previous = w
                f["labels"] = labels
            features.append(f)
        return features

    def collate(self, features):
        batch = super().collate([{k: v for k, v in f.items() if k != "word_ids"} for f in features])
        return batch

    def evaluate(self, model: nn.Module, features, batch_size: int) -> dict[str, Any]:
        device, preds, refs, total = _device_of(model), [], [], 0.0
        with torch.no_grad():
            for chunk in _batches(features, batch_size):
                batch = to_device(self.collate(chunk), device)
                out = self.loss(model, batch)
                total += float(out.loss) * len(chunk)
                guess = out.logits.argmax(-1).cpu()
                for row, f in zip(guess, chunk):
                    keep = [j for j, label in enumerate(f["labels"]) if label != -100]
                    preds.append([self.labels.names[int(row[j])] for j in keep])
                    refs.append([self.labels.names[f["labels"][j]] for j in keep])
        result = M.entity_scores(preds, refs)
        result["eval_loss"] = total / max(1, len(features))
        return result

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "text_column": self.text_column,
            "label_column": self.label_column,
            "labels": self.labels.names if self.labels else None,
        }
