"""IA3, bottleneck adapters, BitFit, FREEZE and FULL on tiny models: training, save/load, disable, merge, interop."""

import contextlib
import json
import os

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_bert_cls, tiny_cnn, tiny_gpt2, tiny_llama, tiny_mlp
from safetensors.torch import load_file

import deltatune as dt
from deltatune.registry import config_class_for

TOL = 1e-5


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b):
    return (a - b).abs().max().item()


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def loss_of(model, x, labels):
    out = model(input_ids=x, labels=labels)
    return out.loss


def train_losses(model, x, labels, steps=20, lr=5e-2):
    """Loss before and after a few Adam steps on one fixed batch."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_of(model, x, labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return first, loss_of(model, x, labels).item()


# (model factory, config factory, labels maker) for the generic checks every method must pass.
def lm_labels(x):
    return x


def cls_labels(x):
    return torch.tensor([0, 1])


CASES = {
    "ia3-llama": (tiny_llama, lambda: dt.IA3Config(task_type="CAUSAL_LM"), lm_labels),
    "ia3-bert": (tiny_bert_cls, lambda: dt.IA3Config(task_type="SEQ_CLS"), cls_labels),
    "houlsby-llama": (tiny_llama, lambda: dt.BottleneckConfig(variant="houlsby"), lm_labels),
    "pfeiffer-bert": (
        tiny_bert_cls,
        lambda: dt.BottleneckConfig(variant="pfeiffer", task_type="SEQ_CLS"),
        cls_labels,
    ),
    "parallel-bert": (
        tiny_bert_cls,
        lambda: dt.BottleneckConfig(variant="parallel", task_type="SEQ_CLS"),
        cls_labels,
    ),
    "parallel-gpt2": (
        tiny_gpt2,
        lambda: dt.BottleneckConfig(variant="parallel", non_linearity="gelu"),
        lm_labels,
    ),
    "bitfit-bert": (tiny_bert_cls, lambda: dt.BitFitConfig(task_type="SEQ_CLS"), cls_labels),
    "bitfit-gpt2": (tiny_gpt2, lambda: dt.BitFitConfig(), lm_labels),
    "freeze-llama": (tiny_llama, lambda: dt.FreezeConfig(num_trainable_layers=1), lm_labels),
    "freeze-bert": (
        tiny_bert_cls,
        lambda: dt.FreezeConfig(num_trainable_layers=1, task_type="SEQ_CLS"),
        cls_labels,
    ),
    "full-gpt2": (tiny_gpt2, lambda: dt.FullConfig(task_type="CAUSAL_LM"), lm_labels),
}


@pytest.mark.parametrize("case", list(CASES))
def test_starts_as_base_trains_saves_loads_and_disables(case, tmp_path):
    make, config, labels = CASES[case]
    x = ids()
    base_out = logits(make(), x)
    model = dt.get_peft_model(make(), config())
    assert max_diff(logits(model, x), base_out) == 0.0  # every method starts from the base model exactly

    first, last = train_losses(model, x, labels(x))
    assert last < first - 0.05, (first, last)  # a tiny random LM moves slowly under IA3: about -0.09 here
    trained = logits(model, x)
    assert max_diff(trained, base_out) > 1e-3

    with model.disable_adapter():
        assert max_diff(logits(model, x), base_out) == 0.0
    assert max_diff(logits(model, x), trained) == 0.0  # and back on afterwards

    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(make(), tmp_path)
    assert max_diff(logits(loaded, x), trained) == 0.0
    assert trainable(loaded) == set()  # loaded for inference
    with loaded.disable_adapter():
        assert max_diff(logits(loaded, x), base_out) == 0.0


# --- exactly the intended parameters train ------------------------------------------------------------
def test_ia3_trains_only_vectors_on_default_targets():
    model = dt.get_peft_model(tiny_llama(), dt.IA3Config(task_type="CAUSAL_LM"))
    expected = {
        f"base_model.model.model.layers.{i}.{m}.ia3_l.default"
        for i in range(2)
        for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert trainable(model) == expected
    layer = model.get_base_model().model.layers[0]
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)  # input scaling on the FFN
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)  # output scaling on keys


def test_bottleneck_placements_and_sizes():
    bert = dt.get_peft_model(tiny_bert_cls(), dt.BottleneckConfig(reduction_factor=8, task_type="SEQ_CLS"))
    names = trainable(bert)
    for i in range(2):
        for place in (f"layer.{i}.attention.output.dense", f"layer.{i}.output.dense"):
            for part in ("adapter_down", "adapter_up"):
                for kind in ("weight", "bias"):
                    assert f"base_model.model.bert.encoder.{place}.{part}.default.{kind}" in names
    heads = {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    assert len(names) == 2 * 2 * 4 + 2 and heads <= names
    down = bert.get_base_model().bert.encoder.layer[0].output.dense.adapter_down["default"]
    assert (down.in_features, down.out_features) == (32, 4)

    pfeiffer = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig(variant="pfeiffer"))
    assert pfeiffer.peft_config["default"].target_modules == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    parallel = dt.get_peft_model(tiny_gpt2(), dt.BottleneckConfig(variant="parallel"))
    assert parallel.peft_config["default"].target_modules == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    houlsby = dt.get_peft_model(tiny_gpt2(), dt.BottleneckConfig(variant="houlsby", layers_to_transform=[1]))
    assert houlsby.peft_config["default"].target_modules == [
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]


def test_bottleneck_parallel_bert_matches_formula():
    """BERT's parallel adapter: LayerNorm(FFN(x) + f(x) + x), f read from the FFN input x."""
    model = dt.get_peft_model(tiny_bert_cls(), dt.BottleneckConfig(variant="parallel", scaling=2.0))
    randomize_adapter(model, scale=0.5)
    block = model.get_base_model().bert.encoder.layer[0]
    x = torch.randn(2, 5, 32)
    inter = block.intermediate(x)
    got = block.output(inter, x)
    wrapper = block.output
    down, up = wrapper.adapter_down["default"], wrapper.adapter_up["default"]
    f = 2.0 * up(torch.relu(down(x)))
    base = wrapper.base_layer
    expected = base.LayerNorm(base.dense(inter) + f + x)
    assert max_diff(got, expected) <= 1e-6


def test_bottleneck_custom_model_named_modules():
    model = dt.get_peft_model(tiny_mlp(), dt.BottleneckConfig(target_modules=["lin0"], reduction_factor=4))
    assert trainable(model) == {
        f"base_model.model.lin0.adapter_{p}.default.{k}" for p in ("down", "up") for k in ("weight", "bias")
    }
    assert model.get_base_model().lin0.adapter_down["default"].out_features == 8
    with pytest.raises(ValueError, match="Could not find where houlsby adapters go in MLP"):
        dt.get_peft_model(tiny_mlp(), dt.BottleneckConfig())


def test_bitfit_trains_only_biases_and_heads():
    model = dt.get_peft_model(tiny_bert_cls(), dt.BitFitConfig(task_type="SEQ_CLS"))
    base = tiny_bert_cls()
    biases = {
        f"base_model.model.{n}"
        for n, _ in base.named_parameters()
        if n.endswith(".bias") and not n.startswith("classifier")
    }
    heads = {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    assert trainable(model) == biases | heads
    with_ln = dt.get_peft_model(tiny_bert_cls(), dt.BitFitConfig(include_layer_norm=True))
    ln = {f"base_model.model.{n}" for n, _ in base.named_parameters() if "LayerNorm.weight" in n}
    assert trainable(with_ln) == {b for b in biases | {"base_model.model.classifier.bias"}} | ln
    only_query = dt.get_peft_model(tiny_bert_cls(), dt.BitFitConfig(target_modules=["query"]))
    assert trainable(only_query) == {
        f"base_model.model.bert.encoder.layer.{i}.attention.self.query.bias" for i in range(2)
    }


def test_bitfit_without_biases_is_a_clear_error():
    with pytest.raises(ValueError, match="LlamaForCausalLM has no bias terms.*include_layer_norm=True"):
        dt.get_peft_model(tiny_llama(), dt.BitFitConfig())
    model = dt.get_peft_model(tiny_llama(), dt.BitFitConfig(include_layer_norm=True))
    assert trainable(model) == {
        "base_model.model.model.norm.weight",
        *(
            f"base_model.model.model.layers.{i}.{n}.weight"
            for i in range(2)
            for n in ("input_layernorm", "post_attention_layernorm")
        ),
    }


def test_freeze_trains_top_blocks_and_head():
    model = dt.get_peft_model(tiny_llama(), dt.FreezeConfig(num_trainable_layers=1))
    base = tiny_llama()
    expected = {
        f"base_model.model.{n}"
        for n, _ in base.named_parameters()
        if n.startswith(("model.layers.1.", "lm_head."))
    }
    assert trainable(model) == expected
    named = dt.get_peft_model(
        tiny_llama(),
        dt.FreezeConfig(num_trainable_layers=0, trainable_modules=["embed_tokens"], train_head=False),
    )
    assert trainable(named) == {"base_model.model.model.embed_tokens.weight"}
    bert = dt.get_peft_model(tiny_bert_cls(), dt.FreezeConfig(num_trainable_layers=2, task_type="SEQ_CLS"))
    names = trainable(bert)
    assert all(
        n.startswith(("base_model.model.bert.encoder.layer.", "base_model.model.classifier.modules_to_save."))
        for n in names
    )
    assert len(names) == 2 * 16 + 2
    with pytest.raises(ValueError, match="num_trainable_layers=3 but model.layers has 2 blocks"):
        dt.get_peft_model(tiny_llama(), dt.FreezeConfig(num_trainable_layers=3))
    with pytest.raises(ValueError, match="selects nothing to train"):
        dt.get_peft_model(tiny_llama(), dt.FreezeConfig(num_trainable_layers=0, train_head=False))


def test_full_trains_everything_and_saves_all_weights(tmp_path):
    base = tiny_gpt2()
    model = dt.get_peft_model(base, dt.FullConfig())
    assert trainable(model) == {f"base_model.model.{n}" for n, _ in tiny_gpt2().named_parameters()}
    model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert set(saved) == {f"base_model.model.{n}" for n, _ in tiny_gpt2().named_parameters()}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FULL"
    assert type(dt.PeftConfig.from_pretrained(tmp_path)) is dt.FullConfig


def test_in_place_methods_hold_one_adapter():
    model = dt.get_peft_model(tiny_bert_cls(), dt.BitFitConfig())
    with pytest.raises(ValueError, match="holds one BitFit adapter"):
        model.add_adapter("second", dt.BitFitConfig())
    assert list(model.peft_config) == ["default"]


def test_in_place_methods_merge_and_unload_keeps_trained_values():
    x = ids()
    model = dt.get_peft_model(tiny_bert_cls(), dt.BitFitConfig(task_type="SEQ_CLS"))
    randomize_adapter(model)
    trained = logits(model, x)
    plain = model.merge_and_unload()
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert max_diff(logits(plain, x), trained) == 0.0


# --- IA3: interop with peft and merging -------------------------------------------------------------
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("make,task", [(tiny_llama, "CAUSAL_LM"), (tiny_bert_cls, "SEQ_CLS")])
def test_ia3_interop_with_peft_both_ways(make, task, tmp_path):
    x = ids()
    ours = dt.get_peft_model(make(), dt.IA3Config(task_type=task))
    randomize_adapter(ours)
    expected = logits(ours, x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    assert max_diff(logits(theirs, x), expected) <= TOL

    peft_model = peft.get_peft_model(make(), peft.IA3Config(task_type=task))
    randomize_adapter(peft_model, seed=7)
    peft_out = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "theirs")
    ours_loaded = dt.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    assert max_diff(logits(ours_loaded, x), peft_out) <= TOL
    ours_loaded.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    )
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    shared = set(ours_config) & set(peft_config)
    assert set(peft_config) - shared <= {"peft_version", "auto_mapping"}
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
        assert sorted(ours_config[key] or []) == sorted(peft_config[key] or [])


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert_cls, tiny_gpt2])
def test_ia3_merge_unmerge(make):
    x = ids()
    model = dt.get_peft_model(make(), dt.IA3Config())
    model.add_adapter("other", dt.IA3Config())
    randomize_adapter(model)
    model.set_adapter("other")
    randomize_adapter(model, seed=5)
    model.set_adapter(["default", "other"])
    both = logits(model, x)
    before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert max_diff(logits(model, x), both) <= TOL
    model.unmerge_adapter()
    assert max_diff(logits(model, x), both) <= TOL
    for n, p in model.get_base_model().named_parameters():
        if n in before:
            assert max_diff(p, before[n]) <= 1e-6, n
    merged = model.merge_and_unload()
    assert not any("ia3" in n for n, _ in merged.named_parameters())
    assert max_diff(logits(merged, x), both) <= TOL


def test_ia3_merge_scales_bias_of_output_scaled_layers():
    """Output scaling multiplies the bias too: BERT's key/value layers have biases."""
    x = ids()
    model = dt.get_peft_model(
        tiny_bert_cls(), dt.IA3Config(target_modules=["key", "value"], feedforward_modules=[])
    )
    randomize_adapter(model)
    expected = logits(model, x)
    assert max_diff(logits(model.merge_and_unload(), x), expected) <= TOL


def test_ia3_conv_merge():
    x = torch.randn(2, 3, 8, 8)
    model = dt.get_peft_model(
        tiny_cnn(), dt.IA3Config(target_modules=["conv", "conv2", "conv1d"], feedforward_modules=["conv2"])
    )
    randomize_adapter(model)
    expected = logits(model, x)
    model.merge_adapter()
    assert max_diff(logits(model, x), expected) <= TOL


def test_ia3_config_errors():
    with pytest.raises(ValueError, match="subset of target_modules"):
        dt.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="no default target_modules for model type None"):
        dt.get_peft_model(tiny_mlp(), dt.IA3Config())


# --- merging what cannot be merged --------------------------------------------------------------------
def test_bottleneck_refuses_to_merge_clearly():
    x = ids()
    model = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig())
    randomize_adapter(model)
    before = logits(model, x)
    with pytest.raises(dt.MergeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(dt.MergeError, match="cannot be merged"):
        model.merge_and_unload()
    assert max_diff(logits(model, x), before) == 0.0  # nothing was half-merged


# --- several bottleneck adapters use the generic machinery ---------------------------------------------
def test_bottleneck_multi_adapter_set_delete_save(tmp_path):
    x = ids()
    model = dt.get_peft_model(tiny_llama(), dt.BottleneckConfig())
    randomize_adapter(model)
    first = logits(model, x)
    model.add_adapter("second", dt.BottleneckConfig(variant="pfeiffer", reduction_factor=4))
    model.set_adapter("second")
    randomize_adapter(model, seed=9)
    second = logits(model, x)
    assert max_diff(second, first) > 1e-3
    model.set_adapter("default")
    assert max_diff(logits(model, x), first) == 0.0
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second")
    assert max_diff(logits(loaded, x), second) == 0.0
    model.delete_adapter("second")
    assert not any(".second." in n for n, _ in model.named_parameters())
    assert max_diff(logits(model, x), first) == 0.0
    with pytest.raises(ValueError, match="serial bottleneck adapters; a parallel one cannot join"):
        model.add_adapter("par", dt.BottleneckConfig(variant="parallel"))


def test_bottleneck_config_roundtrip_and_errors(tmp_path):
    config = dt.BottleneckConfig(variant="parallel", reduction_factor=4, non_linearity="silu", scaling=0.5)
    config.save_pretrained(tmp_path)
    again = dt.PeftConfig.from_pretrained(tmp_path)
    assert type(again) is dt.BottleneckConfig and again.to_dict() == config.to_dict()
    assert config_class_for("FREEZE") is dt.FreezeConfig and config_class_for("FULL") is dt.FullConfig
    with pytest.raises(ValueError, match="variant must be one of"):
        dt.BottleneckConfig(variant="serial")
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        dt.BottleneckConfig(non_linearity="softmax")
    with pytest.warns(UserWarning, match="does not start"):
        dt.BottleneckConfig(residual=False)


@pytest.mark.parametrize("residual", [True, False])
def test_bottleneck_serial_matches_formula(residual):
    """Serial adapter on a linear layer: h + s * up(act(down(h))), or without the skip when residual=False."""
    with pytest.warns(UserWarning) if not residual else contextlib.nullcontext():
        config = dt.BottleneckConfig(
            target_modules=["lin0"], non_linearity="tanh", scaling=0.5, residual=residual
        )
    model = dt.get_peft_model(tiny_mlp(), config)
    randomize_adapter(model)
    layer = model.get_base_model().lin0
    h_in = torch.randn(3, 16)
    h = layer.base_layer(h_in)
    f = 0.5 * layer.adapter_up["default"](torch.tanh(layer.adapter_down["default"](h)))
    expected = h + f if residual else f
    with torch.no_grad():
        assert max_diff(layer(h_in), expected) <= 1e-6


def test_in_place_disable_also_covers_generate():
    x = ids(batch=1, length=4)
    expected = tiny_llama().generate(x, max_new_tokens=5, do_sample=False)
    model = dt.get_peft_model(tiny_llama(), dt.FreezeConfig(num_trainable_layers=2))
    randomize_adapter(model, scale=1.0)
    assert not torch.equal(model.generate(input_ids=x, max_new_tokens=5, do_sample=False), expected)
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=x, max_new_tokens=5, do_sample=False), expected)
    after = model.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    assert not torch.equal(after, expected)  # the trained values are back


@pytest.mark.slow
def test_ia3_interop_with_peft_on_smollm2(smollm2, tmp_path):
    """The real SmolLM2-135M: an IA3 adapter saved by deltatune gives peft the same logits."""
    model, tokenizer = smollm2
    batch = tokenizer(["The capital of France is", "Adapters are small"], return_tensors="pt", padding=True)
    ours = dt.get_peft_model(model, dt.IA3Config(task_type="CAUSAL_LM"))
    try:
        randomize_adapter(ours, scale=0.1)
        expected = logits(ours, batch["input_ids"])
        ours.save_pretrained(tmp_path)
    finally:
        ours.unload()
    theirs = peft.PeftModel.from_pretrained(model, tmp_path)
    try:
        assert max_diff(logits(theirs, batch["input_ids"]), expected) <= TOL
    finally:
        theirs.unload()
