"""Memory and speed of LoRA vs QLoRA on SmolLM2-135M-Instruct (CPU).

Measures, in one run:
1. base-weight memory in fp32 / bf16 / int8 / NF4: bytes of every parameter plus the quantization constants
   bitsandbytes keeps beside them (NF4: absmax, double-quantized absmax and its code; int8: row scales). Counted from
   the tensors, so the numbers are exact for the weights and exclude activations and allocator overhead.
2. per training step (AdamW, batch 4 x 64 tokens, LoRA r=16 on all linear layers): the step time (median of timed
   steps after a warm-up) and the peak resident memory of the step, each configuration in its own fresh process;
   then LoRA (fp32) and QLoRA (NF4) at longer sequences (`--seqs`, default 128 and 512) with training tokens/s.
   The loss is the trainer's (deltatune.train.losses: chunked, no full logits tensor), every token scored.
   Peak = highest RSS seen by a thread sampling /proc/self/statm every 1 ms during the timed steps, minus the RSS
   just before them (so it is the step's working memory: activations, gradients, optimizer state, dequantized
   weight copies). The process's RSS after setup (model + adapter, after gc and malloc_trim) is reported too.
   tracemalloc is not used: it sees only Python's allocator, not torch's tensor memory.

The child processes start with OMP_WAIT_POLICY=PASSIVE: bitsandbytes' CPU kernels (system libgomp) and torch (its own
libgomp) otherwise spin against each other and a 4-bit step slows down several-fold (see deltatune/quant.py).

Usage: python bench/quant_memory.py [--steps 5] [--seqs 128 512] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

MODEL = "smollm2-135m-instruct"
CONFIGS = ("lora_fp32", "lora_bf16", "qlora_nf4", "lora_int8")
BATCH, SEQ, RANK = 4, 64, 16


# --- exact weight bytes ------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_bytes(state) -> int:
    total = _tensor_bytes(state.absmax) + _tensor_bytes(getattr(state, "code", None))
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _tensor_bytes(nested.absmax) + _tensor_bytes(getattr(nested, "code", None))
    return total


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of all parameters (tied ones once) plus bitsandbytes' constants; and the part in linear layers."""
    from deltatune.quant import is_quantized

    seen: set[int] = set()
    total = linear = 0
    for module in model.modules():
        own = 0
        for p in module.parameters(recurse=False):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            own += _tensor_bytes(p)
        if is_quantized(module):
            if type(module.weight).__name__ == "Params4bit":
                own += _quant_state_bytes(module.weight.quant_state)
            else:
                scb = (
                    module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
                )
                own += _tensor_bytes(scb)
        total += own
        if isinstance(module, torch.nn.Linear) and module is not getattr(model, "lm_head", None):
            linear += own
    return {"total_bytes": total, "linear_layers_bytes": linear}


def measure_weights() -> dict[str, dict[str, int]]:
    from deltatune import quantize
    from deltatune.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(MODEL)
    out = {"fp32": weight_bytes(base), "bf16": weight_bytes(copy.deepcopy(base).to(torch.bfloat16))}
    out["int8"] = weight_bytes(quantize(copy.deepcopy(base), "int8"))
    out["nf4"] = weight_bytes(quantize(copy.deepcopy(base), "nf4", double_quant=True))
    out["nf4_no_double_quant"] = weight_bytes(quantize(copy.deepcopy(base), "nf4", double_quant=False))
    return out


# --- one training configuration, in a child process ---------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Highest RSS seen while active, sampled every `interval` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_config(name: str, steps: int, seq: int = SEQ) -> dict:
    import deltatune
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.losses import causal_lm_loss

    model, tok = load_model_and_tokenizer(MODEL)
    if name == "lora_bf16":
        model = model.to(torch.bfloat16)
    elif name == "qlora_nf4":
        deltatune.quantize(model, "nf4", compute_dtype=torch.float32, double_quant=True)
        deltatune.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif name == "lora_int8":
        deltatune.quantize(model, "int8")
        deltatune.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = deltatune.get_peft_model(
        model,
        deltatune.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    text = "The film is a charming, funny and moving portrait of a family. " * (seq // 4)
    ids = tok([text] * BATCH, return_tensors="pt", truncation=True, max_length=seq).input_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()

    def step() -> float:
        loss = causal_lm_loss(peft_model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()  # warm-up: allocates optimizer state, first-call costs
    trim()
    before = rss()
    times = []
    with PeakSampler() as sampler:
        for _ in range(steps):
            t0 = time.perf_counter()
            last_loss = step()
            times.append(time.perf_counter() - t0)
    return {
        "config": name,
        "seq": seq,
        "tokens_per_s": BATCH * seq / statistics.median(times),
        "trainable_params": trainable,
        "rss_after_setup_mb": before / 2**20,
        "step_peak_rss_delta_mb": (sampler.peak - before) / 2**20,
        "step_time_s_median": statistics.median(times),
        "step_times_s": times,
        "loss_first": first_loss,
        "loss_last": last_loss,
        "torch_threads": torch.get_num_threads(),
    }


def run_in_child(name: str, steps: int, seq: int = SEQ) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(steps), "--seq", str(seq)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    mb = 2**20
    w = result["weights"]
    lines = [
        f"# LoRA vs QLoRA on SmolLM2-135M-Instruct ({result['device']})",
        "",
        "## Base-weight memory (exact tensor bytes, incl. quantization constants)",
        "",
        "| format | whole model (MiB) | linear layers (MiB) | linear vs fp32 |",
        "|---|---:|---:|---:|",
    ]
    for fmt, v in w.items():
        ratio = v["linear_layers_bytes"] / w["fp32"]["linear_layers_bytes"]
        lines.append(
            f"| {fmt} | {v['total_bytes'] / mb:.1f} | {v['linear_layers_bytes'] / mb:.1f} | {ratio:.3f} |"
        )
    lines += [
        "",
        "The tied 49152 x 576 embedding/head (28.3M params) stays in float in every format.",
        "",
        f"## Training step (AdamW, batch {BATCH} x {SEQ} tokens, LoRA r={RANK} on all linear layers)",
        "",
        "Each configuration ran in a fresh process. Peak = max RSS sampled every 1 ms during the timed steps minus RSS "
        "before them; RSS after setup = resident size with model + adapter loaded (after gc + malloc_trim).",
        "",
        "| config | step time (s, median) | step peak RSS delta (MiB) | RSS after setup (MiB) | trainable params |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["steps"]:
        lines.append(
            f"| {r['config']} | {r['step_time_s_median']:.3f} | {r['step_peak_rss_delta_mb']:.1f} | "
            f"{r['rss_after_setup_mb']:.1f} | {r['trainable_params']:,} |"
        )
    lines += [
        "",
        f"## Sequence length (AdamW, batch {BATCH}, LoRA r={RANK} on all linear layers, every token scored)",
        "",
        "| config | tokens per step | step time (s, median) | training tokens/s | step peak RSS delta (MiB) "
        "| RSS after setup (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result.get("seq_steps", []):
        lines.append(
            f"| {r['config']} | {BATCH} x {r['seq']} | {r['step_time_s_median']:.3f} | {r['tokens_per_s']:.0f} "
            f"| {r['step_peak_rss_delta_mb']:.1f} | {r['rss_after_setup_mb']:.1f} |"
        )
    lines += [
        "",
        f"torch {torch.__version__}, {result['device']}, OMP_WAIT_POLICY=PASSIVE in the step processes; "
        f"{result.get('date', '')}; `{result.get('command', 'python bench/quant_memory.py')}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--seqs", type=int, nargs="*", default=[128, 512], help="longer sequence lengths")
    parser.add_argument("--seq", type=int, default=SEQ, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_config(args.child, args.steps, args.seq)))
        return
    device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), no GPU"
    result = {
        "model": MODEL,
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/quant_memory.py " + " ".join(sys.argv[1:]),
        "weights": measure_weights(),
    }
    result["steps"] = [run_in_child(name, args.steps) for name in CONFIGS]
    result["seq_steps"] = [
        run_in_child(name, args.steps, seq) for seq in args.seqs for name in ("lora_fp32", "qlora_nf4")
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant_memory.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(args.out, "quant_memory.md"), "w") as fh:
        fh.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
