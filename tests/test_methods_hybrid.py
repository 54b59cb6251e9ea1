"""MAM adapter and UniPELT on tiny models: training, exactly which tensors train, save/load, disable, merge refusal,
generation through the KV cache, the gate formulas, and the CLI's method table."""

import json
import re

import pytest
import torch
import yaml
from helpers import randomize_adapter, sentiment_rows, tiny_bert_cls, tiny_bert_folder, tiny_llama, write_csv
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.unipelt import GatedBottleneckLayer, GatedLoraLinear

N = 4


def configs(kind, **extra):
    if kind == "mam":
        return dt.MAMConfig(num_virtual_tokens=N, **extra)
    return dt.UniPELTConfig(num_virtual_tokens=N, r=2, reduction_factor=4, **extra)


CASES = [
    ("mam", tiny_llama, None),
    ("unipelt", tiny_llama, None),
    ("mam", tiny_bert_cls, "SEQ_CLS"),
    ("unipelt", tiny_bert_cls, "SEQ_CLS"),
]
IDS = [f"{k}-{f.__name__}" for k, f, _ in CASES]

# What may train, per piece: the prefixes (on the PeftModel), and per-module tensors inside the base model.
PIECES = {
    "prefix": r"prompt_encoder\.default\.embedding\.weight",
    "adapter": r".*\.adapter_(down|up)\.default\.(weight|bias)",
    "adapter_gate": r".*\.adapter_gate\.default\.(weight|bias)",
    "lora": r".*\.lora_(A|B)\.default\.weight",
    "lora_gate": r".*\.lora_gate\.default\.(weight|bias)",
    "head": r".*classifier\.modules_to_save\.default\.(weight|bias)",
}
EXPECTED = {
    "mam": {"prefix", "adapter"},
    "unipelt": {"prefix", "adapter", "adapter_gate", "lora", "lora_gate"},
}


def batch(factory):
    x = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    labels = x if factory is tiny_llama else torch.tensor([0, 1])
    return x, labels


def out_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def wrapped(kind, factory, task, **extra):
    return dt.get_peft_model(factory(), configs(kind, task_type=task, **extra))


@pytest.mark.parametrize("kind,factory,task", CASES, ids=IDS)
def test_loss_goes_down(kind, factory, task):
    # A larger init lets the frozen random LM head express the task (at 0.02 its logits barely move).
    base = tiny_llama(initializer_range=0.2) if factory is tiny_llama else factory()
    model = dt.get_peft_model(base, configs(kind, task_type=task))
    x, labels = batch(factory)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=labels).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind,factory,task", CASES, ids=IDS)
def test_exactly_the_intended_tensors_train(kind, factory, task):
    model = wrapped(kind, factory, task)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    found = set()
    for name in names:
        pieces = [k for k, pattern in PIECES.items() if re.fullmatch(pattern, name)]
        assert pieces, f"{name} trains but belongs to no piece of {kind}"
        found |= set(pieces)
    expected = EXPECTED[kind] | ({"head"} if task == "SEQ_CLS" else set())
    assert found == expected
    layers = model.get_base_model().config.num_hidden_layers
    adapters = {n.split(".adapter_down")[0] for n in names if ".adapter_down." in n}
    assert len(adapters) == layers  # one adapter per block
    if kind == "unipelt":
        loras = {n.split(".lora_A")[0] for n in names if ".lora_A." in n}
        assert len(loras) == 2 * layers  # query and value of each block
        assert all(re.search(r"(q_proj|v_proj|query|value)$", n) for n in loras)
    if kind == "mam":  # the parallel adapter sits beside the FFN block
        assert all(re.search(r"(\.mlp|\.output)$", n) for n in adapters)


@pytest.mark.parametrize("kind,factory,task", CASES, ids=IDS)
def test_save_load_identical_and_disable_gives_the_base(kind, factory, task, tmp_path):
    model = wrapped(kind, factory, task)
    randomize_adapter(model)
    x, _ = batch(factory)
    adapted = out_of(model, x)
    base = out_of(factory(), x)
    assert (adapted - base).abs().max() > 1e-3  # the adapter really changes the outputs
    with model.disable_adapter():
        assert torch.equal(out_of(model, x), base)
    model.save_pretrained(tmp_path)
    saved = json.load(open(tmp_path / "adapter_config.json"))
    assert saved["peft_type"] == kind.upper()
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "prompt_embeddings" in keys
    assert any(".adapter_down." in k for k in keys)
    assert not any(".default." in k for k in keys)  # adapter names are not in the file, as in peft
    loaded = dt.PeftModel.from_pretrained(factory(), tmp_path)
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])
    assert torch.equal(out_of(loaded, x), adapted)


@pytest.mark.parametrize("kind", ["mam", "unipelt"])
def test_projection_is_saved_as_plain_prefixes(kind, tmp_path):
    model = wrapped(kind, tiny_llama, None, prefix_projection=True, encoder_hidden_size=8)
    assert any(
        n.startswith("prompt_encoder.default.transform")
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    randomize_adapter(model)
    x, _ = batch(tiny_llama)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert not any(k.startswith("prompt_encoder.") for k in keys)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(out_of(loaded, x), out_of(model, x), atol=1e-6)


@pytest.mark.parametrize("kind", ["mam", "unipelt"])
def test_merge_refuses_clearly(kind):
    model = wrapped(kind, tiny_llama, None)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize("kind", ["mam", "unipelt"])
def test_generate_matches_a_manual_greedy_loop(kind):
    """generate() runs prefixes from the cache and adapters in the modules; a loop over full forwards agrees."""
    model = wrapped(kind, tiny_llama, None)
    randomize_adapter(model, scale=0.5)
    x = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (2, 7)
    ids = x
    for _ in range(4):
        ids = torch.cat([ids, out_of(model, ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_mam_adapter_is_a_scaled_parallel_adapter():
    """MAM's FFN block computes mlp(x) + 4 * up(relu(down(x))) (the paper's scaling 4)."""
    model = wrapped("mam", tiny_llama, None)
    randomize_adapter(model)
    block = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 3, 32)
    down, up = block.adapter_down["default"], block.adapter_up["default"]
    assert down.out_features == 16  # reduction_factor 2 on 32 features
    with torch.no_grad():
        expected = block.base_layer(x) + 4.0 * up(torch.relu(down(x)))
        assert torch.allclose(block(x), expected, atol=1e-6)


def test_unipelt_gates_follow_the_paper():
    """LoRA: W x + sigmoid(g_L x) * s B A x; adapter: h + sigmoid(g_A h) * up(relu(down(h))), h the FFN output."""
    model = wrapped("unipelt", tiny_llama, None)
    randomize_adapter(model)
    layer = model.get_base_model().model.layers[0]
    q, ffn_out = layer.self_attn.q_proj, layer.mlp.down_proj
    assert isinstance(q, GatedLoraLinear) and isinstance(ffn_out, GatedBottleneckLayer)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        a, b, g = q.lora_A["default"], q.lora_B["default"], q.lora_gate["default"]
        expected = q.base_layer(x) + torch.sigmoid(g(x)) * (16 / 2) * b(a(x))
        assert torch.allclose(q(x), expected, atol=1e-6)
        h_in = torch.randn(2, 3, 64)
        h = ffn_out.base_layer(h_in)
        d, u, ga = (
            ffn_out.adapter_down["default"],
            ffn_out.adapter_up["default"],
            ffn_out.adapter_gate["default"],
        )
        expected = h + torch.sigmoid(ga(h)) * u(torch.relu(d(h)))
        assert torch.allclose(ffn_out(h_in), expected, atol=1e-6)
    gates = torch.sigmoid(g(x))
    assert gates.std() > 0  # computed per token from the input, not one constant


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="adapter_variant"):
        dt.UniPELTConfig(adapter_variant="sideways")
    with pytest.raises(ValueError, match="non_linearity"):
        dt.MAMConfig(non_linearity="nope")
    with pytest.raises(ValueError, match="rank r"):
        dt.UniPELTConfig(r=0)


def test_cli_method_table():
    from deltatune.train.recipe import method_info

    assert method_info("mam")[2] is dt.MAMConfig
    assert method_info("unipelt")[2] is dt.UniPELTConfig
    assert method_info("ptuning-v2")[2] is dt.PTuningV2Config
    assert method_info("p_tuning_v2")[2] is dt.PTuningV2Config


@pytest.mark.parametrize("method", ["mam", "unipelt", "ptuning-v2"])
def test_trains_through_the_cli(method, tmp_path):
    from typer.testing import CliRunner

    from deltatune.apps.cli import app

    tiny_bert_folder(str(tmp_path / "model"))
    rows = sentiment_rows(40)
    write_csv(str(tmp_path / "train.csv"), rows[:32])
    write_csv(str(tmp_path / "dev.csv"), rows[32:])
    recipe = {
        "model": str(tmp_path / "model"),
        "task": "seq-cls",
        "method": method,
        method.replace("-", "_"): {"num_virtual_tokens": 4},  # option sections are named with underscores
        "train_file": "train.csv",
        "eval_file": "dev.csv",
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "batch_size": 8,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "num_threads": 1,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    config = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert config["peft_type"] == {"ptuning-v2": "PREFIX_TUNING"}.get(method, method.upper())
    assert config["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize("kind", ["mam", "unipelt"])
def test_prefixes_start_at_zero_unless_asked_for_random(kind):
    """Random prefixes collapse some seeds of a classifier (bench/results/scale/prefix_init.md); plain prefix
    tuning keeps peft's N(0, 1)."""
    zero = wrapped(kind, tiny_bert_cls, "SEQ_CLS").prompt_encoder["default"].embedding.weight
    assert torch.count_nonzero(zero) == 0
    random = (
        wrapped(kind, tiny_bert_cls, "SEQ_CLS", init_weights=None).prompt_encoder["default"].embedding.weight
    )
    assert random.std() > 0.5
    plain = dt.get_peft_model(
        tiny_bert_cls(), dt.PrefixTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS")
    )
    assert plain.prompt_encoder["default"].embedding.weight.std() > 0.5
