"""Serving the vision tasks: `POST /v1/classify-image`, `/v1/detect`, `/v1/segment` and `/v1/generate-image`
(and `/v1/predict`) answer with the same rows as `deltatune predict` on each run.

Many runs share one backbone, as adapters share a base for text: the first run loaded builds the base (its
torchvision/timm model or diffusers pipeline, from its run_config.yaml), and every run is an adapter on it, with its
own trained heads (`modules_to_save`); a request activates the adapter it names. A run trained on another base
(model, weights, options, image size or labels) is refused: it needs its own server. Requests send images as
base64 only (the server never reads a path it was sent) and get images back as base64 (it never writes a file).

The engine has the methods the adapter cache calls, as RecommendEngine does: `read_adapter` reads a run's files
(and builds the base while none is loaded) on the loader thread; `install`, `unload` and `predict` run on the model
thread, so the shared model is only ever touched there. Runs named at start, loaded by an admin or found under the
adapter root on first use share the same LRU cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from deltatune.apps.serve.batching import AdapterError
from deltatune.apps.serve.server import Strict
from deltatune.checkpoint import read_adapter_file
from deltatune.config import PeftConfig
from deltatune.errors import ConfigError, DataError, DeltatuneError
from deltatune.model import PeftModel, get_peft_model

VISION_ENDPOINTS = {
    "image-cls": "classify-image",
    "detection": "detect",
    "segmentation": "segment",
    "text-to-image": "generate-image",
}
# a text-to-image row's num_inference_steps: a request cannot hold the model for long
MAX_INFERENCE_STEPS = 200
LOAD_ERRORS = (DeltatuneError, OSError, ValueError, KeyError, TypeError, RuntimeError)


class ImageRequest(Strict):
    adapter: str | None = Field(
        None,
        description="Name of a run (loaded, or a folder under the adapter root); null: the base "
        "(text-to-image only).",
    )
    inputs: list[dict[str, Any]] = Field(
        ...,
        description="Rows as `deltatune predict` takes them: `image` as base64 (with `min_score`, "
        "`return_image`), or for text-to-image `prompt`, `seed`, `num_inference_steps`, `guidance_scale`.",
    )


def check_rows(rows: list[dict[str, Any]]) -> None:
    """Refuse what a network request may not ask for, before any model work: no rows, a file to write, too many
    sampling steps."""
    if not rows:
        raise DataError("inputs is empty; send a list of rows.")
    for row in rows:
        if "output" in row:
            raise DataError("'output' is not served (the server writes no files); send return_image: true.")
        steps = row.get("num_inference_steps")
        if steps is not None and not (
            isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_INFERENCE_STEPS
        ):
            raise DataError(f"num_inference_steps must be an integer from 1 to {MAX_INFERENCE_STEPS}.")


def base_of(run: Any) -> dict[str, Any]:
    """What a run's base model is built from: runs with equal bases can share one."""
    keys = ("model", "weights", "model_options", "image_size", "labels")
    return {k: getattr(run, k) for k in keys}


@dataclass
class VisionRun:
    """A run read from its folder off the model thread: its config, its Task, its adapter's tensors, and the base
    built for it when none was loaded yet (None otherwise; the model thread builds one if it is missing by then)."""

    run: Any
    task: Any
    config: PeftConfig
    state: dict[str, torch.Tensor]
    built: tuple[Any, Any] | None  # (the task's wrapped base model, its processor)


def build_base(run: Any) -> tuple[Any, Any]:
    """(the task's wrapped base model, its processor) as `deltatune train` built them for `run`."""
    from deltatune.train.data import LabelMap
    from deltatune.train.recipe import build_task, load_base

    labels = LabelMap(run.labels) if run.labels else None
    base, processor = load_base(run, labels)
    return build_task(run, processor, labels).wrap_model(base), processor


class VisionEngine:
    """Named vision runs as adapters over one shared base; every method but `read_adapter` is called from the
    model thread only."""

    tokenizer = None  # the tasks read images (and prompts) themselves; the server tokenizes nothing

    def __init__(self, task: str) -> None:
        if task not in VISION_ENDPOINTS:
            raise ValueError(f"Not a vision task: {task!r}; use one of {', '.join(VISION_ENDPOINTS)}.")
        self.task = task
        self.model: PeftModel | None = None  # over the shared base, once a run is loaded
        self.base: dict[str, Any] | None = None
        self.processor: Any = None
        # run name -> its Task (labels, image size), reading base64 images only
        self.tasks: dict[str, Any] = {}
        self.paths: dict[str, str] = {}

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    def read_adapter(self, path: str) -> VisionRun:
        """Read the run in folder `path` (and build a base while none is loaded); any thread, nothing served is
        touched (the base is checked again when the run is installed)."""
        from deltatune.train.data import LabelMap
        from deltatune.train.recipe import build_task, read_run

        try:
            run = read_run(path)
        except (DeltatuneError, OSError) as err:
            raise AdapterError(f"Could not read the run: {err}") from err
        if run.task != self.task:
            raise AdapterError(f"This run was trained with task {run.task!r}; this server runs {self.task}.")
        self._check_base(run)
        try:
            config = PeftConfig.from_pretrained(path)
            state = read_adapter_file(path)
            processor = self.processor  # set and cleared with the model, on the model thread
            built = build_base(run) if processor is None else None
            processor = built[1] if built is not None else processor
            labels = LabelMap(run.labels) if run.labels else None
            task = build_task(run, processor, labels)
        except LOAD_ERRORS as err:
            raise AdapterError(f"Could not load the run: {err}") from err
        config.inference_mode = True
        task.read_files = False
        return VisionRun(run, task, config, state, built)

    def _check_base(self, run: Any) -> None:
        if self.base is not None and base_of(run) != self.base:
            differ = [k for k, v in base_of(run).items() if v != self.base[k]]
            raise AdapterError(
                f"This run was trained on another base ({', '.join(differ)} differ from the loaded runs'); "
                "serve it from its own server."
            )

    def install(self, name: str, read: VisionRun, path: str) -> None:
        """Attach a read run under `name` (model thread); on any error the served model is left as it was."""
        if name in self.paths:
            raise ConfigError(f"A run named {name!r} is already loaded; unload it first or pick a new name.")
        self._check_base(read.run)
        try:
            if self.model is None:
                wrapped, processor = read.built or build_base(read.run)
                model = get_peft_model(wrapped, read.config, adapter_name=name)
                model._load_weights(name, read.state)
                self.model, self.processor, self.base = model.eval(), processor, base_of(read.run)
            else:
                self.model.add_adapter(name, read.config)
                try:
                    self.model._load_weights(name, read.state)
                except BaseException:
                    self.model.delete_adapter(name)
                    raise
                self.model.eval()  # the new adapter's layers and heads start in training mode
        except LOAD_ERRORS as err:
            raise AdapterError(f"Could not load run {name!r}: {err}") from err
        self.tasks[name] = read.task
        self.paths[name] = path

    def load(self, name: str, path: str) -> None:
        """Read and attach at once (runs named at start, before the model thread runs)."""
        self.install(name, self.read_adapter(path), os.path.abspath(path))

    def unload(self, name: str) -> None:
        """Remove a run; removing the last one frees the base too."""
        del self.tasks[name], self.paths[name]
        if self.paths:
            self.model.delete_adapter(name)
        else:
            self.model = self.base = self.processor = None

    def predict(self, name: str | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`deltatune predict` on run `name` (None: the base model, for text-to-image)."""
        check_rows(rows)
        if name is None:
            if self.task != "text-to-image":
                raise DataError(f"Name an adapter: a {self.task} run's heads are trained with its adapter.")
            if self.model is None:
                raise AdapterError(
                    "No run is loaded, so there is no base; load a run first (POST /v1/adapters)."
                )
            with self.model.disable_adapter():
                return next(iter(self.tasks.values())).predict(self.model, rows)
        self.model.set_adapter(name)
        return self.tasks[name].predict(self.model, rows)
