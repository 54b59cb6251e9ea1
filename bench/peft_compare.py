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
def train_loop(model, batches, steps: int, lr: float) -> dict[str, Any]:
    """Plain AdamW loop; returns median step time (first step excluded), peak working memory and final loss."""
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
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    return {
        "median_step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "peak_step_memory_mb": (sampler.peak - before) / 2**20,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
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
    results = {}
    order = [("peft", peft_model), ("deltatune", dt_model)]
    for name, model in order[::-1] if DELTATUNE_FIRST else order:
        torch.manual_seed(0)
        results[name] = train_loop(model, batches, steps, lr)
        del model
    del peft_model, dt_model
    trim()
    p, d = results["peft"], results["deltatune"]
    results["ratio"] = {
        key: d[key] / p[key] if p[key] else None
        for key in ("median_step_s", "peak_step_memory_mb", "final_loss")
    }
    # same start, same batches: the curves should agree to float rounding (a check on the comparison itself)
    results["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(p.pop("losses"), d.pop("losses")))
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
        t0 = time.perf_counter()
        merged_model = model.merge_and_unload()
        merge_s = time.perf_counter() - t0
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


# --- report ---------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# deltatune vs peft (same model, data, seed, starting weights, AdamW loop)",
        "",
        f"{result['date']}; {result['machine']}; `{result['command']}`; {result['threads']} torch thread(s); "
        f"{'deltatune' if result.get('deltatune_first') else 'peft'} trained first in each pair.",
        "Ratios are deltatune / peft (below 1: deltatune is faster / lighter). Memory: peak RSS growth during the "
        "training steps.",
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per MiniLM pair")
    parser.add_argument("--llm-steps", type=int, default=6, help="training steps of the SmolLM2 pair")
    parser.add_argument("--llm-batch", type=int, default=2)
    parser.add_argument("--llm-seq", type=int, default=64)
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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peft_compare.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(args.out, "peft_compare.md"), "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
