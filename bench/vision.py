"""The vision table: methods x {classification on a CNN, detection, segmentation} on an ImageNet MobileNetV2.

Each cell is one `deltatune train` of the task's recipe (recipes/*-mobilenetv2-lora.yaml) with the method swapped
and the same step budget, run in its own process (its own peak memory). Heads (the classifier, the detector's
pyramid and head, the segmenter's head) start fresh and train in full with every method; "heads only" trains
nothing else (the frozen-backbone linear probe). Reports trainable parameters, stored adapter bytes, median step
time, peak memory (max RSS of the process) and the task's score, to bench/results/vision.{json,md}.

    make vision-assets && python bench/vision.py [--steps 60] [--methods heads,lora,ia3,bitfit,full]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {  # task -> (recipe, score keys shown)
    "classification": ("recipes/image-cls-mobilenetv2-lora.yaml", ["eval_accuracy"]),
    "detection": ("recipes/detection-mobilenetv2-lora.yaml", ["eval_map", "eval_map_50", "eval_recall@100"]),
    "segmentation": ("recipes/segmentation-mobilenetv2-lora.yaml", ["eval_pixel_accuracy", "eval_mean_iou"]),
}
METHODS = {  # method -> (title, overrides)
    "heads": ("heads only (linear probe)", ["--method", "freeze", "--lora", "null",
              "--freeze.num_trainable_layers", "0", "--freeze.train_head", "false"]),
    "lora": ("LoRA r=16 (r=8 for classification)", []),
    "ia3": ("IA3", ["--method", "ia3", "--lora", "null"]),
    "bitfit": ("BitFit (norm biases)", ["--method", "bitfit", "--lora", "null"]),
    "full": ("full fine-tuning", ["--method", "full", "--lora", "null", "--lr", "1e-3"]),
}  # fmt: skip


def run_one(task: str, method: str, steps: int, out: str, max_eval: int = 0) -> dict:
    recipe, keys = TASKS[task]
    folder = os.path.join("runs", "bench-vision", f"{task}-{method}")  # runs/ is git-ignored
    command = [sys.executable, "-m", "deltatune", "train", recipe, *METHODS[method][1], "--max_steps", str(steps),
               "--eval_every", "0", "--output_dir", folder, "--progress", "false", "--plot", "false",
               "--tensorboard", "false", "--keep_checkpoint", "false", "--max_eval_samples", str(max_eval)]  # fmt: skip
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{task}/{method} failed:\n{done.stderr[-3000:]}")
    summary = json.load(open(os.path.join(ROOT, folder, "train_summary.json")))
    metrics = json.load(open(os.path.join(ROOT, folder, "metrics.json")))
    log = [json.loads(line) for line in open(os.path.join(ROOT, folder, "log.jsonl"))]
    batch = 32 if task == "classification" else 16
    step_s = statistics.median(batch / r["tokens_per_s"] for r in log if r.get("tokens_per_s"))
    return {
        "task": task,
        "method": method,
        "steps": steps,
        "eval_images": max_eval or "all",
        "trainable_params": summary["trainable_params"],
        "stored_bytes": os.path.getsize(os.path.join(ROOT, folder, "adapter_model.safetensors")),
        "step_s": step_s,
        "peak_memory_mb": summary["peak_memory_mb"],
        "wall_s": time.time() - start,
        **{k.removeprefix("eval_"): metrics[k] for k in keys},
    }


def table(rows: list[dict]) -> str:
    lines = []
    for task, (_, keys) in TASKS.items():
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        names = [k.removeprefix("eval_") for k in keys]
        lines += [f"\n**{task}** ({mine[0]['steps']} steps, batch {32 if task == 'classification' else 16})\n", "| method | trainable params | stored bytes | step s | peak MiB | "
                  + " | ".join(names) + " |", "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]  # fmt: skip
        for r in mine:
            scores = " | ".join(f"{r[n]:.3f}" for n in names)
            lines.append(
                f"| {METHODS[r['method']][0]} | {r['trainable_params']:,} | {r['stored_bytes']:,} | {r['step_s']:.2f} | "
                f"{r['peak_memory_mb']:.0f} | {scores} |"
            )
    return "\n".join(lines) + "\n"


def write(rows: list[dict], args, load_before: list[str]) -> None:
    """The JSON and markdown tables, rewritten after every cell (rows of earlier runs for other cells are kept)."""
    path = os.path.join(args.out, "vision.json")
    previous = json.load(open(path))["rows"] if os.path.exists(path) else []
    done = {(r["task"], r["method"]) for r in rows}
    rows = [r for r in previous if (r["task"], r["method"]) not in done] + rows
    order = {(t, m): i for i, (t, m) in enumerate((t, m) for t in TASKS for m in METHODS)}
    rows.sort(key=lambda r: order[(r["task"], r["method"])])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_before": load_before,
        "load_average_after": open("/proc/loadavg").read().split()[:3],
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(args.out, "vision.md"), "w") as fh:
        fh.write(
            f"# Vision table ({result['date']}, one torch thread, 2-core CPU shared with "
            f"other work: load average {' '.join(load_before)} before, {' '.join(result['load_average_after'])} after)\n"
            + table(rows)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--max-eval", type=int, default=0, help="Score detection/segmentation on this many images."
    )
    args = parser.parse_args()
    load_before = open("/proc/loadavg").read().split()[:3]
    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            rows.append(
                run_one(task, method, args.steps, args.out, args.max_eval if task != "classification" else 0)
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(rows, args, load_before)
    print(table(rows))


if __name__ == "__main__":
    main()
