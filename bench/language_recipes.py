"""Run language recipes as a user would and keep what they measured: `python bench/language_recipes.py NAME ...`.

Each NAME is a recipe under recipes/ (without .yaml). The run is `deltatune train recipes/NAME.yaml --overwrite
--progress false`, timed end to end (wall clock and peak RSS of the process tree, from /usr/bin/time) with the load
average sampled every 10 s, since this box is shared and a wall time means little without it. The run's metrics.json
and training summary land in bench/results/language/NAME.json, the file the README's language table quotes.
Needs `make language-data` first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import yaml

OUT = "bench/results/language"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def run_recipe(name: str) -> dict:
    recipe = f"recipes/{name}.yaml"
    with open(recipe) as f:
        output_dir = yaml.safe_load(f)["output_dir"]
    command = ["deltatune", "train", recipe, "--overwrite", "--progress", "false"]
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(10):
            samples.append(float(load_average().split()[0]))

    start, start_load = now(), load_average()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    timed = ["/usr/bin/time", "-f", "%M", "-o", f"/tmp/{name}.rss", *command]
    subprocess.run(
        timed,
        check=True,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    wall = time.perf_counter() - began
    done.set()
    with open(f"/tmp/{name}.rss") as f:
        max_rss_kb = int(f.read().split()[-1])
    with open(os.path.join(output_dir, "metrics.json")) as f:
        metrics = json.load(f)
    summary_path = os.path.join(output_dir, "train_summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    return {
        "recipe": recipe,
        "command": " ".join(command),
        "start": f"start {start} load {start_load}",
        "end": f"end {now()} load {load_average()}",
        "time": f"{wall:.2f} s wall, {max_rss_kb} KB max RSS",
        "load1_mean_min_max": [round(statistics.mean(samples), 1), min(samples), max(samples)]
        if samples
        else None,
        "metrics": metrics,
        "train_summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="recipe names under recipes/, e.g. xsum-smollm2-lora")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    for name in args.names:
        result = run_recipe(name)
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"{name}: {result['time']}, load {result['load1_mean_min_max']}")


if __name__ == "__main__":
    main()
