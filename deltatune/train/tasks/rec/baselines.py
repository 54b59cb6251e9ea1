"""The baselines every rec run reports beside the tuned model: popularity and matrix factorisation.

Both see exactly what the tuned model learns from (the training events) and score every catalogue item, so
the same ranking code scores them. Matrix factorisation is implicit's ALS (Hu, Koren and Volinsky 2008) on the
binary user x item matrix; a case's user vector is solved from that case's history (implicit's
`recalculate_user`), so it reads the same history the text model reads, and its size and regularisation are picked
on the validation cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from deltatune.train.tasks.rec.data import Case, Event

# (factors, regularization) tried on the validation cases
MF_GRID = ((32, 0.01), (64, 0.05), (128, 0.1))


def popularity_scores(train: dict[str, list[Event]], n_items: int, liked_only: bool = True) -> torch.Tensor:
    """How many training events each item has (liked ones, when `liked_only`)."""
    counts = np.zeros(n_items, dtype=np.float32)
    for events in train.values():
        for e in events:
            if e.liked or not liked_only:
                counts[e.item] += 1
    return torch.from_numpy(counts)


def like_rate(train: dict[str, list[Event]], n_items: int) -> torch.Tensor:
    """Each item's share of liked training events, smoothed towards the overall share (preference popularity)."""
    liked = np.zeros(n_items)
    seen = np.zeros(n_items)
    for events in train.values():
        for e in events:
            seen[e.item] += 1
            liked[e.item] += e.liked
    prior = liked.sum() / max(1.0, seen.sum())
    return torch.from_numpy((liked + prior) / (seen + 1)).float()


class ALS:
    """implicit's ALS on the training matrix; `scores(histories)` folds each history in as a new user."""

    def __init__(
        self,
        train: dict[str, list[Event]],
        n_items: int,
        factors: int = 64,
        regularization: float = 0.05,
        seed: int = 0,
    ) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        self.n_items = n_items
        rows = [events for events in train.values() if any(e.liked for e in events)]
        with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, not BLAS's
            self.model = AlternatingLeastSquares(
                factors=factors, regularization=regularization, iterations=15, random_state=seed
            )
            self.model.fit(self.matrix([liked_items(events) for events in rows]), show_progress=False)

    def matrix(self, item_lists: Sequence[Sequence[int]]):
        import scipy.sparse as sp

        rows = [r for r, items in enumerate(item_lists) for _ in items]
        cols = [i for items in item_lists for i in items]
        data = np.ones(len(cols), dtype=np.float32)
        return sp.csr_matrix((data, (rows, cols)), shape=(len(item_lists), self.n_items))

    def scores(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        from threadpoolctl import threadpool_limits

        items = np.asarray(self.model.item_factors)
        with threadpool_limits(1, "blas"):
            users = self.model.recalculate_user(np.arange(len(histories)), self.matrix(histories))
        return torch.from_numpy(users @ items.T).float()


def liked_items(history: Sequence[Event]) -> list[int]:
    return [e.item for e in history if e.liked]


def tuned_als(
    train: dict[str, list[Event]],
    n_items: int,
    tune: Sequence[Case],
    score_fn,
    seed: int = 0,
) -> ALS:
    """The ALS of MF_GRID that scores best on the validation cases (`score_fn(model) -> float`)."""
    best, best_score = None, -np.inf
    for factors, reg in MF_GRID:
        model = ALS(train, n_items, factors, reg, seed)
        score = score_fn(model) if tune else 0.0
        if best is None or score > best_score:
            best, best_score = model, score
        if not tune:
            break
    return best
