"""Encoder-decoder models (T5, BART): source text in, target text out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train.data import LabelMap
from deltatune.train.tasks.base import StepOutput, _batches, _device_of, logits_of
from deltatune.train.tasks.causal_lm import CausalLMTask


class Seq2SeqTask(CausalLMTask):
    """Encoder-decoder models (T5, BART): source text in, target text out."""

    name = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"
    default_columns = ("source", "target")

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> Seq2SeqTask:
        return cls(
            tokenizer,
            run.text_column,
            run.label_column,
            run.max_length,
            run.max_new_tokens,
            run.generate_samples,
        )

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "source",
        label_column: str = "target",
        max_length: int = 256,
        max_new_tokens: int = 64,
        generate_samples: int = 32,
    ) -> None:
        super().__init__(tokenizer, max_length, max_new_tokens, generate_samples)
        self.text_column, self.label_column = text_column, label_column

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        sources, targets = (
            [str(s) for s in table[self.text_column]],
            [str(t) for t in table[self.label_column]],
        )
        enc = self.tokenizer(sources, text_target=targets, truncation=True, max_length=self.max_length)
        return [
            {
                "input_ids": enc["input_ids"][i],
                "labels": enc["labels"][i],
                "prompt": sources[i],
                "reference": targets[i],
            }
            for i in range(len(sources))
        ]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        logits = logits_of(
            model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            )
        )
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=-100
        )
        return StepOutput(loss, logits, batch["labels"], int(batch["attention_mask"].sum()))

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[str], batch_size: int = 8) -> list[str]:
        device, out = _device_of(model), []
        for chunk in _batches(list(prompts), batch_size):
            enc = self.tokenizer(
                chunk, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
            ).to(device)
            ids = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
            out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [text.strip() for text in out]

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        return [
            {"generation": g}
            for g in self.generate(model, [str(r[self.text_column]) for r in rows], batch_size)
        ]

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "text_column": self.text_column, "label_column": self.label_column}
