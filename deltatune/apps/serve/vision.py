"""Serving the vision tasks: `POST /v1/classify-image`, `/v1/detect`, `/v1/segment` and `/v1/generate-image`
answer with the same rows as `deltatune predict` on each run.

Many runs share one backbone, as adapters share a base for text: the first run loaded builds the base (its
torchvision/timm model or diffusers pipeline, from its run_config.yaml), and every run is an adapter on it, with its
own trained heads (`modules_to_save`); a request activates the adapter it names. A run trained on another base
(model, weights, options, image size or labels) is refused: it needs its own server. Requests send images as
base64 only (the server never reads a path it was sent) and get images back as base64 (it never writes a file).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field

from deltatune.apps.serve.batching import AdapterError
from deltatune.errors import DataError, DeltatuneError

VISION_ENDPOINTS = {
    "image-cls": "classify-image",
    "detection": "detect",
    "segmentation": "segment",
    "text-to-image": "generate-image",
}
MAX_INFERENCE_STEPS = (
    200  # a text-to-image row's num_inference_steps: a request cannot hold the model for long
)


class ImageRequest(BaseModel):
    adapter: str | None = Field(
        None, description="Name of a loaded run; null: the base (text-to-image only)."
    )
    inputs: list[dict[str, Any]] = Field(
        ...,
        description="Rows as `deltatune predict` takes them: `image` as base64 (with `min_score`, "
        "`return_image`), or for text-to-image `prompt`, `seed`, `num_inference_steps`, `guidance_scale`.",
    )


def check_rows(rows: list[dict[str, Any]], limit: int) -> None:
    """Refuse what a network request may not ask for, before any model work: too many rows, a file to write,
    too many sampling steps."""
    if not rows:
        raise DataError("inputs is empty; send a list of rows.")
    if len(rows) > limit:
        raise DataError(f"{len(rows)} rows in one request; the limit is {limit} (--max-batch-size).")
    for row in rows:
        if "output" in row:
            raise DataError("'output' is not served (the server writes no files); send return_image: true.")
        steps = row.get("num_inference_steps")
        if steps is not None and not (isinstance(steps, int) and 1 <= steps <= MAX_INFERENCE_STEPS):
            raise DataError(f"num_inference_steps must be an integer from 1 to {MAX_INFERENCE_STEPS}.")


def base_of(run: Any) -> dict[str, Any]:
    """What a run's base model is built from: runs with equal bases can share one."""
    keys = ("model", "weights", "model_options", "image_size", "labels")
    return {k: getattr(run, k) for k in keys}


class VisionEngine:
    """Named vision runs as adapters over one shared base; called from one worker thread only."""

    def __init__(self, task: str) -> None:
        if task not in VISION_ENDPOINTS:
            raise ValueError(f"Not a vision task: {task!r}; use one of {', '.join(VISION_ENDPOINTS)}.")
        self.task = task
        self.model: Any = None  # the PeftModel over the shared base, once a run is loaded
        self.base: dict[str, Any] | None = None
        self.tasks: dict[
            str, Any
        ] = {}  # run name -> its Task (labels, image size), reading base64 images only
        self.paths: dict[str, str] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    def load(self, name: str, path: str) -> None:
        """Add the run in folder `path` under `name`; the first run loaded builds the base."""
        from deltatune.model import PeftModel
        from deltatune.train.data import LabelMap
        from deltatune.train.recipe import build_task, load_base, read_run

        if name in self.paths:
            raise AdapterError(f"A run named {name!r} is already loaded; unload it first or pick a new name.")
        try:
            run = read_run(path)
        except (DeltatuneError, OSError) as err:
            raise AdapterError(f"Could not read the run in {path}: {err}") from err
        if run.task != self.task:
            raise AdapterError(f"{path} was trained with task {run.task!r}; this server runs {self.task}.")
        if self.base is not None and base_of(run) != self.base:
            differ = [k for k, v in base_of(run).items() if v != self.base[k]]
            raise AdapterError(
                f"{path} was trained on another base ({', '.join(differ)} differ from the loaded runs'); "
                "serve it from its own server."
            )
        labels = LabelMap(run.labels) if run.labels else None
        try:
            if self.model is None:
                base, processor = load_base(run, labels)
                task = build_task(run, processor, labels)
                self.model = PeftModel.from_pretrained(task.wrap_model(base), path, adapter_name=name).eval()
                self.processor, self.base = processor, base_of(run)
            else:
                task = build_task(run, self.processor, labels)
                self.model.load_adapter(path, name)
        except (DeltatuneError, OSError, ValueError, KeyError, RuntimeError) as err:
            raise AdapterError(f"Could not load the run in {path}: {err}") from err
        task.read_files = False
        self.tasks[name] = task
        self.paths[name] = os.path.abspath(path)

    def unload(self, name: str) -> None:
        """Remove a run; removing the last one frees the base too."""
        del self.tasks[name], self.paths[name]
        if self.paths:
            self.model.delete_adapter(name)
        else:
            self.model = self.base = None

    def predict(self, name: str | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`deltatune predict` on run `name` (None: the base model, for text-to-image)."""
        if self.model is None:
            raise AdapterError("No run is loaded; load one first (POST /v1/adapters).")
        if name is None:
            if self.task != "text-to-image":
                raise DataError(f"Name an adapter: a {self.task} run's heads are trained with its adapter.")
            with self.model.disable_adapter():
                return next(iter(self.tasks.values())).predict(self.model, rows)
        self.model.set_adapter(name)
        return self.tasks[name].predict(self.model, rows)
