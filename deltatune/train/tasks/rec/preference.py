"""Preference prediction as in TALLRec (Bao et al. 2023): a causal LM reads the items a user liked and disliked
and answers whether they will like a target item; the score is P("Yes") against P("No") at the answer position.

Each event of a user's history is one question, read against the events before it (the last `history_length`);
the loss is the cross-entropy of the two answers, so the model learns to say Yes or No and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DataError
from deltatune.train.data import render_prompt
from deltatune.train.tasks.base import StepOutput, _batches, _device_of, to_device
from deltatune.train.tasks.rec import metrics as M
from deltatune.train.tasks.rec.baselines import ALS, like_rate, liked_items, tuned_als
from deltatune.train.tasks.rec.common import RecModelTask
from deltatune.train.tasks.rec.data import CasePart, Event, TrainPart

ANSWERS = ("No", "Yes")  # the label is the index: 1 = liked


@dataclass
class Questions:
    """The (history, target) questions of an evaluation split, tokenized, with the split they came from."""

    part: CasePart
    pairs: list[tuple[list[Event], Event]]
    features: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)


class PreferenceTask(RecModelTask):
    """Yes/No preference questions for a causal LM; see the module docstring."""

    metric = "auc"
    task_type = "CAUSAL_LM"
    positives_only = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer_ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
        if self.answer_ids[0] == self.answer_ids[1]:
            raise DataError(f"The tokenizer starts {ANSWERS} with the same token; they cannot be told apart.")

    # --- prompts -------------------------------------------------------------------------------
    def question(self, history: Sequence[Event], target: int) -> str:
        def titles(liked: bool) -> str:
            chosen = [f'"{self.catalogue.texts[e.item]}"' for e in history if e.liked == liked]
            return ", ".join(chosen) or "none"

        return (
            f"A user liked these items: {titles(True)}.\nThe user disliked these items: {titles(False)}.\n"
            f'Will the user like "{self.catalogue.texts[target]}"? Answer Yes or No.'
        )

    def tokens(self, history: Sequence[Event], target: int) -> list[int]:
        """The rendered question; the oldest events are dropped until it fits in max_length tokens."""
        window = self.recent(history)
        while True:
            text = render_prompt(self.tokenizer, [{"role": "user", "content": self.question(window, target)}])
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= self.max_length:
                return list(ids)
            if not window:
                raise DataError(
                    f"The question about item {self.catalogue.ids[target]!r} alone is {len(ids)} tokens, over "
                    f"max_length={self.max_length}; raise max_length or shorten the item texts."
                )
            window = window[1:]

    def prepare(self, part: TrainPart | CasePart, source: str = "the data") -> Any:
        if isinstance(part, CasePart):
            pairs = [(c.history, t) for c in part.cases for t in c.targets]
            questions = Questions(part, pairs)
            questions.features = [
                {"input_ids": self.tokens(h, t.item), "label": int(t.liked)} for h, t in pairs
            ]
            return questions
        train = part.split.train
        return [
            {"input_ids": self.tokens(train[u][:t], train[u][t].item), "label": int(train[u][t].liked)}
            for u, t in part.examples
        ]

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Left padding, so every question's answer position is the last one; positions count real tokens."""
        width = max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad_id] * (width - len(f["input_ids"])) + f["input_ids"] for f in features])
        mask = torch.tensor(
            [[0] * (width - len(f["input_ids"])) + [1] * len(f["input_ids"]) for f in features]
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp_min(0),
            "labels": torch.tensor([f["label"] for f in features]),
        }

    def lengths(self, features) -> list[int]:
        return [len(f["input_ids"]) for f in features]

    # --- scoring -------------------------------------------------------------------------------
    def answer_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=1,
        )
        return out.logits[:, -1, self.answer_ids].float()

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        logits = self.answer_logits(model, batch)
        return StepOutput(
            F.cross_entropy(logits, batch["labels"]), None, None, int(batch["attention_mask"].sum())
        )

    @torch.no_grad()
    def p_yes(self, model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int) -> torch.Tensor:
        device, out = _device_of(model), []
        for chunk in _batches(list(features), batch_size):
            out.append(
                self.answer_logits(model, to_device(self.collate(chunk), device)).softmax(-1)[:, 1].cpu()
            )
        return torch.cat(out)

    def scores(self, model: nn.Module, questions: Questions, batch_size: int, which: str = "model"):
        liked = [t.liked for _, t in questions.pairs]
        split = questions.part.split
        if which == "popularity":
            rate = like_rate(split.train, len(self.catalogue))
            return {"auc": M.auc([float(rate[t.item]) for _, t in questions.pairs], liked)}
        if which == "mf":

            def auc_of(als: ALS, pairs) -> float:
                user = als.scores([liked_items(h) for h, _ in pairs])
                return M.auc(
                    [float(user[i, t.item]) for i, (_, t) in enumerate(pairs)], [t.liked for _, t in pairs]
                )

            tune = [(c.history, t) for c in questions.part.tune or [] for t in c.targets]
            als = tuned_als(split.train, len(self.catalogue), tune, lambda m: auc_of(m, tune))
            return {"auc": auc_of(als, questions.pairs)}
        p = self.p_yes(model, questions.features, batch_size)
        result = M.preference_metrics(p.tolist(), liked)
        target = torch.tensor(liked, dtype=torch.float)
        result["loss"] = float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), target))
        return result

    def evaluate(self, model: nn.Module, features: Questions, batch_size: int) -> dict[str, Any]:
        """AUC, accuracy, precision, recall, F1 of "Yes" and the loss; on the test split also the untuned model
        and the baselines (`zeroshot_*`, `popularity_auc`, `mf_auc`)."""
        result = self.scores(model, features, batch_size)
        result["cases"] = len(features)
        if features.part.name == "test":
            result.update(self.compare(model, features, batch_size, self.scores))
        return result

    # --- predictions ---------------------------------------------------------------------------
    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """P(Yes) for `{"item": id}` with `"user": id` (their history in the log) or `"liked"`/`"disliked"`
        lists of item ids."""
        features = []
        for row in rows:
            if "item" not in row:
                raise DataError(
                    f"A preference request needs 'item' (the item to ask about); got {sorted(row)}."
                )
            (target,) = self.catalogue.lookup([str(row["item"])], "The request")
            if "user" in row:
                history = [e for e in self.user_history(row["user"]) if e.item != target]
            else:
                liked = self.catalogue.lookup([str(i) for i in row.get("liked", [])], "The request")
                disliked = self.catalogue.lookup([str(i) for i in row.get("disliked", [])], "The request")
                history = [Event(i, True, 0.0) for i in liked] + [Event(i, False, 0.0) for i in disliked]
            if not history:
                raise DataError("The history is empty; send 'user', or 'liked' / 'disliked' item ids.")
            features.append({"input_ids": self.tokens(history, target), "label": 0})
        p = self.p_yes(model, features, batch_size)
        return [{"p_yes": float(v), "answer": ANSWERS[int(v > 0.5)]} for v in p]
