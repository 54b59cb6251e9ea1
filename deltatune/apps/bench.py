"""`deltatune bench`: every method of the library on one model and one task, with one step budget and one seed.

Why: practitioners pick a method by trading trainable parameters, memory, speed and score, and published numbers
rarely share a setting. This runs each method through the project's own Trainer on the same data, the same
number of optimizer steps, the same batch size and seed (only the learning rate is per method, each a value
usual for that method), and writes bench/results/bench.json, bench.md and three plots: bench.png (dev score vs
trainable params), bench_memory.png and bench_step_time.png.

With several seeds (`--seeds 0,1,2`) the score columns give the mean and standard deviation over seeds; speed and
memory come from the first seed, which runs alone, while the other seeds may run `jobs` at a time (they only add
scores, so sharing the CPU does not bias anything reported).

Each method runs in its own fresh Python process (unless `isolate=False`), so its peak memory (the process's
maximum RSS on CPU, `torch.cuda.max_memory_allocated` on GPU) is its own and one failing method cannot stop the
others: a failure is recorded in its row. The majority-class baseline (the train split's most frequent label,
scored on the dev split) is the bar every method should clear.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL = "all-minilm-l6-v2"
DEFAULT_DATA = "../shared/data/sst2"  # relative to the repository, as recipes/sst2-minilm-lora.yaml


@dataclasses.dataclass
class BenchSettings:
    """One benchmark setting; `quick()` is the under-5-minutes variant."""

    model: str = DEFAULT_MODEL
    data_dir: str = DEFAULT_DATA
    steps: int = 120
    batch_size: int = 16
    max_length: int = 64
    train_samples: int = 4000
    eval_samples: int = 0  # 0: the whole dev split (872 rows for SST-2)
    seed: int = 0
    num_threads: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        return cls(**{"steps": 8, "train_samples": 256, "eval_samples": 128, **overrides})


def _methods() -> dict[str, tuple[Callable[[int], Any], float, bool]]:
    """name -> (config factory taking the step budget, learning rate, quantize the base to NF4 first)."""
    import deltatune as dt

    cls = "SEQ_CLS"
    lora = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "task_type": cls}
    return {
        "full": (lambda n: dt.FullConfig(task_type=cls), 1e-4, False),
        "freeze (top 2)": (lambda n: dt.FreezeConfig(num_trainable_layers=2, task_type=cls), 1e-4, False),
        "bitfit": (lambda n: dt.BitFitConfig(task_type=cls), 5e-3, False),
        "houlsby": (lambda n: dt.BottleneckConfig(variant="houlsby", task_type=cls), 1e-3, False),
        "pfeiffer": (lambda n: dt.BottleneckConfig(variant="pfeiffer", task_type=cls), 1e-3, False),
        "parallel": (lambda n: dt.BottleneckConfig(variant="parallel", task_type=cls), 1e-3, False),
        "ia3": (lambda n: dt.IA3Config(task_type=cls), 5e-3, False),
        "prompt tuning": (lambda n: dt.PromptTuningConfig(num_virtual_tokens=20, task_type=cls), 3e-2, False),
        "p-tuning": (
            lambda n: dt.PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, task_type=cls),
            1e-2,
            False,
        ),
        "prefix": (
            lambda n: dt.PrefixTuningConfig(
                num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128, task_type=cls
            ),
            1e-3,  # 1e-2 and 3e-3 diverged to the majority class on MiniLM (2026-11-23)
            False,
        ),
        "p-tuning v2": (lambda n: dt.PTuningV2Config(num_virtual_tokens=20), 1e-2, False),
        "lora": (lambda n: dt.LoraConfig(**lora), 1e-3, False),
        "rslora": (lambda n: dt.LoraConfig(**lora, use_rslora=True), 1e-3, False),
        "dora": (lambda n: dt.LoraConfig(**lora, use_dora=True), 1e-3, False),
        "adalora": (
            lambda n: dt.AdaLoraConfig(
                init_r=12,
                target_r=8,
                lora_alpha=16,
                target_modules="all-linear",
                tinit=n // 10,
                tfinal=n // 5,
                total_step=n,
                task_type=cls,
            ),
            2e-3,
            False,
        ),
        "qlora (nf4)": (lambda n: dt.LoraConfig(**lora), 1e-3, True),
        "mam": (lambda n: dt.MAMConfig(task_type=cls), 3e-4, False),
        "unipelt": (lambda n: dt.UniPELTConfig(task_type=cls), 1e-3, False),
    }


def method_names() -> list[str]:
    return list(_methods())


# --- data and model ----------------------------------------------------------------------------------
def _run_config(s: BenchSettings):
    from deltatune.train.recipe import RunConfig, resolve_path

    data_dir = resolve_path(s.data_dir, REPO) or s.data_dir
    files = {}
    for split, names in (("train", ("train.tsv", "train.csv")), ("eval", ("dev.tsv", "dev.csv"))):
        found = [os.path.join(data_dir, n) for n in names if os.path.isfile(os.path.join(data_dir, n))]
        if not found:
            raise FileNotFoundError(
                f"No {' or '.join(names)} in {data_dir}; pass --data-dir pointing at a folder with SST-2's "
                "train.tsv and dev.tsv (columns sentence, label)."
            )
        files[split] = found[0]
    return RunConfig(
        model=s.model,
        task="seq-cls",
        train_file=files["train"],
        eval_file=files["eval"],
        text_column="sentence",
        label_column="label",
        max_length=s.max_length,
        max_train_samples=s.train_samples,
        max_eval_samples=s.eval_samples,
    )


def load_data(s: BenchSettings):
    """(run config, label map, train table, dev table): the same seeded subsets for every method."""
    from deltatune.train.recipe import fit_labels, load_splits, prepare_tables

    run = _run_config(s)
    tables = load_splits(run, s.seed)
    tables = prepare_tables(run, tables, {"train": run.train_file, "validation": run.eval_file})
    return run, fit_labels(run, tables["train"]), tables["train"], tables["validation"]


def majority_baseline(s: BenchSettings) -> dict[str, Any]:
    """Accuracy and macro-F1 on dev of always predicting the train split's most frequent label."""
    from collections import Counter

    from deltatune.train.metrics import classification_scores

    run, labels, train, dev = load_data(s)
    counts = Counter(labels.encode(v) for v in train[run.label_column])
    majority = counts.most_common(1)[0][0]
    refs = [labels.encode(v) for v in dev[run.label_column]]
    scores = classification_scores([majority] * len(refs), refs, labels.names)
    return {"label": labels.names[majority], "accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"]}


class _CountingTask:
    """The task, passed through, counting the training tokens its loss sees (for tokens/s)."""

    def __init__(self, task: Any) -> None:
        self._task, self.tokens = task, 0

    def loss(self, model, batch):
        out = self._task.loss(model, batch)
        self.tokens += int(out.tokens)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def run_method(name: str, s: BenchSettings) -> dict[str, Any]:
    """Train one method for `s.steps` steps and measure it; returns its row of the table."""
    import torch

    from deltatune.model import get_peft_model
    from deltatune.quant import quantize
    from deltatune.train.recipe import build_task, load_base
    from deltatune.train.trainer import TrainConfig, Trainer, seed_everything

    factory, lr, quantized = _methods()[name]
    torch.set_num_threads(s.num_threads)
    run, labels, train, dev = load_data(s)
    model, tokenizer = load_base(run, labels)
    if quantized:
        quantize(model, "nf4")
    task = _CountingTask(build_task(run, tokenizer, labels))
    train_features, dev_features = task.prepare(train, run.train_file), task.prepare(dev, run.eval_file)
    seed_everything(s.seed)
    peft_model = get_peft_model(model, factory(s.steps))
    marks: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            output_dir=out,
            max_steps=s.steps,
            batch_size=s.batch_size,
            eval_batch_size=64,
            lr=lr,
            warmup_ratio=0.06,
            seed=s.seed,
            num_threads=s.num_threads,
            progress=False,
            tensorboard=False,
            plot=False,
            keep_checkpoint=False,
            load_best_at_end=False,
        )
        trainer = Trainer(
            peft_model,
            task,
            train_features,
            dev_features,
            cfg,
            callbacks=[lambda t, r: marks.append((time.perf_counter(), task.tokens))],
        )
        start = (time.perf_counter(), 0)
        summary = trainer.train()
        adapter_dir = os.path.join(out, "adapter")
        peft_model.save_pretrained(adapter_dir)
        stored = _dir_bytes(adapter_dir)
    points = [start] + marks
    times = [b[0] - a[0] for a, b in zip(points, points[1:])]
    tokens = [b[1] - a[1] for a, b in zip(points, points[1:])]
    timed = slice(1, None) if len(times) > 1 else slice(None)  # the first step warms up caches
    final = summary["final"]
    return {
        "method": name,
        "status": "ok",
        "seed": s.seed,
        "lr": lr,
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "trainable_percent": summary["trainable_percent"],
        "adapter_bytes": stored,
        "peak_memory_mb": summary["peak_memory_mb"],
        "median_step_s": statistics.median(times[timed]),
        "tokens_per_s": sum(tokens[timed]) / max(1e-9, sum(times[timed])),
        "dev_accuracy": final.get("eval_accuracy"),
        "dev_f1_macro": final.get("eval_f1_macro"),
        "steps": summary["steps"],
    }


def _run_isolated(name: str, s: BenchSettings) -> dict[str, Any]:
    """run_method in a fresh interpreter: its own peak memory, and a crash becomes a row with the error."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    spec = json.dumps({"method": name, "settings": dataclasses.asdict(s)})
    proc = subprocess.run(
        [sys.executable, "-m", "deltatune.apps.bench", spec],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"method": name, "status": f"error: {tail}"}


def _run_here(name: str, s: BenchSettings) -> dict[str, Any]:
    try:
        return run_method(name, s)
    except Exception as err:  # noqa: BLE001 - one failing method is reported in its row, not fatal
        return {"method": name, "status": f"error: {type(err).__name__}: {err}"}


# --- the whole table ---------------------------------------------------------------------------------
def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a method's per-seed runs: the first seed's measurements, scores as mean and std over seeds."""
    row = dict(runs[0])
    scored = [r for r in runs if r["status"] == "ok"]
    if row["status"] != "ok" or len(runs) == 1:
        return row
    row["seeds"] = [r.get("seed") for r in scored]
    row["seed_runs"] = [
        {k: r.get(k) for k in ("seed", "dev_accuracy", "dev_f1_macro", "status")} for r in runs
    ]
    for key in ("dev_accuracy", "dev_f1_macro"):
        values = [r[key] for r in scored]
        row[key] = statistics.mean(values)
        row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def _run_seeds(name: str, s: BenchSettings, seeds: list[int], isolate: bool, jobs: int) -> dict[str, Any]:
    """The first seed alone (its speed and memory are reported), then the other seeds `jobs` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    run = _run_isolated if isolate else _run_here
    settings = [dataclasses.replace(s, seed=seed) for seed in seeds]
    first = run(name, settings[0])
    with ThreadPoolExecutor(max_workers=max(1, jobs if isolate else 1)) as pool:
        rest = list(pool.map(lambda x: run(name, x), settings[1:]))
    return _aggregate([first, *rest])


def run_bench(
    s: BenchSettings,
    out_dir: str,
    methods: list[str] | None = None,
    isolate: bool = True,
    log: Callable[[str], None] = print,
    seeds: list[int] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run the methods, write bench.json, bench.md and the plots to `out_dir`, and return the results."""
    names = methods or method_names()
    unknown = sorted(set(names) - set(method_names()))
    if unknown:
        raise ValueError(f"Unknown bench method(s) {unknown}; choose from: {', '.join(method_names())}.")
    baseline = majority_baseline(s)
    log(f"majority-class baseline: accuracy {baseline['accuracy']:.4f}, macro-F1 {baseline['f1_macro']:.4f}")
    rows: list[dict[str, Any]] = []
    command = "deltatune " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("deltatune") else "run_bench()"
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "command": command,
        "settings": dataclasses.asdict(s),
        "seeds": seeds or [s.seed],
        "isolated_processes": isolate,
        "wall_time_s": 0.0,
        "majority_baseline": baseline,
        "methods": rows,
    }
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        t0 = time.time()
        row = _run_seeds(name, s, seeds or [s.seed], isolate, jobs)
        row["wall_s"] = time.time() - t0
        rows.append(row)
        log(_row_line(row))
        result["wall_time_s"] = time.time() - started
        _write(result, out_dir)  # after every method, so a long run stopped midway keeps its rows
    plot(result, out_dir)
    return result


def _write(result: dict[str, Any], out_dir: str) -> None:
    with open(os.path.join(out_dir, "bench.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(out_dir, "bench.md"), "w") as fh:
        fh.write(markdown(result))


def _machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{platform.platform()}, {device}, torch {torch.__version__}"


def _row_line(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['method']:>16}: {row['status']}"
    return (
        f"{row['method']:>16}: acc {row['dev_accuracy']:.4f} f1 {row['dev_f1_macro']:.4f} "
        f"trainable {row['trainable_params']:,} step {1000 * row['median_step_s']:.0f} ms "
        f"peak {row['peak_memory_mb']:.0f} MiB ({row['wall_s']:.0f} s)"
    )


def _seeds_text(result: dict[str, Any]) -> str:
    seeds = result.get("seeds") or [result["settings"]["seed"]]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return (
        f"seeds {', '.join(map(str, seeds))} (scores: mean ± std over seeds; speed and memory: seed {seeds[0]}, "
        "run alone)"
    )


def _score(row: dict[str, Any], key: str) -> str:
    std = row.get(key + "_std")
    return f"{row[key]:.4f}" if std is None else f"{row[key]:.4f} ± {std:.4f}"


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table, with the setting that produced them."""
    s, b = result["settings"], result["majority_baseline"]
    lines = [
        f"# deltatune bench: {s['model']} on SST-2",
        "",
        f"{result['date']}; {result['machine']}; `{result['command']}`.",
        f"{s['steps']} steps x batch {s['batch_size']} (max_length {s['max_length']}), {_seeds_text(result)}, "
        f"{s['train_samples'] or 'all'} train rows, {s['eval_samples'] or 'all'} dev rows, "
        f"{s['num_threads']} torch thread(s). Peak memory: "
        + ("each method's own process (max RSS)." if result["isolated_processes"] else "one shared process."),
        "",
        "| method | trainable | % | total | stored bytes | peak MiB | median step ms | train tok/s "
        "| dev acc | dev macro-F1 | lr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| majority class ({b['label']}) | 0 | 0 | | | | | | {b['accuracy']:.4f} | {b['f1_macro']:.4f} | |",
    ]
    for r in result["methods"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
            f"{r['total_params']:,} | {r['adapter_bytes']:,} | {r['peak_memory_mb']:.0f} | "
            f"{1000 * r['median_step_s']:.1f} | {r['tokens_per_s']:.0f} | {_score(r, 'dev_accuracy')} | "
            f"{_score(r, 'dev_f1_macro')} | {r['lr']:g} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out_dir: str) -> list[str]:
    """Three PNGs: dev accuracy vs trainable parameters (log scale), peak memory, and median step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["methods"] if r["status"] == "ok"]
    title = f"{result['settings']['model']} on SST-2, {result['settings']['steps']} steps"
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.errorbar(
            r["trainable_params"], r["dev_accuracy"], yerr=r.get("dev_accuracy_std"), fmt="o", capsize=3
        )
        ax.annotate(r["method"], (r["trainable_params"], r["dev_accuracy"]), fontsize=8)
    ax.axhline(result["majority_baseline"]["accuracy"], color="gray", linestyle="--", label="majority class")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="dev accuracy", title=title)
    ax.legend()
    paths.append(_save(fig, os.path.join(out_dir, "bench.png")))

    for key, label, name, scale in (
        ("peak_memory_mb", "peak memory (MiB, process max RSS)", "bench_memory.png", 1),
        ("median_step_s", "median step time (ms)", "bench_step_time.png", 1000),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        names = [r["method"] for r in rows]
        ax.barh(names, [scale * r[key] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set(xlabel=label, title=title)
        paths.append(_save(fig, os.path.join(out_dir, name)))
    plt.close("all")
    return paths


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


if __name__ == "__main__":  # the per-method child process of run_bench
    spec = json.loads(sys.argv[1])
    print(json.dumps(run_method(spec["method"], BenchSettings(**spec["settings"]))))
