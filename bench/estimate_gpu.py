"""`deltatune estimate` against `torch.cuda.max_memory_allocated` at sizes this CPU box cannot train.

Why: `bench/estimate_check.py` checks the estimator on real checkpoints up to 270M parameters, counted on the CPU.
People use the number for 1B-70B models on GPUs, where attention runs through SDPA kernels and cuBLAS needs
workspaces. This script trains random-weight Llama 3 shapes (1B, 8B) in bfloat16 on one GPU: two AdamW steps
(foreach) of batch x seq random ids per (shape, method), the peak of the CUDA caching allocator over those steps
(weights, adapters and optimizer already resident), against the estimate from the config alone. Writes
<out>/estimate_gpu.{json,md}.

    python bench/estimate_gpu.py --out bench/results/gpu          # on a GPU machine: a minute or two
    python bench/estimate_gpu.py --tiny --out /tmp/est            # seconds, on a CPU: the same code, tiny shape
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (shape, method); llama-8b full fine-tuning (about 75 GiB) does not fit an 80 GB card with room to spare.
ROWS = (
    ("llama-1b", "full"),
    ("llama-1b", "lora"),
    ("llama-1b", "qlora"),
    ("llama-1b", "prompt_tuning"),
    ("llama-8b", "lora"),
    ("llama-8b", "qlora"),
)
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def config_of(shape: str, tiny: bool):
    import transformers

    from deltatune.train.memory import load_config

    if tiny:
        return transformers.LlamaConfig(vocab_size=512, **TINY)
    return load_config(shape)


def build(config, method: str, device: str):
    """The random-weight bfloat16 model with the method's adapter, as `deltatune train` would build it."""
    import transformers

    import deltatune as dt
    from deltatune import registry
    from deltatune.train.recipe import RunConfig, make_peft_config

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an 8B model never exists in float32
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    quantization = registry.resolve_variant(method)[1].quantize
    if quantization:
        dt.quantize(model, quantization)
    return dt.get_peft_model(model, make_peft_config(RunConfig(task="causal-lm", method=method), {}))


def one(shape: str, method: str, batch: int, seq: int, tiny: bool) -> dict:
    from deltatune.train.memory import estimate_training_memory, measure_training_peak

    cuda = torch.cuda.is_available()
    config = config_of(shape, tiny)
    model = build(config, method, "cuda" if cuda else "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=params[0].device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    else:  # the dry run: the same bookkeeping, counted by deltatune's dispatch mode
        measured = measure_training_peak(model, step)["peak"]
    seconds = (time.perf_counter() - start) / 2
    estimate = estimate_training_memory(config, method, batch, seq, "bfloat16")
    label = "tiny" if tiny else shape
    return {
        "shape": label,
        "method": method,
        "measured_bytes": measured,
        "step_s": seconds,
        **estimate.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; 64 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama: a smoke run on any device")
    parser.add_argument(
        "--rows", default="", help="shape:method pairs, comma-separated (default: the fitted 1B and 8B rows)"
    )
    parser.add_argument("--out", default="bench/results/gpu")
    args = parser.parse_args(argv)
    seq = args.seq or (64 if args.tiny else 2048)
    chosen = tuple(tuple(r.split(":")) for r in args.rows.split(",") if r) or ROWS
    if any(len(row) != 2 for row in chosen):
        sys.exit(f"--rows takes shape:method pairs, e.g. llama-1b:lora,llama-8b:qlora; got {args.rows!r}.")
    rows = chosen if torch.cuda.is_available() or args.tiny else ()
    if not rows:
        sys.exit("No CUDA GPU: run on a GPU machine, or pass --tiny for a smoke run.")
    if args.tiny and not torch.cuda.is_available():
        rows = tuple(r for r in rows if r[1] != "qlora")  # bitsandbytes' 4-bit layers need the GPU here
    results = []
    for shape, method in rows:
        try:
            results.append(one(shape, method, args.batch, seq, args.tiny))
        except Exception as err:  # one failed row (an OOM, a missing bitsandbytes) must not hide the others
            results.append({"shape": shape, "method": method, "error": f"{type(err).__name__}: {err}"[:300]})
        gc.collect()  # the last row's model and optimizer, before the next is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/estimate_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": gpu,
        "torch": torch.__version__,
        "batch": args.batch,
        "seq": seq,
        "rows": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "estimate_gpu.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    gib = 2**30
    lines = [
        f"# `deltatune estimate` vs `torch.cuda.max_memory_allocated`, {gpu}",
        "",
        f"{report['date']}; `{report['command']}`; torch {torch.__version__}; random-weight Llama 3 shapes in "
        f"bfloat16, SDPA attention, batch {args.batch} x {seq} tokens, AdamW (foreach), two steps.",
        "",
        "| shape | method | measured GiB | estimate GiB | estimate / measured | weights | gradients | optimizer | "
        "activations | step s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['method']} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['measured_bytes'] / gib:.2f} | {r['total'] / gib:.2f} | "
            f"{r['total'] / r['measured_bytes']:.3f} | {r['weights'] / gib:.2f} | {r['gradients'] / gib:.2f} | "
            f"{r['optimizer'] / gib:.2f} | {r['activations'] / gib:.2f} | {r['step_s']:.2f} |"
        )
    with open(os.path.join(args.out, "estimate_gpu.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
