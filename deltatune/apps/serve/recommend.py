"""Serving `task: rec` runs: `POST /v1/recommend` answers with the same rows as `deltatune predict`.

A rec adapter is a whole run (the adapter, its item catalogue and its log), so each named run is loaded with its
own base model by `load_run`; its catalogue's vectors are computed once, on the first request, and reused until
the run is unloaded. The engine has the methods the adapter cache calls (`read_adapter` on the loader thread,
`install` and `unload` on the model thread), so runs named at start, loaded by an admin or found under the adapter
root on first use are all held in the same LRU cache as LoRA adapters, and the admin token works as for the other
tasks.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from deltatune.apps.serve.http import Text
from deltatune.apps.serve.runs import RunEngine
from deltatune.apps.serve.server import Strict

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


class RecommendEngine(RunEngine):
    """Named rec runs (see RunEngine), answering one row per /v1/recommend request."""

    def __init__(self) -> None:
        super().__init__("rec")

    def recommend(self, name: str, row: dict[str, Any]) -> dict[str, Any]:
        return self.predict(name, [row])[0]
