"""Translation: a sentence in one language in, the same sentence in another out."""

from __future__ import annotations

from typing import Any

from deltatune.train import metrics as M
from deltatune.train.data import LabelMap
from deltatune.train.tasks.text_to_text import TextToTextTask, from_run_kwargs

LANGUAGES = {
    "zh": "Chinese",
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ja": "Japanese",
    "ru": "Russian",
}


def language_name(code_or_name: str) -> str:
    return LANGUAGES.get(code_or_name.lower(), code_or_name)


class TranslationTask(TextToTextTask):
    """Source sentence -> target sentence. Scored by BLEU (sacrebleu; its `zh` tokenizer when the references are
    Chinese, since 13a would treat a whole Chinese sentence as one word) and chrF."""

    name = "translation"
    default_columns = ("source", "target")
    output_key = "translation"

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> TranslationTask:
        return cls(
            tokenizer,
            run.text_column,
            run.label_column,
            source_lang=run.source_lang,
            target_lang=run.target_lang,
            **from_run_kwargs(run),
        )

    def __init__(
        self,
        tokenizer: Any,
        text_column: str = "source",
        label_column: str = "target",
        source_lang: str = "zh",
        target_lang: str = "en",
        **kwargs: Any,
    ) -> None:
        self.source_lang, self.target_lang = source_lang, target_lang
        source, target = language_name(source_lang), language_name(target_lang)
        self.instruction = f"Translate the following {source} text into {target}."
        self.prefix = f"translate {source} to {target}: "
        super().__init__(tokenizer, text_column, label_column, **kwargs)

    def scores(self, predictions: list[str], golds: list[Any]) -> dict[str, float]:
        return M.generation_scores(predictions, golds)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source_lang": self.source_lang, "target_lang": self.target_lang}
