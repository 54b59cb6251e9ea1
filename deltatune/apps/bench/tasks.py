"""The benchmark's tasks and their data: the same rows for every method, model and seed.

- `sst2` (encoders): SST-2 sentence classification, dev accuracy.
- `sst2-text` (decoders): the same sentences as an instruction ("positive" or "negative"), exact match of the greedy
  answer, i.e. accuracy; classification as text, the way a decoder does it.
- `dates` (decoders): rewrite a date written in words as ISO 8601 (the demo's task, dates from the real calendar),
  exact match.

Every task has three disjoint splits: `train`, `validation` (carved from the training data; the learning-rate sweep
picks on it) and `dev` (the score reported, never seen by the sweep). The training budget is counted in tokens
(`token_budget`): a model whose tokenizer cuts the same text into more tokens gets fewer steps, so every model and
method trains on the same amount of text.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_DATA = "../shared/data/sst2"  # relative to the repository, as recipes/sst2-minilm-lora.yaml
SPLIT_SEED = 1234  # the data split is the same for every run; a run's seed changes initialisation and order


@dataclasses.dataclass(frozen=True)
class BenchTask:
    name: str
    family: str  # "encoder" | "decoder": which models it runs on
    trainer_task: str  # "seq-cls" | "causal-lm"
    metric: str  # the score reported, 0..1
    token_budget: (
        int  # training tokens per run (prompt and padding-free answer tokens, as the loss sees them)
    )
    batch_size: int
    max_length: int
    train_rows: int
    val_rows: int
    dev_rows: int  # 0: the whole dev split
    max_new_tokens: int = 0  # decoders: the answer's length budget when generating

    def scaled(self, factor: float, rows: int | None = None) -> BenchTask:
        """A cheaper copy (--quick): a fraction of the token budget, at most `rows` train and dev rows and a quarter
        of that for validation."""

        def cap(n: int, limit: int | None) -> int:
            return n if not limit else min(n, limit) if n else limit

        return dataclasses.replace(
            self,
            token_budget=max(1, int(self.token_budget * factor)),
            train_rows=cap(self.train_rows, rows),
            val_rows=cap(self.val_rows, rows and max(1, rows // 4)),
            dev_rows=cap(self.dev_rows, rows),
        )


TASKS = {
    t.name: t
    for t in (
        BenchTask("sst2", "encoder", "seq-cls", "accuracy", 24_000, 16, 64, 4000, 400, 0),
        BenchTask("sst2-text", "decoder", "causal-lm", "exact_match", 48_000, 8, 96, 2000, 100, 200, 3),
        BenchTask("dates", "decoder", "causal-lm", "exact_match", 48_000, 8, 96, 2000, 100, 200, 12),
    )
}
SENTIMENT = {0: "negative", 1: "positive"}
SENTIMENT_PROMPT = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: "
)
DATE_PROMPT = "Rewrite the date in ISO 8601 (YYYY-MM-DD).\n\nDate: "


def tasks_for(family: str) -> list[BenchTask]:
    return [t for t in TASKS.values() if t.family == family]


def _sst2_files(data_dir: str) -> dict[str, str]:
    from deltatune.train.recipe import resolve_path

    folder = resolve_path(data_dir, REPO) or data_dir
    files = {}
    for split, names in (("train", ("train.tsv", "train.csv")), ("dev", ("dev.tsv", "dev.csv"))):
        found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
        if not found:
            raise FileNotFoundError(
                f"No {' or '.join(names)} in {folder}; pass --data-dir pointing at a folder with SST-2's "
                "train.tsv and dev.tsv (columns sentence, label)."
            )
        files[split] = found[0]
    return files


def _take(table, rows: list[int]):
    return table.select(sorted(rows))


def _sst2_tables(task: BenchTask, data_dir: str) -> dict[str, Any]:
    from deltatune.train.data import load_table

    files = _sst2_files(data_dir)
    train, dev = load_table(files["train"], "train"), load_table(files["dev"], "validation")
    order = list(range(len(train)))
    random.Random(SPLIT_SEED).shuffle(order)
    if task.val_rows + task.train_rows > len(order):
        raise ValueError(f"{files['train']} has {len(order)} rows; the {task.name} task needs more.")
    tables = {
        "validation": _take(train, order[: task.val_rows]),
        "train": _take(train, order[task.val_rows : task.val_rows + task.train_rows]),
        "dev": dev
        if not task.dev_rows or task.dev_rows >= len(dev)
        else _take(dev, list(range(task.dev_rows))),
    }
    if task.trainer_task == "causal-lm":
        tables = {
            name: table.map(_sentiment_row, remove_columns=table.column_names)
            for name, table in tables.items()
        }
    return tables


def _sentiment_row(row: dict[str, Any]) -> dict[str, str]:
    return {
        "instruction": SENTIMENT_PROMPT + str(row["sentence"]).strip(),
        "output": SENTIMENT[int(row["label"])],
    }


def _dates_tables(task: BenchTask) -> dict[str, Any]:
    import datasets

    from deltatune.train.dates import make_dates

    sizes = {"train": task.train_rows, "validation": task.val_rows, "dev": task.dev_rows or 200}
    pairs = make_dates(sum(sizes.values()), SPLIT_SEED)  # distinct dates: no split shares one
    tables, start = {}, 0
    for name, n in sizes.items():
        rows = [
            {"instruction": DATE_PROMPT + words, "output": iso} for words, iso in pairs[start : start + n]
        ]
        tables[name], start = datasets.Dataset.from_list(rows), start + n
    return tables


def load_tables(task: BenchTask, data_dir: str = DEFAULT_DATA) -> dict[str, Any]:
    """train / validation / dev tables of a task, the same for every run."""
    if task.name == "dates":
        return _dates_tables(task)
    return _sst2_tables(task, data_dir)


def majority_baseline(task: BenchTask, tables: dict[str, Any]) -> dict[str, Any]:
    """The score of always giving the training split's most frequent answer, on dev: the bar to clear."""
    column = "label" if task.trainer_task == "seq-cls" else "output"
    answer, _ = Counter(tables["train"][column]).most_common(1)[0]
    refs = tables["dev"][column]
    return {"answer": str(answer), "score": sum(r == answer for r in refs) / len(refs)}
