"""One benchmark run: a model, a task, a method, a learning rate and a seed -> one row of measurements.

Each run is cached as its own JSON file (`runs/<task>/<model>/<method>/lr<lr>-seed<seed>.json`), keyed by
everything that shapes it, so a stopped or extended benchmark resumes where it was and never reruns a finished run.
By default a run has its own Python process: its peak memory (max RSS) is its own, and a crash is a row with the
error, not the end of the benchmark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from deltatune.apps.bench.tasks import BenchTask

RUN_VERSION = 3  # bump when a change to the benchmark makes cached runs stale
# (2: MAM/UniPELT zero prefixes; 3: the fresh head is initialised under the run's seed, so a run is reproducible)


TRAINER_OPTIONS = {"head_lr"}  # ablation options that go to the trainer, not to the method's config


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: str
    task: BenchTask
    method: str
    lr: float
    seed: int
    data_dir: str
    num_threads: int = 1
    max_steps: int = 0  # > 0: a cap on the steps (tests)
    options: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # ablations (bench rows: none): method options, and trainer settings such as head_lr

    def key(self) -> str:
        """What makes two runs the same run (the cache key)."""
        data = {**dataclasses.asdict(self), "version": RUN_VERSION}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, out_dir: str) -> str:
        """The run's file; method options (ablations) are in its name, so two ablations never share a file."""
        model = os.path.basename(os.path.normpath(self.model)).lower()
        options = "".join(f"-{k}={v}" for k, v in sorted(self.options.items()))
        name = f"lr{self.lr:g}-seed{self.seed}{options}.json"
        return os.path.join(out_dir, "runs", self.task.name, model, self.method, name)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class _CountingTask:
    """The task, passed through, counting the training tokens its loss sees (for tokens/s and the budget)."""

    def __init__(self, task: Any) -> None:
        self._task, self.tokens = task, 0

    def loss(self, model, batch):
        out = self._task.loss(model, batch)
        self.tokens += int(out.tokens)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def steps_for_budget(features: list[dict[str, Any]], token_budget: int, batch_size: int) -> int:
    """Optimizer steps that feed about `token_budget` tokens, at this tokenizer's mean example length."""
    mean = statistics.fmean(len(f["input_ids"]) for f in features)
    return max(1, round(token_budget / (batch_size * mean)))


def _stored(adapter_dir: str) -> tuple[int, int]:
    """(tensor elements, bytes) in the adapter's safetensors file(s)."""
    from safetensors import safe_open

    elements = size = 0
    for name in os.listdir(adapter_dir):
        if name.endswith(".safetensors"):
            path = os.path.join(adapter_dir, name)
            size += os.path.getsize(path)
            with safe_open(path, "pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    elements += math.prod(fh.get_slice(key).get_shape())
    return elements, size


def loss_ends(losses: list[float]) -> dict[str, float | None]:
    """Mean training loss over the first and the last tenth of the steps: whether a run left its starting point
    (a seed that ends where it began did not train within the budget; one that trained like the others but scores
    lower generalises worse)."""
    if not losses:
        return {"train_loss_start": None, "train_loss_end": None}
    tenth = max(1, len(losses) // 10)
    return {
        "train_loss_start": statistics.fmean(losses[:tenth]),
        "train_loss_end": statistics.fmean(losses[-tenth:]),
    }


def execute(spec: RunSpec) -> dict[str, Any]:
    """Train and measure one run in this process."""
    import torch

    from deltatune import registry
    from deltatune.apps.bench.tasks import load_tables
    from deltatune.model import get_peft_model
    from deltatune.train.recipe import RunConfig, fit_labels, load_base, make_peft_config
    from deltatune.train.tasks import TASKS
    from deltatune.train.trainer import TrainConfig, Trainer, seed_everything

    started, load_start = time.time(), loadavg()
    torch.set_num_threads(spec.num_threads)
    t = spec.task
    tables = load_tables(t, spec.data_dir)
    run = RunConfig(
        model=spec.model,
        task=t.trainer_task,
        method=spec.method,
        text_column="sentence" if t.trainer_task == "seq-cls" else None,
        label_column="label" if t.trainer_task == "seq-cls" else None,
        max_length=t.max_length,
        max_new_tokens=t.max_new_tokens,
        generate_samples=max(len(tables["validation"]), len(tables["dev"])),
    )
    labels = fit_labels(run, tables["train"]) if t.trainer_task == "seq-cls" else None
    # a fresh task head is initialised while loading: the seed decides it, as in train
    seed_everything(spec.seed)
    model, tokenizer = load_base(run, labels)  # quantized when the variant says so (qlora)
    base_params = sum(p.numel() for p in model.parameters())
    base_ids = {id(p) for p in model.parameters()}
    task = _CountingTask(TASKS[t.trainer_task].from_run(run, tokenizer, labels))
    features = {name: task.prepare(table, name) for name, table in tables.items()}
    steps = steps_for_budget(features["train"], t.token_budget, t.batch_size)
    steps = min(steps, spec.max_steps) if spec.max_steps else steps
    train_options = {k: v for k, v in spec.options.items() if k in TRAINER_OPTIONS}
    method_options = {k: v for k, v in spec.options.items() if k not in TRAINER_OPTIONS}
    seed_everything(spec.seed)
    config = make_peft_config(run, method_options, steps, tokenizer)
    peft_model = get_peft_model(model, config)
    added = sum(p.numel() for p in peft_model.parameters() if id(p) not in base_ids)
    marks: list[tuple[float, int]] = []
    losses: list[float] = []

    def on_step(_trainer: Trainer, record: dict[str, Any]) -> None:
        marks.append((time.perf_counter(), task.tokens))
        losses.append(float(record["loss"]))

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            output_dir=out,
            max_steps=steps,
            batch_size=t.batch_size,
            eval_batch_size=32,
            lr=spec.lr,
            warmup_ratio=0.06,
            seed=spec.seed,
            num_threads=spec.num_threads,
            progress=False,
            tensorboard=False,
            plot=False,
            keep_checkpoint=False,
            load_best_at_end=False,
            **train_options,
        )
        trainer = Trainer(
            peft_model,
            task,
            features["train"],
            None,
            cfg,
            callbacks=[on_step],
        )
        start = (time.perf_counter(), 0)
        summary = trainer.train()
        scores = {
            **trainer.evaluate(features["validation"], "val"),
            **trainer.evaluate(features["dev"], "dev"),
        }
        adapter_dir = os.path.join(out, "adapter")
        peft_model.save_pretrained(adapter_dir)
        stored_params, stored_bytes = _stored(adapter_dir)
    points = [start, *marks]
    times = [b[0] - a[0] for a, b in zip(points, points[1:])]
    tokens = [b[1] - a[1] for a, b in zip(points, points[1:])]
    timed = slice(1, None) if len(times) > 1 else slice(None)  # the first step warms caches up
    return {
        "model": spec.model,
        "task": t.name,
        "method": spec.method,
        "peft_type": registry.resolve_variant(spec.method)[0].peft_type,
        "lr": spec.lr,
        "seed": spec.seed,
        "status": "ok",
        "val_score": scores[f"val_{t.metric}"],
        "dev_score": scores[f"dev_{t.metric}"],
        "dev_f1_macro": scores.get("dev_f1_macro"),
        "model_params": base_params,
        "total_params": summary["total_params"],
        "trainable_params": summary["trainable_params"],
        "added_params": added,
        "stored_params": stored_params,
        "stored_bytes": stored_bytes,
        "peak_rss_mb": summary["peak_memory_mb"],
        "median_step_s": statistics.median(times[timed]),
        "tokens_per_s": sum(tokens[timed]) / max(1e-9, sum(times[timed])),
        "train_tokens": task.tokens,
        **loss_ends(losses),
        "steps": summary["steps"],
        "wall_s": time.time() - started,
        "loadavg": [load_start, loadavg()],
        "config": config.to_dict(),
    }


def run_isolated(spec: RunSpec) -> dict[str, Any]:
    """`execute` in a fresh interpreter: its own peak memory, and a crash becomes a row with the error."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    payload = json.dumps({**dataclasses.asdict(spec), "task": dataclasses.asdict(spec.task)})
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune.apps.bench", payload], capture_output=True, text=True, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return _failed(spec, f"error: {tail}")


def run_here(spec: RunSpec) -> dict[str, Any]:
    try:
        return execute(spec)
    except Exception as err:  # noqa: BLE001 - one failing run is reported in its row, not fatal
        return _failed(spec, f"error: {type(err).__name__}: {err}")


def _failed(spec: RunSpec, status: str) -> dict[str, Any]:
    return {
        "model": spec.model,
        "task": spec.task.name,
        "method": spec.method,
        "lr": spec.lr,
        "seed": spec.seed,
        "status": status,
    }


def cached_run(spec: RunSpec, out_dir: str, isolate: bool = True) -> dict[str, Any]:
    """The run's row from its cache file when it finished before with the same key; else run it and cache it."""
    path = spec.path(out_dir)
    if os.path.isfile(path):
        with open(path) as fh:
            row = json.load(fh)
        if row.get("key") == spec.key() and row.get("status") == "ok":
            return {**row, "cached": True}
    row = {**(run_isolated(spec) if isolate else run_here(spec)), "key": spec.key()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(row, fh, indent=1)
    os.replace(tmp, path)
    return row


def spec_from_json(payload: str) -> RunSpec:
    data = json.loads(payload)
    return RunSpec(**{**data, "task": BenchTask(**data["task"])})
