"""The GPU path: bf16 autocast, bitsandbytes NF4 QLoRA, paged AdamW, strategy: fsdp (one-process NCCL group; two
processes when there are two GPUs), packing with SDPA, accelerate's FSDP2 plugin. Skipped without a GPU (CI has
none); `bash bench/gpu_check.sh` runs them on a GPU machine (or `pytest -m cuda tests/test_cuda.py`)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ids, tiny_llama

import deltatune as dt
from deltatune.train.schedules import make_optimizer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(model, optimizer_name="adamw", steps=8, autocast=None):
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_name, lr=1e-2)
    x = ids(batch=4, length=16).cuda()
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=autocast) if autocast else torch.autocast("cuda", enabled=False):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_lora_matches_fp32_and_learns():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama().cuda(), dt.LoraConfig(r=4, target_modules="all-linear"))
    x = ids(batch=2, length=9).cuda()
    with torch.no_grad():
        full = model(input_ids=x).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(input_ids=x).logits
    torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)
    losses = _train(model, autocast=torch.bfloat16)
    assert losses[-1] < losses[0]


def test_nf4_qlora_trains_on_cuda_and_merges_to_the_same_outputs():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = dt.quantize(tiny_llama(hidden_size=64, intermediate_size=128).cuda(), "nf4")
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    losses = _train(model)
    assert losses[-1] < losses[0]
    x = ids(batch=2, length=9).cuda()
    with torch.no_grad():
        before = model(input_ids=x).logits
        merged = model.merge_and_unload()  # dequantizes the merged layers to float (deltatune/quant.py)
        after = merged(input_ids=x).logits
    torch.testing.assert_close(after, before, atol=2e-2, rtol=2e-2)


def test_paged_adamw_trains_lora():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama().cuda(), dt.LoraConfig(r=4, target_modules="all-linear"))
    losses = _train(model, optimizer_name="paged_adamw")
    assert losses[-1] < losses[0]


# --- sharding (FSDP2) and packing on the GPU ----------------------------------------------------------------
def _token_rows(n=8, length=24, prompt=4):
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(4, 64, (n, length), generator=g).tolist()
    return [{"input_ids": r, "labels": [-100] * prompt + r[prompt:]} for r in rows]


def _fit(out, steps=6, batch_size=4, **options):
    """LoRA on a tiny Llama trained by deltatune's Trainer; returns (model, losses, dtypes a LoRA layer computed in).
    strategy: fsdp here runs as a one-process group (world size 1): the same sharding code, policies and offload."""
    from deltatune.train import CausalLMTask, TrainConfig, Trainer

    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    seen = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    lora_a.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    config = TrainConfig(
        output_dir=str(out),
        max_steps=steps,
        batch_size=batch_size,
        lr=1e-2,
        progress=False,
        tensorboard=False,
        plot=False,
        **options,
    )
    rows = _token_rows()
    Trainer(model, CausalLMTask(None, generate_samples=0), rows, rows[:4], config).train()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    return model, [r["loss"] for r in log if "loss" in r], set(seen)


def test_fsdp_bf16_mixed_precision_and_gradient_checkpointing(tmp_path):
    """Parameters gathered and computed in bf16 (fp32 shards, fp32 gradient reduction) track bf16 autocast on an
    unsharded model, and the adapter is saved whole in float32."""
    from safetensors.torch import load_file

    _, reference, _ = _fit(tmp_path / "autocast", precision="bf16")
    _, sharded, dtypes = _fit(
        tmp_path / "fsdp", precision="bf16", strategy="fsdp", gradient_checkpointing=True
    )
    assert torch.bfloat16 in dtypes
    assert sharded == pytest.approx(reference, rel=3e-2) and sharded[-1] < sharded[0]
    saved = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert len(saved) == 28 and all(t.dtype == torch.float32 for t in saved.values())
    assert saved.keys() == load_file(tmp_path / "autocast" / "adapter_model.safetensors").keys()


def test_fsdp_cpu_offload_trains_like_the_gpu_shards(tmp_path):
    from torch.distributed.tensor import DTensor

    _, on_gpu, _ = _fit(tmp_path / "gpu", strategy="fsdp")
    model, offloaded, _ = _fit(tmp_path / "offload", strategy="fsdp", cpu_offload=True)
    shard = next(p for p in model.parameters() if isinstance(p, DTensor))
    assert shard.to_local().device.type == "cpu"
    assert offloaded == pytest.approx(on_gpu, rel=1e-4)


def test_fsdp_qlora_on_cuda(tmp_path):
    """4-bit weights stay whole on each process (not sharded); the adapter and the rest are sharded."""
    pytest.importorskip("bitsandbytes")
    from deltatune.train import CausalLMTask, TrainConfig, Trainer

    torch.manual_seed(0)
    base = dt.quantize(tiny_llama(hidden_size=64, intermediate_size=128).cuda(), "nf4")
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    config = TrainConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        batch_size=4,
        lr=1e-2,
        strategy="fsdp",
        progress=False,
        tensorboard=False,
        plot=False,
    )
    summary = Trainer(model, CausalLMTask(None), _token_rows(), None, config).train()
    assert summary["steps"] == 6 and (tmp_path / "adapter_model.safetensors").exists()


TWO_GPU_SCRIPT = """
import sys
from pathlib import Path
from test_cuda import _fit
_fit(Path(sys.argv[1]), batch_size=2, strategy="fsdp")
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL puts one process on each)")
def test_fsdp_on_two_gpus_over_nccl_matches_one_gpu(tmp_path):
    """torchrun, 2 processes on 2 GPUs (NCCL), batch 2 each: the losses and the adapter of one GPU with batch 4."""
    from safetensors.torch import load_file

    _, one, _ = _fit(tmp_path / "one", batch_size=4, strategy="fsdp")
    (tmp_path / "two.py").write_text(TWO_GPU_SCRIPT)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, tmp_path / "two.py", tmp_path / "two"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = [r["loss"] for r in map(json.loads, open(tmp_path / "two" / "log.jsonl")) if "loss" in r]
    assert two == pytest.approx(one, rel=1e-4)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_with_sdpa_on_cuda(dtype):
    """A packed batch (block mask through SDPA on the GPU) computes the padded batch's loss and gradients."""
    from deltatune.train import CausalLMTask

    torch.manual_seed(0)
    model = dt.get_peft_model(
        tiny_llama(attn_implementation="sdpa").cuda(), dt.LoraConfig(r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    features = []
    for n in (7, 19, 3, 12):
        row = torch.randint(1, 60, (n,), generator=g).tolist()
        features.append({"input_ids": row, "labels": [-100, -100] + row[2:]})
    results = []
    for packing in (False, True):
        task = CausalLMTask(None, packing=packing)
        model.zero_grad()
        batch = {k: v.cuda() for k, v in task.collate(features).items()}
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = task.loss(model, batch).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
    (padded, grads_a), (packed, grads_b) = results
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(packed, padded, **tol)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **tol)


ACCELERATE_SCRIPT = """
import sys
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
import deltatune as dt

folder, out = sys.argv[1:3]
g = torch.Generator().manual_seed(1)
ids = torch.randint(4, 30, (16, 12), generator=g).tolist()
rows = [{"input_ids": r, "labels": r, "attention_mask": [1] * len(r)} for r in ids]
torch.manual_seed(0)
config = dt.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config)
args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], save_strategy="no", logging_steps=1, seed=0, bf16=True)
trainer = Trainer(model=model, args=args, train_dataset=rows)
assert trainer.is_fsdp_enabled, "accelerate did not turn FSDP on"
trainer.train()
trainer.save_model(out)
"""


def test_accelerate_fsdp2_with_transformers_trainer_saves_a_whole_peft_adapter(tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` driving transformers' Trainer on a deltatune model (FSDP in
    accelerate needs an accelerator device, so this runs here, not on the CPU): the saved adapter holds whole
    tensors, and peft loads it with deltatune's logits."""
    from helpers import tiny_llama_folder
    from peft import PeftModel as PeftPeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tiny_llama_folder(str(tmp_path / "llama"))
    (tmp_path / "train.py").write_text(ACCELERATE_SCRIPT)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2"]
    launch += ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap"]
    launch += ["LlamaDecoderLayer", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    done = subprocess.run(
        [*launch, tmp_path / "train.py", tmp_path / "llama", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    fresh = dt.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "llama"),
        dt.LoraConfig(r=4, target_modules="all-linear"),
    )
    expected = fresh.saved_entries("default")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert all(
        float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k
    )  # trained, not the zero init
    x = ids(batch=2, length=9) % 30
    with torch.no_grad():
        ours = dt.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), tmp_path / "out"
        )
        theirs = PeftPeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "llama"), tmp_path / "out"
        )
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-5, atol=1e-5)
