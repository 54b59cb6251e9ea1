"""Merges are exact: each merged weight is the correctly rounded result (the float32 update added, rounded once to
the weight's dtype), unmerging and unloading give the original weights back bit for bit, and merging several
adapters changes all of them or nothing."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deltatune as dt
from deltatune.errors import AdapterNotFoundError, MergeError
from deltatune.layer import AdapterLayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("lora", "dora", "ia3-output", "ia3-input")


def build(method, dtype, out_features, in_features, r, scale, seed, n_adapters, adapter_dtype):
    """A one-layer model in `dtype` with `n_adapters` random adapters of `method` (names a0, a1, ...)."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_features, out_features))
    with torch.no_grad():
        base[0].weight.mul_(scale)
    base = base.to(dtype)
    if method.startswith("ia3"):
        feedforward = ["0"] if method == "ia3-input" else []
        config = lambda: dt.IA3Config(target_modules=["0"], feedforward_modules=feedforward)  # noqa: E731
    else:
        config = lambda: dt.LoraConfig(  # noqa: E731
            r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=method == "dora"
        )
    model = dt.get_peft_model(base, config(), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", config())
    layer = model.base_model.model[0]
    with torch.no_grad():
        for tensor in layer.parameters():
            if tensor is not layer.base_layer.weight and tensor is not layer.base_layer.bias:
                tensor.copy_(torch.randn_like(tensor) * 0.5 + (1.0 if method.startswith("ia3") else 0.0))
    if adapter_dtype is not None:  # adapters cast to the base's half precision (model.to(dtype) does this)
        for tensor in layer.parameters():
            tensor.data = tensor.data.to(adapter_dtype)
    return model, layer


def reference(layer, method, name, weight, bias):
    """The correctly rounded merge of one adapter: computed in float32 from the stored tensors, rounded once."""
    w = weight.float()
    if method.startswith("ia3"):
        vector = layer.ia3_l[name].float()
        if method == "ia3-input":
            return (w * vector.reshape(1, -1)).to(weight.dtype), bias
        new_bias = (bias.float() * vector.reshape(-1)).to(bias.dtype)
        return (w * vector.reshape(-1, 1)).to(weight.dtype), new_bias
    a, b = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
    combined = w + (b @ a) * layer.scaling[name]
    if method == "dora":
        magnitude = layer.lora_magnitude_vector[name].float()
        combined = combined * (magnitude / combined.norm(p=2, dim=1))[:, None]
    return combined.to(weight.dtype), bias


def equal(a, b):
    return torch.equal(a, b) or (a.isnan().any() and torch.equal(a.nan_to_num(), b.nan_to_num()))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(METHODS),
    dtype=st.sampled_from(list(DTYPES)),
    out_features=st.integers(1, 24),
    in_features=st.integers(1, 24),
    r=st.integers(1, 6),
    scale=st.sampled_from([1e-3, 0.05, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
    n_adapters=st.integers(1, 2),
    cast_adapter=st.booleans(),
)
def test_merge_is_correctly_rounded_and_unmerge_unload_restore_bit_exactly(
    method, dtype, out_features, in_features, r, scale, seed, n_adapters, cast_adapter
):
    dtype = DTYPES[dtype]
    adapter_dtype = dtype if cast_adapter and method in ("lora", "ia3-output", "ia3-input") else None
    model, layer = build(method, dtype, out_features, in_features, r, scale, seed, n_adapters, adapter_dtype)
    names = [f"a{i}" for i in range(n_adapters)]
    base = layer.base_layer
    original_w, original_b = base.weight.detach().clone(), base.bias.detach().clone()

    # merged = the correctly rounded reference, adapter after adapter
    expected = []
    w, b = original_w, original_b
    for name in names:
        w, b = reference(layer, method, name, w, b)
        expected.append((w, b))
    model.merge_adapter(names)
    assert layer.keeps_original
    assert equal(base.weight, expected[-1][0]) and equal(base.bias, expected[-1][1])
    unloaded_elsewhere = copy.deepcopy(model).merge_and_unload()[0]  # keeps no originals, same weights
    assert equal(unloaded_elsewhere.weight, expected[-1][0])

    if n_adapters == 2:  # undoing the newest merge leaves exactly the first one merged
        layer.unmerge(1)
        assert equal(base.weight, expected[0][0]) and equal(base.bias, expected[0][1])
        assert layer.merged_adapters == ["a0"]

    model.unmerge_adapter()  # bit-exact, as merge_adapter keeps the originals by default
    assert torch.equal(base.weight, original_w) and torch.equal(base.bias, original_b)
    assert not layer.keeps_original  # the copy is released once nothing is merged

    model.merge_adapter(names)
    plain = model.unload()  # the base model with its original weights
    assert torch.equal(plain[0].weight, original_w) and torch.equal(plain[0].bias, original_b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unmerge_without_originals_is_within_one_rounding(dtype):
    """keep_original=False (what merge_and_unload uses) undoes a merge by its inverse rule: close, not exact."""
    model, layer = build("lora", dtype, 64, 64, 8, 1.0, 0, 1, None)
    original = layer.base_layer.weight.detach().clone()
    model.merge_adapter(keep_original=False)
    assert not layer.keeps_original
    merged = layer.base_layer.weight.detach().float().clone()
    model.unmerge_adapter()
    error = (layer.base_layer.weight.float() - original.float()).abs()
    assert (error <= torch.finfo(dtype).eps * (merged.abs() + original.float().abs())).all()  # two roundings


def test_a_thousand_switches_on_bf16_leave_the_base_bit_identical():
    """The serving pattern: merge one adapter, unmerge, merge another, ... The base never drifts."""
    model, layer = build("lora", torch.bfloat16, 64, 64, 8, 1.0, 0, 2, None)
    original = layer.base_layer.weight.detach().clone()
    merged = {}
    for i in range(1000):
        name = f"a{i % 2}"
        model.merge_adapter([name])
        merged.setdefault(name, layer.base_layer.weight.detach().clone())
        assert torch.equal(layer.base_layer.weight, merged[name])
        model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, original)


def _two_layer_model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)).to(dtype)
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["0", "2"]), adapter_name="good")
    model.add_adapter("bad", dt.LoraConfig(r=4, target_modules=["0", "2"]))
    for layer in (model.base_model.model[0], model.base_model.model[2]):
        for name in ("good", "bad"):
            torch.nn.init.normal_(layer.lora_B[name].weight)
    return model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items()}


def _unchanged(model, before):
    after = model.get_base_model().state_dict()
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    return all(torch.equal(after[k], v) for k, v in before.items()) and not any(m.merged for m in layers)


def test_an_unknown_adapter_name_raises_before_anything_merges():
    model = _two_layer_model()
    before = _weights(model)
    with pytest.raises(AdapterNotFoundError, match="'missing'"):
        model.merge_adapter(["good", "missing"])
    assert _unchanged(model, before)


def test_merging_several_adapters_is_all_or_nothing_under_safe_merge():
    """`bad` is non-finite only in the last layer: the first layer (and `good`) must not stay merged."""
    model = _two_layer_model()
    with torch.no_grad():
        model.base_model.model[2].lora_B["bad"].weight[0, 0] = float("inf")
    before = _weights(model)
    with pytest.raises(MergeError, match="NaN/inf"):
        model.merge_adapter(["good", "bad"], safe_merge=True)
    assert _unchanged(model, before)


def test_a_failure_partway_through_the_writes_is_rolled_back_exactly(monkeypatch):
    """Any error while writing (here: the second layer's second adapter) leaves every weight as it was."""
    model = _two_layer_model()
    before = _weights(model)
    last = model.base_model.model[2]
    original_merge_one = type(last)._merge_one

    def failing(self, name):
        if self is last and name == "bad":
            raise RuntimeError("out of memory")
        return original_merge_one(self, name)

    monkeypatch.setattr(type(last), "_merge_one", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.merge_adapter(["good", "bad"])
    assert _unchanged(model, before)
