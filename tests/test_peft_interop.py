"""Adapters written by deltatune load in the `peft` package with the same logits, and the other way round."""

import json

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_bert_cls, tiny_cnn, tiny_gpt2, tiny_llama, tiny_mlp
from safetensors.torch import load_file

import deltatune as dt

peft = pytest.importorskip("peft")

CASES = {
    "lora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"]), ids),
    "all-linear": (tiny_llama, dict(target_modules="all-linear"), ids),
    "rslora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], use_rslora=True, lora_alpha=16), ids),
    "dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True), ids),
    "patterns": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 32},
        ),
        ids,
    ),
    "modules_to_save": (tiny_bert_cls, dict(task_type="SEQ_CLS", target_modules=["query", "value"]), ids),
    "modules_to_save_explicit": (
        tiny_llama,
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        ids,
    ),
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "k_proj"]), ids),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), ids),
    "gpt2_conv1d_dora": (tiny_gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True), ids),
    "conv2d": (tiny_cnn, dict(target_modules=["conv", "conv2", "conv1d"]), lambda: torch.randn(2, 3, 8, 8)),
    "mlp_bias_all": (tiny_mlp, dict(target_modules=["lin0", "lin1"], bias="all"), lambda: ids(vocab=20)),
}


def logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(params=list(CASES))
def case(request):
    factory, kwargs, make_input = CASES[request.param]
    return factory, kwargs, make_input()


def test_deltatune_to_peft(case, tmp_path):
    factory, kwargs, x = case
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, **{"lora_alpha": 8, **kwargs}))
    randomize_adapter(model)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    torch.testing.assert_close(logits(theirs, x), expected, rtol=0, atol=1e-5)


def test_peft_to_deltatune(case, tmp_path):
    factory, kwargs, x = case
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, **{"lora_alpha": 8, **kwargs}))
    randomize_adapter(theirs)
    expected = logits(theirs, x)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(logits(ours, x), expected, rtol=0, atol=1e-5)


def test_same_files_as_peft(tmp_path):
    """Key names, shapes and config keys match what peft writes for the same model and config."""
    kwargs = dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], use_dora=True)
    dt.get_peft_model(tiny_bert_cls(), dt.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**kwargs)).save_pretrained(str(tmp_path / "theirs"))
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_cfg, their_cfg = (
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")
    )
    assert set(our_cfg) <= set(their_cfg)
    for key in our_cfg:
        if key not in ("target_modules", "modules_to_save"):
            assert our_cfg[key] == their_cfg[key], key
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    assert sorted(our_cfg["modules_to_save"]) == sorted(their_cfg["modules_to_save"])


def test_multiple_adapters_subfolders_both_ways(tmp_path):
    x = ids()
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    ours.add_adapter("second", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    ours.set_adapter("second")
    randomize_adapter(ours, seed=5)
    expected_second = logits(ours, x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
    theirs.load_adapter(str(tmp_path / "ours" / "second"), adapter_name="second")
    theirs.set_adapter("second")
    torch.testing.assert_close(logits(theirs, x), expected_second, rtol=0, atol=1e-5)

    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    back.load_adapter(tmp_path / "theirs" / "second", adapter_name="second")
    back.set_adapter("second")
    torch.testing.assert_close(logits(back, x), expected_second, rtol=0, atol=1e-5)


def test_peft_merged_model_matches_ours(tmp_path):
    """merge_and_unload in both libraries yields the same weights."""
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapter(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    a, b = ours.merge_and_unload().state_dict(), theirs.merge_and_unload().state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
