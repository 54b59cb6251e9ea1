"""Metrics against hand-computed values and the reference libraries' own examples."""

import pytest

from deltatune.train.metrics import (
    bio_entities,
    classification_scores,
    entity_scores,
    exact_match,
    generation_scores,
)


def test_classification_scores_by_hand():
    preds, refs = [0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0]
    s = classification_scores(preds, refs, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    # per class: a P=1 R=1/2, b P=1/2 R=1, c P=2/3 R=2/3
    f = {"a": 2 / 3, "b": 2 / 3, "c": 2 / 3}
    assert s["f1_per_class"] == pytest.approx(f)
    assert s["precision_macro"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert s["recall_macro"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)


def test_entities_follow_seqeval():
    # seqeval's README example: f1 = 0.5
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_scores(y_pred, y_true)["entity_f1"] == pytest.approx(0.5)
    # an I- tag that does not continue its type starts a new entity (seqeval's default mode)
    assert bio_entities(["I-LOC", "I-LOC", "B-LOC", "I-PER", "O"]) == {
        ("LOC", 0, 2),
        ("LOC", 2, 3),
        ("PER", 3, 4),
    }


def test_generation_scores():
    assert exact_match([" 2020-01-02", "x"], ["2020-01-02", "y"]) == 0.5
    same = generation_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    import sacrebleu

    hyp, ref = ["the cat is on a mat"], ["the cat sat on the mat"]
    assert generation_scores(hyp, ref)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyp, [ref]).score)
    assert 0 < generation_scores(hyp, ref)["chrf"] < 100
