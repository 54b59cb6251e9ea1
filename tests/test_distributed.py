"""strategy: fsdp on CPU processes (gloo): sharded training computes what one process computes, every method shards,
sharded checkpoints resume after SIGKILL on another number of processes, and the adapter written by rank 0 loads
in real peft with the same logits.

Tolerances: sharded and unsharded runs add the same numbers in a different order (reduce-scatter across processes
instead of one sum), so after a few Adam steps at lr 1e-2 the adapters agree to 1e-5 (absolute; float32, weights
of order 0.1 to 1), while each moved by more than 1e-3 from its initial value. Losses agree to a relative 1e-5.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import tiny_llama, tiny_llama_folder

import deltatune as dt
from deltatune.errors import CheckpointError, ConfigError
from deltatune.train import CausalLMTask, TrainConfig, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": f"{ROOT}:{HERE}"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Every method whose weights live in the module tree, and the soft prompts; `qlora` = LoRA on an NF4 base.
METHODS = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules="all-linear"),
    "dora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "adalora": lambda: dt.AdaLoraConfig(
        init_r=4, target_r=2, total_step=3, tinit=0, tfinal=1, deltaT=1, target_modules=["q_proj", "v_proj"]
    ),
    "ia3": lambda: dt.IA3Config(),
    "prompt_tuning": lambda: dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "p_tuning": lambda: dt.PromptEncoderConfig(
        num_virtual_tokens=4, encoder_hidden_size=8, task_type="CAUSAL_LM"
    ),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "bottleneck": lambda: dt.BottleneckConfig(reduction_factor=4),
    "bitfit": lambda: dt.BitFitConfig(),
    "freeze": lambda: dt.FreezeConfig(),
    "full": lambda: dt.FullConfig(),
    "mam": lambda: dt.MAMConfig(num_virtual_tokens=4),
    "unipelt": lambda: dt.UniPELTConfig(num_virtual_tokens=4, r=2, reduction_factor=4),
    "qlora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora+checkpointing": lambda: dt.LoraConfig(r=4, target_modules="all-linear"),
}
# Trained under fsdp with these options; the one-process reference runs without them (so it shows they change nothing).
FSDP_OPTIONS = {"lora+checkpointing": {"gradient_checkpointing": True}}


def method_model(method):
    torch.manual_seed(0)
    if method == "qlora":
        base = dt.quantize(tiny_llama(hidden_size=64, intermediate_size=128), "nf4")
    else:
        base = tiny_llama(attention_bias=method == "bitfit")
    return dt.get_peft_model(base, METHODS[method]())


def token_rows(n=8, length=10, prompt=3):
    """Rows of equal length, so every process scores as many tokens (its mean loss then weighs like the whole)."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(4, 64, (n, length), generator=g).tolist()
    return [{"input_ids": r, "labels": [-100] * prompt + r[prompt:]} for r in rows]


def train(model, out, batch_size, strategy, steps=3, **extra):
    config = TrainConfig(
        output_dir=str(out),
        max_steps=steps,
        batch_size=batch_size,
        lr=1e-2,
        strategy=strategy,
        progress=False,
        tensorboard=False,
        plot=False,
        **extra,
    )
    return Trainer(model, CausalLMTask(None), token_rows(), None, config).train()


def method_worker(rank, world, store, root, methods):
    """One of two processes: each method trained under fsdp with half the global batch."""
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for method in methods:
        out = os.path.join(root, "fsdp", method)
        summary = train(method_model(method), out, 8 // world, "fsdp", **FSDP_OPTIONS.get(method, {}))
        if rank == 0:
            with open(os.path.join(out, "bytes.json"), "w") as fh:
                json.dump([summary["param_bytes_per_rank"], summary["optimizer_bytes_per_rank"]], fh)
    torch.distributed.destroy_process_group()


def test_every_method_sharded_on_two_processes_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    methods = [m for m in METHODS if m != "qlora" or _has_bitsandbytes()]
    initial, single_bytes, single_optimizer, trainable = {}, {}, {}, {}
    for method in methods:  # the reference: one process, the whole batch of 8, no sharding
        model = method_model(method)
        initial[method] = {k: v.detach().clone() for k, v in model.saved_entries("default").items()}
        trainable[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary = train(model, tmp_path / "one" / method, 8, "ddp")
        single_bytes[method] = summary["param_bytes_per_rank"][0]
        single_optimizer[method] = summary["optimizer_bytes_per_rank"][0]
    os.environ["OMP_WAIT_POLICY"] = (
        "PASSIVE"  # bitsandbytes' CPU threads and torch's otherwise starve each other
    )
    mp.start_processes(
        method_worker,
        args=(2, tempfile.mktemp(dir=tmp_path), str(tmp_path), methods),
        nprocs=2,
        start_method="spawn",
    )
    for method in methods:
        one = load_file(tmp_path / "one" / method / "adapter_model.safetensors")
        two = load_file(tmp_path / "fsdp" / method / "adapter_model.safetensors")
        assert one.keys() == two.keys(), method
        moved = 0.0
        for key in one:
            assert one[key].shape == two[key].shape, (method, key)
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=f"{method} {key}")
            if one[key].shape == initial[method][key].shape and one[key].numel():
                moved = max(moved, float((one[key] - initial[method][key]).abs().max()))
        assert moved > 1e-3, method
        configs = [
            json.load(open(tmp_path / run / method / "adapter_config.json")) for run in ("one", "fsdp")
        ]
        assert configs[0] == configs[1], method  # AdaLoRA's rank pattern too
        per_rank, optimizer_per_rank = json.load(open(tmp_path / "fsdp" / method / "bytes.json"))
        if method != "qlora":  # 4-bit weights stay whole on each process (distributed.py says why)
            assert max(per_rank) <= 0.52 * single_bytes[method], (method, per_rank, single_bytes[method])
        # AdamW state (two float32 moments + a step counter per tensor) for the trainable parameters only, and
        # sharded: each process holds about half of the one-process state
        assert 8 * trainable[method] <= single_optimizer[method] <= 8 * trainable[method] + 4096, method
        assert max(optimizer_per_rank) <= 0.52 * single_optimizer[method] + 2048, (method, optimizer_per_rank)


def _has_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


# --- the command line: torchrun -m deltatune train RECIPE --strategy fsdp -----------------------------------
@pytest.fixture(scope="module")
def llama_recipe(tmp_path_factory):
    """A tiny saved Llama, instruction data of equal-length rows and a recipe."""
    import yaml
    from helpers import POSITIVE

    root = tmp_path_factory.mktemp("fsdp_recipe")
    tiny_llama_folder(str(root / "llama"))
    pairs = [(a, b) for a in POSITIVE for b in POSITIVE if a != b][:32]
    train = [{"instruction": "say", "input": f"{a} {b}", "output": f"{b} {a}"} for a, b in pairs]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    dev = [{"instruction": "say", "input": "bad sad", "output": "sad bad"}]  # not a training row
    (root / "dev.jsonl").write_text(json.dumps(dev[0]))
    recipe = {
        "model": str(root / "llama"),
        "task": "causal-lm",
        "method": "lora",
        "lora": {"r": 4, "target_modules": "all-linear"},
        "train_file": str(root / "train.jsonl"),
        "eval_file": str(root / "dev.jsonl"),
        "max_steps": 4,
        "eval_every": 2,
        "lr": 1e-2,
        "max_new_tokens": 3,
        "generate_samples": 1,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _log(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_fsdp_recipe_matches_one_process_and_loads_in_peft(llama_recipe, tmp_path):
    """The multi-node command of the README on one machine: two torchrun agents ("nodes", one process each)
    meet through a c10d rendezvous and train the recipe with strategy: fsdp, batch 4 each; one process with
    batch 8 and no sharding is the reference."""
    from peft import PeftModel as PeftPeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from deltatune.train.recipe import load_recipe, train_from_recipe

    root = llama_recipe
    one_args = ["--batch_size", "8", "--output_dir", str(tmp_path / "one")]
    train_from_recipe(load_recipe(str(root / "recipe.yaml"), one_args))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    torchrun += [
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        "fsdp-test",
    ]
    command = [*torchrun, "-m", "deltatune", "train", root / "recipe.yaml", "--strategy", "fsdp"]
    command += ["--batch_size", "4", "--output_dir", tmp_path / "two"]
    command += ["--progress", "true"]  # its ETA runs a forward, which under fsdp every process must join
    nodes = [
        subprocess.Popen(
            command,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
            start_new_session=True,  # a node that hangs is killed with its worker
        )
        for _ in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28  # 7 linear layers x 2 blocks x (A, B): whole, not shards
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    losses = [[r.get("loss", r.get("eval_loss")) for r in _log(tmp_path / run)] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and len(losses[0]) == 6  # 4 steps + 2 evaluations
    one, two_summary = (json.load(open(tmp_path / run / "train_summary.json")) for run in ("one", "two"))
    assert (two_summary["world_size"], two_summary["strategy"]) == (2, "fsdp")
    assert len(two_summary["param_bytes_per_rank"]) == 2
    assert max(two_summary["param_bytes_per_rank"]) <= 0.52 * one["param_bytes_per_rank"][0]

    base = AutoModelForCausalLM.from_pretrained(root / "llama")
    x = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        ours = dt.PeftModel.from_pretrained(base, tmp_path / "two")(input_ids=x).logits
        theirs = PeftPeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(root / "llama"), tmp_path / "two"
        )
        theirs = theirs(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(root / "llama")(input_ids=x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the outputs


# --- SIGKILL under fsdp, resumed on one process ---------------------------------------------------------------
SCRIPT = """
import sys, time
from test_distributed import sigkill_run
sigkill_run(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", float(sys.argv[4]))
"""


def sigkill_run(out, batch_size, resume, delay):
    slow = [lambda trainer, record: time.sleep(delay)]
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    config = TrainConfig(
        output_dir=out,
        max_steps=10,
        batch_size=batch_size,
        lr=1e-2,
        scheduler="cosine",
        warmup_steps=2,
        save_every=2,
        resume=resume,
        strategy="fsdp",
        progress=False,
        tensorboard=False,
        plot=False,
    )
    Trainer(model, CausalLMTask(None), token_rows(), None, config, callbacks=slow).train()


def test_sigkill_under_fsdp_then_resume_on_one_process(tmp_path):
    """Two processes are killed (SIGKILL, the whole process group) mid-run; one process resumes from their
    sharded checkpoint (with batch 8 instead of 2 x 4: the same global batch) and the loss curve continues as an
    uninterrupted run's."""
    torch.manual_seed(0)
    reference = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    train(reference, tmp_path / "ref", 8, "ddp", steps=10, scheduler="cosine", warmup_steps=2)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    victim = subprocess.Popen(
        [*TORCHRUN, script, out, "4", "fresh", "0.4"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the launcher and both workers die at once
    )
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        logged = [r["step"] for r in _log(out)] if (out / "log.jsonl").exists() else []
        if (out / "checkpoint-last.pt").exists() and logged and max(logged) >= 5:
            os.killpg(victim.pid, signal.SIGKILL)
            killed_at = max(logged)
            break
        time.sleep(0.05)
    victim.wait(timeout=30)
    assert killed_at is not None and killed_at < 10, victim.stderr.read().decode()[-3000:]
    assert victim.returncode == -signal.SIGKILL

    resumed = subprocess.run(
        [sys.executable, script, out, "8", "resume", "0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step" in resumed.stderr
    ref = {r["step"]: r["loss"] for r in _log(tmp_path / "ref")}
    res = {r["step"]: r["loss"] for r in _log(out)}
    assert sorted(res) == sorted(ref) == list(range(1, 11))
    assert [res[s] for s in sorted(res)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-5)
    assert os.listdir(out / "checkpoint-shards") == ["step-10"]  # older shards dropped after each commit


# --- refusals ---------------------------------------------------------------------------------------------------
def test_settings_that_cannot_apply_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="strategy must be one of"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ConfigError, match="needs strategy: fsdp"):
        TrainConfig(cpu_offload=True)
    with pytest.raises(ConfigError, match="use adamw, adam or sgd"):
        TrainConfig(strategy="fsdp", optimizer="adamw_8bit")


def test_a_ddp_checkpoint_is_not_resumed_as_fsdp(tmp_path):
    from deltatune.train.trainer import _Position

    trainer = Trainer(
        tiny_llama(), CausalLMTask(None), token_rows(), None, TrainConfig(output_dir=str(tmp_path))
    )
    trainer.config.strategy = "fsdp"
    with pytest.raises(CheckpointError, match="written under strategy: ddp"):
        trainer._load_trained_state({"weights": {}, "optimizer": {}, "position": _Position()})
