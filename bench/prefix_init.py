"""Why MAM and UniPELT collapsed on some seeds: their prefixes' initialisation, measured.

Both carry prefix tuning, whose prefixes start as N(0, 1) keys and values in every layer (peft's default). On a small
pretrained encoder that is far from harmless: 20 random prefixes move all-MiniLM-L6-v2's [CLS] vector by about half
its norm before any training, and some seeds never recover within the budget. This trains MAM and UniPELT on the
benchmark's SST-2 task (same data, token budget and learning rate as `deltatune bench`) with random and with zero
prefixes (`init_weights="zero"`), over three seeds, and writes prefix_init.{json,md} into --out
(prefix_init_<task>.{json,md} for another task than sst2).

The same question for plain prefix tuning on a decoder: `--model smollm2-135m-instruct --task sst2-text --methods
prefix --lr 0.003 --out bench/results/scale_dec` (the rate its sweep chose there). An arm equal to the method's default
(random prefixes for prefix tuning, zero for MAM and UniPELT) carries no options, so it is the benchmark's own run.

Usage: python bench/prefix_init.py [--methods mam,unipelt] [--task sst2] [--lr LR] [--seeds 0,1,2] [--jobs 3]
  [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltatune.apps.bench import BenchSettings, model_family  # noqa: E402
from deltatune.apps.bench.methods import typical_lr  # noqa: E402
from deltatune.apps.bench.run import RunSpec, cached_run, loadavg  # noqa: E402
from deltatune.apps.bench.tasks import load_tables, majority_baseline  # noqa: E402

INITS = {"random (N(0,1), peft's)": {"init_weights": None}, "zero": {"init_weights": "zero"}}


def arm_options(method: str, options: dict) -> dict:
    """The options that differ from the method's defaults: an arm that equals the default is the bench's own run."""
    import dataclasses

    from deltatune import registry

    fields = dataclasses.fields(registry.resolve_variant(method)[0].config_class)
    default = {f.name: f.default for f in fields}
    return {k: v for k, v in options.items() if default[k] != v}


def build_config(method: str, options: dict):
    """The method's config as the benchmark builds it: its recipe defaults (20 virtual tokens), then `options`."""
    import dataclasses

    from deltatune import registry

    spec = registry.resolve_variant(method)[0]
    names = {f.name for f in dataclasses.fields(spec.config_class) if f.init}
    defaults = {k: v for k, v in spec.recipe_defaults.items() if k in names}
    return spec.config_class(**{**defaults, **options})


def read_position(mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """Where the model's answer is read: [CLS] (position 0) on an encoder, the last real token on a decoder."""
    if not decoder:
        return torch.zeros(mask.shape[0], dtype=torch.long)
    return mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last 1 in each row, padded left or right


def init_shift(method: str, model: str = "all-minilm-l6-v2") -> dict[str, float]:
    """How far the untrained adapter moves the hidden state the answer is read from ([CLS] on an encoder, the last
    token on a decoder; relative norm), per initialisation."""
    import deltatune as dt
    from deltatune.models import load_model_and_tokenizer

    texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate cliches."]
    out = {}
    for label, options in INITS.items():
        base, tok = load_model_and_tokenizer(model, task="feature-extraction")
        batch = tok(texts, return_tensors="pt", padding=True)
        rows = torch.arange(len(texts))
        at = read_position(batch["attention_mask"], model_family(model) == "decoder")
        with torch.no_grad():
            ref = base(**batch).last_hidden_state[rows, at]
        torch.manual_seed(0)
        config = build_config(method, options)
        peft_model = dt.get_peft_model(base, config)
        with torch.no_grad():
            moved = peft_model(**batch).last_hidden_state[rows, at]
        out[label] = float((moved - ref).norm() / ref.norm())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--methods", default="mam,unipelt")
    parser.add_argument(
        "--task", default="sst2", help="a bench task: sst2 (encoders), sst2-text or dates (decoders)"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="every run's rate (default: each method's typical_lr)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--budget-scale", type=float, default=1.0, help="as `deltatune bench --budget-scale`")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    settings = BenchSettings(budget_scale=args.budget_scale)
    task = settings.task(args.task)
    baseline = majority_baseline(task, load_tables(task, settings.data_dir))
    specs = [
        (
            method,
            label,
            RunSpec(
                args.model,
                task,
                method,
                float(f"{args.lr or typical_lr(method):.3g}"),
                int(seed),
                settings.data_dir,
                options=arm_options(method, opts),
            ),
        )
        for method in args.methods.split(",")
        for label, opts in INITS.items()
        for seed in args.seeds.split(",")
    ]
    start, load = time.time(), loadavg()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: cached_run(s[2], args.out), specs))
    results = []
    for (method, label, spec), row in zip(specs, rows):
        results.append(
            {
                "method": method,
                "init": label,
                "seed": spec.seed,
                "lr": spec.lr,
                **{k: row.get(k) for k in ("status", "dev_score", "val_score", "steps")},
            }
        )
    shifts = {m: init_shift(m, args.model) for m in args.methods.split(",")}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/prefix_init.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "task": args.task,
        "majority_baseline": baseline,
        "loadavg": [load, loadavg()],
        "wall_s": time.time() - start,
        "init_shift": shifts,
        "runs": results,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "prefix_init" if args.task == "sst2" else f"prefix_init_{args.task}")
    with open(f"{stem}.json", "w") as fh:
        json.dump(report, fh, indent=1)
    with open(f"{stem}.md", "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    rates = ", ".join(sorted({f"{r['lr']:g}" for r in report["runs"]}))
    lines = [
        f"# Prefix initialisation in {', '.join(dict.fromkeys(r['method'] for r in report['runs']))} "
        f"({report['model']}, {report.get('task', 'sst2')})",
        "",
        f"{report['date']}; `{report['command']}`; load average {report['loadavg']} (a shared machine). Learning rate: "
        f"{rates}; majority class {report['majority_baseline']['score']:.3f}.",
        "",
        "| method | prefix init | answer state moved at init ([CLS] / last token) | dev score per seed | mean ± std |",
        "|---|---|---:|---|---:|",
    ]
    for method in dict.fromkeys(r["method"] for r in report["runs"]):
        for label in INITS:
            runs = [r for r in report["runs"] if r["method"] == method and r["init"] == label]
            scores = [r["dev_score"] for r in runs if r["status"] == "ok"]
            per_seed = ", ".join(
                f"{r['dev_score']:.3f}" if r["status"] == "ok" else r["status"] for r in runs
            )
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            summary = f"{statistics.fmean(scores):.3f} ± {std:.3f}" if scores else "-"
            lines.append(
                f"| {method} | {label} | {report['init_shift'][method][label]:.2f} | {per_seed} | {summary} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
