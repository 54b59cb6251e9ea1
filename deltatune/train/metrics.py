"""Evaluation metrics: classification scores (scikit-learn), entity F1 over BIO tags (the seqeval rule),
BLEU and chrF (sacrebleu), and exact match for generated text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def classification_scores(
    predictions: Sequence[int], references: Sequence[int], label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and F1 per class."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    labels = list(range(len(label_names))) if label_names else sorted(set(references) | set(predictions))
    names = list(label_names) if label_names else [str(x) for x in labels]
    p, r, f, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, average="macro", zero_division=0
    )
    _, _, per_class, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
        "f1_per_class": {name: float(v) for name, v in zip(names, per_class)},
    }


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans of a BIO (or IOB2) tag sequence, end exclusive.

    As in seqeval's default mode, an `I-X` that does not continue an `X` entity starts a new one."""
    spans = set()
    kind, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, label = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and kind == label
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


def entity_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Micro precision/recall/F1 over exact entity spans, plus token accuracy."""
    tp = n_pred = n_true = 0
    correct = total = 0
    for pred, ref in zip(predictions, references):
        if len(pred) != len(ref):
            raise ValueError(
                f"A predicted tag sequence has {len(pred)} tags but its reference has {len(ref)}."
            )
        p, t = bio_entities(pred), bio_entities(ref)
        tp += len(p & t)
        n_pred += len(p)
        n_true += len(t)
        correct += sum(a == b for a, b in zip(pred, ref))
        total += len(ref)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "entity_precision": precision,
        "entity_recall": recall,
        "entity_f1": f1,
        "token_accuracy": correct / total if total else 0.0,
    }


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming and collapsing whitespace."""
    if not references:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(
        references
    )


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match, corpus BLEU and chrF (sacrebleu's defaults, on a 0-100 scale)."""
    import sacrebleu

    preds, refs = list(predictions), list(references)
    return {
        "exact_match": exact_match(preds, refs),
        "bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(preds, [refs]).score),
    }
