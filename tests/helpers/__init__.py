"""What the tests share: tiny models built in code (models.py) and tiny data sets and saved models (data.py)."""

from helpers.data import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    WORDS,
    sentiment_rows,
    tiny_bert_folder,
    tiny_llama_folder,
    train_config,
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
from helpers.serving import save_llama_adapters, serve_in_thread

__all__ = [
    "train_config",
    "CNN",
    "FILLER",
    "MLP",
    "NEGATIVE",
    "POSITIVE",
    "WORDS",
    "ids",
    "randomize_adapter",
    "save_llama_adapters",
    "sentiment_rows",
    "serve_in_thread",
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
