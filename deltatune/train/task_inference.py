"""Which task a set of adapters and a base model are for, so `deltatune serve` needs no `--task` to be right.

The adapters' `task_type` (in `adapter_config.json`) decides; without one, the model's architecture does; without
either, sequence classification. A choice that cannot work is refused before anything loads: adapters of different
tasks on one server, an explicit `--task` that contradicts an adapter, or a causal-LM adapter on a classifier
checkpoint (whose language-model head was never trained).
"""

from __future__ import annotations

import os

import yaml

from deltatune.config import PeftConfig
from deltatune.errors import ConfigError
from deltatune.models import architecture_task
from deltatune.train.recipe import RUN_CONFIG
from deltatune.train.tasks import TASKS

CLASSIFIER_TASKS = ("seq-cls", "token-cls")


def task_of_adapters(adapters: dict[str, str]) -> dict[str, str]:
    """Adapter name -> task name: the task of the run that wrote the folder (its run_config.yaml) when there is
    one, else the task its config's task_type stands for."""
    # the first task of each task_type: regression and multi-label are SEQ_CLS adapters too
    by_type: dict[str, str] = {}
    for name, task in TASKS.items():
        if task.task_type:
            by_type.setdefault(task.task_type, name)
    found = {}
    for name, path in adapters.items():
        run_task = _run_task(path)
        task_type = PeftConfig.from_pretrained(path).task_type
        if run_task:
            found[name] = run_task
        elif task_type:
            found[name] = by_type.get(task_type, task_type)
    return found


def _run_task(folder: str) -> str | None:
    """The `task:` of the `deltatune train` run that wrote `folder`, if it did."""
    path = os.path.join(folder, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    task = raw.get("task") if isinstance(raw, dict) else None
    return task if isinstance(task, str) and task in TASKS else None


def infer_task(model: str, adapters: dict[str, str], requested: str | None = None) -> tuple[str, str]:
    """(task, why) for serving `model` with `adapters` (name -> folder); `requested` (`--task`) overrides the
    inference but not a contradiction. Raises ConfigError with one line when the combination cannot work."""
    adapter_tasks = task_of_adapters(adapters)
    distinct = sorted(set(adapter_tasks.values()))
    if len(distinct) > 1:
        shown = ", ".join(f"{n}: {t}" for n, t in adapter_tasks.items())
        raise ConfigError(
            f"The adapters are for different tasks ({shown}); serve each task from its own server."
        )
    from_model = architecture_task(model) if model else None
    if requested:
        task, why = requested, "--task"
    elif distinct:
        task, why = distinct[0], "the adapters' task_type"
    elif from_model:
        task, why = from_model, "the model's architecture"
    else:
        task, why = "seq-cls", "the default; pass --task causal-lm to generate"
    wrong = {n: t for n, t in adapter_tasks.items() if t != task}
    if wrong:
        name, other = next(iter(wrong.items()))
        raise ConfigError(
            f"Adapter {name!r} is a {other} adapter but the server was asked to run {task} ({why}); "
            f"drop --task or serve {name!r} from a {other} server."
        )
    if from_model in CLASSIFIER_TASKS and from_model != task:
        raise ConfigError(
            f"{model} is a {from_model} checkpoint (a classifier), so it cannot run {task} ({why}); "
            "serve these adapters on the base model they were trained on."
        )
    return task, why
