"""Ranking and preference metrics, from score matrices, the same code for every model and baseline.

Ranking is full ranking over the whole catalogue, minus the items in the user's history (a user does not meet an
item twice). Ties in score are broken by one fixed random order of the items, so a baseline that gives many
items the same score (popularity) gets its expected rank, not the best or the worst one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

KS = (5, 10, 20)


def target_ranks(
    scores: torch.Tensor,
    targets: Sequence[Sequence[int]],
    excluded: Sequence[Sequence[int]],
    tie_order: torch.Tensor,
) -> list[list[int]]:
    """1-based rank of every target among the items that are not excluded, for each row of `scores`.

    `tie_order` is a permutation of the items: among equal scores, the item that comes first in it ranks first."""
    scores = scores.float().clone()
    rows = torch.tensor([r for r, items in enumerate(excluded) for _ in items], dtype=torch.long)
    cols = torch.tensor([i for items in excluded for i in items], dtype=torch.long)
    if len(rows):
        scores[rows, cols] = -math.inf
    out = []
    for r, items in enumerate(targets):
        t = torch.tensor(list(items), dtype=torch.long)
        s, mine = scores[r], scores[r, t].unsqueeze(1)
        better = (s.unsqueeze(0) > mine).sum(1)
        tied_before = ((s.unsqueeze(0) == mine) & (tie_order.unsqueeze(0) < tie_order[t].unsqueeze(1))).sum(1)
        out.append((1 + better + tied_before).tolist())
    return out


def ranking_metrics(ranks: Sequence[Sequence[int]], ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@K (a target in the top K), recall@K (share of targets in the top K), NDCG@K (binary gains, ideal DCG
    over min(#targets, K) hits) and MRR (1 / rank of the best-ranked target), averaged over cases."""
    if not ranks:
        raise ValueError("No cases to score.")
    out: dict[str, float] = {}
    for k in ks:
        hit, recall, ndcg = [], [], []
        for case in ranks:
            top = [r for r in case if r <= k]
            hit.append(float(bool(top)))
            recall.append(len(top) / len(case))
            ideal = sum(1 / math.log2(i + 2) for i in range(min(len(case), k)))
            ndcg.append(sum(1 / math.log2(r + 1) for r in top) / ideal)
        out[f"hit@{k}"], out[f"recall@{k}"], out[f"ndcg@{k}"] = map(float, map(np.mean, (hit, recall, ndcg)))
    out["mrr"] = float(np.mean([1 / min(case) for case in ranks]))
    return out


def preference_metrics(p_yes: Sequence[float], liked: Sequence[bool]) -> dict[str, float]:
    """AUC of P(Yes), and accuracy, precision, recall and F1 of "Yes" when P(Yes) > 0.5 (the liked class)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y, p = np.asarray(liked, dtype=int), np.asarray(p_yes, dtype=float)
    predicted = (p > 0.5).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, average="binary", pos_label=1, zero_division=0
    )
    return {
        "auc": auc(p, y),
        "accuracy": float(accuracy_score(y, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def auc(scores: Sequence[float], liked: Sequence[bool]) -> float:
    """ROC AUC; NaN when the cases hold only one class (it is then undefined)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(liked, dtype=int)
    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))
