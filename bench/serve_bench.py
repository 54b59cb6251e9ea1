"""Requests/s of serving 4 LoRA adapters over one base: mixed-adapter batches vs switching adapters per request,
and vs the `peft` package's mixed-batch inference (`adapter_names=`), in the same run (CPU).

Model: all-minilm-l6-v2 (BERT, 22M) with a 2-label head; 4 LoRA adapters (r=8 on query/value, each with its own
head), random weights, saved to a temporary folder and loaded by both libraries from the same files. Requests: SST-2
dev sentences (or synthetic ones when the data is absent), adapter i % 4, one sentence per request. Measured at the
model level (no HTTP), so the numbers compare the batching strategies, not the web stack:
- deltatune_mixed: batches of `--batch` requests in arrival order, adapters mixed (per-row LoRA, one base pass);
- deltatune_grouped: the same batches split per adapter, `set_adapter` before each group;
- deltatune_per_request: `set_adapter` + a forward pass for every request (batch 1);
- peft_mixed: peft's `model(**batch, adapter_names=[...])` on the same batches;
- peft_per_request: peft's `set_adapter` + a forward pass per request.
After a warm-up, `--repeats` rounds each run every mode once (so load from other processes hits all modes alike);
the best and the median time are reported. Every mode's scores are compared to
deltatune_per_request (the offline reference) and the largest difference is reported.

Usage: python bench/serve_bench.py [--requests 96] [--batch 32] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.apps.serve.batching import Engine  # noqa: E402
from deltatune.models import resolve_model_path  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]
SST2_DEV = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2", "dev.tsv"
)


def load_texts(n: int) -> list[str]:
    path = os.environ.get("SST2_DEV", SST2_DEV)
    if os.path.isfile(path):
        with open(path) as fh:
            rows = [line.split("\t")[0] for line in fh.read().splitlines()[1:] if line.strip()]
        return [rows[i % len(rows)] for i in range(n)]
    words = "the movie was good bad awful great plot acting story fun dull".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[j] for j in torch.randint(0, len(words), (12,), generator=g)) for _ in range(n)]


def base_model(path: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same random head every time
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def save_adapters(path: str, folder: str) -> None:
    for i, name in enumerate(ADAPTERS):
        model = get_peft_model(
            base_model(path), LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"])
        )
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(os.path.join(folder, name))


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def timed_round_robin(modes: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Each round runs every mode once, so load from other processes on the machine hits all modes alike."""
    outputs = {mode: fn() for mode, fn in modes.items()}  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, fn in modes.items():
            start = time.perf_counter()
            outputs[mode] = fn()
            times[mode].append(time.perf_counter() - start)
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    import peft
    from transformers import AutoTokenizer

    path = resolve_model_path("all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    texts = load_texts(args.requests)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.requests)]
    groups = batches(args.requests, args.batch)

    with tempfile.TemporaryDirectory() as folder:
        save_adapters(path, folder)
        engine = Engine(base_model(path), tok, "seq-cls")
        for name in ADAPTERS:
            engine.load(name, os.path.join(folder, name))
        theirs = peft.PeftModel.from_pretrained(
            base_model(path), os.path.join(folder, "a0"), adapter_name="a0"
        )
        for name in ADAPTERS[1:]:
            theirs.load_adapter(os.path.join(folder, name), adapter_name=name)
        theirs.eval()

    def scores(results) -> torch.Tensor:
        return torch.tensor([[r["scores"]["LABEL_0"], r["scores"]["LABEL_1"]] for r in results])

    @torch.no_grad()
    def dt_mixed():
        return scores(
            [r for b in groups for r in engine.classify([texts[i] for i in b], [names[i] for i in b])]
        )

    @torch.no_grad()
    def dt_grouped():
        out = torch.empty(args.requests, 2)
        for b in groups:
            for name in ADAPTERS:
                rows = [i for i in b if names[i] == name]
                if rows:
                    out[rows] = scores(engine.classify([texts[i] for i in rows], [name] * len(rows)))
        return out

    @torch.no_grad()
    def dt_per_request():
        return scores([engine.classify([t], [a])[0] for t, a in zip(texts, names)])

    @torch.no_grad()
    def peft_mixed():
        out = []
        for b in groups:
            enc = tok([texts[i] for i in b], padding=True, return_tensors="pt")
            out.append(theirs(**enc, adapter_names=[names[i] for i in b]).logits.float().softmax(-1))
        return torch.cat(out)

    @torch.no_grad()
    def peft_per_request():
        out = []
        for t, a in zip(texts, names):
            theirs.set_adapter(a)
            out.append(theirs(**tok(t, return_tensors="pt")).logits.float().softmax(-1))
        return torch.cat(out)

    modes = {
        "deltatune_mixed": dt_mixed,
        "deltatune_grouped": dt_grouped,
        "deltatune_per_request": dt_per_request,
        "peft_mixed": peft_mixed,
        "peft_per_request": peft_per_request,
    }
    times, outputs = timed_round_robin(modes, args.repeats)
    results = {}
    for mode in modes:
        best, median = min(times[mode]), statistics.median(times[mode])
        results[mode] = {
            "best_seconds": round(best, 4),
            "median_seconds": round(median, 4),
            "requests_per_s": round(args.requests / best, 1),
            "requests_per_s_median": round(args.requests / median, 1),
        }
        print(f"{mode:24s} {results[mode]['requests_per_s']:8.1f} req/s (best run)", flush=True)
    reference = outputs["deltatune_per_request"]
    for mode in modes:
        results[mode]["max_abs_diff_vs_offline"] = float((outputs[mode] - reference).abs().max())

    report = {
        "model": "all-minilm-l6-v2 (BertForSequenceClassification, 2 labels)",
        "adapters": "4 x LoRA r=8 on query/value, each with its own head",
        "requests": args.requests,
        "batch": args.batch,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # other processes sharing the CPUs
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"peft {peft.__version__}",
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "serve_bench.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(args.out, "serve_bench.md"), "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        "# Serving 4 LoRA adapters over one base (CPU)",
        "",
        f"{report['model']}; {report['adapters']}; {report['requests']} one-sentence requests (SST-2 dev), adapter "
        f"i % 4, batches of {report['batch']}; {report['repeats']} rounds (every mode once per round, after a warm-up); "
        f"{report['machine']}, "
        f"{report['torch_threads']} torch threads; machine load average (1/5/15 min) at the end "
        f"{report['load_average_at_end']}. Model level (no HTTP). `max diff` = largest difference of any "
        "softmax score from deltatune_per_request (set_adapter + one request at a time, i.e. offline prediction).",
        "",
        "| mode | requests/s (best run) | requests/s (median) | max diff vs offline |",
        "|---|---:|---:|---:|",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"| {mode} | {r['requests_per_s']:.1f} | {r['requests_per_s_median']:.1f} | "
            f"{r['max_abs_diff_vs_offline']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
