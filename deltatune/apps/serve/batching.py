"""The model side of serving: one shared base with many LoRA adapters, and a dynamic batcher in front of it.

`Engine` owns the model and is only ever called from one worker thread, so loads, unloads and forward passes never
overlap. A batch may mix adapters: every LoRA layer (and every per-adapter classifier head) is told which adapter
each row uses (`PeftModel.row_adapters`), so the base runs once for the whole batch and each adapter's B A x is added only to
its own rows. `Batcher` gathers requests for a short window (or until the batch is full) before running them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig
from deltatune.errors import CheckpointError
from deltatune.model import PeftModel


class AdapterError(CheckpointError):
    """An adapter folder that cannot be served (wrong method, DoRA, unreadable files)."""


class Engine:
    """A base model plus named LoRA adapters, answering classification or generation batches."""

    def __init__(self, model: nn.Module, tokenizer: Any, task: str) -> None:
        if task not in ("seq-cls", "causal-lm"):
            raise ValueError(f"Serving supports task 'seq-cls' or 'causal-lm', got {task!r}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.task = task
        self.paths: dict[str, str] = {}
        self.merged: str | None = None  # the adapter folded into the weights by the single-adapter fast path

    @property
    def adapters(self) -> list[str]:
        return list(self.paths)

    # --- adapters ------------------------------------------------------------------------------
    def load(self, name: str, path: str) -> None:
        """Add the adapter in folder `path` under `name`; on any error the model is left as it was."""
        if name in self.paths:
            raise AdapterError(
                f"An adapter named {name!r} is already loaded; unload it first or pick a new name."
            )
        try:
            config = PeftConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise AdapterError(f"Cannot read the adapter config in {path}: {err}") from err
        if getattr(config.peft_type, "value", config.peft_type) != "LORA":
            raise AdapterError(
                f"Only LoRA adapters can be served; {path} holds a {config.peft_type} adapter."
            )
        if getattr(config, "use_dora", False):
            raise AdapterError(f"{path} is a DoRA adapter; mixed-adapter batches support plain LoRA only.")
        self._unmerge()
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            raise AdapterError(f"Could not load the adapter in {path}: {err}") from err
        self.paths[name] = os.path.abspath(path)

    def unload(self, name: str) -> None:
        """Remove an adapter; removing the last one gives back the plain base model."""
        if name not in self.paths:
            raise KeyError(name)
        self._unmerge()
        if len(self.paths) > 1:
            self.model.delete_adapter(name)
        else:
            for layer in self.model.adapter_layers():
                layer.set_adapter([])  # so unload() keeps the original heads, not the adapter's copies
            self.model = self.model.unload().eval()
        del self.paths[name]

    # --- batches -------------------------------------------------------------------------------
    def _unmerge(self) -> None:
        if self.merged is not None:
            self.model.unmerge_adapter()
            self.merged = None

    def _adapter_scope(self, names: list[str | None]):
        """Every row on one adapter: the merged fast path (the adapter stays folded into the weights while batches
        keep asking for it, so the forward costs what the base costs); mixed rows: per-row LoRA."""
        if not isinstance(self.model, PeftModel):
            return nullcontext()
        distinct = set(names)
        if len(distinct) == 1 and names[0] is not None:
            if self.merged != names[0]:
                self._unmerge()
                self.model.set_adapter(names[0])
                self.model.merge_adapter()
                self.merged = names[0]
            return nullcontext()
        self._unmerge()
        if distinct == {None}:
            return self.model.disable_adapter()
        return self.model.row_adapters(names)

    @torch.no_grad()
    def classify(self, texts: list[str], names: list[str | None]) -> list[dict[str, Any]]:
        """Labels with softmax scores, one dict per text (the same fields as `deltatune predict`)."""
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        with self._adapter_scope(names):
            logits = self.model(**enc).logits
        probs = logits.float().softmax(-1)
        labels = self.label_names(probs.shape[-1])
        return [
            {
                "label": labels[int(p.argmax())],
                "score": float(p.max()),
                "scores": {n: float(v) for n, v in zip(labels, p)},
            }
            for p in probs
        ]

    def label_names(self, count: int) -> list[str]:
        id2label = getattr(getattr(self.model, "config", None), "id2label", None) or {}
        return [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]

    @torch.no_grad()
    def generate(self, prompts: list[str], names: list[str | None], options: dict[str, Any]) -> list[str]:
        """Continue each prompt (left-padded, so all rows end at the same position) and return the new text."""
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(prompts, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        kwargs = dict(options)
        if not kwargs.get("do_sample"):
            kwargs = {"max_new_tokens": kwargs["max_new_tokens"], "do_sample": False}
        with self._adapter_scope(names):
            out = self.model.generate(**enc, **kwargs, pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])


@dataclass
class _Item:
    key: Hashable
    rows: list[Any]
    future: asyncio.Future
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.rows)


class Batcher:
    """Collects requests for up to `window_s` (or `max_rows` rows), then runs them as batches in `executor`.

    `run(key, rows) -> results` sees only rows of one key (e.g. the same sampling options); each request gets back
    the results of its own rows. `on_batch(rows)` is told each batch's size (for metrics)."""

    def __init__(
        self,
        run: Callable[[Hashable, list[Any]], list[Any]],
        executor: Executor,
        max_rows: int = 32,
        window_s: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run, self.executor = run, executor
        self.max_rows, self.window_s = max_rows, window_s
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, key: Hashable, rows: list[Any]) -> list[Any]:
        item = _Item(key, rows, asyncio.get_running_loop().create_future())
        await self.queue.put(item)
        return await item.future

    async def _collect(self) -> list[_Item]:
        items = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while sum(i.size for i in items) < self.max_rows:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            groups: dict[Hashable, list[_Item]] = {}
            for item in items:
                groups.setdefault(item.key, []).append(item)
            for key, group in groups.items():
                rows = [row for item in group for row in item.rows]
                try:
                    results = await loop.run_in_executor(self.executor, self.run, key, rows)
                except Exception as err:  # noqa: BLE001 - the error belongs to these requests, not the loop
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                if self.on_batch is not None:
                    self.on_batch(len(rows))
                start = 0
                for item in group:
                    if not item.future.done():
                        item.future.set_result(results[start : start + item.size])
                    start += item.size
