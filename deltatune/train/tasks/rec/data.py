"""Interaction logs and item catalogues: reading them, checking them, and splitting users' histories.

A log is one event per row (user, item, optional rating and time), in CSV/TSV/JSONL/Parquet, or MovieLens-100K's
`u.data` and `u.item` as they ship. Every user's events are put in time order (ties keep the file's order). Ids are
compared as text, so `7` in a JSON log and `"7"` in a CSV item file are the same item.

Splits, as recommender papers use them:
- leave-last-out: each user's last event is the test target, the one before it the validation target, the rest
  train (users with fewer than three events only train);
- time: global cut points at the given fractions of all events (by time); a user's validation targets are their
  events in the middle period, read against the history before it, and likewise for test.
Items come from the item file, so an item nobody has met in training (cold start) is still ranked, through its text.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from deltatune.errors import DataError
from deltatune.train.data import read_json_rows, require_columns
from deltatune.train.tasks.rec.options import RecOptions

if TYPE_CHECKING:
    import pandas as pd

# pandas is imported where it is used: every `deltatune` command imports the task list, and only rec reads logs.

# MovieLens-100K's own layouts (the dataset's README): u.data is tab-separated without a header; u.item is
# '|'-separated Latin-1 with 19 genre flags.
U_DATA_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
U_ITEM_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
U_ITEM_COLUMNS = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *U_ITEM_GENRES]


def read_frame(path: str) -> pd.DataFrame:
    """Every column as text (ids stay as written); MovieLens' u.data and u.item layouts are recognised."""
    import pandas as pd

    if not os.path.isfile(path):
        raise DataError(f"Data file not found: {path} (resolved to {os.path.abspath(path)}).")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".data":
            return pd.read_csv(path, sep="\t", header=None, names=U_DATA_COLUMNS, dtype=str)
        if ext == ".item":
            frame = pd.read_csv(
                path, sep="|", header=None, names=U_ITEM_COLUMNS, dtype=str, encoding="latin-1"
            )
            flags = frame[U_ITEM_GENRES].to_numpy() == "1"
            frame["genres"] = [", ".join(g for g, on in zip(U_ITEM_GENRES, row) if on) for row in flags]
            return frame.drop(columns=U_ITEM_GENRES)
        if ext in (".csv", ".tsv"):
            sep = "\t" if ext == ".tsv" else ","
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        if ext in (".json", ".jsonl"):
            return pd.DataFrame(read_json_rows(path))
        if ext == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"Could not read {path}: {err}") from err
    raise DataError(
        f"{path}: unsupported file type {ext!r}; use .csv, .tsv, .json, .jsonl, .parquet, or MovieLens' "
        "u.data / u.item."
    )


def require(frame: pd.DataFrame, columns: dict[str, str | None], source: str) -> None:
    require_columns(SimpleNamespace(column_names=list(frame.columns)), columns, source)


def as_ids(values: pd.Series, what: str, source: str) -> list[str]:
    missing = values.isna() | (values.astype(str).str.strip() == "")
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise DataError(f"{source}: row {row + 1} has no {what}; every event needs one.")
    return [_id_text(v) for v in values]


def _id_text(value: Any) -> str:
    """Ids as text; a float that holds an integer (JSON and Parquet readers make those) loses its '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def as_numbers(values: pd.Series, column: str, source: str) -> np.ndarray:
    import pandas as pd

    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        row = int(np.flatnonzero(numbers.isna().to_numpy())[0])
        raise DataError(f"{source}: {column} {values.iloc[row]!r} in row {row + 1} is not a number.")
    return numbers.to_numpy(dtype=float)


def as_times(values: pd.Series, column: str, source: str) -> np.ndarray:
    """Numbers (e.g. Unix seconds) as they are; anything else is parsed as a date."""
    import pandas as pd

    numbers = pd.to_numeric(values, errors="coerce")
    if not numbers.isna().any():
        return numbers.to_numpy(dtype=float)
    dates = pd.to_datetime(values, errors="coerce", utc=True)
    if dates.isna().any():
        row = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise DataError(
            f"{source}: {column} {values.iloc[row]!r} in row {row + 1} is neither a number nor a date."
        )
    return dates.astype("int64").to_numpy(dtype=float) / 1e9


# --- items -----------------------------------------------------------------------------------------------------
@dataclass
class Catalogue:
    """Every item that can be recommended: ids and texts in the item file's order."""

    ids: list[str]
    texts: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: i for i, item in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, items: list[str], source: str) -> list[int]:
        unknown = [i for i in items if i not in self.index]
        if unknown:
            raise DataError(
                f"{source} names {len(unknown)} item(s) that are not in the item file (e.g. "
                f"{', '.join(map(repr, unknown[:3]))}); add them to the item file or remove those events."
            )
        return [self.index[i] for i in items]


def read_catalogue(options: RecOptions) -> Catalogue:
    import pandas as pd

    source = options.item_file
    frame = read_frame(source)
    id_column = options.item_id_column or options.item_column
    require(frame, {"item_id_column": id_column}, source)
    require(frame, {f"item_text_column[{i}]": c for i, c in enumerate(options.text_columns)}, source)
    ids = as_ids(frame[id_column], "item id", source)
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise DataError(f"{source}: item {item!r} appears twice; keep one row per item.")
        seen.add(item)
    texts = []
    for item, values in zip(ids, frame[options.text_columns].itertuples(index=False)):
        parts = [str(v).strip() for v in values if v is not None and not pd.isna(v) and str(v).strip()]
        if not parts:
            raise DataError(
                f"{source}: item {item!r} has no text in {', '.join(options.text_columns)}; the models read "
                "items through their text, so give every item some."
            )
        texts.append(", ".join(parts))
    return Catalogue(ids, texts)


# --- events ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    item: int  # index into the catalogue
    liked: bool  # rating >= threshold (True when there is no threshold: every event is a positive)
    time: float


@dataclass
class Log:
    """Every user's events in time order."""

    catalogue: Catalogue
    users: dict[str, list[Event]]

    def __len__(self) -> int:
        return sum(len(events) for events in self.users.values())


def read_log(options: RecOptions, path: str, catalogue: Catalogue, positives_only: bool) -> Log:
    """The interaction log, checked and ordered. `positives_only` keeps only liked events (implicit feedback)."""
    frame = read_frame(path)
    require(
        frame,
        {
            "user_column": options.user_column,
            "item_column": options.item_column,
            "rating_column": options.rating_column,
            "time_column": options.time_column,
        },
        path,
    )
    if len(frame) == 0:
        raise DataError(f"{path} has no events.")
    users = as_ids(frame[options.user_column], "user id", path)
    items = catalogue.lookup(as_ids(frame[options.item_column], "item id", path), path)
    n = len(frame)
    times = (
        as_times(frame[options.time_column], options.time_column, path)
        if options.time_column
        else np.arange(n, dtype=float)
    )
    liked = np.ones(n, dtype=bool)
    if options.rating_threshold is not None:
        liked = (
            as_numbers(frame[options.rating_column], options.rating_column, path) >= options.rating_threshold
        )
    order = np.lexsort((np.arange(n), times))  # by time; equal times keep the file's order
    by_user: dict[str, list[Event]] = {}
    first_row: dict[tuple[str, int], int] = {}
    for row in order:
        key = (users[row], items[row])
        if key in first_row:
            if options.dedupe is None:
                raise DataError(
                    f"{path}: user {users[row]!r} meets item {catalogue.ids[items[row]]!r} twice (rows "
                    f"{first_row[key] + 1} and {row + 1}); a recommender ranks each item once per user. Remove "
                    "the repeats, or set rec.dedupe: first (keep the earliest event) or last (the latest)."
                )
            if options.dedupe == "first":
                continue
            by_user[users[row]] = [e for e in by_user[users[row]] if e.item != items[row]]
        first_row.setdefault(key, int(row))
        by_user.setdefault(users[row], []).append(Event(int(items[row]), bool(liked[row]), float(times[row])))
    if positives_only:
        by_user = {u: [e for e in events if e.liked] for u, events in by_user.items()}
        by_user = {u: events for u, events in by_user.items() if events}
        if not by_user:
            raise DataError(
                f"{path}: no event has {options.rating_column} >= {options.rating_threshold}; lower "
                "rec.rating_threshold."
            )
    return Log(catalogue, by_user)


# --- splits ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One evaluation question: given this history, where do the targets rank (or: is the target liked)?"""

    user: str
    history: list[Event]
    targets: list[Event]


@dataclass
class Split:
    """Training histories and the validation and test cases, all drawn from one log."""

    log: Log
    train: dict[str, list[Event]]
    validation: list[Case]
    test: list[Case]

    def check(self, source: str) -> None:
        if not any(len(events) >= 2 for events in self.train.values()):
            raise DataError(
                f"{source}: no user has two training events after the split, so there is no (history, next "
                "item) pair to learn from; use a longer log."
            )
        for name in ("validation", "test"):
            if not getattr(self, name):
                raise DataError(
                    f"{source}: the {name} split is empty (no user has an event there with a history before "
                    "it); use a longer log or another split."
                )


def leave_last_out(log: Log) -> Split:
    train, validation, test = {}, [], []
    for user, events in log.users.items():
        if len(events) < 3:
            train[user] = list(events)
            continue
        train[user] = events[:-2]
        validation.append(Case(user, events[:-2], [events[-2]]))
        test.append(Case(user, events[:-1], [events[-1]]))
    return Split(log, train, validation, test)


def time_split(log: Log, fractions: list[float]) -> Split:
    """Cut points at the given fractions of all events by time; events at a cut point fall after it."""
    times = np.sort([e.time for events in log.users.values() for e in events])
    first_val = times[min(len(times) - 1, int(round(fractions[0] * len(times))))]
    first_test = times[min(len(times) - 1, int(round((fractions[0] + fractions[1]) * len(times))))]
    train, validation, test = {}, [], []
    for user, events in log.users.items():
        before = [e for e in events if e.time < first_val]
        middle = [e for e in events if first_val <= e.time < first_test]
        after = [e for e in events if e.time >= first_test]
        if before:
            train[user] = before
        if before and middle:
            validation.append(Case(user, before, middle))
        if (before or middle) and after:
            test.append(Case(user, before + middle, after))
    return Split(log, train, validation, test)


def split_log(log: Log, options: RecOptions, source: str) -> Split:
    split = leave_last_out(log) if options.split == "leave-last-out" else time_split(log, options.time_split)
    split.check(source)
    return split


def sample(items: list[Any], n: int, seed: int) -> list[Any]:
    """A seeded random subset of n items (all of them when n is 0 or larger than the list), in their order."""
    if not n or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# --- what the tasks read from a split ------------------------------------------------------------------------
@dataclass
class TrainPart:
    """(user, position) pairs: each is the event at that position read against the events before it."""

    split: Split
    examples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class CasePart:
    """Evaluation cases of one split; `tune` holds validation cases a baseline may tune on (test only)."""

    split: Split
    name: str
    cases: list[Case]
    tune: list[Case] | None = None

    def __len__(self) -> int:
        return len(self.cases)


def training_examples(train: dict[str, list[Event]]) -> list[tuple[str, int]]:
    return [(user, t) for user, events in train.items() for t in range(1, len(events))]
