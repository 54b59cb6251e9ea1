"""The benchmark's report: bench.json, bench.md (tables per task, the load average, a verdict on each of the
mission's claims) and one score-vs-model-size plot per task."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
from typing import Any

STD_LIMIT = 0.03  # a method whose score varies more than this over seeds gets a note saying why
COLLAPSE_MARGIN = 0.02  # a run within this of the majority-class score learned nothing


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{platform.platform()}, {device}, torch {torch.__version__}"


def summarize(cell, baseline: dict[str, Any]) -> dict[str, Any]:
    """A cell as one row: the chosen learning rate, dev score mean/std over seeds, the first seed's measurements."""
    lr = cell.chosen_lr()
    row: dict[str, Any] = {"model": cell.model, "task": cell.task.name, "method": cell.method}
    row["sweep"] = [{k: r.get(k) for k in ("lr", "val_score", "dev_score", "status")} for r in cell.sweep]
    if lr is None:
        statuses = sorted({r["status"] for r in cell.sweep})
        return {**row, "status": "; ".join(statuses)}
    first = next(r for r in cell.sweep if r["status"] == "ok" and r["lr"] == lr)
    runs = [first, *cell.seeds]
    ok = [r for r in runs if r["status"] == "ok"]
    scores = [r["dev_score"] for r in ok]
    row.update({k: v for k, v in first.items() if k not in ("seed", "key", "cached", "config", "val_score")})
    row.update(
        {
            "status": "ok",
            "lr": lr,
            "val_score": first["val_score"],
            "dev_score": statistics.fmean(scores),
            "dev_std": statistics.stdev(scores) if len(scores) > 1 else None,
            "seed_scores": {r["seed"]: r.get("dev_score") for r in runs},
            "seeds_missing": [r["seed"] for r in runs if r["status"] != "ok"],
            "note": "; ".join(n for n in (_note(runs, scores, baseline), sweep_edge(cell)) if n),
            "config": first.get("config"),
        }
    )
    return row


def _note(runs: list[dict[str, Any]], scores: list[float], baseline: dict[str, Any]) -> str:
    notes = []
    missing = [f"seed {r['seed']}: {r['status']}" for r in runs if r["status"] != "ok"]
    if missing:
        notes.append("; ".join(missing))
    if len(scores) > 1 and statistics.stdev(scores) > STD_LIMIT:
        ok = [r for r in runs if r["status"] == "ok"]
        collapsed = [r["seed"] for r in ok if r["dev_score"] <= baseline["score"] + COLLAPSE_MARGIN]
        why = (
            f"seed(s) {', '.join(map(str, collapsed))} stayed at the majority class"
            if collapsed
            else "seeds disagree"
        )
        per_seed = ", ".join(_seed_text(r) for r in ok)
        notes.append(f"std > {STD_LIMIT}: {why} ({per_seed}){_cause(ok)}")
    return "; ".join(notes)


def sweep_edge(cell) -> str:
    """A warning when the chosen rate is left at a rising edge of the sweep: its score is a lower bound."""
    edge = cell.rising_edge()
    if edge > 0:
        return "chosen at the top of the sweep, validation still rising: a higher rate may score more"
    if edge < 0:
        return "chosen at the bottom of the sweep, validation still rising: a lower rate may score more"
    return ""


def _seed_text(r: dict[str, Any]) -> str:
    text = f"{r['seed']}: {r['dev_score']:.3f}"
    if r.get("train_loss_end") is not None:
        text += f", train loss {r['train_loss_start']:.2f} to {r['train_loss_end']:.2f}"
    return text


def _cause(runs: list[dict[str, Any]]) -> str:
    """Why the seeds differ, from their training losses (mean of the first and the last tenth of the steps).

    - The worst seed's loss fell less than half as far as the best seed's: it had not converged when the budget
      ended (more steps or another learning rate would help).
    - Every seed trained, and the worst one ended with the highest loss: they converge at different speeds.
    - Every seed trained alike: the spread is in how the few steps generalise, which more seeds average out."""
    if len(runs) < 2 or any(r.get("train_loss_end") is None for r in runs):
        return ""
    worst, best = min(runs, key=lambda r: r["dev_score"]), max(runs, key=lambda r: r["dev_score"])

    def fall(r: dict[str, Any]) -> float:
        return r["train_loss_start"] - r["train_loss_end"]

    falls = ", ".join(f"{fall(r):.2f}" for r in runs)
    if fall(worst) < 0.5 * fall(best):
        return (
            f": seed {worst['seed']}'s training loss fell {fall(worst):.2f} against {fall(best):.2f} for seed "
            f"{best['seed']}, so it had not converged when the budget ended"
        )
    if worst["train_loss_end"] == max(r["train_loss_end"] for r in runs):
        return (
            f": every seed trained (training loss fell {falls}), but seed {worst['seed']} ended with the highest "
            f"loss ({worst['train_loss_end']:.2f}): the seeds converge at different speeds within this budget"
        )
    return (
        f": every seed's training loss fell alike ({falls}), so the spread is in how the few training steps "
        "generalise, not in training that failed"
    )


def cell_line(cell, baseline: dict[str, Any]) -> str:
    r = summarize(cell, baseline)
    head = f"{r['task']:>9} {os.path.basename(r['model']):>24} {r['method']:>14}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}"
    std = f" ± {r['dev_std']:.3f}" if r["dev_std"] is not None else ""
    return (
        f"{head}: dev {r['dev_score']:.3f}{std} (lr {r['lr']:g}, val {r['val_score']:.3f}) "
        f"trainable {r['trainable_params']:,} step {1000 * r['median_step_s']:.0f} ms peak {r['peak_rss_mb']:.0f} MiB"
    )


# --- files -------------------------------------------------------------------------------------------------------
def write(result: dict[str, Any], out_dir: str, plots: bool = False) -> None:
    rows = [summarize(c, result["baselines"][c.task.name]) for c in result["cells"]]
    data = {k: v for k, v in result.items() if k != "cells"}
    data["command"] = (
        "deltatune " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("deltatune") else "run_bench()"
    )
    data["tasks"] = {c.task.name: dataclasses.asdict(c.task) for c in result["cells"]}
    data["rows"] = rows
    with open(os.path.join(out_dir, "bench.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as fh:
        fh.write(markdown(data))
    if plots:
        plot(data, out_dir)


def _models_by_size(rows: list[dict[str, Any]]) -> list[str]:
    sizes: dict[str, int] = {}
    for r in rows:
        if r.get("model_params"):
            sizes[r["model"]] = r["model_params"]
    order = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(order, key=lambda m: sizes.get(m, 0))


def _name(model: str) -> str:
    return os.path.basename(os.path.normpath(model))


def _score(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return r.get("status", "")
    std = f" ± {r['dev_std']:.3f}" if r.get("dev_std") is not None else ""
    return f"{r['dev_score']:.3f}{std}"


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        "# deltatune bench: methods x model sizes",
        "",
        f"{data['date']}; {data['machine']}; `{data['command']}`.",
        f"Seeds {', '.join(map(str, s['seeds']))}; learning rate per method and model: the best validation score "
        f"among `typical_lr` x {', '.join(f'{f:.3g}' for f in s['lr_factors'])} (seed {s['seeds'][0]}); scores: dev "
        "mean ± std over seeds; speed and memory: the first seed's run at the chosen learning rate, each run in its "
        "own process" + (" (max RSS)." if s["isolate"] else " (one shared process)."),
        f"Load average (1, 5, 15 min) at the start {data['loadavg_start']}, at the end {data.get('loadavg_end')}: "
        "timings were measured on a shared machine under contention, so compare them within a table, not with other "
        "machines.",
        "",
    ]
    rows = data["rows"]
    for task_name, task in data["tasks"].items():
        task_rows = [r for r in rows if r["task"] == task_name]
        models = _models_by_size(task_rows)
        base = data["baselines"][task_name]
        lines += [
            f"## {task_name} ({task['family']}s, {task['metric']})",
            "",
            f"Budget {task['token_budget'] * 1:,} training tokens per run (batch {task['batch_size']}, max length "
            f"{task['max_length']}), {task['train_rows']} train / {task['val_rows']} validation / "
            f"{task['dev_rows'] or 'all'} dev rows. Majority class (`{base['answer']}`): **{base['score']:.3f}**.",
            "",
            "| method | " + " | ".join(_name(m) for m in models) + " |",
            "|---|" + "---:|" * len(models),
        ]
        methods = list(dict.fromkeys(r["method"] for r in task_rows))
        by = {(r["model"], r["method"]): r for r in task_rows}
        for method in methods:
            cells = [by.get((m, method)) for m in models]
            text = [
                _score(c) + (f" (lr {c['lr']:.2g})" if c and c.get("status") == "ok" else "") if c else ""
                for c in cells
            ]
            lines.append(f"| {method} | " + " | ".join(text) + " |")
        lines.append("")
        for model in models:
            lines += _detail_table(model, [r for r in task_rows if r["model"] == model])
        lines += verdicts(task_rows, models, base)
    return "\n".join(lines) + "\n"


def _detail_table(model: str, rows: list[dict[str, Any]]) -> list[str]:
    size = next((r["model_params"] for r in rows if r.get("model_params")), None)
    lines = [
        f"### {_name(model)}" + (f" ({size / 1e6:.1f}M parameters)" if size else ""),
        "",
        "| method | trainable | added | stored | stored bytes | peak RSS MiB | step ms | train tok/s | steps "
        "| lr (val) | dev score | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']} |" + " |" * 10)
            continue
        sweep = ", ".join(
            f"{x['lr']:.2g}: {x['val_score']:.3f}" if x["status"] == "ok" else f"{x['lr']:.2g}: -"
            for x in sorted(r["sweep"], key=lambda x: x["lr"])
        )
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {r['added_params']:,} | {r['stored_params']:,} | "
            f"{r['stored_bytes']:,} | {r['peak_rss_mb']:.0f} | {1000 * r['median_step_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['steps']} | {r['lr']:.2g} ({sweep}) | {_score(r)} | {r['note']} |"
        )
    return [*lines, ""]


# --- the mission's claims ----------------------------------------------------------------------------------------
CLAIM_METHODS = {"PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "LORA": "LoRA"}


def _claim_rows(rows: list[dict[str, Any]], model: str) -> dict[str, dict[str, Any]]:
    """The plain variant of each claim's method (prompt_tuning, prefix, lora) on one model."""
    from deltatune import registry

    out = {}
    for peft_type, label in CLAIM_METHODS.items():
        main = registry.BY_PEFT_TYPE[peft_type].name
        row = next(
            (r for r in rows if r["model"] == model and r["method"] == main and r["status"] == "ok"), None
        )
        if row is not None:
            out[label] = row
    return out


def verdicts(rows: list[dict[str, Any]], models: list[str], baseline: dict[str, Any]) -> list[str]:
    """A short verdict on each claim, from these rows only (`models` smallest first)."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok or not models:
        return []
    lines = ["#### The mission's claims, from this table", ""]
    best = {
        m: max((r for r in ok if r["model"] == m), key=lambda r: r["dev_score"], default=None) for m in models
    }
    for m in models:
        if best[m]:
            lines.append(f"- Best method on {_name(m)}: {best[m]['method']} ({_score(best[m])}).")
    three = {m: _claim_rows(ok, m) for m in models}

    def leader(m: str) -> str:
        trio = three[m]
        if len(trio) < 3:
            return ""
        label, r = max(trio.items(), key=lambda kv: kv[1]["dev_score"])
        others = ", ".join(f"{k} {_score(v)}" for k, v in trio.items() if k != label)
        return f"{label} leads ({_score(r)}; {others})"

    small, medium = models[0], models[len(models) // 2] if len(models) > 2 else models[-1]
    for claim, model, label in (
        ("Prefix tuning does best on small models", small, "prefix tuning"),
        ("LoRA does best on medium models", medium, "LoRA"),
    ):
        text = leader(model)
        if not text:
            lines.append(
                f"- {claim}: not measured (prompt tuning, prefix tuning and LoRA are not all in the table)."
            )
            continue
        holds = text.startswith(label)
        verdict = "holds" if holds else "does not hold"
        lines.append(f"- {claim}: {verdict} on {_name(model)} among the three: {text}.")
    gaps = {
        m: best[m]["dev_score"] - three[m]["prompt tuning"]["dev_score"]
        for m in models
        if "prompt tuning" in three[m]
    }
    if len(gaps) >= 2:
        above = all(three[m]["prompt tuning"]["dev_score"] > baseline["score"] + 0.05 for m in gaps)
        gap_text = ", ".join(f"{_name(m)} {g:.3f}" for m, g in gaps.items())
        first, last = list(gaps.values())[0], list(gaps.values())[-1]
        holds = above and last <= first + 0.02
        lines.append(
            f"- Prompt tuning holds up across sizes: {'holds' if holds else 'does not hold'}; its gap to the best "
            f"method by size: {gap_text}"
            + ("" if above else "; it does not clear the majority class by 0.05 everywhere")
            + "."
        )
    elif gaps:
        lines.append("- Prompt tuning holds up across sizes: one model size only, not measured.")
    return [*lines, ""]


# --- plots -------------------------------------------------------------------------------------------------------
def plot(data: dict[str, Any], out_dir: str) -> list[str]:
    """Per task: dev score against model size (log scale), one line per method, the majority class dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task_name in data["tasks"]:
        rows = [r for r in data["rows"] if r["task"] == task_name and r["status"] == "ok"]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(9, 6))
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted(
                (r["model_params"], r["dev_score"], r.get("dev_std") or 0)
                for r in rows
                if r["method"] == method
            )
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        ax.axhline(
            data["baselines"][task_name]["score"], color="gray", linestyle="--", label="majority class"
        )
        ax.set(
            xscale="log",
            xlabel="model parameters",
            ylabel="dev score",
            title=f"{task_name}: score vs model size",
        )
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_{task_name}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    plt.close("all")
    return paths
