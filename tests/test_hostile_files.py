"""Careless and hostile adapter folders (issue 15): every field of a config is held to its type and range, a failed
load leaves the model exactly as it was, a file may only hold the adapter's own tensors, and NaN/inf is refused."""

import json
import shutil
import warnings

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_bert_cls, tiny_llama
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.errors import CheckpointError, ConfigError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def fingerprint(model):
    """Everything a failed load must leave alone: module names and types, state-dict keys and values,
    requires_grad and train/eval flags."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_same(before, after):
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["grad"] == before["grad"]
    assert after["training"] == before["training"]


def saved_lora(folder, factory=tiny_llama, **kwargs):
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, **{"target_modules": ["q_proj"], **kwargs}))
    randomize_adapter(model)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """One saved LoRA adapter (q_proj of the tiny Llama); tests change copies of it."""
    return saved_lora(tmp_path_factory.mktemp("lora"))


def copy_of(folder, tmp_path):
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    return tmp_path


def edit_config(folder, **changes):
    data = json.loads((folder / CONFIG).read_text())
    data.update(changes)
    (folder / CONFIG).write_text(json.dumps(data))


# --- field types and ranges (the raw Python errors quoted in the issue) --------------------------------------------
BAD_FIELDS = [
    ("r", True, "LoraConfig.r must be an integer"),
    ("lora_alpha", "16", "LoraConfig.lora_alpha must be a finite number"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("lora_dropout", "0.1", "LoraConfig.lora_dropout must be a finite number"),
    ("target_modules", 3, "LoraConfig.target_modules must be a list of strings"),
    ("layers_to_transform", "0", "LoraConfig.layers_to_transform must be a list of integers"),
    ("rank_pattern", {"q_proj": 0}, "rank_pattern ranks must be positive"),
    ("target_modules", "((", "not a valid regular expression"),
    ("rank_pattern", {"[": 2}, "not a valid regular expression"),
    ("layers_to_transform", [-1], "layers_to_transform holds block indices"),
    ("modules_to_save", "score", "modules_to_save must be a list of strings"),
]


@pytest.mark.parametrize("field,value,message", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_field_in_adapter_config_json_names_the_field(lora_dir, tmp_path, field, value, message):
    edit_config(copy_of(lora_dir, tmp_path), **{field: value})
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match=message) as err:
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert CONFIG in str(err.value) and field in str(err.value)
    assert_same(before, fingerprint(model))


@pytest.mark.parametrize("field,value,message", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_field_in_code_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dt.LoraConfig(**{"target_modules": ["q_proj"], field: value})


@pytest.mark.parametrize(
    "config_cls,kwargs,message",
    [
        (dt.IA3Config, {"feedforward_modules": 5}, "IA3Config.feedforward_modules"),
        (dt.PromptTuningConfig, {"num_virtual_tokens": True}, "num_virtual_tokens"),
        (dt.PromptEncoderConfig, {"num_virtual_tokens": 4, "encoder_hidden_size": -1}, "encoder_hidden_size"),
        (dt.PrefixTuningConfig, {"num_virtual_tokens": 4, "prefix_projection": "yes"}, "prefix_projection"),
        (dt.PrefixTuningConfig, {"num_virtual_tokens": 4, "token_dim": 0}, "token_dim"),
        (dt.AdaLoraConfig, {"total_step": 10, "beta1": "0.85"}, "AdaLoraConfig.beta1"),
        (dt.AdaLoraConfig, {"total_step": 10, "tinit": -1}, "tinit"),
        (dt.AdaLoraConfig, {"total_step": 10, "rank_pattern": {"q": [True]}}, "init_r=12 booleans"),
        (dt.BottleneckConfig, {"scaling": float("inf")}, "BottleneckConfig.scaling must be a finite number"),
        (dt.FreezeConfig, {"trainable_modules": "(("}, "not a valid regular expression"),
        (dt.UniPELTConfig, {"r": 2.5}, "UniPELTConfig.r must be an integer"),
        (dt.LoraConfig, {"task_type": 7}, "task_type"),
    ],
)
def test_every_method_checks_types_and_ranges(config_cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        config_cls(**kwargs)


def test_a_config_changed_after_it_was_built_is_checked_when_used():
    config = dt.LoraConfig(target_modules=["q_proj"])
    config.r = "8"
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="LoraConfig.r must be an integer"):
        dt.get_peft_model(model, config)
    assert_same(before, fingerprint(model))


def test_valid_configs_keep_their_values_and_json():
    config = dt.LoraConfig(target_modules=("v_proj", "q_proj"), lora_alpha=16, layers_to_transform=(1, 0))
    assert config.target_modules == ["q_proj", "v_proj"] and config.layers_to_transform == [0, 1]
    assert config.lora_alpha == 16 and isinstance(config.lora_alpha, int)  # peft writes ints as ints


def test_a_config_of_another_method_is_refused_by_the_wrong_class(lora_dir, tmp_path):
    copy_of(lora_dir, tmp_path)
    with pytest.raises(ConfigError, match="LORA adapter, not a IA3Config"):
        dt.IA3Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["\xff\xfe garbage", "[1, 2]", '{"peft_type": ["LORA"]}', "[" * 100_000])
def test_unreadable_config_files(lora_dir, tmp_path, text):
    copy_of(lora_dir, tmp_path)
    (tmp_path / CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# --- a failed load leaves the model exactly as it was ---------------------------------------------------------------
def test_missing_modules_to_save_leaves_the_model_unchanged(lora_dir, tmp_path):
    """The issue's case: the keys of the model differed after this failed load."""
    edit_config(copy_of(lora_dir, tmp_path), modules_to_save=["no_such_head"])
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ConfigError, match="modules_to_save=\\['no_such_head'\\] matched no module"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert_same(before, fingerprint(model))


def test_failed_load_after_wrapping_leaves_the_model_unchanged(tmp_path):
    """The file misses a tensor: the layers were already wrapped and the head copied when that is found."""
    saved_lora(tmp_path, tiny_bert_cls, task_type="SEQ_CLS", target_modules=["query"])
    state = load_file(tmp_path / WEIGHTS)
    save_file({k: v for k, v in state.items() if "lora_B" not in k}, tmp_path / WEIGHTS)
    model = tiny_bert_cls()
    model.train()
    before = fingerprint(model)
    with pytest.raises(CheckpointError, match="missing"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert_same(before, fingerprint(model))


def test_failed_load_adapter_leaves_the_peft_model_unchanged(tmp_path):
    saved_lora(tmp_path / "good")
    saved_lora(tmp_path / "bad", target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    state = load_file(tmp_path / "bad" / WEIGHTS)
    state["base_model.model.lm_head.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "bad" / WEIGHTS)
    model = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "good", is_trainable=True)
    before, configs = fingerprint(model), dict(model.peft_config)
    with pytest.raises(CheckpointError, match="NaN"):
        model.load_adapter(tmp_path / "bad", adapter_name="second")
    assert_same(before, fingerprint(model))
    assert model.peft_config == configs


def test_failed_pissa_load_restores_the_base_weights(tmp_path):
    """PiSSA rewrites base weights while the adapter is added; a later failure must put them back."""
    saved_lora(tmp_path, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    state = load_file(tmp_path / WEIGHTS)
    save_file({k: v for k, v in state.items() if "v_proj.lora_B" not in k}, tmp_path / WEIGHTS)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(CheckpointError, match="missing"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert_same(before, fingerprint(model))


# --- only the adapter's own tensors load ----------------------------------------------------------------------------
def test_a_base_weight_key_is_refused_by_name_and_the_base_is_untouched(lora_dir, tmp_path):
    copy_of(lora_dir, tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    key = "base_model.model.model.layers.0.mlp.down_proj.weight"
    state[key] = torch.full((32, 64), 7.0)
    save_file(state, tmp_path / WEIGHTS)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(CheckpointError, match="overwrite the base model's own weights.*down_proj.weight"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert_same(before, fingerprint(model))


def test_trained_biases_and_heads_still_load(tmp_path):
    """What belongs to the adapter besides its factors: modules_to_save copies and (bias="all") biases."""
    model = dt.get_peft_model(
        tiny_bert_cls(), dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"], bias="all")
    )
    randomize_adapter(model)
    with torch.no_grad():  # the trained biases differ from the base's
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.5)
    x = ids()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=1e-6)


def test_an_untargeted_embedding_weight_loads_as_peft_writes_it_for_a_resized_vocabulary(lora_dir, tmp_path):
    """peft saves `<embedding>.weight` when the vocabulary was resized; that one base weight may load."""
    copy_of(lora_dir, tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    new_embedding = torch.randn(64, 32)
    state["base_model.model.model.embed_tokens.weight"] = new_embedding
    save_file(state, tmp_path / WEIGHTS)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded.get_base_model().model.embed_tokens.weight, new_embedding)


# --- NaN and infinity -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_by_name(lora_dir, tmp_path, bad):
    copy_of(lora_dir, tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    key = next(k for k in state if "lora_B" in k)
    state[key][0, 0] = bad
    save_file(state, tmp_path / WEIGHTS)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(CheckpointError, match=f"NaN or infinite values: {key}.*allow_nonfinite=True"):
        dt.PeftModel.from_pretrained(model, tmp_path)
    assert_same(before, fingerprint(model))
    with pytest.warns(UserWarning, match=f"NaN or infinite values: {key}"):
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_nonfinite=True)
    assert not torch.isfinite(
        loaded.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    ).all()


def test_integer_tensors_for_float_weights_are_refused(lora_dir, tmp_path):
    copy_of(lora_dir, tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    key = next(iter(state))
    state[key] = state[key].to(torch.int32)
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(CheckpointError, match=f"{key} holds torch.int32"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_legacy_bin_that_is_not_a_dict_of_tensors_is_refused(lora_dir, tmp_path):
    copy_of(lora_dir, tmp_path)
    (tmp_path / WEIGHTS).unlink()
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="not a mapping of tensor names"):
            dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
