"""Scaling out on CPU processes (gloo): what `strategy: fsdp` holds per process, and what packing saves.

Why: the claim of sharding is memory per process, and the claim of data parallelism is that N processes compute
what one computes on the same global batch. This measures both on a real model, SmolLM2-135M-Instruct with LoRA
(r=16 on all linear layers, the instruction recipe's settings and data), with 1, 2 and 4 processes of one thread
each under torchrun and the same global batch:
- parameter and optimizer-state bytes held per process (the trainer's train_summary.json), peak RSS per process
  (ru_maxrss: it includes loading the whole model in every process before sharding) and RSS at the end (after
  sharding, gc and malloc_trim);
- median step time (after the first step), and the loss curve of each run against the one-process run;
- a projection from the measured bytes per parameter per process to 8B and 70B models on 8 GPUs.
It also runs the instruction recipe's batches padded and packed in lockstep (one process) and reports tokens/s.

This box is a shared 2-core machine: 2 and 4 processes of one thread each share 2 cores with other work, so
step times measure contention as much as scaling; the load average is recorded with every run.

    python bench/scaling.py                  # writes bench/results/scaling.{json,md,png}
    python bench/scaling.py --procs 1,2 --steps 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
TRAIN = os.path.join(REPO, "recipes", "data", "dates-train.jsonl")
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deltatune")
MODEL = "smollm2-135m-instruct"


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def model_folder() -> str:
    """SmolLM2 saved once as safetensors (outside the repo), so N processes load it quickly, not from GGUF."""
    folder = os.path.join(CACHE, f"{MODEL}-safetensors")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        from deltatune.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(MODEL, task="causal-lm")
        model.hf_quantizer = None  # the GGUF weights are already dequantized to float32: save them as such
        del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def features(tokenizer, max_length: int, n: int):
    from deltatune.train import CausalLMTask, load_table

    task = CausalLMTask(tokenizer, max_length=max_length)
    table = load_table(TRAIN, "train")
    return task.prepare(table.select(range(min(n, len(table)))), TRAIN)


def rss_now() -> int:
    from ctypes import CDLL

    gc.collect()
    CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- one run (under torchrun, or one process) --------------------------------------------------------------
def worker(a) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.train import CausalLMTask, TrainConfig, Trainer

    torch.set_num_threads(1)
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = features(tokenizer, a.max_length, a.rows)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model = dt.get_peft_model(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    stamps: list[float] = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = TrainConfig(
        output_dir=a.out,
        max_steps=a.steps,
        batch_size=a.global_batch // world,
        lr=2e-3,  # the instruction recipe's
        warmup_steps=2,
        strategy="fsdp",
        num_threads=1,
        progress=False,
        tensorboard=False,
        plot=False,
        keep_checkpoint=False,
        save_every=10**9,
        seed=0,
    )
    task = CausalLMTask(tokenizer, max_length=a.max_length)
    trainer = Trainer(
        model, task, rows, None, config, callbacks=[lambda t, r: stamps.append(time.perf_counter())]
    )
    start = time.perf_counter()
    summary = trainer.train()
    mine = rss_now()
    ends = [mine] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(ends, mine)
    if trainer.is_main:
        steps = [b - a_ for a_, b in zip([start] + stamps, stamps)]
        log = [json.loads(line) for line in open(os.path.join(a.out, "log.jsonl"))]
        result = {
            "procs": world,
            "global_batch": a.global_batch,
            "steps": a.steps,
            "step_s": steps,
            "median_step_s": statistics.median(steps[1:]) if len(steps) > 1 else steps[0],
            "losses": [r["loss"] for r in log if "loss" in r],
            "tokens_per_s": [r["tokens_per_s"] for r in log if "tokens_per_s" in r],
            "param_bytes_per_rank": summary["param_bytes_per_rank"],
            "optimizer_bytes_per_rank": summary["optimizer_bytes_per_rank"],
            "peak_rss_mib_per_rank": summary["peak_memory_mb_per_rank"],
            "end_rss_mib_per_rank": [b / 2**20 for b in ends],
            "params": summary["total_params"],
            "trainable_params": summary["trainable_params"],
            "peak_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        with open(os.path.join(a.out, "result.json"), "w") as fh:
            json.dump(result, fh)


def launch(procs: int, steps: int, global_batch: int, max_length: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [__file__, "--worker", "--out", out, "--steps", str(steps), "--global-batch", str(global_batch)]
        cmd += ["--max-length", str(max_length)]
        if procs > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(procs),
            ] + cmd
        else:
            cmd = [sys.executable] + cmd
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
        before = loadavg()
        started = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(os.path.join(out, "result.json")) as fh:
            result = json.load(fh)
    result.update(loadavg_before=before, loadavg_after=loadavg(), wall_s=time.time() - started)
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_s", "tokens_per_s")}), flush=True)
    return result


# --- packing, lockstep -------------------------------------------------------------------------------------
def packing_lockstep(steps: int, global_batch: int, max_length: int) -> dict:
    """Padded and packed forward + backward on the same batches, alternating (and swapping the order each
    step) in one process, so load on the machine hits both alike; the instruction recipe's batches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deltatune as dt
    from deltatune.train import CausalLMTask
    from deltatune.train.data import epoch_batches

    torch.set_num_threads(1)
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = features(tokenizer, max_length, steps * global_batch)
    torch.manual_seed(0)
    model = dt.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        dt.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    tasks = {
        "padded": CausalLMTask(tokenizer, max_length),
        "packed": CausalLMTask(tokenizer, max_length, packing=True),
    }
    lengths = [len(r["input_ids"]) for r in rows]
    batches = epoch_batches(lengths, global_batch, seed=0, epoch=0)[:steps]
    seconds: dict[str, list[float]] = {name: [] for name in tasks}
    losses: dict[str, list[float]] = {name: [] for name in tasks}
    before = loadavg()
    for i, batch in enumerate(batches):
        for name in sorted(tasks, reverse=i % 2 == 1):
            start = time.perf_counter()
            loss = tasks[name].loss(model, tasks[name].collate([rows[j] for j in batch])).loss
            loss.backward()
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
            model.zero_grad(set_to_none=True)
    real = sum(lengths[j] for b in batches for j in b)
    padded = sum(len(b) * max(lengths[j] for j in b) for b in batches)
    result = {
        "steps": len(batches),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 1 - real / padded,
        "max_loss_diff": max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"])),
        "loadavg_before": before,
        "loadavg_after": loadavg(),
    }
    for name in tasks:
        result[name] = {
            "median_s": statistics.median(seconds[name]),
            "tokens_per_s": real / sum(seconds[name]),
        }
    print(json.dumps(result), flush=True)
    return result


# --- the projection ------------------------------------------------------------------------------------------
# Shapes of the models projected to (Llama-3 8B and 70B): hidden, intermediate, layers, kv heads x head dim, vocab.
LLAMAS = {"8B": (4096, 14336, 32, 1024, 128256), "70B": (8192, 28672, 80, 1024, 128256)}


def llama_counts(hidden: int, inter: int, layers: int, kv: int, vocab: int, r: int = 16) -> dict[str, int]:
    """Parameters of a Llama: the blocks' linear weights (what QLoRA quantizes), everything else (embeddings,
    head, norms), one block, and LoRA r on every linear layer of the blocks."""
    linear = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, inter)] * 2
    linear += [(inter, hidden)]
    per_block = sum(i * o for i, o in linear)
    return {
        "linear": layers * per_block,
        "other": 2 * vocab * hidden + (2 * layers + 1) * hidden,
        "block": per_block + 2 * hidden,
        "lora": layers * sum(r * (i + o) for i, o in linear),
    }


def projection(rows: list[dict]) -> list[dict]:
    """GiB per GPU for the weights and the LoRA optimizer state on 8 GPUs, scaled by the measured sharding
    efficiency (bytes held per process x processes / the whole model's bytes; 1.0 is a perfect 1/N)."""
    one = next(r for r in rows if r["procs"] == 1)
    widest = max(rows, key=lambda r: r["procs"])
    efficiency = max(widest["param_bytes_per_rank"]) * widest["procs"] / (4 * one["params"])
    nf4 = 0.5 + 4 / 64  # 4-bit codes + a float32 scale per block of 64 (double quantization makes it smaller)
    out = []
    for name, shape in LLAMAS.items():
        n = llama_counts(*shape)
        adapter = 12 * n["lora"]  # float32 weights + AdamW's two float32 moments
        lora_gpu = (2 * (n["linear"] + n["other"]) + adapter) * efficiency / 8 + 2 * 2 * n["block"]
        qlora_gpu = (
            nf4 * n["linear"] + (2 * n["other"] + adapter) * efficiency / 8
        )  # 4-bit weights stay whole
        for method, per_gpu, whole in (
            ("LoRA, bf16 base", lora_gpu, 2 * (n["linear"] + n["other"]) + adapter),
            ("QLoRA, NF4 base", qlora_gpu, nf4 * n["linear"] + 2 * n["other"] + adapter),
        ):
            out.append(
                {
                    "model": name,
                    "method": method,
                    "base_params_b": (n["linear"] + n["other"]) / 1e9,
                    "lora_params_m": n["lora"] / 1e6,
                    "weights_per_gpu_gib": per_gpu / 2**30,
                    "one_gpu_gib": whole / 2**30,
                }
            )
    return out


# --- tables ---------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    rows = report["runs"]
    one = next(r for r in rows if r["procs"] == 1)
    lines = [
        "# Scaling out on CPU processes (gloo): SmolLM2-135M-Instruct, LoRA r=16 on all linear layers",
        "",
        f"{report['date']}; {report['platform']}, torch {report['torch']}; `{report['command']}`.",
        f"Global batch {report['global_batch']} rows of the instruction recipe's data (max_length "
        f"{report['max_length']}), {report['steps']} steps, strategy fsdp, 1 torch thread per process.",
        "Measured on a shared 2-core machine (up to 8 sessions at once): step times are inflated by contention "
        "and 2 or 4 processes share 2 cores; read the bytes, not the times.",
        "",
        "| processes | param MiB / process | optimizer MiB / process | peak RSS MiB / process | RSS at end MiB "
        "| median step s | max loss diff vs 1 process | load avg (before -> after) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        diff = max(abs(a - b) for a, b in zip(r["losses"], one["losses"]))
        lines.append(
            f"| {r['procs']} | {max(r['param_bytes_per_rank']) / 2**20:.1f} "
            f"| {max(r['optimizer_bytes_per_rank']) / 2**20:.2f} | {max(r['peak_rss_mib_per_rank']):.0f} "
            f"| {max(r['end_rss_mib_per_rank']):.0f} | {r['median_step_s']:.2f} | {diff:.1e} "
            f"| {r['loadavg_before']} -> {r['loadavg_after']} |"
        )
    lines += [
        "",
        "Loss per step (same global batch):",
        "",
        "| step | " + " | ".join(f"{r['procs']} proc" for r in rows) + " |",
    ]
    lines.append("|---:|" + "---:|" * len(rows))
    for i in range(len(one["losses"])):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.5f}" for r in rows) + " |")
    packing = report.get("packing")
    if packing:
        lines += [
            "",
            f"Packing (`packing: true`), one process, forward + backward of the same {packing['steps']} batches of "
            f"{report['global_batch']} rows, padded and packed alternating step by step (order swapped each step); "
            f"padding is {100 * packing['padding_share']:.0f}% of the padded batches' tokens; tokens/s counts real "
            f"tokens; largest loss difference padded vs packed {packing['max_loss_diff']:.1e}; load avg "
            f"{packing['loadavg_before']} -> {packing['loadavg_after']}.",
            "",
            "| batches | tokens/s | median step s |",
            "|---|---:|---:|",
        ]
        for name in ("padded", "packed"):
            lines.append(
                f"| {name} | {packing[name]['tokens_per_s']:.0f} | {packing[name]['median_s']:.2f} |"
            )
    lines += [
        "",
        "Projection (not measured): weights + LoRA r=16 (all linear layers) with its AdamW state per GPU on 8 GPUs, "
        f"scaled by the measured sharding efficiency (bytes held per process x processes / whole model = "
        f"{report['efficiency']:.3f} at {max(r['procs'] for r in rows)} processes; 1 is a perfect 1/N), plus two "
        "gathered bf16 blocks for LoRA (the one computing and the one prefetched). QLoRA keeps the 4-bit weights "
        "whole on every GPU (distributed.py) and shards the rest. Activations come on top (sequence 2048, batch 1 "
        "per GPU with gradient checkpointing: a few GiB).",
        "",
        "| model | method | base params | LoRA params | GiB per GPU (FSDP, 8 GPUs) | GiB on one GPU (no sharding) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for p in report["projection"]:
        lines.append(
            f"| {p['model']} | {p['method']} | {p['base_params_b']:.1f} B | {p['lora_params_m']:.0f} M "
            f"| {p['weights_per_gpu_gib']:.1f} | {p['one_gpu_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in report["runs"]:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=f"{r['procs']} process(es)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("SmolLM2-135M LoRA, fsdp, same global batch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--packing-steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=400)
    a = parser.parse_args()
    if a.worker:
        worker(a)
        return
    import torch

    model_folder()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "platform": f"{platform.platform()}, CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": "python bench/scaling.py " + " ".join(sys.argv[1:]),
        "global_batch": a.global_batch,
        "max_length": a.max_length,
        "steps": a.steps,
        "runs": [launch(int(n), a.steps, a.global_batch, a.max_length) for n in a.procs.split(",")],
    }
    if a.packing_steps:
        report["packing"] = packing_lockstep(a.packing_steps, a.global_batch, a.max_length)
    widest = max(report["runs"], key=lambda r: r["procs"])
    one = next(r for r in report["runs"] if r["procs"] == 1)
    report["efficiency"] = max(widest["param_bytes_per_rank"]) * widest["procs"] / (4 * one["params"])
    report["projection"] = projection(report["runs"])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scaling.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(a.out, "scaling.md"), "w") as fh:
        fh.write(markdown(report))
    plot(report, os.path.join(a.out, "scaling.png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
