"""Question answering in SQuAD format: extractive (a span of the context) or generative (the answer written out).

Rows hold `question`, `context` and `answers` = {"text": [...], "answer_start": [...]} (SQuAD; empty lists for an
unanswerable question, as in SQuAD 2.0). A plain string answer is read as found in the context ("" or a missing
answer: unanswerable).

Extractive (an encoder with a span head, AutoModelForQuestionAnswering): a long context is cut into overlapping
windows of max_length tokens (`doc_stride` tokens shared between neighbours); in each window the answer's character
span becomes start/end token positions, or position 0 when the answer is not inside that window. Decoding takes, per
question, the best-scoring span over all its windows (top `n_best` starts x ends, end >= start, at most
`max_answer_tokens` long, inside the context) and answers "" when the no-answer score beats it.

Generative (`generative: true`, any decoder or encoder-decoder): the context and question become an instruction and
the answer is the response ("unanswerable" for none), for models without a span head.

Both are scored by SQuAD's exact match and F1 (`metrics.qa_scores`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.train import metrics as M
from deltatune.train.data import DataError, LabelMap
from deltatune.train.tasks.base import StepOutput, Task, _batches, _device_of, to_device
from deltatune.train.tasks.text_to_text import TextToTextTask, from_run_kwargs

NO_ANSWER = "unanswerable"
MODEL_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")


def answer_spans(value: Any, context: str, where: str) -> list[tuple[str, int]]:
    """(text, start character) of each gold answer; [] for unanswerable. A start that does not point at its text
    (e.g. after cleaning changed the context) is moved to the nearest occurrence of the text."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        texts, starts = [value], [context.find(value)]
    elif isinstance(value, dict) and "text" in value:
        texts = list(value["text"])
        starts = list(value.get("answer_start") or [context.find(t) for t in texts])
    else:
        raise DataError(
            f"{where}: answers must be SQuAD's {{'text': [...], 'answer_start': [...]}} or a string, got {value!r}."
        )
    spans = []
    for text, start in zip(texts, starts):
        if context[start : start + len(text)] != text:
            found = [i for i in range(len(context)) if context.startswith(text, i)]
            if not found:
                raise DataError(f"{where}: the answer {text!r} does not occur in its context.")
            start = min(found, key=lambda i: abs(i - start))
        spans.append((text, start))
    return spans


class QuestionAnsweringTask(Task):
    """Extractive QA over windows of long contexts; see the module docstring."""

    name = "qa"
    metric = "f1"
    greater_is_better = True
    task_type = "QUESTION_ANS"
    default_columns = ("question", "answers")
    default_pair_column = "context"

    @classmethod
    def model_task(cls, run: Any) -> str:
        return GenerativeQATask.model_task(run) if run.generative else "qa"

    @classmethod
    def adapter_task_type(cls, run: Any) -> str:
        return GenerativeQATask.adapter_task_type(run) if run.generative else cls.task_type

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: LabelMap | None) -> Task:
        context = run.text_pair_column or cls.default_pair_column
        if run.generative:
            return GenerativeQATask(
                tokenizer, run.text_column, context, run.label_column, **from_run_kwargs(run)
            )
        return cls(
            tokenizer,
            run.text_column,
            context,
            run.label_column,
            run.max_length,
            null_threshold=run.null_threshold,
        )

    def __init__(
        self,
        tokenizer: Any,
        question_column: str = "question",
        context_column: str = "context",
        answers_column: str = "answers",
        max_length: int = 384,
        doc_stride: int = 128,
        max_answer_tokens: int = 30,
        n_best: int = 20,
        null_threshold: float = 0.0,
    ) -> None:
        super().__init__(tokenizer, max_length)
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise DataError(
                "Extractive QA needs a fast tokenizer (it maps answers through character offsets)."
            )
        self.question_column, self.context_column, self.answers_column = (
            question_column,
            context_column,
            answers_column,
        )
        self.doc_stride, self.max_answer_tokens, self.n_best = doc_stride, max_answer_tokens, n_best
        self.null_threshold = null_threshold  # see `calibrate`

    # --- windows ---------------------------------------------------------------------------------------------
    def windows(self, questions: list[str], contexts: list[str]) -> list[dict[str, Any]]:
        """Tokenized (question, context window) pairs with each window's example index and context offsets."""
        stride = min(self.doc_stride, self.max_length // 2)
        enc = self.tokenizer(
            self.capped_questions([q.lstrip() for q in questions]),
            contexts,
            truncation="only_second",
            max_length=self.max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        features = []
        for i, example in enumerate(enc["overflow_to_sample_mapping"]):
            sequence_ids = enc.sequence_ids(i)
            f = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            f["example"] = example
            f["offsets"] = [
                tuple(span) if sequence_ids[j] == 1 else None
                for j, span in enumerate(enc["offset_mapping"][i])
            ]
            features.append(f)
        if not features:
            raise DataError("No question produced a window; check the question and context columns.")
        return features

    def capped_questions(self, questions: list[str]) -> list[str]:
        """Questions cut to 64 tokens (a third of max_length when that is less), as BERT's SQuAD recipe does: a
        longer question leaves the context less room in a window than the stride shared between windows, which the
        tokenizer cannot split, and the answer lives in the context anyway."""
        limit = min(64, self.max_length // 3)
        enc = self.tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        return [
            q if len(offsets) <= limit else q[: offsets[limit - 1][1]]
            for q, offsets in zip(questions, enc["offset_mapping"])
        ]

    def prepare(self, table, source: str = "the data") -> list[dict[str, Any]]:
        questions = [str(q) for q in table[self.question_column]]
        contexts = [str(c) for c in table[self.context_column]]
        golds = None
        if self.answers_column in table.column_names:
            golds = [
                answer_spans(value, contexts[i], f"{source}, row {i}")
                for i, value in enumerate(table[self.answers_column])
            ]
        features = self.windows(questions, contexts)
        for f in features:
            f["context"] = contexts[f["example"]]
            if golds is None:
                continue
            spans = golds[f["example"]]
            f["answers"] = [text for text, _ in spans]
            f["start_positions"], f["end_positions"] = self.token_span(f["offsets"], spans[:1])
        return features

    @staticmethod
    def token_span(offsets: list[tuple[int, int] | None], spans: list[tuple[str, int]]) -> tuple[int, int]:
        """Token positions of the first answer inside this window, or (0, 0) when there is none here."""
        if not spans:
            return 0, 0
        text, start = spans[0]
        end = start + len(text)
        inside = [j for j, span in enumerate(offsets) if span is not None]
        if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
            return 0, 0
        first = next(j for j in inside if offsets[j][1] > start)
        last = next(j for j in reversed(inside) if offsets[j][0] < end)
        return first, last

    def collate(self, features: Sequence[Any]) -> Any:
        return super().collate([{k: f[k] for k in MODEL_FIELDS if k in f} for f in features])

    # --- training --------------------------------------------------------------------------------------------
    @staticmethod
    def _logits(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
        out = model(**inputs)
        width = batch["input_ids"].shape[1]  # soft-prompt methods put their virtual tokens in front
        return out.start_logits[:, -width:].float(), out.end_logits[:, -width:].float()

    @staticmethod
    def loss_from(start: torch.Tensor, end: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return (
            F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])
        ) / 2

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        start, end = self._logits(model, batch)
        return StepOutput(self.loss_from(start, end, batch), None, None, int(batch["attention_mask"].sum()))

    # --- decoding --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def candidates(self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int):
        """Per example (in order): (best span or None, no-answer score), a span being (text, score, start char,
        end char); and the mean loss when the features carry gold positions."""
        device, loss_total, by_example = _device_of(model), 0.0, defaultdict(list)
        for chunk in _batches(list(features), batch_size):
            batch = to_device(self.collate(chunk), device)
            start, end = self._logits(model, batch)
            if "start_positions" in batch:
                loss_total += float(self.loss_from(start, end, batch)) * len(chunk)
            for f, s, e in zip(chunk, start.cpu(), end.cpu()):
                by_example[f["example"]].append((f, s[: len(f["input_ids"])], e[: len(f["input_ids"])]))
        found = {example: self.best_span(windows) for example, windows in by_example.items()}
        return [found[k] for k in sorted(found)], loss_total / max(1, len(features))

    def best_span(self, windows) -> tuple[tuple[str, float, int, int] | None, float]:
        """The best-scoring valid span over a question's windows, and the lowest no-answer score among them."""
        best, null_score = None, float("inf")
        for f, start, end in windows:
            offsets = f["offsets"]
            null_score = min(null_score, float(start[0] + end[0]))
            top_starts = start.topk(min(self.n_best, len(start))).indices.tolist()
            top_ends = end.topk(min(self.n_best, len(end))).indices.tolist()
            for i in top_starts:
                for j in top_ends:
                    if (
                        offsets[i] is None
                        or offsets[j] is None
                        or j < i
                        or j - i + 1 > self.max_answer_tokens
                    ):
                        continue
                    score = float(start[i] + end[j])
                    if best is None or score > best[1]:
                        a, b = offsets[i][0], offsets[j][1]
                        best = (f["context"][a:b], score, a, b)
        return best, null_score

    def decide(self, span, null_score: float) -> tuple[str, float, int, int]:
        """The span when it beats the no-answer score by more than `null_threshold`, else no answer ("")."""
        if span is None or span[1] - null_score <= self.null_threshold:
            return "", null_score, -1, -1
        return span

    def evaluate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        found, loss = self.candidates(model, features, batch_size)
        golds = {f["example"]: f["answers"] for f in features}
        result = M.qa_scores([self.decide(*c)[0] for c in found], [golds[k] for k in sorted(golds)])
        result["eval_loss"] = loss
        return result

    def calibrate(
        self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int
    ) -> dict[str, Any]:
        """SQuAD 2.0's no-answer threshold: the margin a span must beat the no-answer score by, chosen for the best
        F1 on held-out `features` (a recipe uses the validation split and then scores the test split with it).
        Candidates are 0 and every observed margin; ties go to the one nearest 0."""
        found, _ = self.candidates(model, features, batch_size)
        golds = {f["example"]: f["answers"] for f in features}
        golds = [golds[k] for k in sorted(golds)]
        margins = sorted({0.0} | {span[1] - null for span, null in found if span is not None})
        options = [margins[0] - 1.0] + margins  # below every margin: always answer with the span

        def f1_at(threshold: float) -> float:
            self.null_threshold = threshold
            return M.qa_scores([self.decide(*c)[0] for c in found], golds)["f1"]

        self.null_threshold = max(options, key=lambda t: (f1_at(t), -abs(t)))
        return {"null_threshold": self.null_threshold}

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 16
    ) -> list[dict[str, Any]]:
        for i, row in enumerate(rows):
            if self.question_column not in row or self.context_column not in row:
                raise DataError(f"Row {i} needs {self.question_column!r} and {self.context_column!r}.")
        questions = [str(r[self.question_column]) for r in rows]
        contexts = [str(r[self.context_column]) for r in rows]
        features = self.windows(questions, contexts)
        for f in features:
            f["context"] = contexts[f["example"]]
        found, _ = self.candidates(model, features, batch_size)
        return [
            {"answer": text, "score": score, "start": a, "end": b}
            for text, score, a, b in (self.decide(*c) for c in found)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "question_column": self.question_column,
            "context_column": self.context_column,
            "answers_column": self.answers_column,
            "null_threshold": self.null_threshold,
        }


class GenerativeQATask(TextToTextTask):
    """QA as text generation: context and question in, the answer (or "unanswerable") out."""

    name = "qa"
    metric = "eval_loss"
    instruction = (
        "Answer the question with a short span copied from the context. If the context does not answer it, "
        f"reply {NO_ANSWER}."
    )
    prefix = "question answering: "
    output_key = "answer"

    def __init__(
        self,
        tokenizer: Any,
        question_column: str = "question",
        context_column: str = "context",
        answers_column: str = "answers",
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer, question_column, answers_column, **kwargs)
        self.question_column, self.context_column = question_column, context_column

    def source_of(self, row: dict[str, Any]) -> str:
        return f"Context: {row[self.context_column]}\nQuestion: {str(row[self.question_column]).strip()}"

    def fit_source(self, text: str, reserve: int = 0) -> str:
        # the question sits after the context: cut the context, never the question
        context, sep, question = text.rpartition("\nQuestion: ")
        question_tokens = len(self.tokenizer(sep + question, add_special_tokens=False)["input_ids"])
        return super().fit_source(context, reserve + question_tokens) + sep + question

    def gold_of(self, row: dict[str, Any]) -> list[str]:
        context = str(row[self.context_column])
        return [text for text, _ in answer_spans(row.get(self.label_column), context, "a row")]

    def target_of(self, row: dict[str, Any]) -> str:
        golds = self.gold_of(row)
        return golds[0] if golds else NO_ANSWER

    def generate(self, model: nn.Module, prompts: Sequence[str], batch_size: int = 8) -> list[str]:
        return [
            "" if g.strip().lower().rstrip(".") == NO_ANSWER else g
            for g in super().generate(model, prompts, batch_size)
        ]

    def scores(self, predictions: list[str], golds: list[Any]) -> dict[str, float]:
        return M.qa_scores(predictions, golds)

    def input_columns(self) -> list[str]:
        return [self.question_column, self.context_column]
