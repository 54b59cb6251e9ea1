"""`deltatune serve` under load: requests/s and latency percentiles at 1/8/32/64 concurrent clients, static vs
continuous batching in the same run, and the decoding step time with 4 vs 500 adapters loaded (CPU).

Model: a tiny Llama built from a config (2 layers, hidden 64, random weights, a 512-word tokenizer, no end-of-text
token, so every request writes exactly its `max_tokens`), with LoRA adapters (r=8 on q/k/v/o, random weights). Tiny
on purpose: on a CPU a larger model is compute-bound per row, so how rows are batched hardly matters; a tiny one,
like a model on a GPU, costs about the same per step whatever the batch (the case batching policies are about).
Each server runs as its own `deltatune serve` process (`--threads 1`); the clients are closed loops in this
process (each sends its next request when the previous one is answered) over HTTP with `/v1/completions`:
prompts of 4-32 words, `max_tokens` 8-16 for 80% of requests and 64-96 for the rest (mixed lengths are where static
batches wait for their longest row), adapters a0-a3 in turn, greedy. Each point runs `--seconds` after a warm-up;
static and continuous alternate point by point, so load from other processes hits both alike.

Step time: one decoding step of a batch of 8 sequences over 4 adapters (model level, no HTTP), on an engine with
the 4 adapters loaded and on one with 500 loaded (the same 4 in the batch, plus a batch over 8 of the 500), median of
interleaved rounds; also the time to attach the 1st and the 500th adapter on the model thread.

Usage: python bench/serve_load.py [--seconds 20] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.apps.serve.batching import Engine  # noqa: E402
from deltatune.apps.serve.generation import SamplingParams, Sequence  # noqa: E402

WORDS = [f"w{i}" for i in range(512)]
ADAPTERS = ["a0", "a1", "a2", "a3"]
CONCURRENCY = (1, 8, 32, 64)


def make_model(folder: str) -> None:
    """A 2-layer Llama and a word-level tokenizer, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_adapters(base: str, folder: str, count: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    names = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        name = f"a{i}"
        model.save_pretrained(os.path.join(folder, name))
        names.append(name)
    return names


def loadavg() -> list[float]:
    with open("/proc/loadavg") as fh:
        return [float(x) for x in fh.read().split()[:3]]


# --- HTTP load ---------------------------------------------------------------------------------
def start_server(base: str, adapters: str, batching: str, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deltatune", "serve", "--model", base, "--task", "causal-lm"]
    cmd += [arg for name in ADAPTERS for arg in ("--adapter", f"{name}={os.path.join(adapters, name)}")]
    cmd += ["--port", str(port), "--batching", batching, "--threads", "1", "--max-batch-size", "32"]
    cmd += ["--max-queue", "4096", "--max-new-tokens", "128", "--adapter-root", adapters]
    env = {**os.environ, "DELTATUNE_ADMIN_TOKEN": ""}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not start")


def request_body(rng: random.Random, i: int) -> dict:
    long = rng.random() < 0.2
    return {
        "model": ADAPTERS[i % len(ADAPTERS)],
        "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 32))),
        "max_tokens": rng.randint(64, 96) if long else rng.randint(8, 16),
        "temperature": 0,
    }


async def closed_loop(url: str, clients: int, seconds: float, seed: int) -> dict:
    """`clients` clients each send a request as soon as their previous one is answered, for `seconds`."""
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(1 << 30))
    stop_at = time.perf_counter() + seconds

    async def client(http):
        while time.perf_counter() < stop_at:
            body = request_body(rng, next(counter))
            start = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            if r.status_code == 200 and time.perf_counter() <= stop_at:
                latencies.append(time.perf_counter() - start)
            elif r.status_code != 200:
                key = f"{r.status_code}: {r.text[:200]}"
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = min(time.perf_counter(), stop_at) - started
    if len(latencies) < 2:
        return {"requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / wall}
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
    }


def http_load(base: str, adapters: str, seconds: float) -> dict:
    servers = {"static": 8611, "continuous": 8612}
    log = tempfile.TemporaryFile()
    procs = {mode: start_server(base, adapters, mode, port, log) for mode, port in servers.items()}
    try:
        for mode, port in servers.items():
            wait_ready(f"http://127.0.0.1:{port}", procs[mode])
        results: dict = {mode: {} for mode in servers}
        for clients in CONCURRENCY:
            for mode, port in servers.items():
                url = f"http://127.0.0.1:{port}"
                asyncio.run(closed_loop(url, clients, 3.0, seed=1))  # warm-up
                results[mode][clients] = asyncio.run(closed_loop(url, clients, seconds, seed=clients))
                print(mode, clients, results[mode][clients], flush=True)
        if any(r["errors"] or not r["requests"] for per in results.values() for r in per.values()):
            log.seek(0)
            print("server log (tail):", log.read().decode()[-3000:])
        return results
    except RuntimeError:
        log.seek(0)
        print(log.read().decode()[-3000:])
        raise
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(30)


# --- step time ---------------------------------------------------------------------------------
def engine_with(base: str, adapters: str, names: list[str]) -> tuple[Engine, list[float]]:
    """An engine with these adapters attached; the model-thread attach time of each (file reading excluded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(
        AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), "causal-lm"
    )
    attach = []
    for name in names:
        path = os.path.join(adapters, name)
        read = engine.read_adapter(path)
        start = time.perf_counter()
        engine.install(name, read, path)
        attach.append(time.perf_counter() - start)
    return engine, attach


def running_batch(engine: Engine, names: list[str]) -> None:
    rng = random.Random(0)
    seqs = [
        Sequence([rng.randrange(2, len(WORDS)) for _ in range(16)], name, SamplingParams(max_tokens=10_000))
        for name in names
    ]
    engine.prefill(seqs)


def step_times(base: str, adapters: str, rounds: int) -> dict:
    few, few_attach = engine_with(base, adapters, ADAPTERS)
    all_names = [f"a{i}" for i in range(500)]
    many, many_attach = engine_with(base, adapters, all_names)
    batch4 = [ADAPTERS[i % 4] for i in range(8)]
    batch8 = [all_names[i * 61] for i in range(8)]  # 8 adapters spread over the 500
    cases = {"4 loaded, batch over 4": (few, batch4), "500 loaded, batch over 4": (many, batch4)}
    cases["500 loaded, batch over 8"] = (many, batch8)
    wall: dict[str, list[float]] = {case: [] for case in cases}
    cpu: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(rounds):  # interleaved, so the machine's load hits every case alike
        for case, (engine, names) in cases.items():
            engine.batch.keep([])
            running_batch(engine, names)  # every case steps at the same sequence length
            for _ in range(3):
                start, start_cpu = time.perf_counter(), time.thread_time()
                engine.decode_step()
                wall[case].append(time.perf_counter() - start)
                cpu[case].append(time.thread_time() - start_cpu)
    medians = {case: 1000 * statistics.median(t) for case, t in wall.items()}
    cpu_medians = {case: 1000 * statistics.median(t) for case, t in cpu.items()}
    return {
        "step_ms": medians,
        "step_cpu_ms": cpu_medians,
        "ratio_500_vs_4": medians["500 loaded, batch over 4"] / medians["4 loaded, batch over 4"],
        "cpu_ratio_500_vs_4": cpu_medians["500 loaded, batch over 4"] / cpu_medians["4 loaded, batch over 4"],
        "attach_ms_first": 1000 * many_attach[0],
        "attach_ms_500th": 1000 * many_attach[-1],
        "attach_ms_median": 1000 * statistics.median(many_attach),
    }


def write(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "serve_load.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    http, steps = results["http"], results["steps"]
    lines = [
        "# `deltatune serve` under load: static vs continuous batching, 4 vs 500 adapters (CPU)",
        "",
        f"{results['setup']}",
        "",
        f"Command: `{results['command']}` on {results['date']}; {results['machine']}. Load average (1/5/15 min) "
        f"before {results['loadavg_before']}, after {results['loadavg_after']}: the machine was shared with "
        "other jobs, so absolute numbers are inflated; static and continuous ran alternately under the same load.",
        "",
        "| clients | batching | requests/s | p50 ms | p95 ms | p99 ms | requests | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for clients in CONCURRENCY:
        for mode in ("static", "continuous"):
            r = http[mode][clients]
            ms = [f"{r[k]:.0f}" if k in r else "-" for k in ("p50_ms", "p95_ms", "p99_ms")]
            lines.append(
                f"| {clients} | {mode} | {r['req_per_s']:.1f} | {' | '.join(ms)} | {r['requests']} | "
                f"{sum(r['errors'].values())} |"
            )
    lines += [
        "",
        "Errors: "
        + (
            "; ".join(
                f"{m} {c}: {n} x {e}" for m in http for c in http[m] for e, n in http[m][c]["errors"].items()
            )
            or "none"
        ),
        "",
        "Continuous / static throughput: "
        + ", ".join(
            f"{c} clients {http['continuous'][c]['req_per_s'] / http['static'][c]['req_per_s']:.2f}x"
            for c in CONCURRENCY
        ),
        "",
        "| decoding step, batch of 8 | median ms (wall) | median ms (thread CPU time) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {case} | {ms:.2f} | {steps['step_cpu_ms'][case]:.2f} |" for case, ms in steps["step_ms"].items()
    ]
    lines += [
        "",
        f"500 loaded / 4 loaded: {steps['ratio_500_vs_4']:.2f}x wall, {steps['cpu_ratio_500_vs_4']:.2f}x CPU time "
        "(CPU time is what the step itself costs; wall time adds waiting for a core on a shared machine). Attaching an adapter on the model thread "
        f"(files read beforehand, off that thread): 1st {steps['attach_ms_first']:.1f} ms, 500th "
        f"{steps['attach_ms_500th']:.1f} ms, median {steps['attach_ms_median']:.1f} ms.",
        "",
    ]
    with open(os.path.join(out, "serve_load.md"), "w") as fh:
        fh.write("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="Measured time per (clients, batching) point."
    )
    parser.add_argument("--rounds", type=int, default=30, help="Interleaved rounds of the step-time cases.")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = loadavg()
    with tempfile.TemporaryDirectory() as folder:
        base, adapters = os.path.join(folder, "base"), os.path.join(folder, "adapters")
        make_model(base)
        make_adapters(base, adapters, 500)
        steps = step_times(base, adapters, args.rounds)
        print(steps, flush=True)
        http = http_load(base, adapters, args.seconds)
    results = {
        "setup": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "loadavg_before": before,
        "loadavg_after": loadavg(),
        "http": http,
        "steps": steps,
    }
    write(results, args.out)
    print(open(os.path.join(args.out, "serve_load.md")).read())


if __name__ == "__main__":
    main()
