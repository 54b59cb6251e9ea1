"""Serving `task: rec` runs: `POST /v1/recommend` answers with the same rows as `deltatune predict`.

A rec adapter is a whole run (the adapter, its item catalogue and its log), so each named run is loaded with its
own base model by `load_run`; its catalogue's vectors are computed once, on the first request, and reused until
the run is unloaded. The engine has the methods the adapter cache calls (`read_adapter` on the loader thread,
`install` and `unload` on the model thread), so runs named at start, loaded by an admin or found under the adapter
root on first use are all held in the same LRU cache as LoRA adapters, and the admin token works as for the other
tasks.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import Field

from deltatune.apps.serve.batching import AdapterError
from deltatune.apps.serve.http import Text
from deltatune.apps.serve.server import Strict
from deltatune.errors import ConfigError, DeltatuneError

Items = Annotated[list[Text], Field(max_length=1024)]


class RecommendRequest(Strict):
    adapter: str = Field(..., description="Name of a rec run (loaded, or a folder under the adapter root).")
    user: Text | None = Field(None, description="A user of the run's log: their history is used.")
    items: Items | None = Field(None, description="A history as item ids (oldest first).")
    history: Items | None = Field(None, description="A history as item texts, typed freely (oldest first).")
    k: int = Field(10, ge=1, le=1000)
    item: Text | None = Field(
        None, description="Preference runs: the item to ask about (with user or liked)."
    )
    liked: Items | None = None
    disliked: Items | None = None

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None and k != "adapter"}


class RecommendEngine:
    """Named rec runs, each a (model, task) pair from `load_run`; every method but `read_adapter` is called from
    the model thread only."""

    task = "rec"
    tokenizer = None  # each run tokenizes with its own; the server tokenizes nothing for /v1/recommend

    def __init__(self) -> None:
        self.runs: dict[str, tuple[Any, Any]] = {}
        self.paths: dict[str, str] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    @staticmethod
    def read_adapter(path: str) -> tuple[Any, Any]:
        """Load a rec run (its base model included); any thread, nothing served is touched."""
        from deltatune.train.recipe import load_run

        try:
            model, task, run = load_run(path)
        except (DeltatuneError, OSError) as err:
            raise AdapterError(f"Could not load the rec run: {err}") from err
        if run.task != "rec":
            raise AdapterError(f"This run was trained with task {run.task!r}; /v1/recommend serves task rec.")
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

    def recommend(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        return self.predict(name, [row])[0]
