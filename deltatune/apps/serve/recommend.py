"""Serving `task: rec` runs: `POST /v1/recommend` answers with the same rows as `deltatune predict`.

A rec adapter is a whole run (the adapter, its item catalogue and its log), so each named run is loaded with its
own base model by `load_run`; its catalogue's vectors are computed once, on the first request, and reused until
the run is unloaded. The engine has the methods the app's adapter endpoints call (load, unload, paths, adapters),
so hot-loading and the admin token work as for the other tasks.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field

from deltatune.apps.serve.batching import AdapterError
from deltatune.errors import DeltatuneError


class RecommendRequest(BaseModel):
    adapter: str = Field(..., description="Name of a loaded rec run.")
    user: str | None = Field(None, description="A user of the run's log: their history is used.")
    items: list[str] | None = Field(None, description="A history as item ids (oldest first).")
    history: list[str] | None = Field(
        None, description="A history as item texts, typed freely (oldest first)."
    )
    k: int = Field(10, ge=1, le=1000)
    item: str | None = Field(None, description="Preference runs: the item to ask about (with user or liked).")
    liked: list[str] | None = None
    disliked: list[str] | None = None

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None and k != "adapter"}


class RecommendEngine:
    """Named rec runs, each a (model, task) pair from `load_run`; called from one worker thread only."""

    task = "rec"

    def __init__(self) -> None:
        self.runs: dict[str, tuple[Any, Any]] = {}
        self.paths: dict[str, str] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    def load(self, name: str, path: str) -> None:
        from deltatune.train.recipe import load_run

        if name in self.paths:
            raise AdapterError(f"A run named {name!r} is already loaded; unload it first or pick a new name.")
        try:
            model, task, run = load_run(path)
        except (DeltatuneError, OSError) as err:
            raise AdapterError(f"Could not load the rec run in {path}: {err}") from err
        if run.task != "rec":
            raise AdapterError(f"{path} was trained with task {run.task!r}; /v1/recommend serves task rec.")
        self.runs[name] = (model, task)
        self.paths[name] = os.path.abspath(path)

    def unload(self, name: str) -> None:
        del self.runs[name]
        del self.paths[name]

    def recommend(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        model, task = self.runs[name]
        return task.predict(model, [row])[0]
