"""`deltatune bench`: every method of the registry x models of several sizes x seeds, on the same data and the same
training budget in tokens, with each method's learning rate chosen by a small sweep on a validation split.

Why: "which method is best" depends on the model's size, and published comparisons rarely share a setting. For each
(model, task, method) the benchmark:
1. trains with seed `seeds[0]` at `Method.typical_lr` times each of `lr_factors` (the sweep), and scores every run
   on the validation split (carved from the training data);
2. keeps the learning rate with the best validation score (reported) and trains the other seeds with it; when that
   rate is the sweep's highest (or lowest) and validation still rises towards it, the sweep first goes one step
   further that way, up to `extend_sweep` times (a rate left at a rising edge is flagged in the table);
3. reports the dev score (never seen by the sweep) as mean and std over seeds, and the trainable / added / stored
   parameters, peak memory (max RSS of the run's own process), median step time and training tokens/s of the
   `seeds[0]` run at the chosen learning rate.

Encoders run `sst2`; decoders run `sst2-text` (classification as text) and `dates` (an instruction task); see
`tasks.py`. Every run is cached on its own (`run.py`), so the benchmark runs in stages: one model or method at a
time, stopped and resumed, with `--report-only` turning whatever has finished into the tables and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deltatune.apps.bench.methods import bench_methods, check_methods, typical_lr
from deltatune.apps.bench.run import RunSpec, cached_run, loadavg
from deltatune.apps.bench.tasks import (
    DEFAULT_DATA,
    TASKS,
    BenchTask,
    load_tables,
    majority_baseline,
    tasks_for,
)

DEFAULT_MODELS = ["all-minilm-l6-v2"]
LADDER = [
    "paraphrase-minilm-l3-v2",
    "all-minilm-l6-v2",
    "all-mpnet-base-v2",
    "smollm2-135m-instruct",
    "gemma3-270m",
]


@dataclasses.dataclass
class BenchSettings:
    """One benchmark setting; `quick()` is the few-minutes variant used by `--quick` and the tests."""

    models: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MODELS))
    tasks: list[str] | None = None  # None: every task of each model's family
    methods: list[str] | None = None  # None: every registry variant (bench_methods)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    lr_factors: list[float] = dataclasses.field(default_factory=lambda: [1 / 3, 1.0, 3.0])
    extend_sweep: int = 1  # rates added past an edge of the sweep while validation still rises there
    budget_scale: float = 1.0  # times each task's token budget
    max_steps: int = 0  # > 0: a cap on the steps of every run (tests)
    rows: int = 0  # > 0: at most this many rows per split
    data_dir: str = DEFAULT_DATA
    num_threads: int = 1
    isolate: bool = True
    jobs: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        defaults = {"seeds": [0], "lr_factors": [1.0], "budget_scale": 0.02, "max_steps": 8, "rows": 128}
        return cls(**{**defaults, **overrides})

    def task(self, name: str) -> BenchTask:
        task = TASKS[name]
        if self.budget_scale != 1 or self.rows:
            task = task.scaled(self.budget_scale, self.rows or None)
        return task


def method_names(task: str = "seq-cls") -> list[str]:
    return bench_methods(task)


def model_family(model: str) -> str:
    """ "decoder" for a causal LM (Llama, Gemma, GPT-2 ...), else "encoder" (BERT, MPNet ...)."""
    import transformers

    from deltatune.models import resolve_model_path

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        return "decoder"  # transformers reads only decoder architectures from GGUF
    config = transformers.AutoConfig.from_pretrained(path)
    causal = type(config) in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
    masked = type(config) in transformers.MODEL_FOR_MASKED_LM_MAPPING
    return "decoder" if causal and not masked else "encoder"


@dataclasses.dataclass
class Cell:
    """One (model, task, method): its sweep runs, its seed runs at the chosen learning rate, and the summary."""

    model: str
    task: BenchTask
    method: str
    sweep: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seeds: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def rising_edge(self) -> int:
        """+1 when the chosen rate is the sweep's highest and validation still rises towards it, -1 for the lowest,
        else 0: the best rate may lie outside the sweep."""
        lr = self.chosen_lr()
        ok = sorted((r for r in self.sweep if r["status"] == "ok"), key=lambda r: r["lr"])
        rates = [r["lr"] for r in self.sweep]  # a rate that did not run still bounds the sweep
        if len(ok) < 2:
            return 0
        if lr == max(rates) and ok[-1]["val_score"] > ok[-2]["val_score"]:
            return 1
        if lr == min(rates) and ok[0]["val_score"] > ok[1]["val_score"]:
            return -1
        return 0

    def chosen_lr(self) -> float | None:
        ok = [r for r in self.sweep if r["status"] == "ok"]
        if not ok:
            return None
        centre = typical_lr(self.method)
        return max(ok, key=lambda r: (r["val_score"], -abs(r["lr"] / centre - 1)))["lr"]


def _spec(s: BenchSettings, model: str, task: BenchTask, method: str, lr: float, seed: int) -> RunSpec:
    return RunSpec(model, task, method, float(f"{lr:.3g}"), seed, s.data_dir, s.num_threads, s.max_steps)


def plan(s: BenchSettings) -> list[Cell]:
    """Every (model, task, method) the setting asks for, in order."""
    cells = []
    for model in s.models:
        family = model_family(model)
        names = s.tasks or [t.name for t in tasks_for(family)]
        for name in names:
            if name not in TASKS:
                raise ValueError(f"Unknown bench task {name!r}; choose from: {', '.join(TASKS)}.")
            if TASKS[name].family != family:
                continue  # e.g. --tasks sst2,dates over encoders and decoders: each model runs its own
            task = s.task(name)
            available = bench_methods(task.trainer_task)
            if s.methods:
                check_methods(s.methods, available)
            methods = [m for m in available if not s.methods or m in s.methods]
            cells += [Cell(model, task, m) for m in methods]
    return cells


def _run_all(specs: list[RunSpec], s: BenchSettings, out_dir: str, report_only: bool) -> list[dict[str, Any]]:
    if report_only:
        return [_cached_only(spec, out_dir) for spec in specs]
    with ThreadPoolExecutor(max_workers=max(1, s.jobs if s.isolate else 1)) as pool:
        return list(pool.map(lambda spec: cached_run(spec, out_dir, s.isolate), specs))


def _cached_only(spec: RunSpec, out_dir: str) -> dict[str, Any]:
    path = spec.path(out_dir)
    if os.path.isfile(path):
        with open(path) as fh:
            row = json.load(fh)
        if row.get("key") == spec.key():
            return row
    return {
        "model": spec.model,
        "task": spec.task.name,
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "status": "not run",
    }


def run_bench(
    s: BenchSettings, out_dir: str, log: Callable[[str], None] = print, report_only: bool = False
) -> dict[str, Any]:
    """Run (or, with `report_only`, collect) the whole matrix; write bench.json, bench.md and the plots."""
    from deltatune.apps.bench import report

    started, cells = time.time(), plan(s)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": report.machine(),
        "settings": dataclasses.asdict(s),
        "loadavg_start": loadavg(),
        "baselines": {},
        "cells": cells,
    }
    os.makedirs(out_dir, exist_ok=True)
    for task_name in dict.fromkeys(c.task.name for c in cells):
        task = next(c.task for c in cells if c.task.name == task_name)
        result["baselines"][task_name] = majority_baseline(task, load_tables(task, s.data_dir))
    for group in _groups(cells):  # one (model, task) at a time: its sweep in parallel, then its seeds
        sweep = [
            _spec(s, c.model, c.task, c.method, typical_lr(c.method) * f, s.seeds[0])
            for c in group
            for f in s.lr_factors
        ]
        rows = iter(_run_all(sweep, s, out_dir, report_only))
        for c in group:
            c.sweep = [next(rows) for _ in s.lr_factors]
        _extend_sweeps(group, s, out_dir, report_only)
        seeds = [
            (c, _spec(s, c.model, c.task, c.method, c.chosen_lr(), seed))
            for c in group
            if c.chosen_lr() is not None
            for seed in s.seeds[1:]
        ]
        for (c, _), row in zip(seeds, _run_all([spec for _, spec in seeds], s, out_dir, report_only)):
            c.seeds.append(row)
        for c in group:
            log(report.cell_line(c, result["baselines"][c.task.name]))
        result["wall_time_s"], result["loadavg_end"] = time.time() - started, loadavg()
        report.write(result, out_dir)
    report.write(result, out_dir, plots=True)
    return result


def _extend_sweeps(group: list[Cell], s: BenchSettings, out_dir: str, report_only: bool) -> None:
    """One more rate past the edge, for each cell chosen at a rising edge, up to `extend_sweep` times; the step is
    the sweep's own (x3 for 0.33 / 1 / 3). With `report_only` only extensions that ran before are taken."""
    if len(s.lr_factors) < 2:
        return
    step = (max(s.lr_factors) / min(s.lr_factors)) ** (1 / (len(s.lr_factors) - 1))
    for _ in range(s.extend_sweep):
        todo = [(c, edge) for c in group if (edge := c.rising_edge())]
        specs = [
            _spec(s, c.model, c.task, c.method, c.chosen_lr() * step**edge, s.seeds[0]) for c, edge in todo
        ]
        found = [
            (c, row)
            for (c, _), row in zip(todo, _run_all(specs, s, out_dir, report_only))
            if row["status"] != "not run"
        ]
        for c, row in found:
            c.sweep.append(row)
        if not found:
            return


def _groups(cells: list[Cell]) -> list[list[Cell]]:
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.model, c.task.name), []).append(c)
    return list(groups.values())
