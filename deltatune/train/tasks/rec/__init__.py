"""`task: rec`: recommenders tuned from interaction logs, with any method on any pretrained encoder or LM.

- `rec.mode: ranking` (RankingTask): a text encoder reads a user's recent items and ranks every catalogue item by
  its text; `rec.hybrid: true` adds learned id embeddings (collaborative signal) to the text vectors.
- `rec.mode: preference` (PreferenceTask): a causal LM answers whether a user will like an item (TALLRec).

Every run also scores popularity, matrix factorisation (ALS) and the untuned model on the same test cases.
Files: options (the `rec:` recipe section), data (logs, items, splits), metrics, baselines, ranking, preference.
"""

from __future__ import annotations

from typing import Any

from deltatune.errors import ConfigError
from deltatune.train.tasks.base import Task
from deltatune.train.tasks.rec.common import RecModelTask
from deltatune.train.tasks.rec.data import (
    CasePart,
    Split,
    TrainPart,
    read_catalogue,
    read_log,
    sample,
    split_log,
    training_examples,
)
from deltatune.train.tasks.rec.options import RecOptions
from deltatune.train.tasks.rec.preference import PreferenceTask
from deltatune.train.tasks.rec.ranking import RankingTask, TextTower

MODES: dict[str, type[RecModelTask]] = {"ranking": RankingTask, "preference": PreferenceTask}


def data_report(
    split: Split, parts: dict[str, Any], options: RecOptions, log_file: str, seed: int
) -> dict[str, Any]:
    """What data_report.json holds for a rec run: the log's size, the split, and the cold-start test cases."""
    met = {e.item for events in split.train.values() for e in events}
    cold = sum(1 for c in parts["test"].cases if not any(e.item in met for e in c.targets))
    report = {
        "seed": seed,
        "files": {"log": log_file, "items": options.item_file},
        "users": len(split.log.users),
        "items": len(split.log.catalogue),
        "events": len(split.log),
        "items_in_train": len(met),
        "split": options.split,
        "rows": {name: len(part) for name, part in parts.items()},
        "cold_test_cases": cold,
    }
    report["summary"] = (
        f"data: {report['events']} events of {report['users']} users on {report['items']} items "
        f"({report['items_in_train']} met in training); {options.split} split: train {len(parts['train'])} "
        f"(history, next) pairs, validation {len(parts['validation'])} and test {len(parts['test'])} cases "
        f"({cold} with a cold target), seed {seed}"
    )
    return report


class RecTask(Task):
    """The recipe entry for `task: rec`: reads the `rec:` options, splits the log, builds the mode's task."""

    name = "rec"
    metric = "ndcg@10"
    greater_is_better = True
    recipe_paths = ("rec.item_file",)

    @classmethod
    def options(cls, run: Any) -> RecOptions:
        return RecOptions.from_dict(run.rec)

    @classmethod
    def model_task(cls, run: Any) -> str:
        return "causal-lm" if cls.options(run).mode == "preference" else "feature-extraction"

    @classmethod
    def load_splits(cls, run: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
        """train / validation / test from one log, and the data report; records the hybrid's id items in
        `run.rec` (as fit_labels records labels), since the saved id table is only meaningful with them."""
        options = cls.options(run)
        if not run.train_file:
            raise ConfigError("task: rec needs train_file: the interaction log.")
        if run.eval_file or run.test_file:
            raise ConfigError(
                "task: rec splits its log itself (rec.split); drop eval_file and test_file, or put all events in "
                "train_file."
            )
        catalogue = read_catalogue(options)
        log = read_log(options, run.train_file, catalogue, MODES[options.mode].positives_only)
        split: Split = split_log(log, options, run.train_file)
        if options.hybrid and options.hybrid_items is None:
            met = sorted({e.item for events in split.train.values() for e in events})
            run.rec = {**run.rec, "hybrid_items": [catalogue.ids[i] for i in met]}
        validation = sample(split.validation, run.max_eval_samples, seed)
        parts = {
            "train": TrainPart(split, sample(training_examples(split.train), run.max_train_samples, seed)),
            "validation": CasePart(split, "validation", validation),
            "test": CasePart(split, "test", split.test, tune=validation),
        }
        sources = {name: f"{run.train_file} ({name} split)" for name in parts}
        return parts, data_report(split, parts, options, run.train_file, seed), sources

    @classmethod
    def from_run(cls, run: Any, tokenizer: Any, labels: Any) -> RecModelTask:
        options = cls.options(run)
        return MODES[options.mode](tokenizer, options, run.max_length, log_file=run.train_file)


__all__ = ["MODES", "PreferenceTask", "RankingTask", "RecOptions", "RecTask", "TextTower"]
