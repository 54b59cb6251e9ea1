"""Why the soft prompts lag on all-mpnet-base-v2: the task head's learning rate, measured.

A soft prompt learns best at a high rate (the sweep picks 0.03-0.09 for prompt tuning). On a BERT-style encoder the
classifier is one 770-parameter linear layer over a pretrained pooler, and that rate does it no harm. MPNet's
classifier is a fresh 768 x 768 dense layer and an output layer (590,592 + 1,538 parameters), and training it at the
prompt's rate is a different matter: LoRA trains the same head at 0.001 and reaches 0.916. This trains the soft
prompts on the benchmark's SST-2 task (same data, token budget and runs as `deltatune bench`) with the head at the
prompt's rate and at its own rate (`head_lr`, a `TrainConfig` setting), over three seeds, and writes
`head_lr.{json,md}` into --out. Runs are cached with the benchmark's: the plain runs are the bench's own.

Usage: python bench/head_lr.py [--model all-mpnet-base-v2] [--methods prompt_tuning_cls=0.09,p_tuning_cls=0.01]
  [--head-lr 0.001] [--seeds 0,1,2] [--budget-scale 2] [--jobs 2] [--out bench/results/scale_b2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltatune.apps.bench import BenchSettings  # noqa: E402
from deltatune.apps.bench.run import RunSpec, cached_run, loadavg  # noqa: E402
from deltatune.apps.bench.tasks import load_tables, majority_baseline  # noqa: E402


def parse_methods(text: str) -> dict[str, float]:
    """'prompt_tuning_cls=0.09,p_tuning_cls=0.01' -> {method: the prompt's learning rate}."""
    methods = {}
    for item in text.split(","):
        name, sep, lr = item.partition("=")
        try:
            methods[name.strip()] = float(lr)
        except ValueError:
            sep = ""
        if not sep:
            raise SystemExit(f"--methods wants METHOD=LR pairs such as prompt_tuning_cls=0.09, got {item!r}.")
    return methods


def arms(head_lr: float) -> dict[str, dict[str, float]]:
    """The two settings compared: the head at the prompt's rate (the bench's rows) and at its own."""
    return {"the prompt's": {}, f"{head_lr:g}": {"head_lr": head_lr}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-mpnet-base-v2")
    parser.add_argument("--methods", default="prompt_tuning_cls=0.09,p_tuning_cls=0.01")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="LoRA's rate on the same model")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plain-seeds", default=None, help="seeds of the plain arm (default: --seeds)")
    parser.add_argument("--budget-scale", type=float, default=2.0, help="as `deltatune bench --budget-scale`")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="a cap on the steps of every run (tests)")
    parser.add_argument("--rows", type=int, default=0, help="at most this many rows per split (tests)")
    parser.add_argument("--data-dir", default=BenchSettings().data_dir)
    parser.add_argument("--out", default="bench/results/scale_b2")
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods)
    seeds = [int(s) for s in args.seeds.split(",")]
    plain_seeds = [int(s) for s in (args.plain_seeds or args.seeds).split(",")]
    settings = BenchSettings(budget_scale=args.budget_scale, data_dir=args.data_dir, rows=args.rows)
    task = settings.task("sst2")
    baseline = majority_baseline(task, load_tables(task, settings.data_dir))
    specs = [
        (
            label,
            RunSpec(
                args.model, task, method, lr, seed, settings.data_dir, max_steps=args.max_steps, options=opts
            ),
        )
        for method, lr in methods.items()
        for label, opts in arms(args.head_lr).items()
        for seed in (seeds if opts else plain_seeds)
    ]
    start, load = time.time(), loadavg()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: cached_run(s[1], args.out), specs))
    runs = [
        {
            "method": spec.method,
            "head_lr": label,
            "seed": spec.seed,
            "lr": spec.lr,
            **{
                k: row.get(k)
                for k in ("status", "dev_score", "val_score", "train_loss_start", "train_loss_end", "steps")
            },
        }
        for (label, spec), row in zip(specs, rows)
    ]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/head_lr.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "majority_baseline": baseline,
        "loadavg": [load, loadavg()],
        "wall_s": time.time() - start,
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head_lr.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(args.out, "head_lr.md"), "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        f"# The task head's learning rate under a soft prompt ({report['model']}, SST-2)",
        "",
        f"{report['date']}; `{report['command']}`; load average {report['loadavg']} (a shared machine). Majority "
        f"class {report['majority_baseline']['score']:.3f}.",
        "",
        "| method | prompt lr | head lr | dev accuracy per seed | train loss first → last per seed | mean ± std |",
        "|---|---:|---:|---|---|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in report["runs"]):
        for label in dict.fromkeys(r["head_lr"] for r in report["runs"]):
            runs = [r for r in report["runs"] if r["method"] == method and r["head_lr"] == label]
            ok = [r for r in runs if r["status"] == "ok"]
            scores = [r["dev_score"] for r in ok]
            per_seed = ", ".join(
                f"{r['seed']}: {r['dev_score']:.3f}" if r["status"] == "ok" else f"{r['seed']}: {r['status']}"
                for r in runs
            )
            losses = ", ".join(
                f"{r['train_loss_start']:.2f} → {r['train_loss_end']:.2f}"
                for r in ok
                if r["train_loss_start"]
            )
            std = f" ± {statistics.stdev(scores):.3f}" if len(scores) > 1 else ""
            summary = f"{statistics.fmean(scores):.3f}{std}" if scores else "-"
            lr = runs[0]["lr"]
            lines.append(f"| {method} | {lr:g} | {label} | {per_seed} | {losses or '-'} | {summary} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
