"""Sharp checks of the core (layer.py, checkpoint.py, model.py, methods/lora/) written to kill the mutants that
the rest of the suite let live (see docs/mutation.md): each pins one behaviour to an exact value, an exact error or
the exact state left after a failure, on models small enough to run in milliseconds."""

import copy
import inspect
import math
from contextlib import nullcontext

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_adapter, tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune import checkpoint
from deltatune import model as model_module
from deltatune.errors import CheckpointError, ConfigError, MergeError, UnsupportedModelError
from deltatune.layer import AdapterLayer, ModulesToSave
from deltatune.method import Variant
from deltatune.methods.lora import LoraMethod, arithmetic, dora
from deltatune.methods.lora.fused import can_fuse, lora_linear
from deltatune.methods.lora.layers import LoraConv, LoraLinear, layer_class_for


def one_linear(n_adapters=2, dtype=torch.float32, seed=0):
    """A one-Linear model with `n_adapters` LoRA adapters (a0, a1, ...) whose B factors are random."""
    torch.manual_seed(seed)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)).to(dtype), dt.LoraConfig(r=2, target_modules=["0"]), adapter_name="a0"
    )
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", dt.LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in layer.lora_B:
            nn.init.normal_(layer.lora_B[name].weight)
    return model, layer


# --- layer.py: merging and unmerging ---------------------------------------------------------------------------
def test_unmerge_without_originals_undoes_the_newest_merge_first():
    """Without kept originals, `unmerge(1)` undoes the last merge only (a0 stays merged, exactly W + dW_a0)."""
    model, layer = one_linear()
    weight = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["a0", "a1"], keep_original=False)
    assert layer.merged_adapters == ["a0", "a1"] and not layer.keeps_original
    layer.unmerge(1)
    assert layer.merged_adapters == ["a0"]
    torch.testing.assert_close(layer.base_layer.weight, weight + layer.delta_weight("a0"), rtol=0, atol=1e-6)
    layer.unmerge()
    assert layer.merged_adapters == [] and not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep_original", [True, False])
def test_unmerge_count_zero_or_negative_changes_nothing(keep_original):
    model, layer = one_linear()
    layer.merge(adapter_names=["a0", "a1"], keep_original=keep_original)
    merged = layer.base_layer.weight.detach().clone()
    for count in (0, -1):
        layer.unmerge(count)
        assert layer.merged_adapters == ["a0", "a1"]
        assert torch.equal(layer.base_layer.weight, merged)


def test_the_pop_example_unmerging_one_of_three_keeps_the_first_two():
    """The mutation the issue names (`merged_adapters.pop()` -> `pop(0)`) leaves a0 unmerged instead of a2."""
    model, layer = one_linear(n_adapters=3)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["a0", "a1", "a2"], keep_original=False)
    layer.unmerge(1)
    assert layer.merged_adapters == ["a0", "a1"]
    expected = weight + layer.delta_weight("a0") + layer.delta_weight("a1")
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-5)


def test_delete_adapter_refuses_a_merged_adapter_and_drops_only_the_deleted_name():
    model, layer = one_linear(n_adapters=3)
    layer.set_adapter(["a0", "a1", "a2"])
    layer.merge(adapter_names=["a0"])
    with pytest.raises(MergeError, match="'a0' is merged into the weights; unmerge it before deleting it"):
        layer.delete_adapter("a0")
    layer.unmerge()
    layer.delete_adapter("a1")
    assert layer.active_adapters == ["a0", "a2"]
    assert "a1" not in layer.lora_A and "a1" not in layer.lora_B and layer.adapter_names == ["a0", "a2"]


def test_merged_and_unmerged_weight_round_once_to_the_weights_dtype():
    model, layer = one_linear(dtype=torch.bfloat16)
    weight = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight("a0")
    assert delta.dtype == torch.float32
    merged = layer.merged_weight("a0", weight)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (weight.float() + delta).to(torch.bfloat16))
    unmerged = layer.unmerged_weight("a0", merged)
    assert unmerged.dtype == torch.bfloat16
    assert torch.equal(unmerged, (merged.float() - delta).to(torch.bfloat16))


def test_a_layer_without_a_merge_rule_says_which_class_cannot_merge():
    class NoRule(AdapterLayer):
        pass

    with pytest.raises(MergeError, match="^NoRule cannot be merged into the base weights"):
        NoRule(nn.Linear(2, 2)).delta_weight("x")


def test_unmerge_with_originals_restores_then_redoes_the_merges_that_stay():
    model, layer = one_linear(n_adapters=3)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["a0"])
    layer.merge(adapter_names=["a1", "a2"])  # a second call keeps the first snapshot (the unmerged W)
    assert layer.keeps_original
    layer.unmerge(2)
    assert layer.merged_adapters == ["a0"] and layer.keeps_original
    torch.testing.assert_close(layer.base_layer.weight, weight + layer.delta_weight("a0"), rtol=0, atol=1e-6)
    layer.unmerge()
    assert layer.merged_adapters == [] and not layer.keeps_original
    assert torch.equal(layer.base_layer.weight, weight)


def test_a_failed_merge_undoes_only_its_own_adapters(monkeypatch):
    model, layer = one_linear(n_adapters=3)
    weight = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["a0"], keep_original=False)
    real = type(layer)._merge_one

    def fail_on_a2(self, name):
        if name == "a2":
            raise RuntimeError("disk on fire")
        real(self, name)

    monkeypatch.setattr(type(layer), "_merge_one", fail_on_a2)
    with pytest.raises(RuntimeError, match="disk on fire"):
        layer.merge(adapter_names=["a1", "a2"], keep_original=False)
    assert layer.merged_adapters == ["a0"]
    torch.testing.assert_close(layer.base_layer.weight, weight + layer.delta_weight("a0"), rtol=0, atol=1e-6)


def test_safe_merge_refuses_a_single_non_finite_value():
    model, layer = one_linear()
    with torch.no_grad():
        layer.lora_B["a1"].weight[0, 0] = float("inf")
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(
        MergeError, match="^Merging adapter 'a1' would put NaN/inf into the weights; nothing was"
    ):
        layer.merge(safe_merge=True, adapter_names=["a0", "a1"])
    assert layer.merged_adapters == [] and torch.equal(layer.base_layer.weight, weight)
    layer.merge(adapter_names=["a0"], safe_merge=True)
    assert layer.merged_adapters == ["a0"]


# --- layer.py: ModulesToSave ---------------------------------------------------------------------------------
def heads(seed=0):
    """A ModulesToSave around a Linear(3, 2) with copies 'a' and 'b' whose weights differ from the original."""
    torch.manual_seed(seed)
    module = ModulesToSave(nn.Linear(3, 2))
    for name in ("a", "b"):
        module.add(name)
        with torch.no_grad():
            module.modules_to_save[name].weight.normal_()
    return module


def test_deleting_the_active_copy_leaves_no_active_adapter():
    module = heads()
    module.set_adapter("a")
    module.delete_adapter("b")
    assert module.active_adapters == ["a"] and module.adapter_names == ["a"]
    module.delete_adapter("a")
    assert module.active_adapter is None and module.active_adapters == [] and module.adapter_names == []
    x = torch.randn(4, 3)
    assert torch.equal(module(x), module.original_module(x))


def test_modules_to_save_rows_run_each_rows_copy_in_order():
    module = heads()
    x = torch.randn(5, 3)
    module.row_adapters = ["b", None, "a", "b", "unknown"]
    out = module(x)
    copies = module.modules_to_save
    expected = torch.stack(
        [
            copies["b"](x[0]),
            module.original_module(x[1]),
            copies["a"](x[2]),
            copies["b"](x[3]),
            module.original_module(x[4]),
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    module.enable_adapters(False)
    torch.testing.assert_close(module(x), module.original_module(x), rtol=0, atol=1e-6)


def test_modules_to_save_rows_must_match_the_batch():
    module = heads()
    module.row_adapters = ["a", "b"]
    with pytest.raises(ConfigError, match="row_adapters names 2 rows but the batch has 5"):
        module(torch.randn(5, 3))


def test_modules_to_save_allows_one_active_copy():
    module = heads()
    with pytest.raises(
        ConfigError, match=r"Only one adapter with modules_to_save can be active at a time; got \['a', 'b'\]"
    ):
        module.set_adapter(["a", "b", "c"])
    module.set_adapter(["c", "b"])
    assert module.active_adapter == "b"
    x = torch.randn(2, 3)
    torch.testing.assert_close(module(x), module.modules_to_save["b"](x), rtol=0, atol=0)
    assert module.weight is module.modules_to_save["b"].weight  # attributes read from the copy that runs


# --- checkpoint.py ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Two Linears with biases plus a head: LoRA on `a`, the head trained in full (`modules_to_save`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def net_with_head(bias="none"):
    torch.manual_seed(0)
    config = dt.LoraConfig(r=2, target_modules=["a"], modules_to_save=["head"], bias=bias)
    return dt.get_peft_model(Net(), config)


def test_layer_entries_name_factors_heads_and_biases_as_peft_does():
    model = net_with_head(bias="all")
    base = model.get_base_model()
    entries = checkpoint.layer_entries(base, "default", bias="all")
    assert sorted(entries) == [
        "base_model.model.a.base_layer.bias",
        "base_model.model.a.lora_A.weight",
        "base_model.model.a.lora_B.weight",
        "base_model.model.b.bias",
        "base_model.model.head.bias",
        "base_model.model.head.weight",
    ]
    assert entries["base_model.model.a.lora_A.weight"] is base.a.lora_A["default"].weight
    assert entries["base_model.model.head.weight"] is base.head.modules_to_save["default"].weight
    assert entries["base_model.model.b.bias"] is base.b.bias
    only = checkpoint.layer_entries(base, "default", bias="lora_only")
    assert only["base_model.model.a.base_layer.bias"] is base.a.base_layer.bias
    assert "base_model.model.b.bias" not in only
    assert checkpoint.layer_entries(base, "other") == {}
    assert checkpoint.trained_biases(base, "none") == {}


def test_all_heads_entries_are_the_adapters_copies():
    model = net_with_head()
    base = model.get_base_model()
    heads_only = checkpoint.all_heads_entries(base, "default")
    assert heads_only == {
        "base_model.model.head.weight": base.head.modules_to_save["default"].weight,
        "base_model.model.head.bias": base.head.modules_to_save["default"].bias,
    }
    assert checkpoint.all_heads_entries(base, "default", prefix="").keys() == {"head.weight", "head.bias"}
    assert checkpoint.all_heads_entries(base, "nope") == {}


def test_written_file_size_is_returned_and_nothing_temporary_is_left(tmp_path):
    entries = {"x": torch.arange(6.0).view(2, 3).T, "y": torch.ones(2, dtype=torch.bfloat16)}
    assert checkpoint.stored_bytes(entries) == 6 * 4 + 2 * 2
    size = checkpoint.write_adapter_file(entries, str(tmp_path / "out"))
    assert size == (tmp_path / "out" / checkpoint.WEIGHTS_NAME).stat().st_size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [checkpoint.WEIGHTS_NAME]
    back = checkpoint.read_adapter_file(tmp_path / "out")
    assert torch.equal(back["x"], entries["x"]) and back["y"].dtype == torch.bfloat16
    assert back["x"].device.type == "cpu"


def test_a_truncated_safetensors_file_is_named_as_damaged(tmp_path):
    checkpoint.write_adapter_file({"x": torch.ones(100)}, str(tmp_path))
    path = tmp_path / checkpoint.WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(
        CheckpointError, match="is damaged or truncated .*; re-save or re-download the adapter"
    ):
        checkpoint.read_adapter_file(tmp_path)


def test_a_legacy_bin_of_plain_tensors_is_read_and_anything_else_refused(tmp_path):
    torch.save({"k": torch.ones(2)}, tmp_path / checkpoint.LEGACY_WEIGHTS_NAME)
    assert torch.equal(checkpoint.read_adapter_file(tmp_path)["k"], torch.ones(2))
    torch.save({"k": [1, 2]}, tmp_path / checkpoint.LEGACY_WEIGHTS_NAME)
    with pytest.raises(
        CheckpointError, match="is not a mapping of tensor names to tensors; it is not an adapter"
    ):
        checkpoint.read_adapter_file(tmp_path)
    (tmp_path / checkpoint.LEGACY_WEIGHTS_NAME).write_bytes(b"not a zip")
    with pytest.raises(
        CheckpointError, match="(?s)Could not read .* as plain tensors .*; it may be corrupt or unsafe"
    ):
        checkpoint.read_adapter_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        checkpoint.read_adapter_file(tmp_path / "empty")


def live(**shapes):
    return {k: torch.zeros(*s) for k, s in shapes.items()}


def test_copy_into_refusal_names_missing_base_and_unknown_keys():
    entries = live(**{f"base_model.model.l{i}.lora_A.weight": (2,) for i in range(4)})
    state = {k: torch.ones(2) for k in list(entries)[:0]}
    state["base_model.model.l0.weight"] = torch.ones(2)
    state["base_model.model.zzz"] = torch.ones(2)
    with pytest.raises(CheckpointError) as err:
        checkpoint.copy_into(entries, state, base_names={"base_model.model.l0.weight"})
    message = str(err.value)
    assert message.startswith(
        "The adapter does not fit this model: 4 tensors the model expects are missing, e.g. "
    )
    assert str(sorted(entries)[:3]) in message and str(sorted(entries)[3]) not in message
    assert (
        "; 1 tensors would overwrite the base model's own weights, e.g. ['base_model.model.l0.weight']"
        in message
    )
    assert "; 1 tensors in the file match nothing in the model, e.g. ['base_model.model.zzz']." in message
    assert "Was it trained for another base model?" not in message
    with pytest.raises(CheckpointError) as err:
        checkpoint.copy_into(entries, {**{k: torch.ones(2) for k in entries}, "x": torch.ones(1)})
    assert str(err.value) == (
        "The adapter does not fit this model: 1 tensors in the file match nothing in the model, e.g. ['x']. "
        "Was it trained for another base model?"
    )
    assert all(torch.equal(t, torch.zeros(2)) for t in entries.values())


def test_copy_into_refusal_of_base_keys_is_one_exact_sentence():
    entries = {"base_model.model.x.lora_A.weight": torch.zeros(1)}
    base = [f"base_model.model.l{i}.weight" for i in range(4)]
    other = [f"base_model.model.z{i}" for i in range(4)]
    state = {**{k: torch.ones(1) for k in entries}, **{k: torch.ones(1) for k in base + other}}
    with pytest.raises(CheckpointError) as err:
        checkpoint.copy_into(entries, state, base_names=set(base))
    assert str(err.value) == (
        f"The adapter does not fit this model: 4 tensors would overwrite the base model's own weights, e.g. "
        f"{base[:3]}; an adapter file may hold only the adapter's tensors (its factors, its modules_to_save copies, "
        f"its trained biases), so it was refused; 4 tensors in the file match nothing in the model, e.g. {other[:3]}."
    )


def test_copy_into_checks_shapes_and_kinds_before_writing_anything():
    entries = {"base_model.model.a": torch.zeros(2), "base_model.model.b": torch.zeros(3)}
    with pytest.raises(
        CheckpointError, match=r"different base: b has shape \(4,\) in the file but \(3,\) in this"
    ):
        checkpoint.copy_into(
            entries, {"base_model.model.a": torch.ones(2), "base_model.model.b": torch.ones(4)}
        )
    with pytest.raises(
        CheckpointError, match=r"base_model.model.b holds torch.int64 values in the file, but the"
    ):
        checkpoint.copy_into(
            entries,
            {"base_model.model.a": torch.ones(2), "base_model.model.b": torch.ones(3, dtype=torch.long)},
        )
    assert all(not t.any() for t in entries.values())


def test_copy_into_converts_to_the_live_dtype_and_loads_allowed_base_tensors():
    entries = {"k": torch.zeros(3, dtype=torch.bfloat16)}
    embed = {"e": torch.zeros(2)}
    checkpoint.copy_into(entries, {"k": torch.tensor([1.5, 2.0, 3.0]), "e": torch.tensor([4.0, 5.0])}, embed)
    assert entries["k"].dtype == torch.bfloat16 and entries["k"].tolist() == [1.5, 2.0, 3.0]
    assert embed["e"].tolist() == [4.0, 5.0]


def test_non_finite_tensors_are_refused_or_loaded_with_a_warning_naming_them():
    entries = {"a": torch.zeros(2), "b": torch.zeros(2), "n": torch.zeros(2, dtype=torch.long)}
    state = {"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2), "n": torch.ones(2, dtype=torch.long)}
    assert checkpoint.non_finite_names(state) == ["a"]
    with pytest.raises(
        CheckpointError, match=r"^1 tensors in the adapter file hold NaN or infinite values: a\. "
    ):
        checkpoint.copy_into(entries, state)
    assert not entries["b"].any()
    with pytest.warns(
        UserWarning, match=r"^1 tensors .* values: a; loaded anyway \(allow_nonfinite=True\)\.$"
    ):
        checkpoint.copy_into(entries, state, allow_nonfinite=True)
    assert entries["b"].tolist() == [1.0, 1.0] and entries["a"].isnan().tolist() == [False, True]


def test_embedding_entries_are_the_base_embedding_tensors():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    base = model.get_base_model()
    out = checkpoint.embedding_entries(base)
    assert (
        out["base_model.model.model.embed_tokens.base_layer.weight"]
        is base.model.embed_tokens.base_layer.weight
    )
    assert out["base_model.model.lm_head.weight"] is base.lm_head.weight
    assert len(out) == 2
    assert checkpoint.embedding_entries(nn.Linear(2, 2)) == {}


# --- methods/lora/layers.py ------------------------------------------------------------------------------------
def wrap(module, name="a0", **config):
    """`module` wrapped by its LoRA layer with one adapter (B random unless init says otherwise)."""
    torch.manual_seed(0)
    layer = layer_class_for(module)(module)
    config = dt.LoraConfig(**{"r": 2, "target_modules": ["x"], **config})
    layer.add(name, config.r, config.lora_alpha, config)
    layer.set_adapter(name)
    return layer


def randomize(layer):
    with torch.no_grad():
        for attr in layer.adapter_attrs[:2]:
            for tensor in getattr(layer, attr).parameters():
                tensor.normal_()
    return layer


@pytest.mark.parametrize("rslora, expected", [(False, 8 / 4), (True, 8 / 2)])
def test_scaling_is_alpha_over_r_or_over_its_root(rslora, expected):
    layer = wrap(nn.Linear(6, 5), r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.25)
    assert layer.scaling == {"a0": expected} and layer.r == {"a0": 4} and layer.dropout == {"a0": 0.25}
    assert tuple(layer.lora_A["a0"].weight.shape) == (4, 6) and tuple(layer.lora_B["a0"].weight.shape) == (
        5,
        4,
    )
    with pytest.raises(ConfigError, match="^Adapter 'a0' already exists on this layer.$"):
        layer.add("a0", 4, 8, dt.LoraConfig(r=4))


def test_factors_train_in_float32_on_a_half_base_and_in_the_base_dtype_otherwise():
    assert wrap(nn.Linear(4, 4).to(torch.bfloat16)).lora_A["a0"].weight.dtype == torch.float32
    assert wrap(nn.Linear(4, 4).to(torch.float16)).lora_B["a0"].weight.dtype == torch.float32
    assert wrap(nn.Linear(4, 4).to(torch.float64)).lora_A["a0"].weight.dtype == torch.float64
    assert wrap(nn.Embedding(5, 4).to(torch.float64)).lora_embedding_A["a0"].dtype == torch.float64


def test_inits_set_the_factors_they_promise():
    plain = wrap(nn.Linear(512, 4), r=8)
    assert not plain.lora_B["a0"].weight.any()
    bound = 1 / 512**0.5  # kaiming_uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert 0.9 * bound < plain.lora_A["a0"].weight.abs().max() <= bound
    gaussian = wrap(nn.Linear(512, 4), r=8, init_lora_weights="gaussian")
    assert not gaussian.lora_B["a0"].weight.any()
    assert abs(gaussian.lora_A["a0"].weight.std().item() - 1 / 8) < 0.01
    untouched = wrap(nn.Linear(512, 4), r=8, init_lora_weights=False)
    assert untouched.lora_B["a0"].weight.any()
    embedding = wrap(nn.Embedding(5, 4))
    assert not embedding.lora_embedding_A["a0"].any() and embedding.lora_embedding_B["a0"].std() > 0.3
    raw = wrap(nn.Embedding(5, 4), init_lora_weights=False)
    assert raw.lora_embedding_A["a0"].any()


@pytest.mark.parametrize("module", [nn.Embedding(5, 4), nn.Conv1d(3, 4, 2)])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_inits_are_for_linear_layers_only(module, init):
    with pytest.raises(
        UnsupportedModelError, match=f"^init_lora_weights='{init}' is supported on Linear layers only"
    ):
        wrap(module, init_lora_weights=init)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_inits_keep_the_output_and_move_the_top_of_w_into_the_factors(init):
    torch.manual_seed(1)
    linear = nn.Linear(6, 5).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    before = linear(x)
    weight = linear.weight.detach().clone()
    layer = wrap(linear, r=2, lora_alpha=4, init_lora_weights=init)
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight("a0"), weight)
    if init == "pissa":  # A B holds the top-2 singular part of W
        u, s, vh = torch.linalg.svd(weight)
        torch.testing.assert_close(layer.delta_weight("a0"), (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)
    integer = nn.Linear(2, 2)
    integer.weight = nn.Parameter(torch.ones(2, 2, dtype=torch.long), requires_grad=False)
    with pytest.raises(
        UnsupportedModelError, match=f"^init_lora_weights='{init}' needs a float base weight; quantize"
    ):
        wrap(integer, init_lora_weights=init)


def test_set_flat_factors_writes_a_lower_rank_and_zeroes_the_rest():
    layer = randomize(wrap(nn.Conv2d(3, 4, 2), r=3))
    a, b = torch.ones(2, 12), torch.full((4, 2), 2.0)
    layer.set_flat_factors("a0", a, b)
    flat_a, flat_b = layer.flat_factors("a0")
    assert tuple(flat_a.shape) == (3, 12) and tuple(flat_b.shape) == (4, 3)
    assert flat_a[:2].eq(1).all() and not flat_a[2].any()
    assert flat_b[:, :2].eq(2).all() and not flat_b[:, 2].any()


@pytest.mark.parametrize(
    "module, x",
    [
        (nn.Linear(6, 5), torch.randn(3, 6)),
        (nn.Embedding(7, 5), torch.tensor([[0, 3, 6], [2, 2, 1]])),
        (nn.Conv1d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 9)),
        (nn.Conv2d(3, 4, 2, stride=1, padding=1), torch.randn(2, 3, 5, 5)),
    ],
    ids=["linear", "embedding", "conv1d", "conv2d"],
)
def test_each_layer_kind_adds_exactly_its_delta_weight_and_merges_to_it(module, x):
    """The forward (s B A x) equals the base with W + s B A computed by hand, for every layer kind."""
    module = module.double()
    x = x.double() if x.is_floating_point() else x
    layer = randomize(wrap(module, r=3, lora_alpha=6))
    a, b = (t.detach().flatten(1) for t in layer.factors("a0"))
    by_hand = 2.0 * (b @ a)  # s = alpha / r = 2
    if isinstance(module, nn.Embedding):
        by_hand = by_hand.T
    by_hand = by_hand.view_as(layer.base_layer.weight) if not isinstance(module, nn.Embedding) else by_hand
    torch.testing.assert_close(layer.delta_weight("a0"), by_hand)
    merged = copy.deepcopy(module)
    with torch.no_grad():
        merged.weight += by_hand
    torch.testing.assert_close(layer(x), merged(x))
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, merged.weight)


def test_dropout_runs_only_in_training_and_the_input_is_cast_to_the_factors_dtype():
    layer = randomize(wrap(nn.Linear(8, 8).to(torch.bfloat16), lora_dropout=0.5))
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    layer.eval()
    expected = layer.base_layer(x) + layer._update("a0", x.float()).to(torch.bfloat16)
    assert torch.equal(layer(x), expected)
    layer.train()
    torch.manual_seed(0)
    dropped = layer._input("a0", x)
    assert (
        dropped.dtype == torch.float32 and bool((dropped == 0).any()) and not torch.equal(dropped, x.float())
    )


def test_embedding_lookup_keeps_padding_rows_out_of_the_gradient():
    layer = randomize(wrap(nn.Embedding(5, 4, padding_idx=0)))
    layer(torch.tensor([0, 1, 0, 3])).sum().backward()
    grad = layer.lora_embedding_A["a0"].grad
    assert not grad[:, 0].any() and grad[:, 1].any() and grad[:, 3].any()


def test_grouped_or_dilated_convolutions_and_other_modules_are_refused_by_name():
    for conv in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(3, 3, 3, dilation=2)):
        with pytest.raises(
            UnsupportedModelError, match="^LoRA on grouped or dilated convolutions is not supported"
        ):
            wrap(conv)
    with pytest.raises(
        UnsupportedModelError, match="^LoRA cannot wrap a LayerNorm; it supports Linear, Embedding"
    ):
        layer_class_for(nn.LayerNorm(3))
    assert layer_class_for(nn.Conv1d(2, 2, 1)) is layer_class_for(nn.Conv2d(2, 2, 1)) is LoraConv


def test_mixed_rows_refuse_dora_adapters():
    layer = wrap(nn.Linear(4, 4), use_dora=True)
    layer.row_adapters = ["a0"]
    with pytest.raises(UnsupportedModelError, match="^Mixed-adapter batches .* do not support DoRA adapters"):
        layer(torch.randn(1, 4))


class Scaled(nn.Linear):
    """A Linear whose forward takes a keyword argument (as attention modules take masks)."""

    def forward(self, x, scale=1.0):
        return super().forward(x) * scale


def test_modules_to_save_passes_keyword_arguments_through_and_finds_the_innermost_base():
    module = ModulesToSave(Scaled(3, 2))
    module.add("a")
    module.set_adapter("a")
    x = torch.randn(2, 3)
    torch.testing.assert_close(module(x, scale=3.0), 3.0 * module.modules_to_save["a"](x), rtol=0, atol=1e-6)
    module.row_adapters = ["a", None]
    torch.testing.assert_close(module(x, scale=3.0), 3.0 * module.modules_to_save["a"](x), rtol=0, atol=1e-6)
    inner = Scaled(3, 2)
    assert ModulesToSave(ModulesToSave(inner)).get_base_layer() is inner


def test_a_fresh_modules_to_save_runs_the_original_and_names_longer_adapters_whole():
    module = ModulesToSave(Scaled(3, 2))
    assert module.active_adapter is None and module.active_adapters == []
    module.add("ab")
    module.set_adapter("ab")
    assert module.active_adapter == "ab"
    x = torch.randn(2, 3)
    module.row_adapters = ["ab", None]
    expected = torch.stack([module.modules_to_save["ab"](x[0], 2.0), module.original_module(x[1], 2.0)])
    torch.testing.assert_close(
        module(x, 2.0), expected, rtol=0, atol=1e-6
    )  # positional extras reach the rows


# --- methods/lora/dora.py ----------------------------------------------------------------------------------------
def dora_by_hand(layer, h, x):
    """DoRA's output from its definition: base(x) + (m / ||W + dW|| - 1) * W h + (m / ||W + dW||) * dW h."""
    weight = layer.base_layer.weight
    delta = layer.delta_weight("a0").to(weight.dtype)
    conv = weight.dim() > 2
    norm = (weight + delta).flatten(1).norm(dim=1)
    scale = layer.lora_magnitude_vector["a0"].reshape(-1) / norm
    if conv:
        plain, update = F.conv1d(h, weight, padding=1), F.conv1d(h, delta, padding=1)
        scale = scale[:, None]
    else:
        plain, update = h @ weight.T, h @ delta.T
    return layer.base_layer(x) + (scale - 1) * plain + scale * update


@pytest.mark.parametrize("module", [nn.Linear(6, 5), nn.Conv1d(3, 4, 3, padding=1)], ids=["linear", "conv1d"])
def test_dora_under_dropout_rescales_the_base_applied_to_the_dropped_input(module):
    layer = randomize(wrap(module.double(), use_dora=True, lora_dropout=0.5))
    with torch.no_grad():
        layer.lora_magnitude_vector["a0"].mul_(1.5)
    x = (
        torch.randn(4, 6, dtype=torch.float64)
        if isinstance(module, nn.Linear)
        else torch.randn(2, 3, 7).double()
    )
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    h = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, dora_by_hand(layer, h, x))
    layer.eval()
    torch.testing.assert_close(layer(x), dora_by_hand(layer, x, x))


def test_dora_unmerge_without_originals_inverts_the_merge():
    layer = randomize(wrap(nn.Linear(6, 5).double(), use_dora=True))
    with torch.no_grad():
        layer.lora_magnitude_vector["a0"].mul_(1.5)
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 6, dtype=torch.float64)
    unmerged = layer(x)
    layer.merge(keep_original=False)
    torch.testing.assert_close(layer(x), unmerged)
    norm = (weight + layer.delta_weight("a0")).norm(dim=1)
    expected = (weight + layer.delta_weight("a0")) * (layer.lora_magnitude_vector["a0"] / norm)[:, None]
    torch.testing.assert_close(layer.base_layer.weight, expected)
    layer.unmerge()  # DoRA's rule runs in float32
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-5)
    assert layer._merge_norms == {}


# --- methods/lora/fused.py -------------------------------------------------------------------------------------
def unfused(x, weight, bias, a, b, scaling):
    out = x @ weight.T + (x @ a.T) @ b.T * scaling
    return out if bias is None else out + bias


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("needs", [(0, 0, 1, 1), (1, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1), (0, 0, 1, 0)])
def test_fused_op_gradients_equal_autograd_for_every_subset_that_trains(needs, with_bias):
    """Each gradient the op returns (and the ones it skips) equals autograd on the unfused expression, float64."""
    torch.manual_seed(0)
    tensors = [torch.randn(2, 3, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)]
    bias = (
        torch.randn(5, dtype=torch.float64, requires_grad=bool(with_bias and needs[1])) if with_bias else None
    )
    ours = [t.double().requires_grad_(bool(n)) for t, n in zip(tensors, needs)]
    ref = [t.detach().clone().requires_grad_(bool(n)) for t, n in zip(ours, needs)]
    ref_bias = None if bias is None else bias.detach().clone().requires_grad_(bias.requires_grad)
    out = lora_linear(ours[0], ours[1], bias, ours[2], ours[3], 0.75)
    expected = unfused(ref[0], ref[1], ref_bias, ref[2], ref[3], 0.75)
    torch.testing.assert_close(out, expected)
    assert tuple(out.shape) == (2, 3, 5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for mine, theirs in zip([*ours, bias], [*ref, ref_bias]):
        if theirs is None or not theirs.requires_grad:
            assert mine is None or mine.grad is None
        else:
            torch.testing.assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_op_without_grad_is_the_same_product(with_bias):
    torch.manual_seed(0)
    x, w, a, b = torch.randn(2, 3, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    bias = torch.randn(5) if with_bias else None
    with torch.no_grad():
        out = lora_linear(x, w, bias, a, b, 0.5)
    torch.testing.assert_close(out, unfused(x, w, bias, a, b, 0.5), rtol=1e-5, atol=1e-5)
    assert tuple(out.shape) == (2, 3, 5)


def test_can_fuse_takes_only_the_plain_single_adapter_float_case():
    layer = wrap(nn.Linear(4, 4), lora_dropout=0.1)
    x = torch.randn(2, 4)
    layer.eval()
    assert can_fuse(layer, x, ["a0"])
    assert not can_fuse(layer, x, ["a0", "a0"]) and not can_fuse(layer, x, [])
    assert not can_fuse(layer, x.double(), ["a0"])
    layer.train()
    assert not can_fuse(layer, x, ["a0"])  # dropout at work
    layer.dropout["a0"] = 0.0
    assert can_fuse(layer, x, ["a0"])
    layer.row_adapters = ["a0", "a0"]
    assert not can_fuse(layer, x, ["a0"])
    layer.row_adapters = None
    layer.plain_update = False
    assert not can_fuse(layer, x, ["a0"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_fuse(wrap(nn.Linear(4, 4)), x, ["a0"])
    assert not can_fuse(wrap(nn.Linear(4, 4), use_dora=True), x, ["a0"])
    assert not can_fuse(wrap(nn.Linear(4, 4).to(torch.bfloat16)), x.to(torch.bfloat16), ["a0"])  # f32 factors
    assert can_fuse(wrap(nn.Linear(4, 4).double()), x.double(), ["a0"])
    assert not can_fuse(wrap(Scaled(4, 4)), x, ["a0"])  # a Linear subclass may change the forward


# --- methods/lora/config.py and __init__.py --------------------------------------------------------------------
def test_lora_config_defaults_are_peft_s():
    ours, theirs = dt.LoraConfig(), peft.LoraConfig()
    for field in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "use_dora"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.init_lora_weights is True and ours.rank_pattern == {} and ours.alpha_pattern == {}
    assert ours.peft_type == "LORA"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "^LoRA rank r must be a positive integer, got 0.$"),
        (
            {"rank_pattern": {"q": 0}},
            r"^rank_pattern ranks must be positive integers, got \{'q': 0\}; use r >= 1",
        ),
        ({"bias": "some"}, "^bias must be 'none', 'all' or 'lora_only', got 'some'.$"),
        ({"lora_dropout": 1.0}, r"^lora_dropout must be in \[0, 1\), got 1.0.$"),
        ({"lora_dropout": -0.1}, r"^lora_dropout must be in \[0, 1\), got -0.1.$"),
        (
            {"init_lora_weights": "eva"},
            r"^init_lora_weights must be one of \(True, False, 'gaussian', 'pissa', 'olora'\)",
        ),
    ],
)
def test_lora_config_refuses_bad_values_by_name(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dt.LoraConfig(**kwargs)


def test_lora_config_edges_that_are_allowed():
    assert dt.LoraConfig(r=1, lora_dropout=0.0, rank_pattern={"q": 1}).r == 1
    for bias in ("none", "all", "lora_only"):
        assert dt.LoraConfig(bias=bias).bias == bias
    for init in (True, False, "gaussian", "pissa", "olora"):
        assert dt.LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_rank_and_alpha_patterns_match_the_end_of_the_name_only():
    config = dt.LoraConfig(
        r=4, lora_alpha=16, rank_pattern={"q_proj": 2, "v": 6}, alpha_pattern={"layers.1.q_proj": 3}
    )
    assert config.rank_and_alpha("model.layers.0.q_proj") == (2, 16)
    assert config.rank_and_alpha("model.layers.1.q_proj") == (2, 3)
    assert config.rank_and_alpha("q_proj") == (2, 16)
    assert config.rank_and_alpha("model.xq_proj") == (4, 16)
    assert config.rank_and_alpha("model.q_proj.inner") == (4, 16)
    assert config.rank_and_alpha("model.v") == (6, 16)


def test_lora_method_names_its_variants_and_defaults():
    method = LoraMethod()
    assert method.peft_type == "LORA" and method.config_class is dt.LoraConfig
    assert method.variants == {
        "lora": Variant(),
        "rslora": Variant({"use_rslora": True}),
        "dora": Variant({"use_dora": True}),
        "qlora": Variant(quantize="nf4"),
    }
    assert method.name == "lora" and method.title == "LoRA, rsLoRA, DoRA"
    assert method.typical_lr == 1e-3 and method.recipe_defaults == {"target_modules": "all-linear"}
    assert method.default_targets == "lora" and method.mixed_batches is True


def test_inject_lora_wraps_once_and_marks_transposed_weights():
    model = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["c_attn"]))
    assert model.peft_config["default"].fan_in_fan_out is True
    model.add_adapter("b", dt.LoraConfig(r=3, target_modules=["c_attn"]))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and not isinstance(layer.base_layer, LoraLinear)
    assert layer.adapter_names == ["default", "b"] and layer.r == {"default": 2, "b": 3}
    plain = dt.get_peft_model(nn.Sequential(nn.Linear(3, 3)), dt.LoraConfig(r=2, target_modules=["0"]))
    assert plain.peft_config["default"].fan_in_fan_out is False


# --- model.py (the sampled mutants, see docs/mutation.md) --------------------------------------------------------
def test_parameter_report_counts_by_hand():
    model, layer = one_linear()
    adapter = 2 * 6 + 5 * 2  # A (2 x 6) and B (5 x 2)
    assert model.get_nb_trainable_parameters() == (adapter, 6 * 5 + 5 + 2 * adapter)
    assert model.parameter_report() == {
        "trainable_params": adapter,
        "total_params": 6 * 5 + 5 + 2 * adapter,
        "trainable_percent": 100 * adapter / (6 * 5 + 5 + 2 * adapter),
        "active_adapters": ["a0"],
        "stored_bytes": {"a0": 4 * adapter, "a1": 4 * adapter},
    }


def test_a_4bit_base_counts_its_weights_unpacked_as_peft_does():
    pytest.importorskip("bitsandbytes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_quant.one_torch_thread
    try:
        torch.manual_seed(0)
        base = dt.quantize(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), "nf4")  # the head stays float
        model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["0"]))
        floats = 64 * 64 + 64 + 64 * 8 + 8
        assert model.get_nb_trainable_parameters() == (2 * 64 * 2, floats + 2 * 64 * 2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_sets_inference_mode_from_is_trainable(is_trainable, tmp_path):
    model, _ = one_linear(n_adapters=1)
    model.save_pretrained(str(tmp_path))
    model.load_adapter(
        str(tmp_path / "a0"), "b", is_trainable=is_trainable
    )  # a non-default name: a subfolder
    assert model.peft_config["b"].inference_mode is (not is_trainable)
    model.set_adapter("b")
    layer = model.get_base_model()[0]
    assert layer.lora_A["b"].weight.requires_grad is is_trainable


# --- the random sample of docs/mutation.md (bench/mutation_sample.py): survivors a missing assertion let live ------
def test_get_layer_status_reports_each_adapter_layer_as_peft_does():
    model, _ = one_linear()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)), peft.LoraConfig(r=2, target_modules=["0"]), adapter_name="a0"
    )
    theirs.add_adapter("a1", peft.LoraConfig(r=2, target_modules=["0"]))
    fields = ("name", "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters")
    ours = [{f: getattr(s, f) for f in fields} for s in model.get_layer_status()]
    assert ours == [{f: getattr(s, f) for f in fields} for s in theirs.get_layer_status()]
    assert ours[0]["available_adapters"] == ["a0", "a1"] and ours[0]["active_adapters"] == ["a0"]


def test_named_forward_signature_names_the_inputs_then_takes_any_keyword():
    """transformers reads the columns a model takes from this signature (built once, at import)."""
    parameters = inspect.signature(model_module._named_forward("input_ids", "labels")).parameters
    assert [(n, p.kind, p.default) for n, p in parameters.items()] == [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("input_ids", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("labels", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("kwargs", inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty),
    ]


def test_relative_error_of_a_zero_target_is_zero_when_matched_and_infinite_otherwise():
    a, b = torch.zeros(2, 3), torch.zeros(4, 2)
    assert arithmetic.relative_error(a, b, torch.zeros(4, 3)) == 0.0
    assert arithmetic.relative_error(a, b + 1, torch.zeros(4, 3)) == 0.0  # B A is still zero: A is
    assert arithmetic.relative_error(a + 1, b + 1, torch.zeros(4, 3)) == math.inf
    assert arithmetic.relative_error(a + 1, b + 1, torch.full((4, 3), 4.0)) == pytest.approx(0.5)


def test_add_weighted_adapter_refuses_an_existing_name_before_building_anything():
    model, _ = one_linear()
    with pytest.raises(ConfigError, match="pick a new name for the combination"):
        model.add_weighted_adapter(["a0"], [1.0], "a1")
    # the module function's own defaults are peft's (majority_sign_method="total", combination_type="svd")
    report = arithmetic.add_weighted_adapter(model, ["a0", "a1"], [1.0, 1.0], "both")
    assert report.combination_type == "svd" and "both" in model.peft_config


def test_a_combination_drops_the_first_adapters_alpha_pattern():
    """The factors carry the weights and scalings already: an inherited alpha_pattern would rescale them again."""
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)),
        dt.LoraConfig(r=2, target_modules=["0"], alpha_pattern={"0": 8}),
        adapter_name="a0",
    )
    model.add_adapter("a1", dt.LoraConfig(r=2, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in layer.lora_B:
            nn.init.normal_(layer.lora_B[name].weight)
    model.add_weighted_adapter(["a0", "a1"], [1.0, 0.5], "both", combination_type="cat")
    assert model.peft_config["both"].alpha_pattern == {}
    expected = layer.delta_weight("a0") + 0.5 * layer.delta_weight("a1")
    torch.testing.assert_close(layer.delta_weight("both"), expected, rtol=1e-5, atol=1e-6)


def test_a_saved_p_tuning_adapter_does_not_load_for_training_under_a_new_name(tmp_path):
    config = dt.PromptEncoderConfig(num_virtual_tokens=3, task_type="CAUSAL_LM", encoder_hidden_size=8)
    dt.get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path))
    model = dt.get_peft_model(tiny_llama(), config)
    with pytest.raises(
        CheckpointError, match="^A saved P_TUNING adapter holds the prompts its encoder produced"
    ):
        model.load_adapter(str(tmp_path), "second", is_trainable=True)
    assert list(model.peft_config) == ["default"]


def test_adapter_file_says_format_pt_as_transformers_expects(tmp_path):
    model, _ = one_linear(n_adapters=1)
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "a0" / "adapter_model.safetensors"), "pt") as f:  # a0: not "default"
        assert f.metadata() == {"format": "pt"}


def test_refusals_of_unsupported_options_say_what_to_do(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^low_cpu_mem_usage=True is not supported: deltatune creates adapter weights on the base model's "
        r"device directly\. Leave it False\.$",
    ):
        dt.PeftModel(
            nn.Sequential(nn.Linear(6, 5)), dt.LoraConfig(target_modules=["0"]), low_cpu_mem_usage=True
        )
    model, _ = one_linear(n_adapters=1)
    with pytest.raises(
        ConfigError, match=r"^deltatune writes safetensors only \(pickled \.bin files are unsafe to load\)\.$"
    ):
        model.save_pretrained(str(tmp_path), safe_serialization=False)


def test_add_adapter_keeps_its_own_copy_of_the_config():
    model, _ = one_linear(n_adapters=1)
    config = dt.LoraConfig(r=2, target_modules=["0"])
    model.add_adapter("b", config)
    config.rank_pattern["0"] = 7
    assert model.peft_config["b"].rank_pattern == {}


def test_a_new_prompt_tuning_model_runs_its_prompts():
    """Adapters are enabled from the start: the logits cover the virtual tokens too, as peft's do."""
    model = dt.get_peft_model(
        tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    assert model(input_ids=ids).logits.shape[1] == 4 + 3


# --- model.py: every refusal, word for word (a user reads these; a mutated message is a changed behaviour) ------
def lora_on_linear(n_adapters=1):
    return one_linear(n_adapters=n_adapters)[0]


def ia3_on_linear():
    return dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)), dt.IA3Config(target_modules=["0"], feedforward_modules=[])
    )


def merged(model):
    model.merge_adapter()
    return model


def two_prompt_adapters():
    config = dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    model = dt.get_peft_model(tiny_llama(), config)
    model.add_adapter("b", config)
    return model


MODEL_REFUSALS = [
    (
        lambda tmp: dt.PeftModel(
            nn.Sequential(nn.Linear(6, 5)), dt.LoraConfig(target_modules=["0"]), autocast_adapter_dtype=False
        ),
        ConfigError,
        "autocast_adapter_dtype=False is not supported: deltatune keeps adapter weights in float32 on a "
        "float16/bfloat16 base (as peft does by default), which is what makes their updates stable.",
    ),
    (
        lambda tmp: lora_on_linear()(torch.ones(1, 6), adapter_names="a0"),
        ConfigError,
        "adapter_names must be a list with one adapter name per row, got str.",
    ),
    (
        lambda tmp: lora_on_linear().generate(torch.ones(1, 6), adapter_names=3),
        ConfigError,
        "adapter_names must be a list with one adapter name per row, got int.",
    ),
    (
        lambda tmp: ia3_on_linear()(torch.ones(1, 6), adapter_names=["default"]),
        UnsupportedModelError,
        "Mixed-adapter batches (adapter_names) are supported for LoRA adapters, not IA3; run each adapter in "
        "its own batch with set_adapter().",
    ),
    (
        lambda tmp: merged(lora_on_linear())(torch.ones(1, 6), adapter_names=["a0"]),
        MergeError,
        "adapter_names cannot be used while adapters are merged; call unmerge_adapter() first.",
    ),
    (
        lambda tmp: lora_on_linear().saved_entries("a0", save_embedding_layers="yes"),
        ConfigError,
        "save_embedding_layers must be 'auto', True or False, got 'yes'.",
    ),
    (
        lambda tmp: lora_on_linear().saved_entries("a0", save_embedding_layers=True),
        ConfigError,
        "save_embedding_layers=True needs a transformers model (get_input_embeddings).",
    ),
    (
        lambda tmp: lora_on_linear().add_adapter(
            "b", dt.LoraConfig(target_modules=["0"]), low_cpu_mem_usage=True
        ),
        ConfigError,
        "low_cpu_mem_usage=True is not supported; leave it False.",
    ),
    (
        lambda tmp: lora_on_linear().add_adapter("a0", dt.LoraConfig(target_modules=["0"])),
        ConfigError,
        "An adapter named 'a0' already exists; pick another name or delete it first.",
    ),
    (
        lambda tmp: lora_on_linear().add_adapter(
            "b", dt.IA3Config(target_modules=["0"], feedforward_modules=[])
        ),
        ConfigError,
        "This model holds LORA adapters; a IA3 adapter cannot join them. Use a separate PeftModel (or "
        "merge_and_unload first).",
    ),
    (
        lambda tmp: dt.get_peft_model(
            nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5)), dt.LoraConfig(target_modules=["0"])
        ).add_adapter("b", dt.LoraConfig(target_modules=["1"], modules_to_save=["0"])),
        ConfigError,
        "0 is both adapted and in modules_to_save; choose one.",
    ),
    (
        lambda tmp: dt.get_peft_model(
            nn.Sequential(nn.Linear(6, 5)), dt.LoraConfig(target_modules=["0"], modules_to_save=["head"])
        ),
        ConfigError,
        "modules_to_save=['head'] matched no module of Sequential.",
    ),
    (
        lambda tmp: merged(lora_on_linear()).disable_adapter().__enter__(),
        MergeError,
        "Adapters are merged into the weights; call unmerge_adapter() before disabling them.",
    ),
    (
        lambda tmp: lora_on_linear(2).set_adapter(["a1", "zz"]),
        dt.errors.AdapterNotFoundError,
        "No adapter named 'zz'; this model has: a0, a1.",
    ),
    (
        lambda tmp: lora_on_linear().delete_adapter("a0"),
        ConfigError,
        "Cannot delete the only adapter; use unload() to get the base model back.",
    ),
    (
        lambda tmp: two_prompt_adapters().merge_adapter(),
        MergeError,
        "PROMPT_TUNING adapters change the model's inputs or activations, not its weights, so they cannot be "
        "merged; keep the PeftModel (or use unload() to get the plain base model back).",
    ),
    (
        lambda tmp: lora_on_linear().unmerge_adapter(),
        MergeError,
        "Nothing is merged, so there is nothing to unmerge.",
    ),
    (
        lambda tmp: lora_on_linear().save_pretrained(str(tmp / "file.txt")),
        ConfigError,
        "{tmp}/file.txt is a file; save_pretrained needs a folder.",
    ),
    (
        lambda tmp: lora_on_linear().load_adapter(str(tmp), "b", low_cpu_mem_usage=True),
        ConfigError,
        "autocast_adapter_dtype=False and low_cpu_mem_usage=True are not supported.",
    ),
    (
        lambda tmp: lora_on_linear().load_adapter(str(tmp), "b", autocast_adapter_dtype=False),
        ConfigError,
        "autocast_adapter_dtype=False and low_cpu_mem_usage=True are not supported.",
    ),
    (
        lambda tmp: dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))(
            torch.ones(1, 3, dtype=torch.long), None, None, None, None, None, None, None, None
        ),
        TypeError,
        "forward() takes at most 8 positional arguments, got 9.",
    ),
    (
        lambda tmp: dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))(
            input_ids=torch.ones(1, 3, dtype=torch.long), task_ids=torch.zeros(1)
        ),
        ConfigError,
        "task_ids is for peft's multitask prompt tuning, which deltatune does not have.",
    ),
    (
        lambda tmp: dt.get_peft_model("model", dt.LoraConfig()),
        UnsupportedModelError,
        "get_peft_model needs a torch.nn.Module, got str.",
    ),
    (
        lambda tmp: dt.get_peft_model(lora_on_linear(), dt.LoraConfig(target_modules=["0"])),
        UnsupportedModelError,
        "This model already has adapters; use model.add_adapter(name, config) instead.",
    ),
    (
        lambda tmp: dt.get_peft_model(nn.Linear(2, 2), {"r": 8}),
        TypeError,
        "peft_config must be a deltatune config (e.g. LoraConfig), got dict.",
    ),
    (
        lambda tmp: dt.get_peft_model(nn.Linear(2, 2), dt.LoraConfig(), mixed=True),
        ConfigError,
        "mixed=True (peft's PeftMixedModel, adapters of different methods in one model) is not supported; "
        "use one method per PeftModel.",
    ),
]


@pytest.mark.parametrize("call, error, message", MODEL_REFUSALS)
def test_each_model_refusal_is_its_exact_sentence(call, error, message, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(error) as raised:
        call(tmp_path)
    assert str(raised.value) == message.format(tmp=tmp_path)


def test_load_adapter_into_an_existing_name_of_another_method_is_refused_by_name(tmp_path):
    ia3_on_linear().save_pretrained(str(tmp_path))
    model = lora_on_linear()
    with pytest.raises(ConfigError) as raised:
        model.load_adapter(str(tmp_path), "a0")
    assert str(raised.value) == (
        f"{tmp_path} holds a IA3 adapter; it cannot load into adapter 'a0' (LORA). Pick another adapter_name."
    )


def test_switching_adapters_while_merged_warns_and_unmerges():
    model = lora_on_linear(2)
    model.merge_adapter()
    with pytest.warns(UserWarning) as caught:
        model.set_adapter("a1")
    assert [str(w.message) for w in caught] == [
        "Adapters are merged into the weights; unmerging before switching."
    ]
    assert not any(isinstance(m, AdapterLayer) and m.merged for m in model.modules())


def test_from_pretrained_builds_the_task_class_the_config_names(tmp_path):
    dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM")).save_pretrained(
        str(tmp_path / "lm")
    )
    lora_on_linear().save_pretrained(str(tmp_path / "plain"))
    assert type(dt.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lm"))) is dt.PeftModelForCausalLM
    loaded = dt.PeftModel.from_pretrained(nn.Sequential(nn.Linear(6, 5)), str(tmp_path / "plain" / "a0"))
    assert type(loaded) is dt.PeftModel


def test_load_adapter_into_an_existing_name_loads_the_saved_weights(tmp_path):
    """What transformers' Trainer does when resuming: the folder's tensors replace the live ones."""
    saved, layer = one_linear(n_adapters=1, seed=1)
    saved.save_pretrained(str(tmp_path))
    model, live = one_linear(n_adapters=1, seed=2)
    assert not torch.equal(live.lora_B["a0"].weight, layer.lora_B["a0"].weight)
    model.load_adapter(str(tmp_path / "a0"), "a0", is_trainable=True)
    assert torch.equal(live.lora_B["a0"].weight, layer.lora_B["a0"].weight)
    assert torch.equal(live.lora_A["a0"].weight, layer.lora_A["a0"].weight)


def test_model_card_tags_name_the_method_the_base_and_the_library(tmp_path):
    yaml = pytest.importorskip("yaml")
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path="org/base")
    )
    model.save_pretrained(str(tmp_path / "lm"))
    lora_on_linear().save_pretrained(str(tmp_path / "plain"))

    def card(folder):
        return yaml.safe_load((tmp_path / folder / "README.md").read_text().split("---")[1])

    assert card("lm")["tags"] == sorted(["deltatune", "lora", "base_model:adapter:org/base", "transformers"])
    assert card("lm")["pipeline_tag"] == "text-generation" and card("lm")["library_name"] == "peft"
    assert card("plain")["tags"] == ["deltatune", "lora"] and "pipeline_tag" not in card("plain")


# --- checkpoint.py and the LoRA forwards: what the sampled survivors showed unpinned ----------------------------
def test_a_non_finite_warning_points_at_the_users_call(tmp_path):
    model, layer = one_linear(n_adapters=1)
    with torch.no_grad():
        layer.lora_B["a0"].weight[0, 0] = math.nan
    model.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="loaded anyway") as caught:
        dt.PeftModel.from_pretrained(
            nn.Sequential(nn.Linear(6, 5)), str(tmp_path / "a0"), allow_nonfinite=True
        )
    assert caught[0].filename == __file__
    fresh, _ = one_linear(n_adapters=1)
    with pytest.warns(UserWarning, match="loaded anyway") as caught:
        fresh.load_adapter(str(tmp_path / "a0"), "b", allow_nonfinite=True)
    assert caught[0].filename == __file__


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    def half_written(tensors, path, metadata):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_adapter_file({"w": torch.ones(2)}, str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_lora_only_biases_skip_wrapped_layers_that_have_no_bias_attribute():
    """An embedding has no `bias` attribute at all; the linear layer's bias is the one that trains."""
    base = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 5))
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["0", "1"], bias="lora_only"))
    biases = checkpoint.trained_biases(model.get_base_model(), "lora_only")
    assert list(biases) == ["1.base_layer.bias"] and biases["1.base_layer.bias"] is base[1].base_layer.bias


class ScaledLinear(nn.Linear):
    """A linear layer whose forward takes a keyword (as some models' projections do)."""

    def forward(self, x, *, scale=1.0):
        return super().forward(x) * scale


@pytest.mark.parametrize("use_dora", [False, True])
def test_keyword_arguments_reach_the_base_layer(use_dora):
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(ScaledLinear(6, 5)), dt.LoraConfig(r=2, target_modules=["0"], use_dora=use_dora)
    )
    layer = model.get_base_model()[0]
    x = torch.randn(3, 6)
    expected = layer.base_layer(x, scale=3.0)  # the adapter's B is zero at init: the output is the base's
    torch.testing.assert_close(layer(x, scale=3.0), expected)
    with model.row_adapters(["default"] * 3) if not use_dora else nullcontext():
        torch.testing.assert_close(layer(x, scale=3.0), expected)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_bfloat16_base_gives_bfloat16_outputs(use_dora):
    """The factors train in float32; the layer's output is cast back to the base's dtype."""
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)).to(torch.bfloat16),
        dt.LoraConfig(r=2, target_modules=["0"], use_dora=use_dora),
    )
    layer = model.get_base_model()[0]
    with torch.no_grad():
        nn.init.normal_(layer.lora_B["default"].weight)
    assert layer.lora_B["default"].weight.dtype == torch.float32
    assert layer(torch.randn(3, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_model_half_built_has_no_base_model_attribute():
    """Attribute fall-through must not recurse while `base_model` is not set yet (copy/pickle hooks look first)."""
    bare = dt.PeftModel.__new__(dt.PeftModel)
    nn.Module.__init__(bare)
    assert not hasattr(bare, "base_model")
    assert not hasattr(bare, "anything_else")


def test_deleting_a_prompt_adapter_drops_its_encoder():
    model = two_prompt_adapters()
    assert list(model.prompt_encoder) == ["default", "b"]
    model.delete_adapter("b")
    assert list(model.prompt_encoder) == ["default"] and list(model.peft_config) == ["default"]


def test_with_the_output_embedding_targeted_its_base_weight_is_saved():
    """peft's rule: with embeddings targeted, the wrapped ones' base weights travel (here lm_head, which comes
    after the untargeted input embedding)."""
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM", target_modules=["lm_head", "q_proj"])
    )
    extra = sorted(k for k in model.saved_entries("default") if "lora_" not in k)
    assert extra == ["base_model.model.lm_head.base_layer.weight"]


def test_generate_runs_each_rows_adapter():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model, scale=1.0)
    ids = torch.tensor([[1, 2, 3, 4]])

    def greedy(**kwargs):
        return model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **kwargs)

    with model.disable_adapter():
        base = greedy()
    assert not torch.equal(greedy(), base)  # the adapter changes what is generated
    assert torch.equal(greedy(adapter_names=["__base__"]), base)
    assert torch.equal(greedy(adapter_names=["default"]), greedy())


def test_dora_merge_rules_return_the_weights_dtype():
    """Each merge is computed in float32 and rounded once, to the weight's own dtype."""
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)).to(torch.bfloat16),
        dt.LoraConfig(r=2, target_modules=["0"], use_dora=True),
    )
    layer = model.get_base_model()[0]
    weight = layer.base_weight()
    merged_weight = dora.merged_weight(layer, "default", weight)
    assert merged_weight.dtype == torch.bfloat16
    assert dora.unmerged_weight(layer, "default", merged_weight).dtype == torch.bfloat16


# --- methods/lora/arithmetic.py: every refusal word for word, and the rules the sample found unpinned -----------
def combinable(**second):
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 5)), dt.LoraConfig(r=2, target_modules=["0", "1"]), "a0"
    )
    model.add_adapter("a1", dt.LoraConfig(r=2, target_modules=["0", "1"], **second))
    for layer in (model.get_base_model()[0], model.get_base_model()[1]):
        with torch.no_grad():
            for name in layer.lora_B:
                nn.init.normal_(layer.lora_B[name].weight)
    return model


def combine_with(**options):
    options = {"adapters": ["a0", "a1"], "weights": [1.0, 1.0], "adapter_name": "both", **options}
    return combinable().add_weighted_adapter(**options)


ARITHMETIC_REFUSALS = [
    ({"adapters": []}, ConfigError, "adapters is empty; name the adapters to combine."),
    ({"weights": [1.0]}, ConfigError, "Got 1 weights for 2 adapters; give one weight each."),
    ({"weights": [1.0, math.inf]}, ConfigError, "weights must be finite numbers, got [1.0, inf]."),
    (
        {"adapters": ["a0", "a0"]},
        ConfigError,
        "adapters names an adapter twice (['a0', 'a0']); give each once with its weight.",
    ),
    (
        {"adapters": ["a0", "zz"]},
        dt.errors.AdapterNotFoundError,
        "No adapter named 'zz'; this model has: a0, a1.",
    ),
    (
        {"adapter_name": "a1"},
        ConfigError,
        "An adapter named 'a1' already exists; pick a new name for the combination.",
    ),
    (
        {"combination_type": "mean"},
        ConfigError,
        "Unknown combination_type 'mean'; use one of: linear, ties, dare_linear, dare_ties, magnitude_prune, cat, svd, "
        "ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd.",
    ),
    (
        {"combination_type": "ties", "density": 1.5},
        ConfigError,
        "'ties' needs density, the fraction of entries kept, in (0, 1]; got 1.5.",
    ),
    (
        {"combination_type": "linear", "density": 0.5},
        ConfigError,
        "density is used by the pruning kinds (ties, dare_linear, dare_ties, magnitude_prune and their _svd forms), "
        "not 'linear'.",
    ),
    (
        {"combination_type": "ties", "density": 0.5, "majority_sign_method": "most"},
        ConfigError,
        "majority_sign_method must be 'total' or 'frequency', got 'most'.",
    ),
    (
        {"combination_type": "linear", "majority_sign_method": "frequency"},
        ConfigError,
        "majority_sign_method is used by the ties kinds only, not by 'linear'.",
    ),
    ({"svd_rank": 0}, ConfigError, "svd_rank must be a positive integer, got 0."),
    ({"svd_clamp": 2.0}, ConfigError, "svd_clamp is a quantile in (0, 1], got 2.0."),
    (
        {"combination_type": "cat", "svd_rank": 2, "svd_full_matrices": False},
        ConfigError,
        "svd_rank, svd_full_matrices apply to the svd kinds only, not 'cat'.",
    ),
    (
        {"svd_driver": "gesvd"},
        ConfigError,
        "svd_driver='gesvd' works on CUDA tensors only; leave it None on cpu.",
    ),
]


@pytest.mark.parametrize("options, error, message", ARITHMETIC_REFUSALS)
def test_each_combination_refusal_is_its_exact_sentence(options, error, message):
    with pytest.raises(error) as raised:
        combine_with(**options)
    assert str(raised.value) == message


def test_combination_refusals_of_sources_are_exact():
    model = combinable(rank_pattern={"1": 1})
    with pytest.raises(MergeError) as raised:
        model.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "both", combination_type="linear")
    assert str(raised.value) == (
        "'linear' combines the factors entry by entry, but the adapters have different ranks in this layer "
        "(rank_pattern); use 'cat' or an svd kind."
    )
    assert list(model.peft_config) == ["a0", "a1"]  # nothing was added
    model.add_adapter("a2", dt.LoraConfig(r=3, target_modules=["0"]))
    with pytest.raises(MergeError) as raised:
        model.add_weighted_adapter(["a0", "a2"], [1.0, 1.0], "both", combination_type="linear")
    assert str(raised.value) == (
        "'linear' combines the factors entry by entry, so every adapter needs the same rank; got "
        "{'a0': 2, 'a2': 3}. Use 'cat' or an svd kind."
    )
    with pytest.raises(MergeError) as raised:
        arithmetic._layers_holding(model, ["nowhere"])
    assert str(raised.value) == "No layer holds any of ['nowhere']."
    model.add_adapter("d", dt.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(MergeError) as raised:
        model.add_weighted_adapter(["a0", "d"], [1.0, 1.0], "both")
    assert str(raised.value) == (
        "Adapter 'd' is a DoRA adapter: its per-row magnitude rescales the whole weight, so it does not combine by "
        "adding updates. Combine plain LoRA adapters, or merge DoRA ones into the weights."
    )


def test_one_adapter_with_an_svd_rank_is_truncated_not_copied():
    """peft's one-adapter shortcut to `linear` is taken only when nothing would be dropped."""
    model = combinable()
    report = model.add_weighted_adapter(["a0"], [1.0], "low", combination_type="svd", svd_rank=1)
    assert (report.combination_type, report.rank) == ("svd", 1)
    report = model.add_weighted_adapter(["a0"], [1.0], "same", combination_type="svd")
    assert (report.combination_type, report.rank) == ("linear", 2)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_combination_never_inherits_an_init_that_rewrites_the_base(init):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6))
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["0"], init_lora_weights=init), "a0")
    model.add_weighted_adapter(["a0"], [1.0], "copy", combination_type="linear")
    assert model.peft_config["copy"].init_lora_weights is True


def test_a_hand_built_4bit_layer_still_passes_gradients_after_an_eval_pass():
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad eval call (on CPUs
    with AVX512-BF16, such as this project's), after which no gradient reaches the layer's input. Wrapping the layer
    must prevent that even when deltatune did not quantize it (see deltatune.quant.keep_standard_layout)."""
    bnb = pytest.importorskip("bitsandbytes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_quant.one_torch_thread
    try:
        torch.manual_seed(0)
        quantized = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        weight = nn.Linear(64, 64, bias=False).weight.data
        quantized.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        model = dt.get_peft_model(
            nn.Sequential(nn.Linear(64, 64), quantized.to("cpu")),
            dt.LoraConfig(r=2, target_modules=["0", "1"]),
        )
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 64))
        model.train()
        x = torch.randn(2, 64, requires_grad=True)
        model(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    finally:
        torch.set_num_threads(threads)


def test_dora_and_plain_adapters_together_keep_the_bases_dtype():
    torch.manual_seed(0)
    model = dt.get_peft_model(
        nn.Sequential(nn.Linear(6, 5)).to(torch.bfloat16),
        dt.LoraConfig(r=2, target_modules=["0"], use_dora=True),
        adapter_name="d",
    )
    model.add_adapter("p", dt.LoraConfig(r=2, target_modules=["0"]))
    model.set_adapter(["d", "p"])
    layer = model.get_base_model()[0]
    with torch.no_grad():
        for name in ("d", "p"):
            nn.init.normal_(layer.lora_B[name].weight)
    assert layer(torch.randn(3, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_a_named_forward_passes_its_positional_inputs_by_name():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(task_type="CAUSAL_LM"))
    randomize_adapter(model)
    forward = model_module._named_forward("input_ids", "attention_mask", "labels")
    ids = torch.tensor([[1, 2, 3, 4]])
    out = forward(model, ids, None, ids)
    expected = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)


def test_one_adapter_at_full_density_takes_peft_s_linear_shortcut():
    report = combinable().add_weighted_adapter(["a0"], [1.0], "copy", combination_type="ties", density=1.0)
    assert (report.adapter_name, report.combination_type, report.rank) == ("copy", "linear", 2)


def test_svd_clamp_caps_both_factors_at_the_quantile():
    torch.manual_seed(0)
    update = 0.01 * torch.randn(8, 6)
    u, s, vh = torch.linalg.svd(update, full_matrices=True)
    b, a = u[:, :2] * s[:2], vh[:2]
    high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.9)
    assert a.abs().max() > high and b.abs().max() < high  # the cap bites A here
    clamped_a, clamped_b = arithmetic.truncated_svd(update, 2, 0.9, True, None)
    torch.testing.assert_close(clamped_a, a.clamp(-high, high))
    torch.testing.assert_close(clamped_b, b.clamp(-high, high))
    assert clamped_a.abs().max() == high


def test_the_switching_while_merged_warning_points_at_the_users_call():
    model = lora_on_linear(2)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging before switching") as caught:
        model.set_adapter("a1")
    assert caught[0].filename == __file__  # the user's line, not deltatune's
