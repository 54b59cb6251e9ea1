"""Getting a user's data into batches: tables from local files (or the hub), column checks, opt-in cleaning, a
seeded split, label maps, instruction formatting with response-only labels, and padding-aware batching.

Batches are lists of row indices computed from (seed, epoch) alone, so a resumed run can rebuild the exact order
of an epoch and skip the batches it has already seen; and data-parallel ranks can each take their share of the
same global batch.
"""

from __future__ import annotations

import difflib
import html
import json
import os
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.errors import DataError

FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


# --- tables --------------------------------------------------------------------------------------
def load_table(source: str, split: str = "train"):
    """A `datasets.Dataset` from a local CSV/TSV/JSON/JSONL/Parquet file, or a hub dataset name when online."""
    import datasets

    datasets.disable_progress_bars()
    source = os.fspath(source)
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in FORMATS:
            raise DataError(f"{source}: unsupported file type {ext!r}; use one of {', '.join(FORMATS)}.")
        builder, options = FORMATS[ext]
        try:
            if builder == "json":
                table = datasets.Dataset.from_list(read_json_rows(source))
            else:
                table = datasets.load_dataset(builder, data_files=source, split="train", **options)
        except Exception as err:  # pandas/pyarrow parse errors are long; keep the cause and name the file
            raise DataError(f"Could not read {source} as {ext[1:].upper()}: {err}") from err
    elif ext in FORMATS or os.path.isdir(os.path.dirname(source) or "\0"):
        raise DataError(f"Data file not found: {source} (resolved to {os.path.abspath(source)}).")
    else:
        try:
            table = datasets.load_dataset(source, split=split)
        except Exception as err:
            raise DataError(
                f"{source!r} is neither a local file nor a dataset that could be loaded from the hub ({err})."
            ) from err
    if len(table) == 0:
        raise DataError(f"{source} has no rows; the dataset is empty.")
    return table


def read_json_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a JSON list (or {"data": [...]}) or JSON Lines file, values exactly as written.

    Read with the json module rather than pyarrow's reader, which turns strings like "1984-12-11" into timestamps."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)  # one JSON document: a list of rows, {"data": [...]}, COCO, or a single row
        if isinstance(data, dict) and "images" in data and "annotations" in data:
            return coco_rows(data, os.path.dirname(os.path.abspath(path)))
        rows = (
            data if isinstance(data, list) else data.get("data", [data]) if isinstance(data, dict) else [data]
        )
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every row must be a JSON object with named fields.")
    return rows


def coco_rows(data: dict[str, Any], folder: str) -> list[dict[str, Any]]:
    """A COCO detection file as one row per image: `image` (path, relative ones taken from the JSON's folder),
    `boxes` ([x1, y1, x2, y2] in pixels) and `labels` (category names). Crowd regions (iscrowd=1) are left out,
    as detectors' training code does."""
    try:
        names = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
        rows = {
            img["id"]: {"image": os.path.join(folder, img["file_name"]), "boxes": [], "labels": []}
            for img in data["images"]
        }
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            row = rows[ann["image_id"]]
            row["boxes"].append([x, y, x + w, y + h])
            row["labels"].append(names.get(ann["category_id"], str(ann["category_id"])))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"Not a valid COCO detection file (images/annotations/categories): missing or bad {err}."
        ) from err
    return list(rows.values())


def require_columns(table, columns: dict[str, str | None], source: str) -> None:
    """Each configured column must exist; otherwise list the columns that do and the closest name."""
    existing = list(table.column_names)
    for role, name in columns.items():
        if name is None or name in existing:
            continue
        close = difflib.get_close_matches(name, existing, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"{source} has no column {name!r} (set by {role}). Its columns are: {', '.join(existing)}.{hint}"
        )


# --- cleaning ------------------------------------------------------------------------------------
@dataclass
class Cleaning:
    """Text cleaning; the text steps and drop_empty are opt-in. Duplicates are dropped by default, once over all
    the training data before it is split (`deduplicate`), so copies of one row never sit on both sides."""

    strip_html: bool = False
    normalize_whitespace: bool = False
    normalize_unicode: bool = False
    drop_empty: bool = False
    drop_duplicates: bool = True
    # full-width ASCII forms and the ideographic space -> half-width (Chinese text)
    normalize_width: bool = False

    @property
    def any_text_step(self) -> bool:
        return (
            self.strip_html
            or self.normalize_whitespace
            or self.normalize_unicode
            or self.normalize_width
            or self.drop_empty
        )


_TAG = re.compile(r"<[^>]+>")
# Chinese and Japanese write words without spaces: a space between two of these characters is an artefact
# (of word segmentation or copy-paste), not a word boundary
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{_CJK}])\\s+(?=[{_CJK}])")
# U+FF01..U+FF5E are full-width copies of ASCII 0x21..0x7E; U+3000 is the ideographic (full-width) space
_HALF_WIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def to_half_width(text: str) -> str:
    """Full-width letters, digits and punctuation (ＡＢＣ１２３，！) as their ASCII forms, the ideographic space as
    a space; Chinese punctuation without an ASCII twin (。、「」) stays. Narrower than NFKC, which also rewrites
    circled numbers, ligatures and half-width katakana."""
    return text.translate(_HALF_WIDTH)


def normalize_spaces(text: str) -> str:
    """Runs of whitespace become one space and the ends are trimmed; whitespace between two CJK characters is
    removed, since no word boundary is written there."""
    return _SPACE_BETWEEN_CJK.sub("", " ".join(text.split()))


def clean_text(text: str, options: Cleaning) -> str:
    if options.strip_html:
        text = html.unescape(_TAG.sub(" ", text))
    if options.normalize_unicode:
        text = unicodedata.normalize("NFKC", text)
    if options.normalize_width:
        text = to_half_width(text)
    if options.normalize_whitespace:
        text = normalize_spaces(text)
    return text


def clean_table(table, text_columns: Sequence[str], options: Cleaning):
    """Apply the chosen text steps to the text columns, then drop empty rows if asked (duplicates are
    `deduplicate`'s job, over all the data at once)."""
    if not options.any_text_step:
        return table
    text_columns = [c for c in text_columns if c]

    def fix(row):
        return {c: clean_text(row[c], options) if isinstance(row[c], str) else row[c] for c in text_columns}

    table = table.map(fix, keep_in_memory=True)
    if options.drop_empty:
        table = table.filter(
            lambda row: all(row[c] is not None and str(row[c]).strip() != "" for c in text_columns),
            keep_in_memory=True,
        )
    if len(table) == 0:
        raise DataError("No rows are left after cleaning; check the text columns or switch off drop_empty.")
    return table


# --- leak-free splits ----------------------------------------------------------------------------
# A score is honest only if no evaluation row was seen in training. Rows are compared by their normalized input
# (`normalize_text`); copies are dropped once over all the training data, before it is split; rows that share an
# input or a group (a user, a product, a document) always land in the same split; each label is divided by the
# split ratios (stratified), so a small class is not missing from validation by chance.
SPLITS = ("train", "validation", "test")


def normalize_text(value: Any) -> str:
    """The form under which two inputs count as the same: Unicode NFKC, case-folded, whitespace collapsed
    (a list, like token-classification tokens, is joined by spaces)."""
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())


def deduplicate(
    inputs: Sequence[str], answers: Sequence[str], drop_duplicates: bool, conflicting_labels: str | None
) -> tuple[list[int], dict[str, int], int]:
    """(rows to keep, rows dropped per reason, number of inputs with conflicting labels).

    `conflicting_labels` handles one input seen with different labels: "drop" every row of it, keep the
    "majority" label's rows (an input without a strict majority is dropped), or None (the task has no classes:
    one prompt may have several good answers)."""
    rows_of: dict[str, list[int]] = {}
    for i, key in enumerate(inputs):
        rows_of.setdefault(key, []).append(i)
    keep, conflicting, dropped = [], 0, {"duplicate": 0, "conflicting_label": 0}
    for rows in rows_of.values():
        counts = Counter(answers[i] for i in rows)
        if conflicting_labels is not None and len(counts) > 1:
            conflicting += 1
            (top, n_top), (_, n_next) = counts.most_common(2)
            winner = top if conflicting_labels == "majority" and n_top > n_next else None
            survivors = [i for i in rows if answers[i] == winner]
            dropped["conflicting_label"] += len(rows) - len(survivors)
            rows = survivors
        seen: set[str] = set()
        for i in rows:
            if drop_duplicates and answers[i] in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(answers[i])
            keep.append(i)
    return sorted(keep), dropped, conflicting


def connected_rows(inputs: Sequence[str], groups: Sequence[Any] | None = None) -> list[int]:
    """A component id per row: rows sharing an input, or a group value, are (transitively) one component."""
    parent = list(range(len(inputs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for keys in (inputs, groups or ()):
        first: dict[Any, int] = {}
        for i, key in enumerate(keys):
            if key in first:
                parent[root(i)] = root(first[key])
            else:
                first[key] = i
    return [root(i) for i in range(len(inputs))]


def _targets(n: int, ratios: Sequence[float]) -> list[int]:
    """Rows per split for a stratum of n rows: largest remainders, and one row for every split with a share
    while there are rows enough (so a class is in every split whenever it can be)."""
    exact = [r * n for r in ratios]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(ratios)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts)]:
        counts[k] += 1
    wanted = [k for k, r in enumerate(ratios) if r > 0]
    if n >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[k] += 1
    return counts


def grouped_split(
    components: Sequence[int], strata: Sequence[Any], ratios: Sequence[float], seed: int
) -> dict[str, list[int]]:
    """Row indices per split: whole components only, each stratum divided by the ratios (seeded).

    Components are taken in a seeded random order and each goes to the split furthest below its target for
    the component's stratum (its most common one); with single-row components the targets are met exactly."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios must be three non-negative numbers that sum to 1, got {list(ratios)}.")
    rows_of: dict[int, list[int]] = {}
    for i, c in enumerate(components):
        rows_of.setdefault(c, []).append(i)
    by_stratum: dict[str, list[int]] = {}
    for c, rows in rows_of.items():
        stratum = Counter(str(strata[i]) for i in rows).most_common(1)[0][0]
        by_stratum.setdefault(stratum, []).append(c)
    rng = random.Random(seed)
    open_splits = [k for k, r in enumerate(ratios) if r > 0]
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for stratum in sorted(by_stratum):
        order = sorted(by_stratum[stratum])
        rng.shuffle(order)
        targets = _targets(sum(len(rows_of[c]) for c in order), ratios)
        filled = [0, 0, 0]
        for c in order:
            k = max(open_splits, key=lambda j: (targets[j] - filled[j], -j))
            filled[k] += len(rows_of[c])
            parts[SPLITS[k]].extend(rows_of[c])
    if not parts["train"]:
        raise DataError(
            f"The dataset has only {len(components)} rows; too few to split into train/validation/test."
        )
    return {name: sorted(rows) for name, rows in parts.items()}


# --- labels --------------------------------------------------------------------------------------
class LabelMap:
    """Label values as they appear in the data (strings or integers) <-> class ids.

    Values are sorted (integers as numbers, so 0..n-1 stay ids 0..n-1), so the map depends only on the set of
    labels seen in training, never on row order."""

    def __init__(self, names: Sequence[Any]) -> None:
        self.names = [str(n) for n in names]
        self._ids = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> LabelMap:
        distinct = {v for v in values if v is not None}
        if not distinct:
            raise DataError("The label column is empty.")
        if all(isinstance(v, (int, bool)) for v in distinct):
            return cls(sorted(distinct))
        return cls(sorted(str(v) for v in distinct))

    def encode(self, value: Any, source: str = "the data") -> int:
        key = str(value)
        if key not in self._ids:
            raise DataError(
                f"Label {value!r} in {source} was not seen in the training data (known labels: "
                f"{', '.join(self.names)}). Fix the label or add examples of it to the training file."
            )
        return self._ids[key]

    def __len__(self) -> int:
        return len(self.names)


# --- instruction data ----------------------------------------------------------------------------
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """A row as chat messages: a `messages` list as is, or Alpaca `instruction`/`input`/`output` as two turns."""
    if row.get("messages"):
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise DataError(
                '\'messages\' must be a list of {"role": ..., "content": ...} objects with text values; '
                f"got {str(messages)[:80]!r}."
            )
        return list(messages)
    if "instruction" not in row or "output" not in row:
        raise DataError(
            f"Instruction data needs a 'messages' column or 'instruction' and 'output' columns; got {list(row)}."
        )
    fields = {k: row.get(k) for k in ("instruction", "input", "output")}
    wrong = {k: v for k, v in fields.items() if not isinstance(v, str) and not (k == "input" and v is None)}
    if wrong:
        key, value = next(iter(wrong.items()))
        raise DataError(f"Instruction data: '{key}' must be text, got {value!r} in a row with {list(row)}.")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text a model sees before it writes the next assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    user = "\n\n".join(m["content"] for m in messages if m["role"] != "assistant")
    return ALPACA_PROMPT.format(instruction=user)


def _response_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of every assistant turn (what the loss is taken on)."""
    spans = []
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not full.startswith(upto) or not upto.startswith(before):
                raise DataError(
                    "This tokenizer's chat template does not render conversations prefix by prefix."
                )
            spans.append((len(before), len(upto)))
        return full, spans
    prompt = render_prompt(tokenizer, messages[:-1])
    full = prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
    return full, [(len(prompt), len(full))]


def tokenize_instruction(tokenizer, row: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """input_ids and labels where only assistant tokens carry a label (the rest is -100)."""
    messages = conversation(row)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("Each conversation must end with an assistant message (the response to learn).")
    text, spans = _response_spans(tokenizer, messages)
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    labels = []
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(a <= start < b or (start == end and a < end <= b) for a, b in spans)
        labels.append(token if inside else -100)
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


# --- batching ------------------------------------------------------------------------------------
def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = False,
    drop_last: bool = False,
) -> list[list[int]]:
    """The batches (lists of row indices) of one epoch, a pure function of (seed, epoch).

    With `group_by_length`, shuffled rows are cut into windows of 50 batches, each window sorted by length,
    so a batch holds rows of similar length (little padding) while the order stays random."""
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = batch_size * 50
        order = [
            i
            for start in range(0, n, window)
            for i in sorted(order[start : start + window], key=lambda j: -lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and shuffle:
        rng.shuffle(batches)
    return batches


def pad_batch(
    features: list[dict[str, Any]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Stack token features, padding each sequence field to the longest in this batch (dynamic padding).

    `labels` that are lists are padded with -100 (ignored by the loss); scalar fields are stacked as they are."""
    out: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
            continue
        if not isinstance(values[0], (list, tuple)):
            out[key] = torch.tensor(values)
            continue
        width = max(len(v) for v in values)
        fill = -100 if key == "labels" else (pad_id if key == "input_ids" else 0)
        rows = []
        for v in values:
            pad = [fill] * (width - len(v))
            rows.append(list(v) + pad if padding_side == "right" else pad + list(v))
        out[key] = torch.tensor(rows)
    if "input_ids" in out and "attention_mask" not in out:
        mask = [[1] * len(f["input_ids"]) for f in features]
        width = out["input_ids"].shape[1]
        out["attention_mask"] = torch.tensor(
            [
                m + [0] * (width - len(m)) if padding_side == "right" else [0] * (width - len(m)) + m
                for m in mask
            ]
        )
    return out
