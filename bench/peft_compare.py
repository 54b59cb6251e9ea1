"""deltatune vs the `peft` package, side by side, with one plain PyTorch loop for both (CPU).

Why: deltatune claims to be a faster drop-in for peft; this measures it on identical work. For every pair the model,
the batches (a fixed seeded SST-2 subset, same order), the optimizer (AdamW, same lr), the seed and the starting
adapter weights are the same: peft's freshly initialised adapter is saved and loaded into deltatune with
`PeftModel.from_pretrained(..., is_trainable=True)`, so the two start from the same tensors and their final losses
are comparable, not just their speed.

Measured per pair: median step time (after one warm-up step), peak working memory of the training steps (highest RSS
sampled during the steps minus RSS just before them, after gc + malloc_trim), final loss; and the ratios
deltatune / peft. Pairs: LoRA, IA3, prompt tuning, prefix tuning on all-MiniLM-L6-v2 (sequence classification);
LoRA on SmolLM2-135M-Instruct (causal LM, short sequences, few steps). On SmolLM2 also: time to wrap the model with
LoRA on all linear layers, LoRA step time / frozen forward time (about 2 + epsilon is the floor: the backward of a
frozen layer needs the input gradient but no weight gradient), unmerged inference overhead vs the merged model, and
merge_and_unload time.

Timings on a shared 2-core CPU are noisy; read the ratios, not the absolute numbers, and never assert them in tests.

Usage: python bench/peft_compare.py [--steps 30] [--llm-steps 6] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_memory import PeakSampler, rss, trim  # noqa: E402 - the same RSS sampler as the quantization bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "sst2", "train.tsv"))
MINILM, SMOLLM = "all-minilm-l6-v2", "smollm2-135m-instruct"


# --- data ------------------------------------------------------------------------------------------------
def sst2_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    import random

    with open(SST2) as fh:
        next(fh)
        rows = [(s, int(y)) for s, y in (line.rstrip("\n").rsplit("\t", 1) for line in fh)]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def cls_batches(tokenizer, rows, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer(
            [s for s, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([y for _, y in chunk])
        out.append(dict(enc))
    return out


def lm_batches(tokenizer, rows, batch_size: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-length causal-LM batches (every sequence `seq` tokens: sentences joined, then cut)."""
    ids = tokenizer(" ".join(s for s, _ in rows))["input_ids"]
    out = []
    for i in range(0, len(ids) - batch_size * seq + 1, batch_size * seq):
        block = torch.tensor(ids[i : i + batch_size * seq]).view(batch_size, seq)
        out.append({"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block.clone()})
    return out


# --- the loop both libraries share ------------------------------------------------------------------------
def hf_loss(model, batch) -> torch.Tensor:
    """The loss as transformers computes it: full logits, then cross-entropy (what a peft user runs)."""
    return model(**batch).loss


def train_loop(model, batches, steps: int, lr: float, loss_fn: Callable = hf_loss) -> dict[str, Any]:
    """Plain AdamW loop; returns median and mean step time (first step excluded), peak working memory, losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    times, losses = [], []
    trim()
    with PeakSampler(0.002) as sampler:
        before = rss()
        for step in range(steps):
            batch = batches[step % len(batches)]
            t0 = time.perf_counter()
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    return {
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "mean_step_s": statistics.mean(times[1:] if len(times) > 1 else times),
        "losses_all": list(losses),
        "peak_step_memory_mb": (sampler.peak - before) / 2**20,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
    }


def lockstep_step_times(runs: dict[str, tuple], steps: int, lr: float) -> dict[str, dict[str, float]]:
    """Step times of several models trained in lockstep: step i of every model runs back to back, the order
    rotating each step, so a slow spell of the shared CPU hits every model alike. `runs` maps a name to
    (model, batches, loss_fn). The first two steps of each warm up and are not counted."""
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        for name, (model, _, _) in runs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for step in range(steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            model, batches, loss_fn = runs[name]
            model.train()
            t0 = time.perf_counter()
            loss_fn(model, batches[step % len(batches)]).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    counted = {name: t[2:] if len(t) > 2 else t for name, t in times.items()}
    return {
        name: {"median_step_s": statistics.median(t), "mean_step_s": statistics.mean(t)}
        for name, t in counted.items()
    }


def timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Median wall time of fn() over `repeat` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# --- one pair: the same adapter in peft and in deltatune ---------------------------------------------------
DELTATUNE_FIRST = False  # --deltatune-first: train deltatune's copy before peft's (to expose order effects)


def pair(base, make_peft_config: Callable[[], Any], batches, steps: int, lr: float) -> dict[str, Any]:
    """Train peft's adapter and the same starting adapter loaded into deltatune; results and ratios."""
    import peft

    import deltatune

    torch.manual_seed(0)
    peft_model = peft.get_peft_model(copy.deepcopy(base), make_peft_config())
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        dt_model = deltatune.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    results: dict[str, Any] = {}
    order = [("peft", peft_model), ("deltatune", dt_model)]
    for name, model in order[::-1] if DELTATUNE_FIRST else order:
        torch.manual_seed(0)
        results[name] = train_loop(model, batches, steps, lr)
    # step time from a lockstep run (both models alternate), so CPU noise cannot favour either
    lock = lockstep_step_times({n: (m, batches, hf_loss) for n, m in order}, steps, lr)
    for name, _ in order:
        results[name]["sequential_median_step_s"] = results[name]["median_step_s"]
        results[name]["median_step_s"] = lock[name]["median_step_s"]
    del peft_model, dt_model, order
    trim()
    p, d = results["peft"], results["deltatune"]
    results["ratio"] = {
        key: d[key] / p[key] if p[key] else None
        for key in ("median_step_s", "peak_step_memory_mb", "final_loss")
    }
    # same start, same batches: the curves should agree to float rounding (a check on the comparison itself)
    results["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(p.pop("losses"), d.pop("losses")))
    p.pop("losses_all"), d.pop("losses_all")
    return results


def minilm_pairs(steps: int) -> dict[str, Any]:
    import peft

    from deltatune.models import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(MINILM, task="seq-cls", num_labels=2)
    batches = cls_batches(tok, sst2_rows(16 * steps), 16, 64)
    cls = "SEQ_CLS"
    configs = {
        "lora": (
            lambda: peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type=cls
            ),
            1e-3,
        ),
        "ia3": (lambda: peft.IA3Config(task_type=cls), 5e-3),
        "prompt_tuning": (lambda: peft.PromptTuningConfig(num_virtual_tokens=20, task_type=cls), 3e-2),
        "prefix_tuning": (lambda: peft.PrefixTuningConfig(num_virtual_tokens=20, task_type=cls), 1e-2),
    }
    out = {}
    for name, (make, lr) in configs.items():
        try:
            out[name] = pair(base, make, batches, steps, lr)
        except Exception as err:  # noqa: BLE001 - a failing pair is reported, the others still run
            out[name] = {"error": f"{type(err).__name__}: {err}"}
        print(name, json.dumps(out[name].get("ratio", out[name])), flush=True)
    return out


def merge_time(lib, base, make) -> float:
    """Seconds of merge_and_unload() on a fresh LoRA-wrapped copy with non-zero factors."""
    torch.manual_seed(0)
    model = lib.get_peft_model(copy.deepcopy(base), make(lib))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    t0 = time.perf_counter()
    model.merge_and_unload()
    return time.perf_counter() - t0


def smollm2(steps: int, batch_size: int, seq: int) -> dict[str, Any]:
    """LoRA pair on SmolLM2 plus wrap time, step/forward ratio, merged-vs-unmerged inference and merge time."""
    import peft

    import deltatune
    from deltatune.models import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(SMOLLM, task="causal-lm")
    batches = lm_batches(tok, sst2_rows(400), batch_size, seq)

    def make(lib=peft):
        return lib.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )

    out: dict[str, Any] = {"batch": [batch_size, seq], "lora": pair(base, make, batches, steps, 2e-4)}
    print("smollm2 lora", json.dumps(out["lora"]["ratio"]), flush=True)

    # wrapping time: a fresh copy per call, LoRA on every linear layer
    def wrap(lib) -> float:
        copies = [copy.deepcopy(base) for _ in range(3)]
        times = []
        for model in copies:
            torch.manual_seed(0)
            cfg = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
            t0 = time.perf_counter()
            lib.get_peft_model(model, cfg)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out["wrap_s"] = {"peft": wrap(peft), "deltatune": wrap(deltatune)}
    out["wrap_s"]["ratio"] = out["wrap_s"]["deltatune"] / out["wrap_s"]["peft"]

    # frozen forward, unmerged vs merged inference, merge time (deltatune; peft for reference)
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        frozen = timed(lambda: base(**batch))
    out["frozen_forward_s"] = frozen
    out["step_over_frozen_forward"] = {
        lib: out["lora"][lib]["median_step_s"] / frozen for lib in ("peft", "deltatune")
    }
    for name, lib in (("deltatune", deltatune), ("peft", peft)):
        torch.manual_seed(0)
        model = lib.get_peft_model(copy.deepcopy(base), make(lib))
        with torch.no_grad():  # non-zero B so the merge is real work and the outputs can be compared
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        model.eval()
        with torch.no_grad():
            unmerged = timed(lambda m=model: m(**batch))
            reference = model(**batch).logits
        merge_s = statistics.median(merge_time(lib, base, make) for _ in range(3))
        merged_model = model.merge_and_unload()
        with torch.no_grad():
            merged = timed(lambda m=merged_model: m(**batch))
            diff = float((merged_model(**batch).logits - reference).abs().max())
        out[f"inference_{name}"] = {
            "unmerged_forward_s": unmerged,
            "merged_forward_s": merged,
            "unmerged_overhead": unmerged / merged - 1,
            "merge_and_unload_s": merge_s,
            "max_abs_logit_diff_merged_vs_unmerged": diff,
        }
        del model, merged_model
        trim()
    out["merge_and_unload_ratio"] = (
        out["inference_deltatune"]["merge_and_unload_s"] / out["inference_peft"]["merge_and_unload_s"]
    )
    return out


INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."


def smollm2_instruct(batch_size: int, steps: int) -> dict[str, Any]:
    """LoRA instruction tuning on SmolLM2: SST-2 reviews as questions, the one-word answer is the only scored
    text (as in any instruction data, the prompt is not). Three runs from the same starting adapter over the same
    rows, one pass each: peft; deltatune in the same loop on the same batches (the adapter layers alone); and
    deltatune with its trainer's levers: the response-only chunked loss of deltatune.train.losses (the trainer's
    default for causal-LM tasks) and length-grouped batches (its `group_by_length` option).
    The mean step time over the pass compares the same work: the rows are the same, only their grouping and the
    loss computation differ."""
    import peft

    import deltatune
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.data import epoch_batches
    from deltatune.train.losses import causal_lm_loss
    from deltatune.train.tasks import CausalLMTask

    base, tok = load_model_and_tokenizer(SMOLLM, task="causal-lm")
    task = CausalLMTask(tok, max_length=256)
    rows = [
        {"instruction": INSTRUCTION, "input": s, "output": "positive" if y else "negative"}
        for s, y in sst2_rows(batch_size * steps, seed=1)
    ]
    features = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in task.prepare(rows)]
    lengths = [len(f["input_ids"]) for f in features]

    def batches(grouped: bool) -> list[dict[str, torch.Tensor]]:
        order = epoch_batches(lengths, batch_size, seed=0, epoch=0, group_by_length=grouped)
        return [task.collate([features[i] for i in rows]) for rows in order]

    plain, grouped = batches(False), batches(True)
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        same = deltatune.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
        levers = deltatune.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    runs: dict[str, Any] = {}
    plan = [
        ("peft", peft_model, plain, hf_loss),
        ("deltatune_same_loop", same, plain, hf_loss),
        ("deltatune_levers", levers, grouped, causal_lm_loss),
    ]
    for name, model, data, loss_fn in plan:
        torch.manual_seed(0)
        r = train_loop(model, data, len(data), 2e-4, loss_fn)
        r["sequential_mean_step_s"] = r["mean_step_s"]
        tokens = sum(int(b["attention_mask"].sum()) for b in data[2:])  # the steps lockstep times
        padded = sum(b["input_ids"].numel() for b in data)
        r["real_tokens_timed"] = tokens
        r["padding_fraction"] = 1 - sum(int(b["attention_mask"].sum()) for b in data) / padded
        r["mean_loss"] = statistics.mean(r.pop("losses_all"))
        r.pop("losses")
        runs[name] = r
        print("smollm2 instruct", name, json.dumps(r), flush=True)
    # step times from a lockstep pass over the same batches (the models alternate step by step)
    lock = lockstep_step_times({n: (m, d, f) for n, m, d, f in plan}, len(plain), 2e-4)
    for name, r in ((n, runs[n]) for n, *_ in plan):
        r["mean_step_s"] = lock[name]["mean_step_s"]
        r["tokens_per_s"] = r.pop("real_tokens_timed") / (r["mean_step_s"] * (len(plain) - 2))
    del peft_model, same, levers, plan
    trim()
    p = runs["peft"]
    for name in ("deltatune_same_loop", "deltatune_levers"):
        runs[name]["ratio"] = {
            key: runs[name][key] / p[key] for key in ("mean_step_s", "peak_step_memory_mb", "mean_loss")
        }
    runs["batch_size"], runs["steps"] = batch_size, len(plain)
    runs["mean_length"], runs["scored_tokens_per_row"] = (
        statistics.mean(lengths),
        statistics.mean(sum(1 for y in f["labels"] if y != -100) for f in features),
    )
    return runs


# --- report ---------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# deltatune vs peft (same model, data, seed, starting weights, AdamW loop)",
        "",
        f"{result['date']}; {result['machine']}; `{result['command']}`; {result['threads']} torch thread(s); "
        f"{'deltatune' if result.get('deltatune_first') else 'peft'} trained first in each pair.",
        "Ratios are deltatune / peft (below 1: deltatune is faster / lighter). Step time: median over a lockstep run "
        "(the models alternate step by step, so CPU noise hits both alike). Memory (peak RSS growth during the "
        "steps) and losses: each model's own run.",
        "",
        "| model | method | steps | peft step ms | deltatune step ms | step ratio | peft MiB | deltatune MiB "
        "| memory ratio | first loss | peft final loss | deltatune final loss | loss ratio | max abs loss diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(MINILM, k, v, result["steps"]) for k, v in result.get("minilm", {}).items()]
    if "lora" in result.get("smollm2", {}):
        rows.append((SMOLLM, "lora", result["smollm2"]["lora"], result["llm_steps"]))
    for model, method, r, steps in rows:
        if "error" in r:
            lines.append(f"| {model} | {method} | {steps} | error: {r['error']} |" + " |" * 10)
            continue
        p, d, q = r["peft"], r["deltatune"], r["ratio"]
        lines.append(
            f"| {model} | {method} | {steps} | {1000 * p['median_step_s']:.1f} | {1000 * d['median_step_s']:.1f} "
            f"| {_fmt(q['median_step_s'])} | {p['peak_step_memory_mb']:.0f} | {d['peak_step_memory_mb']:.0f} "
            f"| {_fmt(q['peak_step_memory_mb'])} | {p['first_loss']:.4f} | {p['final_loss']:.4f} "
            f"| {d['final_loss']:.4f} | {_fmt(q['final_loss'], '.4f')} | {r['max_abs_loss_diff']:.1e} |"
        )
    if "error" in result.get("smollm2", {}):
        lines += ["", f"SmolLM2 part failed: {result['smollm2']['error']}"]
    elif "smollm2" in result:
        s = result["smollm2"]
        lines += [
            "",
            f"SmolLM2-135M, batch {s['batch'][0]} x {s['batch'][1]} tokens:",
            "",
            "| measure | peft | deltatune | ratio |",
            "|---|---:|---:|---:|",
            f"| wrap with LoRA on all linear layers (s) | {s['wrap_s']['peft']:.3f} | "
            f"{s['wrap_s']['deltatune']:.3f} | {s['wrap_s']['ratio']:.3f} |",
            f"| LoRA step time / frozen forward time ({1000 * s['frozen_forward_s']:.0f} ms) | "
            f"{s['step_over_frozen_forward']['peft']:.2f} | {s['step_over_frozen_forward']['deltatune']:.2f} | |",
        ]
        ip, idt = s["inference_peft"], s["inference_deltatune"]
        lines += [
            f"| unmerged inference overhead vs merged | {100 * ip['unmerged_overhead']:.1f}% | "
            f"{100 * idt['unmerged_overhead']:.1f}% | |",
            f"| merge_and_unload (s) | {ip['merge_and_unload_s']:.3f} | {idt['merge_and_unload_s']:.3f} | "
            f"{s['merge_and_unload_ratio']:.3f} |",
            f"| max abs logit diff, merged vs unmerged | {ip['max_abs_logit_diff_merged_vs_unmerged']:.2e} | "
            f"{idt['max_abs_logit_diff_merged_vs_unmerged']:.2e} | |",
        ]
    lines += instruct_markdown(result.get("smollm2_instruct"))
    return "\n".join(lines) + "\n"


def instruct_markdown(runs: dict[str, Any] | None) -> list[str]:
    if not runs:
        return []
    if "error" in runs:
        return ["", f"SmolLM2 instruction part failed: {runs['error']}"]
    lines = [
        "",
        f"SmolLM2-135M LoRA instruction tuning (r=16, all linear layers): {runs['steps']} steps of "
        f"{runs['batch_size']} SST-2 reviews as questions, one pass, same rows and starting weights in every run; "
        f"{runs['mean_length']:.0f} tokens per row on average, {runs['scored_tokens_per_row']:.1f} of them scored "
        "(the answer). Ratios are to peft; step time: mean over a lockstep pass (first two steps excluded).",
        "",
        "| run | batches | loss | mean step ms | step ratio | tokens/s | peak MiB | memory ratio | padding | mean loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    described = {
        "peft": ("shuffled", "transformers (full logits)"),
        "deltatune_same_loop": ("shuffled", "transformers (full logits)"),
        "deltatune_levers": ("length-grouped", "deltatune response-only chunked"),
    }
    for name, (batches, loss) in described.items():
        r = runs[name]
        ratio = r.get("ratio", {})
        lines.append(
            f"| {name.replace('_', ' ')} | {batches} | {loss} | {1000 * r['mean_step_s']:.0f} "
            f"| {_fmt(ratio.get('mean_step_s', 1.0))} | {r['tokens_per_s']:.0f} | {r['peak_step_memory_mb']:.0f} "
            f"| {_fmt(ratio.get('peak_step_memory_mb', 1.0))} | {100 * r['padding_fraction']:.0f}% "
            f"| {r['mean_loss']:.4f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per MiniLM pair")
    parser.add_argument("--llm-steps", type=int, default=6, help="training steps of the SmolLM2 pair")
    parser.add_argument("--llm-batch", type=int, default=2)
    parser.add_argument("--llm-seq", type=int, default=64)
    parser.add_argument("--instruct-batch", type=int, default=8)
    parser.add_argument("--instruct-steps", type=int, default=16, help="steps (one pass) per instruction run")
    parser.add_argument("--skip-instruct", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--deltatune-first", action="store_true", help="train deltatune's copy first")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = parser.parse_args(argv)
    global DELTATUNE_FIRST
    DELTATUNE_FIRST = args.deltatune_first
    torch.set_num_threads(args.threads)
    import peft

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.platform()}, CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
        f"peft {peft.__version__}",
        "command": "python bench/peft_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "deltatune_first": args.deltatune_first,
        "steps": args.steps,
        "llm_steps": args.llm_steps,
    }
    if not args.skip_minilm:
        result["minilm"] = minilm_pairs(args.steps)
    if not args.skip_llm:
        try:
            result["smollm2"] = smollm2(args.llm_steps, args.llm_batch, args.llm_seq)
        except Exception as err:  # noqa: BLE001 - keep the MiniLM results; report what failed
            result["smollm2"] = {"error": f"{type(err).__name__}: {err}"}
    if not args.skip_instruct:
        try:
            result["smollm2_instruct"] = smollm2_instruct(args.instruct_batch, args.instruct_steps)
        except Exception as err:  # noqa: BLE001 - keep the other results; report what failed
            result["smollm2_instruct"] = {"error": f"{type(err).__name__}: {err}"}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peft_compare.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(args.out, "peft_compare.md"), "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
