"""Padding-free packing (`packing: true`): a packed batch computes the same response-only loss and the same
gradients as the padded batch it replaces, on every attention path (SDPA, eager) and with the fused loss."""

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train import CausalLMTask
from deltatune.train.packing import block_causal_mask, pack


def rows(lengths=(7, 3, 11, 5), prompt=2, seed=0):
    """Token rows of different lengths whose first `prompt` tokens carry no label (the prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 60, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def loss_and_grads(model, task, features):
    model.zero_grad()
    out = task.loss(model, task.collate(features))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, out.tokens


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [True, False])
def test_packed_batch_matches_the_padded_batch(attention, fused):
    model = dt.get_peft_model(
        tiny_llama(attn_implementation=attention), dt.LoraConfig(r=4, target_modules="all-linear")
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    padded, packed = CausalLMTask(None), CausalLMTask(None, packing=True)
    padded.fused_loss = packed.fused_loss = fused
    features = rows()
    loss_a, grads_a, tokens_a = loss_and_grads(model, padded, features)
    loss_b, grads_b, tokens_b = loss_and_grads(model, packed, features)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)
    assert tokens_a == tokens_b == sum(len(f["input_ids"]) for f in features)


def test_packing_with_learned_positions_gpt2():
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    padded, packed = CausalLMTask(None), CausalLMTask(None, packing=True)
    features = rows((6, 9, 4))
    loss_a, grads_a, _ = loss_and_grads(model, padded, features)
    loss_b, grads_b, _ = loss_and_grads(model, packed, features)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_attention_leaking_across_rows_would_show():
    """The check above is not trivial: without the block mask (plain causal attention over the packed row)
    the loss differs."""
    model = tiny_llama()
    features = rows()
    batch = pack(features)
    with torch.no_grad():
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        leaking = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            use_cache=False,
        )
    masked = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=block_causal_mask(batch["position_ids"]),
    )
    torch.testing.assert_close(masked.logits, isolated.logits)
    assert not torch.allclose(leaking.logits, isolated.logits, atol=1e-3)


def test_pack_layout():
    batch = pack([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 would be the target of row 1's last token
    mask = block_causal_mask(batch["position_ids"])[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_soft_prompts_are_refused():
    model = dt.get_peft_model(
        tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    )
    task = CausalLMTask(None, packing=True)
    with pytest.raises(ConfigError, match="virtual tokens"):
        task.loss(model, task.collate(rows()))


def test_recipe_key_packing_trains_the_same_losses(tmp_path):
    """`packing: true` in a recipe reaches the causal-LM task: the same steps give the same losses."""
    import json

    from helpers import tiny_llama_folder

    from deltatune.train.recipe import load_recipe, train_from_recipe

    tiny_llama_folder(str(tmp_path / "llama"))
    rows = [
        {"instruction": "say", "input": w, "output": f"{w} film"} for w in ("good", "bad", "very fun", "sad")
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 2))
    (tmp_path / "dev.jsonl").write_text(
        json.dumps({"instruction": "say", "input": "fine", "output": "fine film"})
    )
    base = {
        "model": str(tmp_path / "llama"),
        "task": "causal-lm",
        "train_file": str(tmp_path / "train.jsonl"),
        "eval_file": str(tmp_path / "dev.jsonl"),
        "generate_samples": 0,
        "max_steps": 2,
        "batch_size": 4,
        "lr": 1e-2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "clean": {"drop_duplicates": False},
    }
    losses = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train_from_recipe(load_recipe(None, {**base, "packing": packing, "output_dir": str(out)}))
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        losses[packing] = [r["loss"] for r in log if "loss" in r] + [
            r["eval_loss"] for r in log if "eval_loss" in r
        ]
        losses[packing].append(json.load(open(out / "metrics.json"))["eval_loss"])  # evaluation packs too
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert len([r for r in log if "loss" in r]) == 2 and len(losses[True]) >= 3


def test_recipes_refuse_packing_where_it_cannot_apply():
    from deltatune.train.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="packing applies to task: causal-lm"):
        load_recipe(None, {"model": "m", "task": "seq-cls", "packing": True})
    with pytest.raises(RecipeError, match="virtual tokens"):
        load_recipe(None, {"model": "m", "task": "causal-lm", "method": "prompt_tuning", "packing": True})
