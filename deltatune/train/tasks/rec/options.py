"""The `rec:` section of a recipe: where the interaction log's columns are, how it is split, which model to train.

task: rec
train_file: ml-100k/u.data           # the interaction log (CSV/TSV/JSONL/Parquet, or MovieLens u.data as is)
rec:
  item_file: ml-100k/items.csv       # one row per item, with its text
  item_text_column: [title, genres]  # columns joined into the item's text
  rating_column: rating
  time_column: timestamp
  rating_threshold: 4                # ranking: keep events rated >= 4; preference: liked if >= 4
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import ConfigError

MODES = ("ranking", "preference")
SPLITS = ("leave-last-out", "time")
DEDUPE = ("first", "last")


@dataclass
class RecOptions:
    mode: str = (
        "ranking"  # ranking: next-item full ranking; preference: TALLRec-style Yes/No with a causal LM
    )
    item_file: str | None = None
    user_column: str = "user_id"
    item_column: str = "item_id"
    rating_column: str | None = None
    time_column: str | None = None  # unset: the log's row order is the time order
    item_id_column: str | None = None  # the item file's id column (default: item_column)
    item_text_column: str | list[str] = "title"
    rating_threshold: float | None = None
    split: str = "leave-last-out"  # leave-last-out | time
    time_split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    dedupe: str | None = None  # a user meeting an item twice is an error unless this says which event to keep
    history_length: int = 20  # most recent items a model reads
    negatives: int = 64  # ranking: items sampled per batch as negatives, beside the other rows' positives
    temperature: float = 0.05  # ranking: softmax temperature over cosine similarities
    hybrid: bool = False  # ranking: add learned item-id embeddings to the text representation
    hybrid_items: list[str] | None = (
        None  # written by a run: the items that have an id embedding, in row order
    )

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"rec.mode must be one of {', '.join(MODES)}, got {self.mode!r}."),
            (self.split in SPLITS, f"rec.split must be one of {', '.join(SPLITS)}, got {self.split!r}."),
            (
                self.dedupe in (None, *DEDUPE),
                f"rec.dedupe must be first or last (which repeated event to keep), got {self.dedupe!r}.",
            ),
            (
                self.item_file is not None,
                "rec.item_file is required: a file with one row per item and its text.",
            ),
            (self.history_length >= 1, f"rec.history_length must be at least 1, got {self.history_length}."),
            (self.negatives >= 0, f"rec.negatives must be 0 or more, got {self.negatives}."),
            (self.temperature > 0, f"rec.temperature must be positive, got {self.temperature}."),
            (
                len(self.time_split) == 3
                and all(f > 0 for f in self.time_split)
                and abs(sum(self.time_split) - 1) < 1e-6,
                f"rec.time_split must be three positive fractions summing to 1, got {self.time_split}.",
            ),
            (
                self.split != "time" or self.time_column is not None,
                "rec.split: time needs rec.time_column (the column holding each event's time).",
            ),
            (
                self.mode != "preference" or (self.rating_column and self.rating_threshold is not None),
                "rec.mode: preference needs rec.rating_column and rec.rating_threshold (liked = rating >= it).",
            ),
            (
                self.rating_threshold is None or self.rating_column is not None,
                "rec.rating_threshold needs rec.rating_column (the column holding the ratings).",
            ),
            (
                not (self.hybrid and self.mode == "preference"),
                "rec.hybrid adds id embeddings to the ranking model's text vectors; set rec.mode: ranking.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def text_columns(self) -> list[str]:
        cols = self.item_text_column
        return [cols] if isinstance(cols, str) else list(cols)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RecOptions:
        """The options of a recipe's `rec:` section; an unknown key names the closest valid one."""
        if values is not None and not isinstance(values, dict):
            raise ConfigError("rec must be a mapping of options, e.g. rec: {item_file: items.csv}.")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values or {}:
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.5)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"Unknown rec option rec.{key}.{hint} Valid: {', '.join(sorted(names))}.")
        return cls(**(values or {}))
