"""Data loading, column checks, cleaning, splits, labels, instruction masking and batching."""

import json

import pytest
from helpers import word_tokenizer, write_csv

from deltatune.train.data import (
    Cleaning,
    DataError,
    LabelMap,
    clean_table,
    connected_rows,
    deduplicate,
    epoch_batches,
    grouped_split,
    load_table,
    normalize_text,
    pad_batch,
    require_columns,
    tokenize_instruction,
)

ROWS = [{"text": "good film", "label": "pos"}, {"text": 'bad, "very"\nbad film', "label": "neg"}]


def write_all_formats(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    paths = {
        "csv": tmp_path / "d.csv",
        "tsv": tmp_path / "d.tsv",
        "json": tmp_path / "d.json",
        "jsonl": tmp_path / "d.jsonl",
        "parquet": tmp_path / "d.parquet",
    }
    frame.to_csv(paths["csv"], index=False)  # quotes the multi-line field
    frame.to_csv(paths["tsv"], sep="\t", index=False)
    paths["json"].write_text(json.dumps(ROWS))
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS))
    frame.to_parquet(paths["parquet"])
    return paths


def test_every_format_reads_the_same_rows(tmp_path):
    for kind, path in write_all_formats(tmp_path).items():
        table = load_table(str(path))
        assert [dict(r) for r in table] == ROWS, kind


def test_json_values_stay_as_written(tmp_path):
    """pyarrow's JSON reader would turn "1984-12-11" into a timestamp; the answer of a date task must stay text."""
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"instruction": "iso", "output": "1984-12-11"}\n{"instruction": "iso", "output": "2001-02-03"}\n'
    )
    assert list(load_table(str(path))["output"]) == ["1984-12-11", "2001-02-03"]
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"a": "2020-01-01"}]}, indent=2))
    assert load_table(str(tmp_path / "d.json"))[0] == {"a": "2020-01-01"}


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_table(str(tmp_path / "nope.csv"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_table(str(tmp_path / "d.xlsx"))


def test_empty_file_is_refused(tmp_path):
    path = write_csv(str(tmp_path / "empty.csv"), [])
    with pytest.raises(DataError, match="empty"):
        load_table(path)


def test_missing_column_lists_existing_ones(tmp_path):
    table = load_table(write_csv(str(tmp_path / "d.csv"), [("hi", 1)], header=("sentence", "label")))
    with pytest.raises(DataError, match=r"no column 'sentense'.*sentence, label.*Did you mean 'sentence'"):
        require_columns(table, {"text_column": "sentense"}, "d.csv")


def test_cleaning_steps(tmp_path):
    rows = [
        ("<b>Good</b>&amp; fine", 1),
        ("  spaced   out ", 0),
        ("", 0),
        ("ﬁne", 1),
        ("<b>Good</b>&amp; fine", 1),
    ]
    table = load_table(write_csv(str(tmp_path / "d.csv"), rows))
    untouched = clean_table(table, ["text"], Cleaning())
    assert len(untouched) == 5
    cleaned = clean_table(table, ["text"], Cleaning(True, True, True, True))
    # duplicates are not clean_table's job: `deduplicate` drops them once over all the training data
    assert list(cleaned["text"]) == ["Good & fine", "spaced out", "fine", "Good & fine"]


def test_split_is_seeded_stratified_and_70_20_10():
    inputs = [f"row {i}" for i in range(100)]
    labels = [i % 2 for i in range(100)]
    a = grouped_split(connected_rows(inputs), labels, (0.7, 0.2, 0.1), seed=1)
    b = grouped_split(connected_rows(inputs), labels, (0.7, 0.2, 0.1), seed=1)
    assert [len(a[k]) for k in ("train", "validation", "test")] == [70, 20, 10]
    assert a == b
    assert [sum(labels[i] for i in a[k]) for k in ("train", "validation", "test")] == [35, 10, 5]
    assert set(a["train"]).isdisjoint(a["validation"] + a["test"])
    assert grouped_split(connected_rows(inputs), labels, (0.7, 0.2, 0.1), seed=2)["test"] != a["test"]


def test_a_rare_class_reaches_every_split():
    """12 rows, 3 of class 'rare': a plain 70/20/10 shuffle often leaves it out of validation or test."""
    labels = ["common"] * 9 + ["rare"] * 3
    for seed in range(20):
        parts = grouped_split(list(range(12)), labels, (0.7, 0.2, 0.1), seed)
        assert all("rare" in {labels[i] for i in parts[k]} for k in parts), (seed, parts)


def test_copies_and_groups_never_straddle_splits():
    # rows 0 and 1 are one text; rows 1 and 2 share a user, rows 3 and 4 another
    inputs = [normalize_text(t) for t in ["A  b", "a b", "c", "d", "e", "f", "g", "h"]]
    groups = ["u1", "u2", "u2", "u3", "u3", "u4", "u5", "u6"]
    components = connected_rows(inputs, groups)
    assert components[0] == components[1] == components[2] and components[3] == components[4]
    for seed in range(10):
        parts = grouped_split(components, [0] * 8, (0.5, 0.25, 0.25), seed)
        where = {i: k for k, rows in parts.items() for i in rows}
        assert where[0] == where[1] == where[2] and where[3] == where[4]


def test_deduplicate_drops_copies_and_conflicting_labels():
    inputs = ["x", "x", "y", "y", "y", "z", "z"]
    answers = ["1", "1", "0", "1", "1", "0", "1"]
    keep, dropped, conflicting = deduplicate(inputs, answers, True, "drop")
    assert keep == [0] and dropped == {"duplicate": 1, "conflicting_label": 5} and conflicting == 2
    keep, dropped, _ = deduplicate(inputs, answers, True, "majority")  # y -> 1 (2 of 3); z is a tie: dropped
    assert keep == [0, 3] and dropped == {"duplicate": 2, "conflicting_label": 3}
    keep, dropped, _ = deduplicate(inputs, answers, False, None)  # generation: one prompt, several answers
    assert keep == list(range(7)) and dropped == {"duplicate": 0, "conflicting_label": 0}


def test_label_maps_for_strings_and_ints():
    strings = LabelMap.from_values(["pos", "neg", "pos"])
    assert strings.names == ["neg", "pos"] and strings.encode("pos") == 1
    ints = LabelMap.from_values([2, 0, 1, 2])
    assert ints.names == ["0", "1", "2"] and ints.encode(2) == 2
    with pytest.raises(DataError, match=r"Label 'neutral' in dev.csv was not seen.*neg, pos"):
        strings.encode("neutral", "dev.csv")


def test_alpaca_without_chat_template_masks_the_prompt():
    tok = word_tokenizer()
    row = {"instruction": "good film", "input": "", "output": "bad film"}
    f = tokenize_instruction(tok, row, max_length=64)
    learned = [t for t, label in zip(f["input_ids"], f["labels"]) if label != -100]
    assert tok.decode(learned) == "bad film"
    assert f["labels"][: len(f["labels"]) - 2] == [-100] * (len(f["labels"]) - 2)


def test_chat_messages_learn_only_assistant_turns():
    tok = word_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '[CLS] ' + m['role'] + ' ' + m['content'] + ' [SEP] ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[CLS] assistant ' }}{% endif %}"
    )
    tok.add_tokens(["user", "assistant"])
    messages = [
        {"role": "user", "content": "good"},
        {"role": "assistant", "content": "great film"},
        {"role": "user", "content": "bad"},
        {"role": "assistant", "content": "awful plot"},
    ]
    f = tokenize_instruction(tok, {"messages": messages}, max_length=64)
    learned = tok.decode([t for t, label in zip(f["input_ids"], f["labels"]) if label != -100])
    assert learned.split() == ["great", "film", "[SEP]", "awful", "plot", "[SEP]"]


def test_epoch_batches_are_deterministic_and_group_by_length():
    lengths = [i % 17 + 1 for i in range(400)]
    a = epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=2, group_by_length=True)
    assert sorted(i for b in a for i in b) == list(range(400))
    plain = epoch_batches(lengths, 8, seed=3, epoch=1)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(a) < 0.2 * padding(plain)


def test_pad_batch_pads_dynamically():
    batch = pad_batch(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
