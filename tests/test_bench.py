"""`deltatune bench --quick` on a tiny model, so the command cannot rot. Speed is never asserted here."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from helpers import sentiment_rows, word_tokenizer, write_csv
from typer.testing import CliRunner

from deltatune.apps.bench import method_names
from deltatune.apps.cli import app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer BERT 64 wide (4-bit CPU quantization needs widths divisible by 64) and SST-2-shaped TSVs."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bench")
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=2,
    )
    model_dir = str(root / "model")
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    header = ("sentence", "label")
    write_csv(str(data / "train.tsv"), sentiment_rows(160, seed=1), header, "\t")
    dev = sentiment_rows(41, seed=2)
    write_csv(str(data / "dev.tsv"), dev, header, "\t")
    return {"model": model_dir, "data": str(data), "dev": dev, "root": root}


def _bench(tiny, out: str, *extra: str):
    args = ["bench", "--quick", "--model", tiny["model"], "--data-dir", tiny["data"], "--out", out, *extra]
    return CliRunner().invoke(app, args)


def test_quick_bench_runs_every_method(tiny):
    out = str(tiny["root"] / "results")
    result = _bench(tiny, out, "--no-isolate", "--steps", "3")
    assert result.exit_code == 0, result.output
    assert {"bench.json", "bench.md", "bench.png", "bench_memory.png", "bench_step_time.png"} <= set(
        os.listdir(out)
    )
    with open(os.path.join(out, "bench.json")) as fh:
        report = json.load(fh)
    rows = {r["method"]: r for r in report["methods"]}
    assert list(rows) == method_names()
    failed = {name: r["status"] for name, r in rows.items() if r["status"] != "ok"}
    assert not failed
    for name, r in rows.items():
        assert r["steps"] == 3, name
        assert 0 < r["trainable_params"] <= r["total_params"], name
        assert r["adapter_bytes"] > 0 and r["median_step_s"] > 0 and r["tokens_per_s"] > 0, name
        assert 0 <= r["dev_accuracy"] <= 1 and 0 <= r["dev_f1_macro"] <= 1, name
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    # the majority baseline, recomputed by hand from the files
    counts = Counter(y for _, y in sentiment_rows(160, seed=1))
    assert counts[0] != counts[1]  # no tie, so the majority label is unambiguous
    majority = counts.most_common(1)[0][0]
    expected = sum(y == majority for _, y in tiny["dev"]) / len(tiny["dev"])
    assert report["majority_baseline"]["accuracy"] == pytest.approx(expected)
    table = open(os.path.join(out, "bench.md")).read()
    assert "| majority class" in table and all(f"| {name} |" in table for name in rows)


def test_isolated_methods_and_bad_input(tiny):
    out = str(tiny["root"] / "isolated")
    result = _bench(tiny, out, "--methods", "lora,ia3", "--steps", "2")
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "bench.json")) as fh:
        rows = json.load(fh)["methods"]
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    assert all(r["status"] == "ok" and r["peak_memory_mb"] > 0 for r in rows), rows

    bad = _bench(tiny, out, "--methods", "lora,nope")
    assert bad.exit_code == 2 and "nope" in bad.output
    missing = CliRunner().invoke(app, ["bench", "--quick", "--data-dir", str(tiny["root"]), "--out", out])
    assert missing.exit_code == 2 and "train.tsv" in missing.output


def test_several_seeds_average_the_scores(tiny):
    out = str(tiny["root"] / "seeds")
    result = _bench(tiny, out, "--methods", "lora", "--steps", "2", "--seeds", "0,1", "--jobs", "2")
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "bench.json")) as fh:
        report = json.load(fh)
    assert report["seeds"] == [0, 1]
    (row,) = report["methods"]
    runs = row["seed_runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["status"] == "ok" for r in runs)
    accuracies = [r["dev_accuracy"] for r in runs]
    assert row["dev_accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert row["dev_accuracy_std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2**0.5)
    assert "±" in open(os.path.join(out, "bench.md")).read()

    bad = _bench(tiny, out, "--methods", "lora", "--seeds", "one")
    assert bad.exit_code == 2 and "--seeds" in bad.output
