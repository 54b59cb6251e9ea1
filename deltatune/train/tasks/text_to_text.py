"""What summarization, translation and generative QA share: text in, text out, on either kind of language model.

On a decoder (SmolLM2, Gemma) a row becomes an instruction and its input, rendered with the model's chat template
(or the Alpaca format when it has none), and the loss is on the response tokens only. On an encoder-decoder (T5,
BART) the source goes to the encoder with a short prefix and the target is the decoder's label. Long sources are
cut to fit `max_length` before the prompt is built, so the response is never what gets truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from deltatune.models import is_encoder_decoder
from deltatune.train import metrics as M
from deltatune.train.data import DataError, render_prompt, tokenize_instruction
from deltatune.train.tasks.base import StepOutput, Task
from deltatune.train.tasks.causal_lm import CausalLMTask
from deltatune.train.tasks.seq2seq import Seq2SeqTask

PROMPT_ROOM = 48  # tokens kept free for the chat template or Alpaca scaffolding around the source


class TextToTextTask(Task):
    """Source column -> target column through `instruction` (decoder) or `prefix` (encoder-decoder).

    Subclasses set the instruction, the prefix, how a row reads (`source_of`, `target_of`, `gold_of`) and how
    generations are scored (`scores`). Generations are cut at their first line break: every target here is one
    line, and a base model that has not learned where to stop would otherwise be scored on whatever it rambles on
    with (the same rule applies before and after tuning)."""

    metric = "eval_loss"
    instruction = ""
    prefix = ""
    output_key = "generation"  # the key of each `predict` answer

    @classmethod
    def model_task(cls, run: Any) -> str:
        return "seq2seq" if is_encoder_decoder(run.model) else "causal-lm"

    @classmethod
    def adapter_task_type(cls, run: Any) -> str:
        return "SEQ_2_SEQ_LM" if cls.model_task(run) == "seq2seq" else "CAUSAL_LM"

    def __init__(
        self,
        tokenizer: Any,
        text_column: str,
        label_column: str,
        encoder_decoder: bool = False,
        max_length: int = 512,
        max_new_tokens: int = 64,
        generate_samples: int = 32,
        instruction: str | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length)
        self.text_column, self.label_column, self.encoder_decoder = text_column, label_column, encoder_decoder
        self.max_new_tokens, self.generate_samples = max_new_tokens, generate_samples
        self.instruction = instruction or self.instruction
        lm = Seq2SeqTask if encoder_decoder else CausalLMTask
        self.lm = lm(tokenizer, max_length=max_length, max_new_tokens=max_new_tokens)

    # --- how a row reads (subclasses override) ---------------------------------------------------------------
    def source_of(self, row: dict[str, Any]) -> str:
        return str(row[self.text_column])

    def target_of(self, row: dict[str, Any]) -> str:
        return str(row[self.label_column])

    def gold_of(self, row: dict[str, Any]) -> Any:
        """What a generation is scored against (a list of answers for QA); the target by default."""
        return self.target_of(row)

    def scores(self, predictions: list[str], golds: list[Any]) -> dict[str, float]:
        return M.generation_scores(predictions, golds)

    # --- prompts ---------------------------------------------------------------------------------------------
    def fit_source(self, text: str, reserve: int = 0) -> str:
        """The source cut (at a token boundary, by character offsets so no character is split) to leave room for
        the prompt scaffolding, `reserve` more tokens and the response within max_length."""
        room = self.max_length - PROMPT_ROOM - reserve - (0 if self.encoder_decoder else self.max_new_tokens)
        if room <= 0:
            raise DataError(
                f"max_length {self.max_length} leaves no room for the source after max_new_tokens "
                f"{self.max_new_tokens}; raise max_length."
            )
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= room:
            return text
        return text[: enc["offset_mapping"][room - 1][1]]

    def messages(self, source: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": f"{self.instruction}\n\n{source}" if self.instruction else source}
        ]

    def prompt(self, row: dict[str, Any]) -> str:
        source = self.fit_source(self.source_of(row))
        if self.encoder_decoder:
            return self.prefix + source
        return render_prompt(self.tokenizer, self.messages(source))

    # --- the Task contract -----------------------------------------------------------------------------------
    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        rows = [dict(r) for r in table]
        if not rows:
            return []
        if self.encoder_decoder:
            sources = [self.prefix + self.fit_source(self.source_of(r)) for r in rows]
            features = self.lm.prepare(
                {"source": sources, "target": [self.target_of(r) for r in rows]}, source
            )
            for f, row in zip(features, rows):
                f["gold"] = self.gold_of(row)
            return features
        features = []
        for row in rows:
            messages = self.messages(self.fit_source(self.source_of(row)))
            target = self.target_of(row)
            f = tokenize_instruction(
                self.tokenizer,
                {"messages": [*messages, {"role": "assistant", "content": target}]},
                self.max_length,
            )
            if all(label == -100 for label in f["labels"]):
                continue  # a target longer than max_length allows; nothing to learn from this row
            f.update(prompt=render_prompt(self.tokenizer, messages), reference=target, gold=self.gold_of(row))
            features.append(f)
        if not features:
            raise DataError(
                f"{source}: no row has a target left after truncation to {self.max_length} tokens."
            )
        return features

    def lengths(self, features: Sequence[dict[str, Any]]) -> list[int]:
        return self.lm.lengths(features)

    def collate(self, features: Sequence[Any]) -> Any:
        return self.lm.collate(features)

    @property
    def fused_loss(self) -> bool:  # the trainer switches it off for distillation, which needs full logits
        return getattr(self.lm, "fused_loss", False)

    @fused_loss.setter
    def fused_loss(self, value: bool) -> None:
        self.lm.fused_loss = value

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        return self.lm.loss(model, batch)

    def generate(self, model: nn.Module, prompts: Sequence[str], batch_size: int = 8) -> list[str]:
        out = self.lm.generate(model, prompts, batch_size)
        return [text.strip().split("\n", 1)[0].strip() for text in out]

    def evaluate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        result: dict[str, Any] = {"eval_loss": self.eval_loss(model, features, batch_size)}
        sample = list(features)[: self.generate_samples]
        if sample:
            generations = self.generate(model, [f["prompt"] for f in sample], batch_size)
            result.update(self.scores(generations, [f["gold"] for f in sample]))
        return result

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        for i, row in enumerate(rows):
            missing = [c for c in self.input_columns() if c not in row]
            if missing:
                raise DataError(
                    f"Row {i} has no {missing[0]!r}; {self.name} rows need {self.input_columns()}."
                )
        generations = self.generate(model, [self.prompt(r) for r in rows], batch_size)
        return [{self.output_key: g} for g in generations]

    def input_columns(self) -> list[str]:
        return [self.text_column]

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "text_column": self.text_column,
            "label_column": self.label_column,
            "encoder_decoder": self.encoder_decoder,
            "instruction": self.instruction,
        }


def from_run_kwargs(run: Any) -> dict[str, Any]:
    """The constructor arguments every text-to-text task reads from a recipe."""
    return {
        "encoder_decoder": TextToTextTask.model_task(run) == "seq2seq",
        "max_length": run.max_length,
        "max_new_tokens": run.max_new_tokens,
        "generate_samples": run.generate_samples,
        "instruction": run.instruction,
    }
