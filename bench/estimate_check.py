"""`deltatune estimate` against measured peaks on the real decoders of the ladder (SmolLM2-135M, Gemma-3-270M).

Each (model, method) builds the model from its cached folder (`deltatune fetch`), runs two AdamW steps (foreach, as
on a GPU) on batch x tokens of random ids and measures the peak of every tensor allocated
(`deltatune.train.memory.measure_training_peak`), then asks the estimator, which sees only the config. It also
prints the estimate alone for Llama 3 shapes (1B, 8B, 70B) per method, the sizes this machine cannot train. Writes
bench/results/estimate_check.{json,md}. The tiny-model version of this check is tests/test_memory_estimate.py.

Usage: python bench/estimate_check.py [--models smollm2-135m-instruct,gemma3-270m] [--methods lora,prompt_tuning]
       [--batch 1] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one(model_name: str, method: str, batch: int, seq: int, dtype: str = "float32") -> dict:
    import deltatune as dt
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.memory import estimate_training_memory, load_config, measure_training_peak
    from deltatune.train.recipe import RunConfig, make_peft_config

    model, _ = load_model_and_tokenizer(model_name, task="causal-lm", dtype=getattr(torch, dtype))
    peft_model = dt.get_peft_model(model, make_peft_config(RunConfig(task="causal-lm", method=method), {}))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def step() -> None:
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = measure_training_peak(peft_model, step)["peak"]
    estimate = estimate_training_memory(load_config(model_name), method, batch, seq, dtype)
    return {"model": model_name, "method": method, "measured_bytes": measured, **estimate.as_dict()}


SHAPES = ("llama-1b", "llama-3b", "llama-8b", "llama-70b")
SHAPE_METHODS = ("full", "lora", "qlora", "prompt_tuning")


def shape_table(batch: int, seq: int) -> list[str]:
    """The estimator alone on Llama 3 shapes, bfloat16 weights, AdamW (foreach), in GiB."""
    from deltatune.train.memory import estimate_training_memory, load_config

    gib = 2**30
    lines = [
        f"Estimate only, Llama 3 shapes, bfloat16, batch {batch} x {seq} tokens (`deltatune estimate --model "
        f"llama-8b --method lora --batch-size {batch} --seq-len {seq}`), GiB:",
        "",
        "| shape | method | weights | gradients | optimizer | activations | total |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for shape in SHAPES:
        for method in SHAPE_METHODS:
            e = estimate_training_memory(load_config(shape), method, batch, seq, "bfloat16")
            parts = [e.weights, e.gradients, e.optimizer, e.activations, e.total]
            lines.append(f"| {shape} | {method} | " + " | ".join(f"{p / gib:.1f}" for p in parts) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--methods", default="lora,prompt_tuning")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [
        one(m, k, args.batch, args.seq, args.dtype)
        for m in args.models.split(",")
        for k in args.methods.split(",")
    ]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/estimate_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": args.batch,
        "seq": args.seq,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    name = "estimate_check" if args.dtype == "float32" else f"estimate_check_{args.dtype}"
    with open(os.path.join(args.out, f"{name}.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    lines = [
        "# `deltatune estimate` vs measured peak, real checkpoints",
        "",
        f"{report['date']}; `{report['command']}`; batch {args.batch} x {args.seq} tokens, {args.dtype}, AdamW "
        "(foreach). Measured: exact bytes of every tensor allocated in two training steps.",
        "",
        "| model | method | measured MiB | estimate MiB | estimate / measured | weights | gradients | optimizer | "
        "activations |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['measured_bytes'] / mib:.0f} | {r['total'] / mib:.0f} | "
            f"{r['total'] / r['measured_bytes']:.3f} | {r['weights'] / mib:.0f} | {r['gradients'] / mib:.1f} | "
            f"{r['optimizer'] / mib:.1f} | {r['activations'] / mib:.0f} |"
        )
    lines += ["", *shape_table(1, 2048)]
    with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
