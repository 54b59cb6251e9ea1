"""LoRA and QLoRA supervised fine-tuning on a GPU: deltatune's Trainer against peft + transformers' Trainer.

Why: the CPU box that builds this project has no GPU, so the numbers users compare tools by (tokens/s and peak GPU
memory at a realistic sequence length) come from this script, run on a lent GPU machine. The model is a random-weight
Llama of about 1.1B parameters (TinyLlama's shape) in bf16, batch 4 x 2048 tokens, every token scored (plain causal-LM
SFT), LoRA r=16 on all linear layers; QLoRA quantizes the same base to NF4 (bitsandbytes) first. Each setting runs in
a fresh process, so its peak memory is its own; the timed steps follow warm-up steps.

    python bench/gpu_sft.py                 # every setting, writes bench/results/gpu_sft.{json,md}
    python bench/gpu_sft.py --one deltatune-lora --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SETTINGS = ("deltatune-lora", "peft-lora", "deltatune-qlora", "peft-qlora")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# TinyLlama-1.1B's shape; --tiny is a seconds-long smoke run of the same code (on the CPU too).
FULL = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32
)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(quantized: bool, shape: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape, num_key_value_heads=4, max_position_embeddings=4096, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    with torch.device(device()):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if quantized:
        import deltatune

        deltatune.quantize(model, "nf4")
    return model


def batches(steps: int, batch: int, length: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(steps)]


def run_deltatune(model, data, steps: int, warmup: int) -> list[float]:
    import deltatune as dt
    from deltatune.train import CausalLMTask, TrainConfig, Trainer

    peft_model = dt.get_peft_model(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    features = [{"input_ids": row.tolist(), "labels": row.tolist()} for x in data for row in x]
    stamps: list[float] = []

    def stamp(_trainer, _record):
        sync()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            output_dir=out,
            max_steps=warmup + steps,
            batch_size=data[0].shape[0],
            lr=1e-4,
            precision="bf16",
            log_every=1,
            save_every=10**9,
            seed=0,
            progress=False,  # the GPU machine has neither rich nor matplotlib
            plot=False,
            tensorboard=False,
        )
        Trainer(
            peft_model,
            CausalLMTask(None, max_length=data[0].shape[1]),
            features,
            None,
            config,
            callbacks=[stamp],
        ).train()
    return stamps[warmup - 1 :]


def run_peft(model, data, steps: int, warmup: int) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    rows = [
        {"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for x in data for row in x
    ]
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=data[0].shape[0],
            max_steps=warmup + steps,
            learning_rate=1e-4,
            bf16=True,
            use_cpu=device() == "cpu",
            logging_steps=10**9,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            seed=0,
        )
        Trainer(model=peft_model, args=args, train_dataset=rows, callbacks=[Stamp()]).train()
    return stamps[warmup - 1 :]


def one(setting: str, steps: int, warmup: int, batch: int, length: int, shape: dict) -> dict:
    import torch

    library, method = setting.split("-")
    model = build_model(method == "qlora", shape)
    data = batches(warmup + steps, batch, length, shape["vocab_size"])
    cuda = torch.cuda.is_available()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    stamps = (run_deltatune if library == "deltatune" else run_peft)(model, data, steps, warmup)
    seconds = stamps[-1] - stamps[0]
    return {
        "setting": setting,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "steps_timed": len(stamps) - 1,
        "batch": batch,
        "seq_len": length,
        "tokens_per_s": (len(stamps) - 1) * batch * length / seconds,
        "step_ms": 1000 * seconds / (len(stamps) - 1),
        "model_gib": resident / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | tokens/s | step ms | model GiB | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed: {r['error'][:80]} | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {r['model_gib']:.2f} | {r['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def write(out: str, rows: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_sft.json"), "w") as fh:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, fh, indent=2)
    with open(os.path.join(out, "gpu_sft.md"), "w") as fh:
        fh.write(markdown(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=SETTINGS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model: checks the script, measures nothing"
    )
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--timeout", type=float, default=90, help="seconds each setting's process may run")
    a = parser.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.steps, a.warmup, a.batch, a.seq_len, TINY if a.tiny else FULL)))
        return
    rows = []
    for setting in a.settings.split(","):
        cmd = [sys.executable, __file__, "--one", setting, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += ["--batch", str(a.batch), "--seq-len", str(a.seq_len)] + (["--tiny"] if a.tiny else [])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"setting": setting, "error": f"timed out after {a.timeout:.0f} s"})
        else:
            if done.returncode == 0:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                sys.stderr.write(done.stderr[-4000:])
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"
                rows.append({"setting": setting, "error": last})
        print(json.dumps(rows[-1]), flush=True)
        write(a.out, rows)  # after each setting: a run cut short keeps what it measured
    print(markdown(rows))


if __name__ == "__main__":
    main()
