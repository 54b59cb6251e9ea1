"""Token classification, seq2seq and image classification tasks run through the Trainer on tiny models."""

import pytest
import torch
from helpers import tiny_cnn, train_config, word_tokenizer

from deltatune import LoraConfig, get_peft_model
from deltatune.train import (
    ImageClassificationTask,
    Seq2SeqTask,
    TokenClassificationTask,
    Trainer,
)

cfg = train_config  # a few quiet steps of a tiny model


def test_token_classification_aligns_bio_tags_and_scores_entities(tmp_path):
    import datasets
    from transformers import BertConfig, BertForTokenClassification

    tok = word_tokenizer()
    rows = {
        "tokens": [["the", "good", "film"], ["a", "bad", "plot", "was", "dull"]] * 4,
        "tags": [["O", "B-POS", "I-POS"], ["O", "B-NEG", "I-NEG", "O", "B-NEG"]] * 4,
    }
    task = TokenClassificationTask(tok)
    features = task.prepare(datasets.Dataset.from_dict(rows))
    assert task.labels.names == ["B-NEG", "B-POS", "I-NEG", "I-POS", "O"]
    # [CLS] and [SEP] carry no label; every word has exactly one labelled token
    assert features[0]["labels"] == [-100, 4, 1, 3, -100]
    torch.manual_seed(0)
    model = BertForTokenClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=5,
        )
    )
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type="TOKEN_CLS"))
    summary = Trainer(model, task, features, features, cfg(tmp_path)).train()
    assert {"eval_entity_f1", "eval_entity_precision", "eval_token_accuracy"} <= set(summary["final"])


def test_seq2seq_trains_and_generates(tmp_path):
    import datasets
    from transformers import T5Config, T5ForConditionalGeneration

    tok = word_tokenizer()
    table = datasets.Dataset.from_dict(
        {"source": ["good film", "bad plot"] * 4, "target": ["great", "awful"] * 4}
    )
    task = Seq2SeqTask(tok, max_new_tokens=3, generate_samples=2)
    features = task.prepare(table)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=3,
        )
    )
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    summary = Trainer(model, task, features, features, cfg(tmp_path)).train()
    assert {"eval_loss", "eval_bleu", "eval_chrf", "eval_exact_match"} <= set(summary["final"])


def test_image_classification_from_tensors_and_from_a_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 8, 8, generator=g) + 2 * c, c) for c in (0, 1) for _ in range(8)]
    task = ImageClassificationTask()
    features = task.prepare(data)
    model = get_peft_model(
        tiny_cnn(), LoraConfig(r=2, target_modules=["conv", "conv1d"], modules_to_save=["head"])
    )
    summary = Trainer(
        model, task, features, features, cfg(tmp_path / "tensors", max_steps=30, lr=3e-2)
    ).train()
    assert summary["final"]["eval_accuracy"] >= 0.75  # bright vs dark images; chance is 0.5

    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 12), colour).save(tmp_path / "images" / cls / f"{i}.png")
    folder_task = ImageClassificationTask(image_size=8)
    rows = folder_task.prepare(str(tmp_path / "images"))
    assert folder_task.labels.names == ["blue", "red"] and len(rows) == 4
    assert rows[0]["pixel_values"].shape == (3, 8, 8)
    assert (
        rows[0]["pixel_values"][2].mean() == pytest.approx(1.0) and rows[-1]["pixel_values"][0].mean() == 1.0
    )
