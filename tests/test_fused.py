"""The speed levers give the same numbers as the plain path: the fused LoRA op and the response-only chunked loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from torch import nn

import deltatune
from deltatune.methods.lora.fused import can_fuse, lora_linear
from deltatune.train.losses import causal_lm_loss, fused_loss_parts
from deltatune.train.tasks import CausalLMTask


def test_fused_op_gradients_match_finite_differences():
    torch.manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, b, a, bb = t(2, 3, 6), t(5, 6), t(5), t(2, 6), t(5, 2)
    assert torch.autograd.gradcheck(lambda *args: lora_linear(*args, 0.7), (x, w, b, a, bb))
    assert torch.autograd.gradcheck(lambda x, w, a, bb: lora_linear(x, w, None, a, bb, 1.5), (x, w, a, bb))


def _mlp_with_lora(**lora):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).double()
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(r=4, target_modules=["0", "2"], **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _outputs_and_grads(model, x):
    out = model(x)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


def test_fused_path_is_taken_and_equals_the_general_path(monkeypatch):
    model = _mlp_with_lora()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert "LoraLinearFunction" in type(model(x).grad_fn).__name__  # the last layer is a LoRA Linear
    fused_out, fused_grads = _outputs_and_grads(model, x)
    monkeypatch.setattr("deltatune.methods.lora.layers.can_fuse", lambda layer, x, running: False)
    plain_out, plain_grads = _outputs_and_grads(model, x)
    torch.testing.assert_close(fused_out, plain_out, rtol=0, atol=1e-12)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) == 4
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=0, atol=1e-12)
    with torch.no_grad():  # inference takes the graph-free branch of the same op
        monkeypatch.undo()
        torch.testing.assert_close(model(x), plain_out, rtol=0, atol=1e-12)


def test_fused_path_steps_aside_when_it_does_not_apply():
    layer = _mlp_with_lora(lora_dropout=0.1).get_base_model()[0]
    x = torch.randn(2, 8, dtype=torch.float64)
    assert not can_fuse(layer, x, layer.running_adapters())  # dropout at work while training
    layer.eval()
    assert can_fuse(layer, x, layer.running_adapters())
    assert not can_fuse(layer, x.float(), layer.running_adapters())  # dtypes differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_fuse(layer, x, layer.running_adapters())
    dora = _mlp_with_lora(use_dora=True).get_base_model()[0]
    assert not can_fuse(dora, x, dora.running_adapters())


# --- the response-only chunked causal-LM loss ------------------------------------------------------------
def _tiny_llama(**lora):
    """A tied-head Llama with non-zero LoRA factors (so the gradients reach every factor)."""
    base = tiny_llama(vocab_size=97, tie_word_embeddings=True).train().double()
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(r=4, target_modules="all-linear", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _instruction_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt is not scored
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_chunked_loss_equals_cross_entropy_value_and_gradient(chunk_size):
    model, batch = _tiny_llama(), _instruction_batch()
    fused = causal_lm_loss(model, batch, chunk_size=chunk_size)
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = _reference_loss(model, batch)
    reference.backward()
    torch.testing.assert_close(fused.detach(), reference.detach(), rtol=0, atol=1e-12)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fused_grads[name], p.grad, rtol=0, atol=1e-10)


def test_chunked_loss_under_bf16_autocast_is_close():
    model, batch = _tiny_llama(), _instruction_batch()
    model.float()
    reference = float(_reference_loss(model, batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = causal_lm_loss(model, batch)
        fused.backward()
    assert float(fused) == pytest.approx(reference, rel=2e-2)


def test_chunked_loss_declines_models_it_cannot_serve():
    assert fused_loss_parts(_tiny_llama()) is not None
    assert fused_loss_parts(_tiny_llama(modules_to_save=["lm_head"])) is None  # trainable head
    soft_prompt = deltatune.get_peft_model(
        tiny_llama(vocab_size=97), deltatune.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    assert causal_lm_loss(soft_prompt, _instruction_batch()) is None  # virtual tokens: the usual path


def test_causal_lm_task_loss_is_the_same_with_and_without_the_lever():
    model, batch = _tiny_llama(), _instruction_batch()
    task = CausalLMTask(tokenizer=None)
    fast = task.loss(model, batch)
    assert fast.logits is None
    task.fused_loss = False
    slow = task.loss(model, batch)
    assert slow.logits is not None and fast.tokens == slow.tokens == int(batch["attention_mask"].sum())
    assert float(fast.loss) == pytest.approx(float(slow.loss), abs=1e-6)  # the plain path scores in float32
