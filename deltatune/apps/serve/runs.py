"""Serving whole runs: `POST /v1/predict` on a qa, summarization, translation, regression or multi-label run (and
rec runs, see recommend.py) answers with the same rows as `deltatune predict`.

Such a run is more than base + adapter: a span head and its fitted no-answer threshold, per-label thresholds, a
one-output regression head, the instruction a decoder was tuned with. So each named run is loaded whole, with its
own base model, by `load_run`, and a request's rows go through the run's own task `predict`. The engine has the
methods the adapter cache calls (`read_adapter` on the loader thread, `install` and `unload` on the model thread),
so runs named at start, loaded by an admin or found under the adapter root are held in the same LRU cache as LoRA
adapters, and the admin token works as for the other tasks.
"""

from __future__ import annotations

import os
from typing import Any

from deltatune.apps.serve.batching import AdapterError
from deltatune.errors import ConfigError, DeltatuneError

# The tasks whose runs are served whole through POST /v1/predict (rec runs too, with POST /v1/recommend).
RUN_TASKS = ("qa", "summarization", "translation", "regression", "multi-label")


class RunEngine:
    """Named runs of one task, each a (model, task) pair from `load_run`; every method but `read_adapter` is called
    from the model thread only."""

    tokenizer = None  # each run tokenizes with its own

    def __init__(self, task: str) -> None:
        self.task = task
        self.runs: dict[str, tuple[Any, Any]] = {}
        self.paths: dict[str, str] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    def read_adapter(self, path: str) -> tuple[Any, Any]:
        """Load a run (its base model included); any thread, nothing served is touched."""
        from deltatune.train.recipe import load_run

        try:
            model, task, run = load_run(path)
        except (DeltatuneError, OSError) as err:
            raise AdapterError(f"Could not load the {self.task} run: {err}") from err
        if run.task != self.task:
            raise AdapterError(
                f"This run was trained with task {run.task!r}; this server serves task {self.task}."
            )
        return model, task

    def install(self, name: str, run: tuple[Any, Any], path: str) -> None:
        if name in self.paths:
            raise ConfigError(f"A run named {name!r} is already loaded; unload it first or pick a new name.")
        self.runs[name] = run
        self.paths[name] = path

    def load(self, name: str, path: str) -> None:
        self.install(name, self.read_adapter(path), os.path.abspath(path))

    def unload(self, name: str) -> None:
        del self.runs[name]
        del self.paths[name]

    def predict(self, name: str, rows: list[dict[str, Any]]) -> list[Any]:
        model, task = self.runs[name]
        return task.predict(model, rows)
