"""Sharp checks of the core (layer.py, checkpoint.py, model.py, methods/lora/) written to kill the mutants that
the rest of the suite let live (see docs/mutation.md): each pins one behaviour to an exact value, an exact error or
the exact state left after a failure, on models small enough to run in milliseconds."""

import pytest
import torch
from helpers import tiny_llama
from torch import nn

import deltatune as dt
from deltatune import checkpoint
from deltatune.errors import CheckpointError, ConfigError, MergeError
from deltatune.layer import AdapterLayer, ModulesToSave


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
    with pytest.raises(ConfigError, match="row_adapters names 2 rows but the batch has 3"):
        module(torch.randn(3, 3))


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
