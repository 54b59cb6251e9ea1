"""Evaluation metrics: classification scores with per-class reports and confusion matrices, regression and
multi-label scores (scikit-learn, scipy), entity F1 over BIO tags (the seqeval rule), SQuAD exact match and F1,
ROUGE (rouge-score), BLEU and chrF (sacrebleu).

Text metrics work on Chinese too: wherever a metric splits text into words, each CJK character is a word of its own
(Chinese has no spaces between words), and BLEU switches to sacrebleu's `zh` tokenizer when the references are
Chinese."""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence
from typing import Any

# CJK ideographs (and extension A, compatibility ideographs), kana and Hangul: scripts written without spaces
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"[{_CJK}]")
# CJK punctuation (。，、「」…) lives in these blocks; ASCII punctuation is string.punctuation as in SQuAD
_CJK_PUNCT = re.compile(
    "[\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2018-\u201f\u2026]"
)


def has_cjk(text: str) -> bool:
    return bool(_CJK_CHAR.search(text))


def words(text: str) -> list[str]:
    """Whitespace-separated words, with every CJK character a word of its own ("mixed segmentation")."""
    return _CJK_CHAR.sub(lambda m: f" {m.group(0)} ", text).split()


# --- classification ------------------------------------------------------------------------------
def classification_scores(
    predictions: Sequence[int], references: Sequence[int], label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, precision/recall/F1/support per class and the confusion matrix
    (rows: true class, columns: predicted class, in label order)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(label_names))) if label_names else sorted(set(references) | set(predictions))
    names = list(label_names) if label_names else [str(x) for x in labels]
    p, r, f, _ = precision_recall_fscore_support(
        references, predictions, labels=labels, average="macro", zero_division=0
    )
    pc, rc, fc, support = precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
        "f1_per_class": {name: float(v) for name, v in zip(names, fc)},
        "per_class": {
            name: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(n)}
            for name, a, b, c, n in zip(names, pc, rc, fc, support)
        },
        "confusion_matrix": confusion_matrix(references, predictions, labels=labels).tolist(),
    }


def multilabel_scores(
    predictions: Sequence[Sequence[int]], references: Sequence[Sequence[int]], label_names: Sequence[str]
) -> dict[str, Any]:
    """Micro and macro precision/recall/F1, subset accuracy (every label right) and F1 per label, from 0/1 rows."""
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    pred, ref = np.asarray(predictions, dtype=int), np.asarray(references, dtype=int)
    result: dict[str, Any] = {"subset_accuracy": float(accuracy_score(ref, pred))}
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(ref, pred, average=average, zero_division=0)
        result.update(
            {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
        )
    _, _, per_label, _ = precision_recall_fscore_support(ref, pred, average=None, zero_division=0)
    result["f1_per_label"] = {name: float(v) for name, v in zip(label_names, per_label)}
    return result


def regression_scores(predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    """MSE, MAE, RMSE, Pearson's r and Spearman's rho (NaN when either side is constant: no correlation is
    defined then)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    pred, ref = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    mse = float(np.mean((pred - ref) ** 2))
    constant = len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(ref) == 0
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(pred - ref))),
        "pearson": math.nan if constant else float(pearsonr(pred, ref)[0]),
        "spearman": math.nan if constant else float(spearmanr(pred, ref)[0]),
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


# --- question answering (SQuAD) ------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ASCII_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalization (lower case, no punctuation, no English articles, single spaces), plus CJK
    punctuation removed."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    text = _CJK_PUNCT.sub("", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 between normalized answers; an empty gold answer (unanswerable) scores 1 only for an
    empty prediction, as in SQuAD 2.0."""
    pred, ref = words(squad_normalize(prediction)), words(squad_normalize(gold))
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (0-100, SQuAD's scale), each the best over a question's gold answers; an empty list of
    gold answers means unanswerable. Also split into answerable (has_answer_*) and unanswerable (no_answer_*)."""
    exact, f1, has = [], [], []
    for pred, golds in zip(predictions, gold_answers):
        golds = [g for g in golds if squad_normalize(g)] or [""]
        has.append(golds != [""])
        exact.append(max(squad_exact(pred, g) for g in golds))
        f1.append(max(squad_f1(pred, g) for g in golds))

    def mean(values, keep):
        chosen = [v for v, k in zip(values, keep) if k]
        return 100 * sum(chosen) / len(chosen) if chosen else math.nan

    everything = [True] * len(exact)
    result = {"exact_match": mean(exact, everything), "f1": mean(f1, everything)}
    if any(has):
        result.update(has_answer_exact=mean(exact, has), has_answer_f1=mean(f1, has))
    if not all(has):
        no = [not h for h in has]
        result.update(no_answer_exact=mean(exact, no), no_answer_f1=mean(f1, no))
    return result


# --- generated text -------------------------------------------------------------------------------


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after trimming and collapsing whitespace."""
    if not references:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(
        references
    )


def bleu_tokenizer(references: Sequence[str]) -> str:
    """sacrebleu's tokenizer for these references: `zh` for Chinese (it splits every character), else 13a."""
    return "zh" if any(has_cjk(r) for r in references) else "13a"


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match, corpus BLEU and chrF (sacrebleu, 0-100; BLEU with the `zh` tokenizer for Chinese)."""
    import sacrebleu

    preds, refs = list(predictions), list(references)
    return {
        "exact_match": exact_match(preds, refs),
        "bleu": float(sacrebleu.corpus_bleu(preds, [refs], tokenize=bleu_tokenizer(refs)).score),
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


class _CJKTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9] and so scores Chinese as empty text; this one keeps
    every CJK character as a token (and lower-cased Latin words), the usual way Chinese ROUGE is computed."""

    def tokenize(self, text: str) -> list[str]:
        return [w for w in words(re.sub(r"[^0-9a-z" + _CJK + "]+", " ", text.lower())) if w]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, 0-100; Porter stemming for English, characters for Chinese) and
    length statistics: mean words per prediction and per reference, and their ratio."""
    from rouge_score import rouge_scorer

    preds, refs = list(predictions), list(references)
    chinese = any(has_cjk(r) for r in refs)
    scorer = rouge_scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL"],
        use_stemmer=not chinese,
        tokenizer=_CJKTokenizer() if chinese else None,
    )
    totals = collections.Counter()
    for pred, ref in zip(preds, refs):
        for name, score in scorer.score(ref, pred).items():
            totals[name] += score.fmeasure
    n = max(1, len(refs))
    pred_len = sum(len(words(p)) for p in preds) / n
    ref_len = sum(len(words(r)) for r in refs) / n
    return {
        "rouge1": 100 * totals["rouge1"] / n,
        "rouge2": 100 * totals["rouge2"] / n,
        "rougeL": 100 * totals["rougeL"] / n,
        "prediction_words": pred_len,
        "reference_words": ref_len,
        "length_ratio": pred_len / ref_len if ref_len else math.nan,
    }


# --- reports --------------------------------------------------------------------------------------
def report_table(scores: dict[str, Any], title: str = "classification report"):
    """A rich Table of per-class precision/recall/F1/support followed by the confusion matrix."""
    from rich.table import Table

    names = list(scores["per_class"])
    table = Table(title=title)
    for column in ["class", "precision", "recall", "f1", "support"] + [f"pred {n}" for n in names]:
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in zip(names, scores["confusion_matrix"]):
        stats = scores["per_class"][name]
        table.add_row(
            name,
            *(f"{stats[k]:.4f}" for k in ("precision", "recall", "f1")),
            str(stats["support"]),
            *(str(v) for v in row),
        )
    return table


def plot_confusion_matrix(scores: dict[str, Any], path: str, title: str = "confusion matrix") -> None:
    """The confusion matrix as a PNG: counts in each cell, rows true classes, columns predicted classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, matrix = list(scores["per_class"]), scores["confusion_matrix"]
    size = 1.2 + 0.7 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black"
            )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
