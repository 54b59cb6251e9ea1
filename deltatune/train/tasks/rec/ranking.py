"""Sequential recommendation as text retrieval: a pretrained encoder reads the user's recent items (their texts,
newest first) and every candidate item's text; the score is the cosine of the two vectors.

One encoder is both towers, so the adapter that tunes how histories are read also tunes how items are read, and
an item nobody met in training still gets a vector from its text (cold start). Training is a softmax over the
batch's positives (in-batch negatives) plus `negatives` items sampled from the catalogue, with the items a user
already met masked out. Evaluation ranks the whole catalogue, with every item's vector computed once per
evaluation. The hybrid option adds a learned id embedding per training item (zero at the start, so the model
starts as the pure text model); the user side adds the mean id embedding of the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DataError
from deltatune.train.data import pad_batch
from deltatune.train.tasks.base import StepOutput, _batches, _device_of, to_device
from deltatune.train.tasks.rec import metrics as M
from deltatune.train.tasks.rec.baselines import ALS, popularity_scores, tuned_als
from deltatune.train.tasks.rec.common import RecModelTask
from deltatune.train.tasks.rec.data import Case, CasePart, TrainPart

ID_EMBEDDINGS = (
    "item_embedding"  # the hybrid's id table: trained in full beside the adapter (modules_to_save)
)


class TextTower(nn.Module):
    """A text encoder as a recommender tower: masked mean of the last hidden states (+ id embeddings), L2-normed.

    Adapters are added to this module as a whole, so every method that adapts the encoder applies; the id table
    (hybrid) is a plain module the adapter trains in full and saves beside its own weights."""

    def __init__(self, encoder: nn.Module, id_rows: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        if id_rows:
            self.item_embedding = nn.Embedding(id_rows + 1, encoder.config.hidden_size, padding_idx=0)
            nn.init.zeros_(self.item_embedding.weight)  # row 0: no id (cold-start items, padding)

    @property
    def config(self):
        return self.encoder.config

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        id_rows: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        if mask.shape[1] < hidden.shape[1]:  # virtual tokens in front (prompt methods) that the mask omits
            mask = torch.cat([mask.new_ones(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], 1)
        vector = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        if id_rows is not None and hasattr(self, ID_EMBEDDINGS):
            ids = self.item_embedding(id_rows.clamp_min(0))
            if ids.dim() == 3:  # a history: the mean over its items that have an id
                known = (id_rows > 0).to(ids.dtype).unsqueeze(-1)
                ids = (ids * known).sum(1) / known.sum(1).clamp_min(1)
            vector = vector + ids.to(vector.dtype)
        return F.normalize(vector.float(), dim=-1)


class RankingTask(RecModelTask):
    """Next-item ranking over the whole catalogue with a text encoder; see the module docstring."""

    metric = "ndcg@10"
    task_type = "FEATURE_EXTRACTION"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        enc = self.tokenizer(self.catalogue.texts, truncation=True, max_length=self.max_length)
        self.item_tokens: list[list[int]] = [list(ids) for ids in enc["input_ids"]]
        self.id_row = {item: r + 1 for r, item in enumerate(self.options.hybrid_items or [])}
        self._index: tuple[tuple, torch.Tensor] | None = None

    # --- the model -----------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        rows = len(self.options.hybrid_items or []) if self.options.hybrid else 0
        if self.options.hybrid and not rows:
            raise DataError("rec.hybrid: no item has a training event, so there are no ids to learn.")
        return TextTower(model, rows)

    def modules_to_save(self, model: nn.Module) -> list[str]:
        return [ID_EMBEDDINGS] if self.options.hybrid else []

    def rows_of(self, items: Sequence[int]) -> list[int]:
        return [self.id_row.get(self.catalogue.ids[i], 0) for i in items]

    # --- features ------------------------------------------------------------------------------
    def history_text(self, items: Sequence[int]) -> str:
        """The newest item first, so truncation drops the oldest."""
        return "; ".join(self.catalogue.texts[i] for i in reversed(items))

    def encode_history(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def prepare(self, part: TrainPart | CasePart, source: str = "the data") -> Any:
        split = part.split
        if isinstance(part, CasePart):
            return part
        windows = [self.recent(split.train[user][:t]) for user, t in part.examples]
        tokens = self.encode_history([self.history_text([e.item for e in w]) for w in windows])
        return [
            {"input_ids": ids, "item": split.train[user][t].item, "history": [e.item for e in w]}
            for ids, w, (user, t) in zip(tokens, windows, part.examples)
        ]

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Histories, the candidate items (every row's positive + sampled negatives), labels and a mask that
        hides each row's already-met items (they are no negatives)."""
        positives = [f["item"] for f in features]
        sampled = torch.randint(len(self.catalogue), (self.options.negatives,)).tolist()
        candidates = list(dict.fromkeys(positives + sampled))
        column = {item: c for c, item in enumerate(candidates)}
        mask = torch.zeros(len(features), len(candidates), dtype=torch.bool)
        for r, f in enumerate(features):
            for item in f["history"]:
                if item in column and item != f["item"]:
                    mask[r, column[item]] = True
        width = max(1, max(len(f["history"]) for f in features))
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        return {
            "history": pad_batch([{"input_ids": f["input_ids"]} for f in features], pad_id),
            "history_rows": torch.tensor(
                [self.rows_of(f["history"]) + [0] * (width - len(f["history"])) for f in features]
            ),
            "items": pad_batch([{"input_ids": self.item_tokens[i]} for i in candidates], pad_id),
            "item_rows": torch.tensor(self.rows_of(candidates)),
            "labels": torch.tensor([column[p] for p in positives]),
            "mask": mask,
        }

    def lengths(self, features) -> list[int]:
        return [len(f["input_ids"]) for f in features]

    # --- training ------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        users = model(**batch["history"], id_rows=batch["history_rows"])
        items = model(**batch["items"], id_rows=batch["item_rows"])
        logits = (users @ items.T / self.options.temperature).masked_fill(batch["mask"], -torch.inf)
        loss = F.cross_entropy(logits, batch["labels"])
        return StepOutput(loss, None, None, int(batch["history"]["attention_mask"].sum()))

    # --- vectors -------------------------------------------------------------------------------
    @torch.no_grad()
    def vectors(
        self, model: nn.Module, tokens: Sequence[list[int]], id_rows: Sequence[Any], batch_size: int
    ) -> torch.Tensor:
        """One vector per token list, in order (batched longest first, so little padding). `id_rows` holds each
        text's hybrid row: one int for an item, a list of ints for a history."""
        device, pad_id = _device_of(model), getattr(self.tokenizer, "pad_token_id", None) or 0
        order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
        out = None
        for chunk in _batches(order, batch_size):
            batch = to_device(pad_batch([{"input_ids": tokens[i]} for i in chunk], pad_id), device)
            rows = [id_rows[i] for i in chunk]
            if isinstance(rows[0], list):
                width = max(1, max(len(r) for r in rows))
                rows = [r + [0] * (width - len(r)) for r in rows]
            vec = model(**batch, id_rows=torch.tensor(rows, device=device)).float().cpu()
            if out is None:
                out = torch.empty(len(tokens), vec.shape[1])
            out[torch.tensor(chunk)] = vec
        return out

    def item_vectors(self, model: nn.Module, batch_size: int) -> torch.Tensor:
        return self.vectors(model, self.item_tokens, self.rows_of(range(len(self.catalogue))), batch_size)

    def user_vectors(
        self, model: nn.Module, windows: Sequence[Sequence[int]], batch_size: int
    ) -> torch.Tensor:
        tokens = self.encode_history([self.history_text(w) for w in windows])
        return self.vectors(model, tokens, [self.rows_of(w) for w in windows], batch_size)

    # --- evaluation ----------------------------------------------------------------------------
    def rank(self, scores_of_cases, cases: Sequence[Case]) -> dict[str, float]:
        """Full-ranking metrics; `scores_of_cases(chunk) -> (len(chunk), n_items)` scores, in chunks of users."""
        tie_order = torch.randperm(len(self.catalogue), generator=torch.Generator().manual_seed(0))
        ranks: list[list[int]] = []
        for chunk in _batches(list(cases), 512):
            ranks += M.target_ranks(
                scores_of_cases(chunk),
                [[e.item for e in c.targets] for c in chunk],
                [[e.item for e in c.history] for c in chunk],
                tie_order,
            )
        return M.ranking_metrics(ranks)

    def scores(
        self, model: nn.Module, part: CasePart, batch_size: int, which: str = "model", items=None
    ) -> dict[str, float]:
        """Metrics of the tuned model (`which="model"`; `items`: the catalogue's vectors, if already computed),
        or of the popularity or MF baseline."""
        split, cases = part.split, part.cases
        if which == "popularity":
            counts = popularity_scores(split.train, len(self.catalogue))
            return self.rank(lambda chunk: counts.expand(len(chunk), -1), cases)
        if which == "mf":

            def histories(chunk):
                return [[e.item for e in c.history] for c in chunk]

            def validation_ndcg(als: ALS) -> float:
                return self.rank(lambda chunk: als.scores(histories(chunk)), part.tune or [])["ndcg@10"]

            als = tuned_als(split.train, len(self.catalogue), part.tune or [], validation_ndcg)
            return self.rank(lambda chunk: als.scores(histories(chunk)), cases)
        items = self.item_vectors(model, batch_size) if items is None else items

        def model_scores(chunk):
            windows = [[e.item for e in self.recent(c.history)] for c in chunk]
            return self.user_vectors(model, windows, batch_size) @ items.T

        return self.rank(model_scores, cases)

    def evaluate(self, model: nn.Module, features: CasePart, batch_size: int) -> dict[str, Any]:
        """Full-ranking metrics; `cold_*@10` on the cases whose target no training event names; on the test
        split also the untuned model and the baselines (`zeroshot_*`, `popularity_*`, `mf_*`)."""
        items = self.item_vectors(model, batch_size)
        result = self.scores(model, features, batch_size, items=items)
        cold = self.cold_cases(features)
        if cold:
            part = CasePart(features.split, features.name, cold)
            scores = self.scores(model, part, batch_size, items=items)
            result.update({f"cold_{k}": v for k, v in scores.items() if k.endswith("@10")})
        result["cases"] = len(features)
        if features.name == "test":
            result.update(self.compare(model, features, batch_size, self.scores))
        return result

    def cold_cases(self, part: CasePart) -> list[Case]:
        """Cases whose targets no training event names: only their text can rank them."""
        met = {e.item for events in part.split.train.values() for e in events}
        return [c for c in part.cases if not any(e.item in met for e in c.targets)]

    # --- predictions ---------------------------------------------------------------------------
    def index(self, model: nn.Module, batch_size: int) -> torch.Tensor:
        """The catalogue's vectors, kept while the model's weights stay as they are (serving, predict)."""
        version = tuple((id(p), p._version) for p in model.parameters())
        if self._index is None or self._index[0] != version:
            self._index = (version, self.item_vectors(model, batch_size))
        return self._index[1]

    def predict(
        self, model: nn.Module, rows: Sequence[dict[str, Any]], batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Top-k items for each row: `{"user": id}` (their history in the log), `{"items": [ids]}`, or a typed
        history `{"history": [texts]}` / `{"text": "..."}`; optional `"k"` (default 10). Items a row's history
        names are not recommended again."""
        items = self.index(model, batch_size)
        out = []
        for row in rows:
            texts, met = self.history_of(row)
            rows_ = self.rows_of(met[-self.options.history_length :])
            tokens = self.encode_history(["; ".join(reversed(texts[-self.options.history_length :]))])
            user = self.vectors(model, tokens, [rows_], batch_size)
            scores = (user @ items.T)[0]
            if met:
                scores[torch.tensor(met)] = -torch.inf
            k = int(row.get("k", 10))
            if k < 1:
                raise DataError(f"k must be at least 1, got {k}.")
            top = scores.topk(min(k, int(torch.isfinite(scores).sum())))
            out.append(
                {
                    "items": [
                        {"item": self.catalogue.ids[i], "text": self.catalogue.texts[i], "score": float(s)}
                        for s, i in zip(top.values.tolist(), top.indices.tolist())
                    ]
                }
            )
        return out

    def history_of(self, row: dict[str, Any]) -> tuple[list[str], list[int]]:
        """(texts oldest first, catalogue indices of the named items) of one request row."""
        if "user" in row:
            met = [e.item for e in self.user_history(row["user"])]
        elif "items" in row:
            met = self.catalogue.lookup([str(i) for i in row["items"]], "The request")
        elif "history" in row or "text" in row:
            value = row.get("history", row.get("text"))
            texts = [value] if isinstance(value, str) else [str(t) for t in value]
            texts = [t for t in texts if t.strip()]
            if not texts:
                raise DataError("The history is empty; send at least one item text.")
            return texts, []
        else:
            raise DataError(
                f"A rec request needs 'user', 'items' (item ids) or 'history' (item texts); got {sorted(row)}."
            )
        if not met:
            raise DataError("The history is empty; a user needs at least one event to get recommendations.")
        return [self.catalogue.texts[i] for i in met], met
