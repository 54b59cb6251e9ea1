"""Estimate the mutation score of the WHOLE core from a seeded random sample of the mutants not yet run.

The whole core is ~2900 mutants and this box runs ~10 a minute, so the earlier passes (docs/mutation.md) checked
424 of them in mutmut's fastest-first order: not a random sample, so their rate says little about the rest.
This draws a uniform random sample of the unchecked mutants, stratified by file in proportion to each file's
mutant count, freezes it (with the earlier results it was drawn against) in bench/results/, and scores it:

    python bench/mutation_sample.py draw --seed 19 --size 250    # writes bench/results/mutation_sample.json
    mutmut run --max-children 1 $(python bench/mutation_sample.py names --batch 1)   # then --batch 2
    python bench/mutation_sample.py score [--survivors] [--only-batch 1]   # the estimate (mutants/ + the draw)

Two estimates, both stratified by file, weights = each file's share of the core's mutants:
- "sample only": each file's rate is its sample's rate (the unrun mutants' rate stands for the whole file);
- "census + sample": each file is two strata, the mutants run earlier (known exactly, no sampling error) and the
  unrun ones (estimated from the sample): killed = K_earlier + rate_sample * unrun. This is the unbiased estimate
  of the whole file; the earlier results enter only as the exact counts they are, never pooled into the sample.
Interval: stratified normal approximation with finite-population correction, plus a Wilson interval on the
pooled sample (the allocation is proportional, so the pooled sample is close to self-weighting).
Timeouts and "no tests" count as not killed; equivalent mutants (mutation_score.EQUIVALENT) leave the denominator.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from mutation_score import EQUIVALENT, results

FROZEN = Path(__file__).parent / "results" / "mutation_sample.json"
Z95 = 1.959964


def allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Largest-remainder allocation of `total` in proportion to `sizes` (every file with mutants gets >= 1)."""
    whole = sum(sizes.values())
    quota = {f: total * n / whole for f, n in sizes.items()}
    alloc = {f: max(1, math.floor(q)) for f, q in quota.items()}
    for f in sorted(quota, key=lambda f: quota[f] - math.floor(quota[f]), reverse=True):
        if sum(alloc.values()) >= total:
            break
        alloc[f] += 1
    return alloc


def draw(seed: int, size: int) -> None:
    state = results()
    sizes = {f: len(s) for f, s in state.items()}
    alloc = allocate(sizes, size)
    rng = random.Random(seed)
    sample: dict[str, list[str]] = {}
    for file in sorted(state):
        frame = sorted(k for k, s in state[file].items() if s == "not checked")
        sample[file] = sorted(rng.sample(frame, min(alloc[file], len(frame))))
    order = [k for keys in sample.values() for k in keys]
    rng.shuffle(order)  # run order: batch 1 is a random half, so a run cut short still leaves a random subset
    earlier = {f: {k: s for k, s in st.items() if s != "not checked"} for f, st in state.items()}
    FROZEN.write_text(
        json.dumps(
            {
                "seed": seed,
                "size": size,
                "mutants_by_file": sizes,
                "sample": sample,
                "run_order": order,
                "earlier_results": earlier,
            },
            indent=1,
            ensure_ascii=False,
        )
    )
    print(f"drew {len(order)} of {sum(len(v) for v in sample.values())} -> {FROZEN}")


def names(number: int, batches: int, start: int | None, stop: int | None) -> None:
    order = json.loads(FROZEN.read_text())["run_order"]
    print(" ".join(order[start:stop] if start is not None else batch(order, number, batches)))


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p, z2 = k / n, Z95**2
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (mid - half, mid + half)


def first_measured(frozen: dict, now: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """The sample's statuses as first measured: frozen into the draw file the first time `score` sees them.

    Later tests may kill a sampled survivor; counting that kill would bias the estimate (only survivors of the
    sample got new tests), so the estimate always uses the frozen first results and later kills are reported apart.
    """
    first = frozen.setdefault("first_measured", {})
    changed = False
    for file, keys in frozen["sample"].items():
        for k in keys:
            if k not in first.get(file, {}) and now[file][k] != "not checked":
                first.setdefault(file, {})[k] = now[file][k]
                changed = True
    if changed:
        FROZEN.write_text(json.dumps(frozen, indent=1, ensure_ascii=False))
    return first


def batch(order: list[str], number: int, batches: int) -> list[str]:
    step = math.ceil(len(order) / batches)
    return order[(number - 1) * step : number * step]


def score(only_batch: int | None, batches: int, first_n: int | None = None) -> None:
    """The estimate; `only_batch` scores one batch of the run order alone (a complete random subsample, when a
    cut-short run left the next batch partly run in mutmut's fastest-first order, which is not random)."""
    frozen = json.loads(FROZEN.read_text())
    now = results()
    first = first_measured(frozen, now)
    if only_batch is not None or first_n is not None:
        order = frozen["run_order"]
        keep = set(order[:first_n] if first_n is not None else batch(order, only_batch, batches))
        frozen["sample"] = {f: [k for k in ks if k in keep] for f, ks in frozen["sample"].items()}
        first = {f: {k: s for k, s in ran.items() if k in keep} for f, ran in first.items()}
    rows, tot = [], Counter()
    est_s = var_s = est_c = var_c = 0.0
    n_all = sum(frozen["mutants_by_file"].values())
    for file, keys in frozen["sample"].items():
        n_file = frozen["mutants_by_file"][file]
        ran = first.get(file, {})
        equiv = sum(k in EQUIVALENT for k in ran)
        counted = [s for k, s in ran.items() if k not in EQUIVALENT]
        c = Counter(counted)
        n, killed = len(counted), c["killed"]
        killed_later = sum(
            now[file][k] == "killed" for k, s in ran.items() if s != "killed" and k not in EQUIVALENT
        )
        earlier = {k: s for k, s in frozen["earlier_results"][file].items() if k not in EQUIVALENT}
        e_killed = sum(s == "killed" for s in earlier.values())
        unrun = n_file - len(frozen["earlier_results"][file])
        w = n_file / n_all
        p = killed / n if n else float("nan")
        var_p = p * (1 - p) / (n - 1) * (1 - len(ran) / unrun) if n > 1 else 0.0
        est_s += w * p
        var_s += w * w * var_p
        # census + sample, in mutants: the unrun ones less the sample's share of equivalents, times the sample rate
        unrun_counted = unrun * n / len(ran) if ran else unrun
        denom = len(earlier) + unrun_counted
        rate_c = (e_killed + p * unrun_counted) / denom
        est_c += w * rate_c
        var_c += w * w * (unrun_counted / denom) ** 2 * var_p
        lived = c["survived"] + c["no tests"] + c["suspicious"]
        rows.append(
            (
                file,
                n_file,
                len(keys),
                len(ran),
                killed,
                lived,
                c["timeout"],
                equiv,
                p,
                e_killed,
                len(earlier),
                rate_c,
                killed_later,
            )
        )
        tot.update(
            drawn=len(keys),
            ran=len(ran),
            killed=killed,
            lived=lived,
            timeout=c["timeout"],
            equiv=equiv,
            killed_later=killed_later,
        )
    print(f"seed {frozen['seed']}, size {frozen['size']}: {tot['ran']} of the {tot['drawn']} drawn have run")
    print(
        f"{'file':38} {'mutants':>7} {'drawn':>5} {'ran':>4} {'killed':>6} {'lived':>5} {'tmout':>5} "
        f"{'equiv':>5} {'sample':>7} {'earlier':>9} {'census+sample':>13} {'killed later':>12}"
    )
    for file, n_file, drawn, ran, killed, lived, tmo, eq, p, ek, en, rc, kl in rows:
        print(
            f"{file:38} {n_file:7} {drawn:5} {ran:4} {killed:6} {lived:5} {tmo:5} {eq:5} {100 * p:6.1f}% "
            f"{ek:4}/{en:<4} {100 * rc:12.1f}% {kl:12}"
        )
    k, n = tot["killed"], tot["ran"] - tot["equiv"]
    lo, hi = wilson(k, n)
    print(f"pooled sample: {k}/{n} = {100 * k / n:.1f}%, Wilson 95% [{100 * lo:.1f}%, {100 * hi:.1f}%]")
    for label, est, var in (("sample only", est_s, var_s), ("census + sample", est_c, var_c)):
        half = Z95 * math.sqrt(var)
        print(
            f"whole core, {label}: {100 * est:.1f}%, 95% [{100 * (est - half):.1f}%, {100 * (est + half):.1f}%] "
            "(stratified normal approximation, finite-population corrected)"
        )
    print(f"sampled mutants not killed as first measured that tests added later kill: {tot['killed_later']}")
    if "--survivors" in sys.argv:
        for file, ran in first.items():
            for k, s in sorted(ran.items()):
                if s != "killed" and k not in EQUIVALENT:
                    print(f"{s:9} now {now[file][k]:9} {k}")


def main() -> None:
    global FROZEN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--file", type=Path, default=FROZEN, help="the frozen draw (a later sample gets its own file)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("draw")
    d.add_argument("--seed", type=int, default=19)
    d.add_argument("--size", type=int, default=250)
    b = sub.add_parser("names")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--batches", type=int, default=2)
    b.add_argument("--start", type=int, default=None, help="run order[start:stop] instead of a batch")
    b.add_argument("--stop", type=int, default=None)
    sc = sub.add_parser("score")
    sc.add_argument("--survivors", action="store_true")
    sc.add_argument("--only-batch", type=int, default=None)
    sc.add_argument("--batches", type=int, default=2)
    sc.add_argument("--first", type=int, default=None, help="score the first N of the run order alone")
    args = parser.parse_args()
    FROZEN = args.file
    if args.cmd == "draw":
        draw(args.seed, args.size)
    elif args.cmd == "names":
        names(args.batch, args.batches, args.start, args.stop)
    else:
        score(args.only_batch, args.batches, args.first)


if __name__ == "__main__":
    main()
