"""Tiny, download-free models with real tokenizers, saved to folders, for the training and CLI tests."""

from __future__ import annotations

import csv
import os
import random

import torch

WORDS = (
    "good great fine nice love superb fun happy bad awful poor hate boring dull sad worst the a movie film plot "
    "acting was is very not really quite story"
).split()
POSITIVE, NEGATIVE = WORDS[:8], WORDS[8:16]
FILLER = WORDS[16:]


def word_tokenizer(words=WORDS):
    """A BERT-style fast tokenizer over a fixed word list ([CLS] text [SEP], pairs supported)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_bert_folder(path: str, num_labels: int = 2, seed: int = 0, task: str = "seq-cls") -> str:
    """Save a 2-layer BERT (no dropout, so runs compare exactly) and its tokenizer to `path`."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    tok = word_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cls = BertForTokenClassification if task == "token-cls" else BertForSequenceClassification
    cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Sentences whose label is decided by one positive or negative word among fillers: easy to learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        key = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, rng.randrange(2, 6)) + [key]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: str, rows, header=("text", "label"), delimiter: str = ",") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '[CLS] ' + m['role'] + ' ' + m['content'] + ' [SEP] ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[CLS] assistant ' }}{% endif %}"
)


def tiny_llama_folder(path: str, seed: int = 0) -> str:
    """A 2-layer Llama and a word tokenizer with a small chat template, saved to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    tok.add_tokens(["user", "assistant"])
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_config(tmp_path, **overrides):
    """A TrainConfig for a few quiet steps of a tiny model (no progress bar, plots or tensorboard; one thread)."""
    from deltatune.train.trainer import TrainConfig

    base = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        progress=False,
        tensorboard=False,
        plot=False,
        num_threads=1,
    )
    return TrainConfig(**{**base, **overrides})
