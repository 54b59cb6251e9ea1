"""The playground: one input through the base model and several trained adapters, side by side.

Adapters that can share a batch (LoRA: the method's `mixed_batches`) are loaded into one model over one copy of the
base, and the input runs once for all of them: row i of the batch uses adapter i (`PeftModel.row_adapters` /
`adapter_names=`, `"__base__"` for the plain base), the mechanism under `deltatune serve`'s mixed batches. Other
adapters (IA3, prompts, bottlenecks, DoRA ...) run on their own model, loaded as `deltatune predict` loads them.
Outputs have the fields of `deltatune predict`: a label with its scores, or a generation.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune import registry
from deltatune.apps.studio.runs import read_yaml
from deltatune.apps.studio.workspace import EXPORTS_DIR, Workspace
from deltatune.config import PeftConfig
from deltatune.errors import ConfigError, MergeError
from deltatune.model import BASE_ADAPTER, PeftModel
from deltatune.train.data import LabelMap, render_prompt
from deltatune.train.recipe import RUN_CONFIG, build_task, load_base, load_run, merge_run, split_recipe
from deltatune.train.tasks import Task

BASE = "(base model)"
TEXT_TASKS = ("seq-cls", "causal-lm", "seq2seq")


@dataclass
class Loaded:
    """A model in memory with the task that reads its inputs and writes its outputs."""

    model: nn.Module
    task: Task
    adapters: set[str] = field(default_factory=set)


def adapter_info(ws: Workspace, name: str) -> dict[str, Any]:
    """What the playground needs to know of a run's adapter: its base (model, task, labels) and its method."""
    folder = ws.run_folder(name)
    run_config = read_yaml(os.path.join(folder, RUN_CONFIG))
    if not run_config or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise ConfigError(f"Run {name!r} has no trained adapter yet; wait for it to finish.")
    config = PeftConfig.from_pretrained(folder)
    method = registry.method_for(config.peft_type)
    labels = run_config.get("labels")
    return {
        "name": name,
        "folder": folder,
        "run_config": run_config,
        "model": run_config.get("model"),
        "task": run_config.get("task", "seq-cls"),
        "labels": [str(x) for x in labels] if labels else None,
        "method": run_config.get("method", method.name),
        "mixed": method.mixed_batches and not getattr(config, "use_dora", False),
        "mergeable": method.mergeable,
    }


def base_key(info: dict[str, Any]) -> str:
    """Adapters of one base: same model, task and labels (one classifier head size and names)."""
    labels = ",".join(info["labels"] or [])
    quantize = info["run_config"].get("quantize") or registry.resolve_variant(info["method"])[1].quantize
    return f"{info['model']} | {info['task']} | {labels} | {info['run_config'].get('dtype')} | {quantize}"


class Playground:
    """Models stay loaded between requests (at most `max_models`, the least recently used leaves first); one
    request runs at a time."""

    def __init__(self, ws: Workspace, max_models: int = 3) -> None:
        self.ws = ws
        self.max_models = max_models
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()
        self.lock = threading.Lock()

    def groups(self) -> list[dict[str, Any]]:
        """Finished runs grouped by base model, for the page's pickers."""
        groups: dict[str, dict[str, Any]] = {}
        for name in self.ws.run_names():
            try:
                info = adapter_info(self.ws, name)
            except (ConfigError, OSError, ValueError):
                continue
            if info["task"] not in TEXT_TASKS:
                continue
            key = base_key(info)
            group = groups.setdefault(
                key,
                {
                    "key": key,
                    "model": info["model"],
                    "task": info["task"],
                    "labels": info["labels"],
                    "text_pair": bool(info["run_config"].get("text_pair_column")),
                    "adapters": [],
                },
            )
            group["adapters"].append(
                {
                    "name": name,
                    "method": info["method"],
                    "shared_batch": info["mixed"],
                    "mergeable": info["mergeable"],
                }
            )
        return list(groups.values())

    # --- models in memory ------------------------------------------------------------------------------
    def _keep(self, key: str, make) -> Loaded:
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        while len(self.loaded) >= self.max_models:
            self.loaded.popitem(last=False)
        self.loaded[key] = make()
        return self.loaded[key]

    def _shared(self, info: dict[str, Any], names: list[str], infos: dict[str, dict[str, Any]]) -> Loaded:
        """The base of `info`'s group with the shareable adapters `names` loaded into it."""

        def make() -> Loaded:
            run, _, _ = split_recipe(info["run_config"])
            labels = LabelMap(run.labels) if run.labels else None
            model, tokenizer = load_base(run, labels)
            return Loaded(model.eval(), build_task(run, tokenizer, labels))

        loaded = self._keep("shared " + base_key(info), make)
        for name in names:
            if name in loaded.adapters:
                continue
            folder = infos[name]["folder"]
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(folder, adapter_name=name)
            else:
                loaded.model = PeftModel.from_pretrained(loaded.model, folder, adapter_name=name)
            loaded.model.eval()
            loaded.adapters.add(name)
        return loaded

    def _own(self, info: dict[str, Any]) -> Loaded:
        def make() -> Loaded:
            model, task, _ = load_run(info["folder"])
            return Loaded(model, task, {info["name"]})

        return self._keep("own " + info["name"], make)

    # --- one input, several models ------------------------------------------------------------------
    def compare(
        self,
        adapters: list[str],
        include_base: bool,
        text: str,
        text_pair: str | None,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """Outputs for `text` from the base (if asked) and each adapter, in the order asked."""
        if not adapters and not include_base:
            raise ConfigError("Pick at least one adapter, or the base model.")
        if not text.strip():
            raise ConfigError("Type an input first.")
        if not adapters:
            raise ConfigError("Pick at least one adapter: it tells which base model (and labels) to load.")
        infos = {name: adapter_info(self.ws, name) for name in dict.fromkeys(adapters)}
        keys = {base_key(i) for i in infos.values()}
        if len(keys) > 1:
            raise ConfigError(
                "These adapters were trained on different base models (or label sets); pick adapters of one base."
            )
        first = next(iter(infos.values()))
        if first["task"] not in TEXT_TASKS:
            raise ConfigError(f"The playground takes text inputs; task {first['task']!r} has none.")
        sampling = options.get("do_sample") or options.get("seed") is not None
        if first["task"] != "causal-lm" and (sampling or options.get("max_new_tokens")):
            raise ConfigError(
                "Generation options apply to causal-lm adapters only; clear them for this task."
            )
        shared = [n for n in infos if infos[n]["mixed"]]
        with self.lock:
            outputs: dict[str, dict[str, Any]] = {}
            if shared or include_base:
                loaded = self._shared(first, shared, infos)
                names = ([BASE_ADAPTER] if include_base else []) + shared
                for name, out in zip(names, self._run(loaded, names, text, text_pair, options)):
                    how = "shared batch" if len(names) > 1 else "alone"
                    outputs[BASE if name == BASE_ADAPTER else name] = {**out, "pass": how}
            for name in infos:
                if name not in outputs:
                    (out,) = self._run(self._own(infos[name]), None, text, text_pair, options)
                    outputs[name] = {**out, "pass": "own model"}
        order = ([BASE] if include_base else []) + list(infos)
        return {
            "task": first["task"],
            "outputs": [
                {"name": n, "method": infos[n]["method"] if n in infos else None, **outputs[n]} for n in order
            ],
        }

    def _run(
        self,
        loaded: Loaded,
        names: list[str] | None,
        text: str,
        text_pair: str | None,
        options: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """One batch: row i runs adapter names[i] (None: the model as loaded, for a single-adapter model)."""
        rows = len(names) if names else 1
        model, task = loaded.model, loaded.task
        mixed = names is not None and isinstance(model, PeftModel)
        if task.name == "causal-lm":
            return generate(model, task.tokenizer, [text] * rows, options, names if mixed else None)
        row = {getattr(task, "text_column", "text"): text}
        if getattr(task, "text_pair_column", None):
            if not text_pair:
                raise ConfigError(
                    f"These adapters read text pairs; fill in the second text ({task.text_pair_column})."
                )
            row[task.text_pair_column] = text_pair
        scope = model.row_adapters(names) if mixed else nullcontext()
        with torch.no_grad(), scope:
            return task.predict(model, [row] * rows, batch_size=rows)

    def export(self, name: str) -> dict[str, Any]:
        """Merge the run's adapter into its base and save a full model to exports/<run>-merged."""
        info = adapter_info(self.ws, name)
        if not info["mergeable"]:
            raise MergeError(
                f"{info['method']} adapters cannot be folded into the weights; export needs LoRA-like."
            )
        out = os.path.join(self.ws.root, EXPORTS_DIR, f"{name}-merged")
        if os.path.exists(out):
            raise MergeError(f"{self.ws.relative(out)} already exists; delete it to export again.")
        with self.lock:
            result = merge_run(info["folder"], out)
        return {**result, "relative": self.ws.relative(out)}


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, texts: list[str], options: dict[str, Any], names: list[str] | None
) -> list[dict[str, Any]]:
    """Continue each text as the user turn of a chat (the prompt `deltatune predict` renders), left-padded so
    every row ends at the same position; greedy unless `do_sample`."""
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    kwargs: dict[str, Any] = {"max_new_tokens": int(options.get("max_new_tokens") or 32), "do_sample": False}
    if options.get("do_sample"):
        kwargs.update(
            do_sample=True,
            temperature=float(options.get("temperature", 1.0)),
            top_p=float(options.get("top_p", 1.0)),
            top_k=int(options.get("top_k", 50)),
        )
        if options.get("seed") is not None:
            torch.manual_seed(int(options["seed"]))
    if names is not None:
        kwargs["adapter_names"] = names
    out = model.generate(**enc, **kwargs, pad_token_id=tokenizer.pad_token_id)
    texts_out = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [{"generation": t.strip()} for t in texts_out]
