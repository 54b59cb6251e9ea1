"""Bad input gets a clear error that names the problem, and leaves the model as it was."""

import json

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_llama, tiny_mlp
from torch import nn

import deltatune as dt
from deltatune.layer import AdapterLayer


def saved_adapter(tmp_path, factory=tiny_llama, **kwargs):
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, **{"target_modules": ["q_proj"], **kwargs}))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def assert_untouched(model, reference_out, x):
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    torch.testing.assert_close(model(x).logits, reference_out, rtol=0, atol=0)


def test_target_that_matches_nothing_lists_closest_names():
    with pytest.raises(ValueError, match=r"matched no module.*Closest module names: q_proj"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_prj"]))


def test_unsupported_module_type():
    with pytest.raises(TypeError, match="LoRA cannot wrap a LlamaRMSNorm"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["input_layernorm"]))


def test_failed_injection_leaves_model_unchanged():
    model = tiny_llama()
    x = ids()
    before = model(x).logits
    with pytest.raises(TypeError):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["q_proj", "input_layernorm"]))
    assert_untouched(model, before, x)


def test_adding_a_name_twice():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", dt.LoraConfig(target_modules=["v_proj"]))


def test_unmerge_without_merge():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Nothing is merged"):
        model.unmerge_adapter()


def test_safe_merge_refuses_non_finite_and_merges_nothing():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    x = ids()
    out = model(x).logits
    layer = model.get_base_model().model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert not any(m.merged for m in model.modules() if isinstance(m, AdapterLayer))
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = 0.0
    model.merge_adapter(safe_merge=True)
    assert torch.isfinite(model(x).logits).all() and (model(x).logits - out).abs().max() < 0.1


def test_bad_config_values():
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        dt.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias must be"):
        dt.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="task_type"):
        dt.LoraConfig(task_type="CLASSIFY")
    with pytest.raises(ValueError, match="init_lora_weights"):
        dt.LoraConfig(init_lora_weights="loftq")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter folder"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="fetching adapter_model.safetensors from the hub failed"):
        dt.PeftModel.from_pretrained(tiny_llama(), "someone/some-adapter")


def test_adapter_for_another_base_names_module_and_shapes(tmp_path):
    saved_adapter(tmp_path)
    other = tiny_llama(hidden_size=48)
    x = ids()
    before = other(x).logits
    with pytest.raises(
        ValueError,
        match=r"different base: model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(4, 32\) in the file but \(4, 48\)",
    ):
        dt.PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other, before, x)


def test_adapter_whose_targets_do_not_exist(tmp_path):
    saved_adapter(tmp_path, factory=tiny_mlp, target_modules=["lin0"])
    with pytest.raises(ValueError, match="matched no module of LlamaForCausalLM"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unknown_peft_type(tmp_path):
    saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "VERA_PLUS"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Unknown peft_type 'VERA_PLUS'; deltatune supports: .*LORA"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unsupported_peft_option_is_refused(tmp_path):
    saved_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(lora_bias=True, megatron_core="megatron.core", loftq_config={})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"options deltatune does not support: lora_bias=True"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights(tmp_path, damage):
    saved_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file at all")
    model = tiny_llama()
    x = ids()
    before = model(x).logits
    with pytest.raises(ValueError, match="damaged or truncated"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert_untouched(model, before, x)


def test_corrupt_config(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_tensors_in_file(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="1 tensors the model expects are missing"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_failed_load_adapter_removes_the_half_added_adapter(tmp_path):
    saved_adapter(tmp_path / "a")
    saved_adapter(tmp_path / "b", factory=lambda: tiny_llama(hidden_size=48))
    model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match="different base"):
        model.load_adapter(tmp_path / "b", adapter_name="b")
    assert list(model.peft_config) == ["default"]
    assert not any(".b." in n for n, _ in model.named_parameters())


def test_pickle_is_never_loaded(tmp_path):
    """A legacy .bin that holds arbitrary objects is refused by weights_only loading."""
    saved_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="plain tensors"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_wrong_argument_types():
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        dt.get_peft_model("gpt2", dt.LoraConfig())
    model = dt.get_peft_model(nn.Sequential(nn.Linear(2, 2)), dt.LoraConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match="already has adapters"):
        dt.get_peft_model(model, dt.LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="No adapter named 'x'"):
        model.set_adapter("x")
