"""What the tests share: tiny models built in code (models.py) and tiny data sets and saved models (data.py)."""

from helpers.data import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    WORDS,
    sentiment_rows,
    tiny_bert_folder,
    tiny_llama_folder,
    word_tokenizer,
    write_csv,
)
from helpers.models import (
    CNN,
    MLP,
    ids,
    randomize_adapter,
    smollm2_path,
    tiny_bert_cls,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
)

__all__ = [
    "CNN",
    "FILLER",
    "MLP",
    "NEGATIVE",
    "POSITIVE",
    "WORDS",
    "ids",
    "randomize_adapter",
    "sentiment_rows",
    "smollm2_path",
    "tiny_bert_cls",
    "tiny_bert_folder",
    "tiny_cnn",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_llama_folder",
    "tiny_mlp",
    "word_tokenizer",
    "write_csv",
]
