"""Summarization: a document in, a summary out, on a decoder (instruction format) or an encoder-decoder model."""

from __future__ import annotations

from typing import Any

from deltatune.train import metrics as M
from deltatune.train.data import LabelMap
from deltatune.train.tasks.text_to_text import TextToTextTask, from_run_kwargs


class SummarizationTask(TextToTextTask):
    """Document -> summary. Scored by ROUGE-1/2/L (rouge-score, stemmed; per character for Chinese) with the
    mean length of the summaries and of the references, so a model that games ROUGE by length shows it."""

    name = "summarization"
    default_columns = ("document", "summary")
    instruction = "Summarize the following text."
    prefix = "summarize: "
    output_key = "summary"

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> SummarizationTask:
        return cls(tokenizer, run.text_column, run.label_column, **from_run_kwargs(run))

    def scores(self, predictions: list[str], golds: list[Any]) -> dict[str, float]:
        return M.rouge_scores(predictions, golds)
