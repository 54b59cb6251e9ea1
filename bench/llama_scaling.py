"""Step time and peak memory against model size, per method, on random-weight Llama configurations.

Pretrained checkpoints stop at 270M here; speed and memory do not need trained weights, so this builds Llama-shaped
models from ~20M to ~1B parameters (random weights, float32), and for each method times a few AdamW steps (batch x
tokens fixed) and measures the step's peak tensor memory (`deltatune.train.memory.measure_training_peak`, exact
bytes, independent of machine load). It fits step time and peak memory as power laws of the parameter count
(log-log least squares) and compares the measured peaks with `deltatune estimate`'s. Sizes beyond what this
machine can train are covered by the estimator alone (`deltatune estimate --model llama-70b`).

Usage: python bench/llama_scaling.py [--sizes 20m,40m,100m,250m,1b] [--methods lora,ia3,prompt_tuning,full]
       [--steps 2] [--max-full 120e6] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (hidden, intermediate, layers, heads, kv heads); vocabulary 32,000 throughout (Llama 2's)
SHAPES = {
    "20m": (256, 688, 4, 4, 4),
    "40m": (384, 1024, 8, 6, 6),
    "100m": (640, 1728, 12, 10, 5),
    "250m": (1024, 2816, 16, 16, 8),
    "1b": (2048, 5504, 18, 16, 8),
}
VOCAB = 32000


def llama_config(name: str):
    from transformers import LlamaConfig

    h, i, layers, heads, kv = SHAPES[name]
    return LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
    )


def one(size: str, method: str, batch: int, seq: int, steps: int) -> dict:
    """Peak memory of two tracked steps, then the median time of `steps` untracked ones."""
    import deltatune as dt
    from deltatune.train.memory import estimate_training_memory, measure_training_peak
    from deltatune.train.recipe import RunConfig, make_peft_config

    config = llama_config(size)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    peft_model = dt.get_peft_model(model, make_peft_config(RunConfig(task="causal-lm", method=method), {}))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    ids = torch.randint(0, VOCAB, (batch, seq))
    holder: dict = {}

    def step() -> None:
        if "opt" not in holder:  # created inside the tracked steps, so its states are counted
            holder["opt"] = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        holder["opt"].step()
        holder["opt"].zero_grad(set_to_none=True)

    measured = measure_training_peak(peft_model, step, steps=2)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    estimate = estimate_training_memory(config, method, batch, seq, "float32")
    return {
        "size": size,
        "method": method,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "peak_bytes": measured["peak"],
        "estimate_bytes": estimate.total,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def fit(rows: list[dict], key: str) -> dict:
    """`key` ~ a * params^b, by least squares in log-log space."""
    x = np.log([r["params"] for r in rows])
    y = np.log([r[key] for r in rows])
    b, log_a = np.polyfit(x, y, 1)
    return {"exponent": float(b), "coefficient": float(np.exp(log_a))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20m,40m,100m,250m")
    parser.add_argument("--methods", default="lora,ia3,prompt_tuning,full")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-full", type=float, default=120e6, help="full fine-tuning only up to this size")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, start, load = [], time.time(), [round(x, 2) for x in os.getloadavg()]
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            h, i, layers, _, _ = SHAPES[size]
            if method == "full" and (VOCAB * h * 2 + layers * (4 * h * h + 3 * h * i)) > args.max_full:
                continue
            row = one(size, method, args.batch, args.seq, args.steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
    fits = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) >= 2:
            fits[method] = {"step_s": fit(mine, "step_s"), "peak_bytes": fit(mine, "peak_bytes")}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/llama_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": args.batch,
        "seq": args.seq,
        "loadavg": [load, [round(x, 2) for x in os.getloadavg()]],
        "wall_s": time.time() - start,
        "rows": rows,
        "fits": fits,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "llama_scaling.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(args.out, "llama_scaling.md"), "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [
        "# Step time and peak memory vs model size (random-weight Llama, CPU)",
        "",
        f"{report['date']}; `{report['command']}`; batch {report['batch']} x {report['seq']} tokens, float32, "
        f"AdamW (foreach), one torch thread. Load average {report['loadavg'][0]} -> {report['loadavg'][1]}: step "
        "times were measured on a shared, contended machine (compare them with each other only); peak memory is "
        "exact tensor bytes (`measure_training_peak`) and does not depend on load.",
        "",
        "| size | method | parameters | trainable | step s | peak MiB | estimate MiB | estimate / measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['size']} | {r['method']} | {r['params']:,} | {r['trainable']:,} | {r['step_s']:.2f} | "
            f"{r['peak_bytes'] / 2**20:.0f} | {r['estimate_bytes'] / 2**20:.0f} | "
            f"{r['estimate_bytes'] / r['peak_bytes']:.3f} |"
        )
    lines += [
        "",
        "Power-law fits (value = a x params^b):",
        "",
        "| method | step time b | peak memory b |",
        "|---|---:|---:|",
    ]
    for method, f in report["fits"].items():
        lines.append(f"| {method} | {f['step_s']['exponent']:.2f} | {f['peak_bytes']['exponent']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
