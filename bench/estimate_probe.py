"""What one decoder layer keeps for the backward pass on a GPU, at real Llama 3 widths: the data behind
`deltatune.train.memory.LAYER_FLOATS`.

Why: the estimator's per-layer coefficients were first fitted on tiny models on the CPU, where attention and
kernels differ from a GPU's; `bench/estimate_gpu.py` then found the 8B estimate 14-18% low on an H100. This probe
builds each Llama 3 shape (1B, 8B, 70B widths) with 1 and 2 decoder layers in bfloat16 (SDPA attention), runs two
AdamW training steps per method on batch x seq random ids and records, for the second step (optimizer states
allocated): what is resident before the forward pass, what the forward pass leaves allocated (the saved activations,
logits and loss), the peak of forward + backward and the peak of the optimizer step, all from the CUDA caching
allocator. The difference between 2 and 1 layers is one layer's share; the rest is the embedding and the loss.

    python bench/estimate_probe.py --out /tmp/probe      # on a GPU: about a minute; writes estimate_probe.json
    python bench/estimate_probe.py --tiny --out /tmp/p   # seconds on a CPU: the same code, no memory figures
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

SHAPES = ("llama-1b", "llama-8b", "llama-70b")
METHODS = ("prompt_tuning", "lora", "ia3", "full")


def probe(shape: str, layers: int, method: str, batch: int, seq: int, tiny: bool) -> dict:
    from estimate_gpu import build  # the same random-weight bf16 model and adapter as the estimator's check

    from deltatune.train.memory import estimate_training_memory, load_config

    config = load_config(shape)
    config.num_hidden_layers = layers
    if tiny:
        config.vocab_size, config.hidden_size, config.intermediate_size = 256, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    cuda = torch.cuda.is_available()
    model = build(config, method, "cuda" if cuda else "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=params[0].device)
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row = {"shape": shape, "layers": layers, "method": method, "batch": batch, "seq": seq}
    for _ in range(2):  # the second step is the one recorded: AdamW's states exist by then
        sync()
        resident = allocated()
        reset()
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        after_forward = allocated()
        loss.backward()
        del loss
        sync()
        peak_forward_backward = peak()
        before_step = allocated()
        reset()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        peak_step = peak()
        row.update(
            resident=resident,
            saved=after_forward - resident,
            peak_forward_backward=peak_forward_backward,
            before_step=before_step,
            peak_step=peak_step,
        )
    estimate = estimate_training_memory(config, method, batch, seq, "bfloat16")
    row["estimate"] = estimate.as_dict()
    del model, optimizer, params, ids
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; 32 with --tiny)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="bench/results/gpu")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() or args.tiny):
        sys.exit("No CUDA GPU: run on a GPU machine, or pass --tiny for a smoke run.")
    seq = args.seq or (32 if args.tiny else 2048)
    rows = []
    for shape in SHAPES:
        for method in METHODS:
            for layers in (1, 2):
                try:
                    rows.append(probe(shape, layers, method, args.batch, seq, args.tiny))
                except Exception as err:  # an OOM on one row must not lose the others
                    rows.append(
                        {"shape": shape, "layers": layers, "method": method, "error": repr(err)[:300]}
                    )
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "estimate"}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/estimate_probe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(os.path.join(args.out, "estimate_probe.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
