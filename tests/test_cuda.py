"""The GPU path: bf16 autocast, bitsandbytes NF4 QLoRA and paged AdamW on CUDA. Skipped without a GPU (CI has
none); run on a GPU machine with `pytest -m cuda tests/test_cuda.py`."""

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
