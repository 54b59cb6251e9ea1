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


def detection_scores(
    predictions: Sequence[dict[str, Any]], references: Sequence[dict[str, Any]], label_names: Sequence[str]
) -> dict[str, Any]:
    """COCO box metrics through torchmetrics (pycocotools backend): mAP (IoU 0.50:0.95), mAP@50, mAP@75, mAR@100
    (recall averaged over IoU 0.50:0.95) and recall@100 — the share of objects found (IoU >= 0.5, right class)
    among each image's top 100 detections, averaged over classes as COCO averages recall — plus AP per class.

    Each prediction holds `boxes` (xyxy pixels), `scores` and `labels` (class ids); each reference `boxes`, `labels`.
    """
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, extended_summary=True
    )
    metric.update(
        [{k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")} for p in predictions],
        [{k: r[k].detach().cpu() for k in ("boxes", "labels")} for r in references],
    )
    out = metric.compute()
    recall = out["recall"][0, :, 0, -1]  # IoU 0.50, every class, all areas, 100 detections
    found = recall[recall > -1]
    classes = out["classes"].reshape(-1).tolist()
    per_class = out["map_per_class"].reshape(-1).tolist()
    return {
        "map": float(out["map"]),
        "map_50": float(out["map_50"]),
        "map_75": float(out["map_75"]),
        "mar_100": float(out["mar_100"]),
        "recall@100": float(found.mean()) if len(found) else 0.0,
        "ap_per_class": {label_names[c]: float(v) for c, v in zip(classes, per_class) if v > -1},
    }


def segmentation_scores(
    predictions: Sequence[Any], references: Sequence[Any], label_names: Sequence[str], ignore_index: int = 255
) -> dict[str, Any]:
    """Pixel accuracy, mean IoU and IoU per class from one confusion matrix over every pixel (torchmetrics).
    Pixels labelled `ignore_index` count nowhere; a class absent from both prediction and reference has no IoU
    and is left out of the mean."""
    import torch
    from torchmetrics.classification import MulticlassConfusionMatrix

    metric = MulticlassConfusionMatrix(num_classes=len(label_names), ignore_index=ignore_index)
    for pred, ref in zip(predictions, references):
        metric.update(pred.reshape(-1).cpu(), ref.reshape(-1).cpu())
    confusion = metric.compute().double()  # rows: reference class, columns: predicted class
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    iou = torch.where(present, hits / union.clamp_min(1), torch.zeros_like(hits))
    total = confusion.sum()
    return {
        "pixel_accuracy": float(hits.sum() / total) if total > 0 else 0.0,
        "mean_iou": float(iou[present].mean()) if present.any() else 0.0,
        "iou_per_class": {n: float(v) for n, v, p in zip(label_names, iou, present) if p},
    }
