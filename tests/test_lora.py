"""LoRA and model surgery on tiny models: outputs, merging, trainable sets, multi-adapter, save/load."""

import copy

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_bert_cls, tiny_cnn, tiny_gpt2, tiny_llama, tiny_mlp
from torch import nn

import deltatune as dt
from deltatune.layer import AdapterLayer


def run(model, x):
    out = model(x) if not isinstance(x, dict) else model(**x)
    return out.logits if hasattr(out, "logits") else out


# (model factory, config kwargs, input factory) covering every supported layer kind
CASES = {
    "llama-all-linear": (tiny_llama, dict(target_modules="all-linear"), lambda: ids()),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"]), lambda: ids()),
    "bert-seqcls": (
        tiny_bert_cls,
        dict(task_type="SEQ_CLS", target_modules=["query", "value"]),
        lambda: ids(),
    ),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"]), lambda: ids()),
    "mlp": (tiny_mlp, dict(target_modules=["emb", "lin0", "lin1"]), lambda: ids(vocab=20)),
    "cnn": (tiny_cnn, dict(target_modules=["conv", "conv2", "conv1d"]), lambda: torch.randn(2, 3, 8, 8)),
}


@pytest.fixture(params=list(CASES))
def case(request):
    factory, kwargs, make_input = CASES[request.param]
    return factory, kwargs, make_input()


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_outputs_merge_disable_roundtrip(case, variant, tmp_path):
    factory, kwargs, x = case
    if variant.get("use_dora") and (
        factory in (tiny_cnn, tiny_mlp) or "embed_tokens" in kwargs["target_modules"]
    ):
        pytest.skip(
            "deltatune's DoRA covers Linear and GPT-2 Conv1D layers (see test_dora_refuses_other_layers)"
        )
    base_model = factory()
    base_out = run(base_model, x)
    base_weights = copy.deepcopy(base_model.state_dict())
    model = dt.get_peft_model(base_model, dt.LoraConfig(r=4, lora_alpha=8, **kwargs, **variant))
    torch.testing.assert_close(run(model, x), base_out, rtol=0, atol=1e-6)  # B = 0 at init
    randomize_adapter(model)
    out = run(model, x)
    assert (out - base_out).abs().max() > 1e-3, "the adapter should change the outputs"

    with model.disable_adapter():
        torch.testing.assert_close(run(model, x), base_out, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(run(model, x), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, x), out, rtol=0, atol=1e-6)
    for key, value in model.get_base_model().state_dict().items():
        if ".base_layer." in key:
            original = base_weights[key.replace(".base_layer.", ".").replace(".original_module.", ".")]
            torch.testing.assert_close(value, original, rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(run(loaded, x), out, rtol=0, atol=0)


def test_merge_and_unload_gives_plain_model(case):
    factory, kwargs, x = case
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, **kwargs))
    randomize_adapter(model)
    out = run(model, x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert type(merged) is type(factory())
    torch.testing.assert_close(run(merged, x), out, rtol=1e-5, atol=1e-5)


def test_exactly_lora_params_train():
    model = dt.get_peft_model(
        tiny_bert_cls(), dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    )
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    lora = [n for n in trainable if ".lora_" in n]
    head = [n for n in trainable if ".classifier.modules_to_save.default." in n]
    assert len(lora) == 2 * 2  # A and B in two layers
    assert head == [
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
    ]
    assert sorted(lora + head) == trainable
    report = model.parameter_report()
    assert report["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad
    )
    assert report["stored_bytes"]["default"] == 4 * report["trainable_params"]


def test_loading_for_inference_trains_nothing(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in trainable.named_parameters() if ".lora_" in n
    }


def test_loss_goes_down_and_base_stays_frozen():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = ids(batch=4, length=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # a tiny random-init model's head has very small weights, so the drop is steady rather than steep
    assert losses[-1] < 0.92 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_inits_keep_step_zero_outputs(init):
    x = ids()
    base_out = run(tiny_llama(), x)
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=init)
    )
    torch.testing.assert_close(run(model, x), base_out, rtol=1e-4, atol=1e-4)
    if init != "gaussian":
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        assert layer.lora_B["default"].weight.abs().sum() > 0  # the principal part moved into B A


def test_init_false_changes_outputs():
    x = ids()
    base_out = run(tiny_llama(), x)
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    assert (run(model, x) - base_out).abs().max() > 1e-4


def test_rank_and_alpha_patterns():
    config = dt.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    model = dt.get_peft_model(tiny_llama(), config)
    layers = model.get_base_model().model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 2
    assert layers[1].self_attn.q_proj.r["default"] == 4
    assert layers[0].self_attn.q_proj.scaling["default"] == 8 / 2
    assert layers[1].self_attn.v_proj.scaling["default"] == 32 / 4
    rs = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    )
    assert rs.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)


@pytest.mark.parametrize("bias,expected", [("none", 0), ("lora_only", 2), ("all", None)])
def test_bias_options(bias, expected, tmp_path):
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(r=2, target_modules=["lin0", "lin1"], bias=bias))
    trained_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    all_biases = [n for n, _ in model.get_base_model().named_parameters() if n.endswith("bias")]
    assert len(trained_biases) == (len(all_biases) if expected is None else expected)
    randomize_adapter(model)
    x = ids(vocab=20)
    out = run(model, x)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(
        run(dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path), x), out, rtol=0, atol=0
    )


def test_targets_by_regex_type_exclude_and_layers():
    def targeted(**kwargs):
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, **kwargs))
        return sorted(n for n, m in model.get_base_model().named_modules() if isinstance(m, AdapterLayer))

    assert targeted(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj") == [
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    by_type = targeted(target_modules=[nn.Linear])
    assert "lm_head" in by_type and len(by_type) == 2 * 7 + 1
    all_linear = targeted(target_modules="all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 2 * 7
    assert all(
        "mlp" not in n
        for n in targeted(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj", "down_proj"])
    )
    assert targeted(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers") == [
        "model.layers.1.self_attn.q_proj"
    ]
    assert targeted(target_modules=["q_proj"], layers_to_transform=0) == ["model.layers.0.self_attn.q_proj"]


def test_type_targets_are_saved_as_names(tmp_path):
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(r=2, target_modules=[nn.Embedding]))
    assert model.peft_config["default"].target_modules == ["emb"]
    model.save_pretrained(tmp_path)
    assert dt.PeftConfig.from_pretrained(tmp_path).target_modules == ["emb"]


def test_many_adapters_switch_sum_delete_and_subfolders(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6))
    x = torch.randn(3, 6)
    base_out = base(x)
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["0"]))
    model.add_adapter("other", dt.LoraConfig(r=3, target_modules=["0"]))
    assert model.active_adapters == ["default"]
    model.set_adapter("other")
    randomize_adapter(model, seed=1)
    model.set_adapter("default")
    randomize_adapter(model, seed=2)
    out_default = model(x)
    model.set_adapter("other")
    out_other = model(x)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.0.lora_A.other.weight",
        "base_model.model.0.lora_B.other.weight",
    }
    model.set_adapter(["default", "other"])
    torch.testing.assert_close(model(x) - base_out, (out_default - base_out) + (out_other - base_out))

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (
        tmp_path / "other" / "adapter_config.json"
    ).exists()
    torch.manual_seed(0)
    fresh = dt.PeftModel.from_pretrained(nn.Sequential(nn.Linear(6, 6)), tmp_path)
    fresh.load_adapter(tmp_path / "other", adapter_name="other")
    fresh.set_adapter("other")
    torch.testing.assert_close(fresh(x), out_other, rtol=0, atol=0)

    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(x), out_default)
    assert not any("other" in n for n, _ in model.named_parameters())


def test_legacy_bin_loads_with_weights_only(tmp_path):
    model = dt.get_peft_model(tiny_mlp(), dt.LoraConfig(r=2, target_modules=["lin0"]))
    randomize_adapter(model)
    x = ids(vocab=20)
    out = run(model, x)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.testing.assert_close(
        run(dt.PeftModel.from_pretrained(tiny_mlp(), tmp_path), x), out, rtol=0, atol=0
    )


def test_peft_style_alias_import():
    import deltatune as peft

    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    model = peft.get_peft_model(tiny_llama(), config)
    assert isinstance(model, peft.PeftModelForCausalLM)
    assert model.get_base_model().config.vocab_size == 64
    assert model.config.vocab_size == 64  # attribute access falls through to the base model


def test_wrapped_layers_answer_like_the_modules_they_wrap():
    """peft's layer API: attributes fall through to the base layer, and a trained head shows the active copy."""
    model = dt.get_peft_model(
        tiny_bert_cls(), dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    )
    bert = model.get_base_model()
    query = bert.bert.encoder.layer[0].attention.self.query
    assert query.get_base_layer() is query.base_layer
    assert query.weight is query.base_layer.weight and query.in_features == 32 and query.out_features == 32
    head = bert.classifier
    assert head.weight is head.modules_to_save["default"].weight
    assert head.get_base_layer() is head.original_module
    with model.disable_adapter():
        assert head.weight is head.original_module.weight
    assert type(model.base_model).__name__ == "TunerModel" and model.base_model.model is bert
