"""AdaLoRA: peft-identical files and logits both ways, the rank allocator against peft's, and the budget schedule."""

import json
import os

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_cnn, tiny_llama

from deltatune import AdaLoraConfig, PeftModel, get_peft_model
from deltatune.methods.adalora import RankAllocator, current_ranks, orthogonality_penalty

TARGETS = ["q_proj", "v_proj", "up_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=3, tfinal=3, total_step=15, deltaT=1, task_type="CAUSAL_LM")


def ours(seed=0, **kw):
    cfg = dict(target_modules=TARGETS, **SCHEDULE)
    cfg.update(kw)
    return get_peft_model(tiny_llama(seed), AdaLoraConfig(**cfg))


def theirs(seed=0, **kw):
    import peft

    cfg = dict(target_modules=TARGETS, **SCHEDULE)
    cfg.update(kw)
    return peft.get_peft_model(tiny_llama(seed), peft.AdaLoraConfig(**cfg))


def peft_entries(model):
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def copy_peft_into_ours(src, dst):
    dst._load_weights("default", peft_entries(src))


def batch(step, length=9):
    x = ids(batch=4, length=length, seed=100 + step)
    return {"input_ids": x, "labels": x}


def test_state_dict_keys_and_shapes_match_peft():
    mine, ref = ours(), theirs()
    ref_sd = peft_entries(ref)
    my_sd = mine.adapter_entries("default")
    assert sorted(my_sd) == sorted(ref_sd)
    assert all(tuple(my_sd[k].shape) == tuple(ref_sd[k].shape) for k in ref_sd)
    assert not any("ranknum" in k for k in my_sd)


def test_logits_match_peft_model_built_the_same(tmp_path):
    ref = theirs()
    randomize_adapter(ref, seed=5, scale=0.3)
    mine = ours()
    copy_peft_into_ours(ref, mine)
    x = ids()
    torch.testing.assert_close(mine(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    # the change is real, not a zero adapter
    with mine.disable_adapter():
        assert (mine(x).logits - ref(x).logits).abs().max() > 1e-3


def test_forward_loss_includes_orthogonality_penalty_like_peft():
    ref = theirs()
    randomize_adapter(ref, seed=6, scale=0.3)
    mine = ours()
    copy_peft_into_ours(ref, mine)
    b = batch(0)
    loss = mine(**b).loss
    torch.testing.assert_close(loss, ref(**b).loss, atol=1e-5, rtol=0)
    # by hand: the mean over every A and B of ||A A^T - I||_F and ||B^T B - I||_F, times orth_reg_weight
    norms = []
    for layer in [m for m in mine.modules() if hasattr(m, "lora_E")]:
        a, bm = layer.lora_A["default"], layer.lora_B["default"]
        norms += [
            torch.linalg.matrix_norm(a @ a.T - torch.eye(6)),
            torch.linalg.matrix_norm(bm.T @ bm - torch.eye(6)),
        ]
    penalty = torch.stack(norms).mean()
    assert penalty > 0.1
    torch.testing.assert_close(orthogonality_penalty(mine, "default"), penalty)
    torch.testing.assert_close(loss, mine.base_model(**b).loss + 0.5 * penalty, atol=1e-6, rtol=0)
    with mine.disable_adapter():  # no adapter, no penalty
        assert mine(**b).loss.item() == pytest.approx(mine.base_model(**b).loss.item())


def train(model, steps, on_step, lr=0.5):
    """A short real training loop: SGD on the adapter, the allocator hook between step() and zero_grad()."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        model(**batch(step)).loss.backward()
        opt.step()
        on_step(step)
        opt.zero_grad()
    model.eval()


def test_rank_allocator_matches_peft_step_for_step(tmp_path):
    ref = theirs()
    mine = ours()
    copy_peft_into_ours(ref, mine)
    patterns = []

    def ref_step(step):
        ref.base_model.update_and_allocate(step)
        patterns.append(ref.peft_config["default"].rank_pattern)

    train(ref, SCHEDULE["total_step"], ref_step)
    mine_patterns = []

    def my_step(step):
        mine.base_model.update_and_allocate(step)  # peft's spelling
        mine_patterns.append(mine.peft_config["default"].rank_pattern)

    train(mine, SCHEDULE["total_step"], my_step)
    for theirs_p, mine_p in zip(patterns, mine_patterns):
        if theirs_p is None:
            assert mine_p is None
            continue
        assert {k.replace(".default", ""): v for k, v in theirs_p.items()} == mine_p
    x = ids()
    torch.testing.assert_close(mine(x).logits, ref(x).logits, atol=1e-4, rtol=0)


def test_budget_shrinks_on_schedule():
    model = ours()
    allocator = None
    kept = {}

    def on_step(step):
        nonlocal allocator
        model.on_optimizer_step(step)
        allocator = model.__dict__["_adalora_allocator"]
        kept[step] = sum(current_ranks(model).values())

    train(model, SCHEDULE["total_step"], on_step)
    n_layers = 2 * len(TARGETS)
    assert allocator.init_bgt == 6 * n_layers and allocator.target_bgt == 2 * n_layers
    tinit, final = SCHEDULE["tinit"], SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step in range(1, tinit + 1):  # warm-up: nothing masked yet
        assert kept[step] == allocator.init_bgt
    mid = (tinit + final) // 2
    budget_mid, _ = allocator.budget_schedule(mid)
    assert allocator.target_bgt < budget_mid < allocator.init_bgt
    assert kept[mid] == budget_mid
    for step in range(tinit + 1, final):
        assert kept[step] == allocator.budget_schedule(step)[0]
    for step in range(final, SCHEDULE["total_step"] + 1):  # final phase: the target budget, pattern frozen
        assert kept[step] == allocator.target_bgt
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == allocator.target_bgt
    assert set(pattern) == {f"{k}.lora_E" for k in current_ranks(model)}


def test_budget_formula_is_cubic():
    model = ours()
    alloc = RankAllocator(model, "default")
    init, target = alloc.init_bgt, alloc.target_bgt
    assert alloc.budget_schedule(3) == (init, False)
    # step 6 of a 9-step budgeting phase (3 -> 12): (1 - 3/9)^3 of the gap remains
    assert alloc.budget_schedule(6)[0] == int((init - target) * (2 / 3) ** 3 + target)
    assert alloc.budget_schedule(13) == (target, True)


def train_and_save(tmp_path):
    model = ours()
    train(model, SCHEDULE["total_step"], model.on_optimizer_step)
    model.save_pretrained(tmp_path)
    return model


def test_save_writes_pruned_ranks_and_rank_pattern(tmp_path):
    from safetensors.torch import load_file

    model = train_and_save(tmp_path)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "ADALORA"
    pattern = cfg["rank_pattern"]
    sd = load_file(tmp_path / "adapter_model.safetensors")
    for key, keep in pattern.items():
        module = key.removesuffix(".lora_E")
        r = sum(keep)
        assert sd[f"base_model.model.{module}.lora_E"].shape == (r, 1)
        assert sd[f"base_model.model.{module}.lora_A"].shape[0] == r
        assert sd[f"base_model.model.{module}.lora_B"].shape[1] == r
    assert sum(sum(v) for v in pattern.values()) == 2 * 2 * len(TARGETS)
    # round trip in deltatune: pruned layers, same outputs
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=0)
    layer = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.r["default"] == sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert layer.ranknum["default"] == 6.0  # the scale keeps the initial rank, as in peft


def test_deltatune_adapter_loads_in_peft(tmp_path):
    import peft

    model = train_and_save(tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert ref.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    x = ids()
    torch.testing.assert_close(ref(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_peft_trained_adapter_loads_in_deltatune(tmp_path):
    ref = theirs()
    train(ref, SCHEDULE["total_step"], ref.base_model.update_and_allocate)
    ref.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "adapter_config.json"))
    assert saved["rank_pattern"]
    mine = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = ids()
    torch.testing.assert_close(mine(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    # and back out: the same keys, shapes and config fields as peft's own file
    mine.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    again = json.load(open(tmp_path / "again" / "adapter_config.json"))
    for key in (
        "rank_pattern",
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "total_step",
        "orth_reg_weight",
        "lora_alpha",
        "peft_type",
    ):
        assert again[key] == saved[key], key
    assert sorted(again["target_modules"]) == sorted(saved["target_modules"])


def test_merge_matches_unmerged_outputs():
    model = ours()
    randomize_adapter(model, seed=9, scale=0.3)
    x = ids()
    before = model(x).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x).logits, before, atol=1e-5, rtol=0)


def test_conv2d_matches_peft():
    import peft

    cfg = dict(target_modules=["conv", "conv2"], init_r=4, target_r=2, total_step=10)
    ref = peft.get_peft_model(tiny_cnn(), peft.AdaLoraConfig(**cfg))
    randomize_adapter(ref, seed=4, scale=0.3)
    mine = get_peft_model(tiny_cnn(), AdaLoraConfig(**cfg))
    copy_peft_into_ours(ref, mine)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mine(x), ref(x), atol=1e-5, rtol=0)


def test_bad_configs_and_misuse_are_explained():
    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(target_modules=TARGETS)
    with pytest.raises(ValueError, match="budgeting phase"):
        AdaLoraConfig(target_modules=TARGETS, total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="target_r"):
        AdaLoraConfig(target_modules=TARGETS, total_step=10, init_r=4, target_r=6)
    with pytest.raises(ValueError, match="DoRA"):
        AdaLoraConfig(target_modules=TARGETS, total_step=10, use_dora=True)
    model = ours()
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        model.on_optimizer_step(1)  # no backward yet: no gradients to score
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("second", AdaLoraConfig(target_modules=TARGETS, **SCHEDULE))
    model.add_adapter("frozen", AdaLoraConfig(target_modules=TARGETS, inference_mode=True, **SCHEDULE))
    assert "frozen" in model.peft_config


def test_config_round_trips_through_json(tmp_path):
    cfg = AdaLoraConfig(target_modules=TARGETS, **SCHEDULE)
    cfg.save_pretrained(tmp_path)
    loaded = AdaLoraConfig.from_pretrained(tmp_path)
    assert loaded == cfg
    assert os.path.isfile(tmp_path / "adapter_config.json")
