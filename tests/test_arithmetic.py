"""Adapter arithmetic (`add_weighted_adapter`, `deltatune merge-adapters`), side by side with peft 0.21.2.

The deterministic kinds must give peft's adapter; the DARE kinds draw their random masks from torch's global
generator in the same order as peft, so with the same seed they give peft's adapter too (and a separate test checks
the drop-and-rescale statistics on their own). Every reported rank and relative error is checked against a number
computed here from the source adapters' update matrices.
"""

import copy
import json
import math

import peft
import pytest
import torch
from helpers import ids, tiny_bert_cls, tiny_cnn, tiny_gpt2, tiny_llama, tiny_llama_folder
from typer.testing import CliRunner

import deltatune as dt
from deltatune.apps.cli import app
from deltatune.methods.lora import arithmetic

WEIGHTS = [0.7, -0.4]  # a negative weight exercises peft's sign-on-A rule


def _pair(make_base, configs, seed=5):
    """A peft model and a deltatune model on copies of one base, each with adapters `default` and `b` (from
    `configs(lib)`) holding the same random factors."""
    base = make_base()
    models = []
    for lib in (peft, dt):
        first, second = configs(lib)
        model = lib.get_peft_model(copy.deepcopy(base), first)
        model.add_adapter("b", second)
        models.append(model)
    g = torch.Generator().manual_seed(seed)
    ours = models[1].state_dict()
    with torch.no_grad():
        for key, tensor in models[0].state_dict().items():
            if "lora_" in key:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
                ours[key].copy_(tensor)
    return models


def _llama_configs(lib):
    return (
        lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        lib.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
    )


@pytest.fixture(scope="module")
def llama_pair():
    return _pair(tiny_llama, _llama_configs)


def _deltas(model, name):
    """Module name -> the adapter's update, (out, in...) for a linear or conv layer and (vocab, dim) for an
    embedding, from peft's layers or ours."""
    out = {}
    for key, module in model.get_base_model().named_modules():
        if "lora" in key.split(".")[-1] or name not in getattr(module, "r", {}):
            continue
        if hasattr(module, "get_delta_weight"):  # peft's: stored layout (GPT-2's Conv1D: transposed)
            delta = module.get_delta_weight(name)
            out[key] = delta.T if getattr(module, "fan_in_fan_out", False) else delta
        else:
            out[key] = module.delta_weight(name)
    return out


def _combine_both(pair, name, kind, seed=11, **options):
    theirs, ours = pair
    torch.manual_seed(seed)
    theirs.add_weighted_adapter(["default", "b"], WEIGHTS, name, combination_type=kind, **options)
    torch.manual_seed(seed)
    report = ours.add_weighted_adapter(["default", "b"], WEIGHTS, name, combination_type=kind, **options)
    return report


def _assert_same_adapter(pair, name, x, atol=1e-5):
    theirs, ours = pair
    expected, got = _deltas(theirs, name), _deltas(ours, name)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key].reshape(got[key].shape), atol=atol, rtol=1e-4)
    theirs.set_adapter(name)
    ours.set_adapter(name)
    with torch.no_grad():
        out_theirs, out_ours = theirs(x), ours(x)
    out_theirs = getattr(out_theirs, "logits", out_theirs)
    torch.testing.assert_close(getattr(out_ours, "logits", out_ours), out_theirs, atol=atol, rtol=1e-4)


CASES = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.6, "svd_rank": 3}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
]


@pytest.mark.parametrize(("kind", "options"), CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_every_combination_type_gives_peft_adapter(llama_pair, kind, options):
    """Linear layers and an embedding, two scalings, a negative weight, adapters on overlapping layer sets."""
    name = f"{kind}_{CASES.index((kind, options))}"
    report = _combine_both(llama_pair, name, kind, **options)
    _assert_same_adapter(llama_pair, name, ids())
    assert report.combination_type == kind and llama_pair[1].peft_config[name].r == report.rank
    assert {row.module for row in report.layers} == set(_deltas(llama_pair[1], name))


def test_conv_and_gpt2_layers_give_peft_adapter():
    """Conv2d (3x3 with stride, and 1x1) and GPT-2's transposed Conv1D, for each family of kinds."""

    def cnn_configs(lib):
        return (
            lib.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "conv2", "head"]),
            lib.LoraConfig(r=3, lora_alpha=3, target_modules=["conv", "conv2"]),
        )

    cnn = _pair(tiny_cnn, cnn_configs)
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, (kind, options) in enumerate([("cat", {}), ("svd", {}), ("ties_svd", {"density": 0.5})]):
        _combine_both(cnn, f"c{i}", kind, **options)
        _assert_same_adapter(cnn, f"c{i}", images)

    def gpt2_configs(lib):
        return (
            lib.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
            lib.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
        )

    gpt2 = _pair(tiny_gpt2, gpt2_configs)
    for i, (kind, options) in enumerate([("linear", {}), ("svd", {}), ("dare_linear_svd", {"density": 0.5})]):
        _combine_both(gpt2, f"g{i}", kind, **options)
        _assert_same_adapter(gpt2, f"g{i}", ids())


def _exact_sum(model, key, weights=WEIGHTS, names=("default", "b")):
    layer = model.get_base_model().get_submodule(key)
    return sum(w * layer.delta_weight(n) for w, n in zip(weights, names) if n in layer.r)


def test_report_gives_rank_and_relative_error(llama_pair):
    _, ours = llama_pair
    cat = ours.add_weighted_adapter(["default", "b"], WEIGHTS, "r_cat", combination_type="cat")
    assert cat.rank == 8 and cat.max_relative_error < 1e-6
    q = "model.layers.0.self_attn.q_proj"
    assert {row.module: row.rank for row in cat.layers}[q] == 8  # both adapters here
    assert {row.module: row.rank for row in cat.layers}["model.layers.0.self_attn.o_proj"] == 4

    full = ours.add_weighted_adapter(["default", "b"], WEIGHTS, "r_full", combination_type="svd", svd_rank=8)
    assert full.max_relative_error < 1e-5  # rank 8 holds a sum of two rank-4 updates exactly

    one = ours.add_weighted_adapter(["default", "b"], WEIGHTS, "r_one", combination_type="svd", svd_rank=1)
    singular = torch.linalg.svdvals(_exact_sum(ours, q).detach())
    eckart_young = float(singular[1:].norm() / singular.norm())  # the best rank-1 error, from the spectrum
    assert {row.module: row.relative_error for row in one.layers}[q] == pytest.approx(eckart_young, rel=1e-4)

    linear = ours.add_weighted_adapter(["default", "b"], WEIGHTS, "r_linear", combination_type="linear")
    exact = _exact_sum(ours, q)
    got = ours.get_base_model().get_submodule(q).delta_weight("r_linear")
    expected = float((got - exact).norm() / exact.norm())
    assert {row.module: row.relative_error for row in linear.layers}[q] == pytest.approx(expected, rel=1e-4)
    assert expected > 0.05  # linear's cross terms: a rough approximation, now measured
    ties = ours.add_weighted_adapter(
        ["default", "b"], WEIGHTS, "r_ties", combination_type="ties", density=0.5
    )
    assert ties.max_relative_error is None and "rank 4" in str(ties)
    assert json.loads(json.dumps(cat.to_dict()))["max_relative_error"] == cat.max_relative_error


def test_ties_by_hand():
    """TIES (Yadav et al. 2023) on numbers worked out by hand: trim to the top half by magnitude, elect the sign of
    the sum, average the weighted entries that agree (an entry nobody keeps stays 0)."""
    t1, t2 = torch.tensor([3.0, -1.0, 2.0, 0.5]), torch.tensor([-2.0, -4.0, 1.0, 0.1])
    # trimmed: t1 -> [3, 0, 2, 0], t2 -> [-2, -4, 0, 0]; sums [1, -4, 2, 0] elect [+, -, +, +]
    merged = arithmetic.combine("ties", [t1, t2], [1.0, 0.5], density=0.5)
    assert merged.tolist() == [3.0, -2.0, 2.0, 0.0]
    by_count = arithmetic.combine("ties", [t1, t2], [1.0, 0.5], density=0.5, majority_sign_method="frequency")
    assert by_count.tolist() == [3.0, -2.0, 2.0, 0.0]  # counts [0, -1, +1, 0]: the same signs here
    pruned = arithmetic.combine("magnitude_prune", [t1, t2], [1.0, 0.5], density=0.5)
    assert pruned.tolist() == [2.0, -2.0, 2.0, 0.0]


def test_dare_keeps_the_expected_update():
    """DARE (Yu et al. 2023): each entry survives with probability `density` and is rescaled by 1/density, so the
    kept fraction is density and the mean is unchanged (5-sigma bounds for 200k entries)."""
    torch.manual_seed(0)
    values = torch.linspace(-1, 1, 200_000)
    dropped = arithmetic.drop_and_rescale(values, 0.3)
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / values.numel())
    torch.testing.assert_close(dropped[kept], values[kept] / 0.3)
    assert abs(dropped.mean().item() - values.mean().item()) < 5 * (values / 0.3).std().item() / math.sqrt(
        values.numel() / 0.3
    )


def test_single_adapter_and_rslora(llama_pair):
    """One adapter: peft's shortcut (linear, exact); a density is honoured, not ignored as in peft. rsLoRA sources
    combine exactly: the new adapter has scaling 1 (peft keeps use_rslora on it, so its result is sqrt(r) too big)."""
    theirs, ours = llama_pair
    for model in llama_pair:
        model.add_weighted_adapter(["default"], [0.5], "halved", combination_type="svd")
    _assert_same_adapter(llama_pair, "halved", ids())
    layer = ours.get_base_model().get_submodule("model.layers.1.self_attn.q_proj")
    torch.testing.assert_close(layer.delta_weight("halved"), 0.5 * layer.delta_weight("default"))
    ours.add_weighted_adapter(["default"], [1.0], "pruned", combination_type="magnitude_prune", density=0.5)
    assert layer.lora_A["pruned"].weight.count_nonzero() <= layer.lora_A["default"].weight.numel() // 2

    rs = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    )
    rs.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"], use_rslora=True))
    with torch.no_grad():
        for name, p in rs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    report = rs.add_weighted_adapter(["default", "b"], WEIGHTS, "rs_cat", combination_type="cat")
    assert rs.peft_config["rs_cat"].use_rslora is False and report.rank == 6
    q = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(rs.get_base_model().get_submodule(q).delta_weight("rs_cat"), _exact_sum(rs, q))


def test_heads_and_files_load_in_peft(tmp_path):
    """The trained head of the one source that has it goes with the combination; the saved combination loads in
    peft with the same outputs; peft's tuner spelling (`base_model.add_weighted_adapter`) works."""
    model = dt.get_peft_model(
        tiny_bert_cls(), dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    )
    model.add_adapter("plain", dt.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.base_model.add_weighted_adapter(["default", "plain"], [1.0, 1.0], "mix", combination_type="cat")
    heads = model.get_base_model().classifier.modules_to_save
    torch.testing.assert_close(heads["mix"].weight, heads["default"].weight)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    model.set_adapter("mix")
    x = ids(2, 6)
    loaded = peft.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-4)
    model.add_adapter("other_head", dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    with pytest.raises(dt.MergeError, match="modules_to_save"):
        model.add_weighted_adapter(["default", "other_head"], [1, 1], "clash", combination_type="cat")
    assert "clash" not in model.peft_config


def test_bad_arguments_raise_and_change_nothing(llama_pair):
    _, ours = llama_pair
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    names = set(ours.peft_config)
    cases = [
        (dt.AdapterNotFoundError, "No adapter named 'nope'", dict(adapters=["default", "nope"])),
        (dt.ConfigError, "2 weights for 1 adapters", dict(adapters=["default"])),
        (dt.ConfigError, "already exists", dict(adapter_name="b")),
        (dt.ConfigError, "Unknown combination_type", dict(combination_type="average")),
        (dt.ConfigError, "needs density", dict(combination_type="ties")),
        (dt.ConfigError, "density is used by the pruning kinds", dict(density=0.5)),
        (dt.ConfigError, "svd_rank apply to the svd kinds only", dict(combination_type="cat", svd_rank=2)),
        (
            dt.ConfigError,
            "majority_sign_method",
            dict(combination_type="dare_linear", density=0.5, majority_sign_method="frequency"),
        ),
        (dt.ConfigError, "CUDA", dict(svd_driver="gesvd")),
    ]
    for error, message, overrides in cases:
        arguments = dict(
            adapters=["default", "b"], weights=WEIGHTS, adapter_name="new", combination_type="svd"
        )
        arguments.update(overrides)
        with pytest.raises(error, match=message):
            ours.add_weighted_adapter(**arguments)
    assert set(ours.peft_config) == names and all(
        torch.equal(before[k], v) for k, v in ours.state_dict().items()
    )

    different = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    different.add_adapter("r4", dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(dt.MergeError, match="same rank"):
        different.add_weighted_adapter(["default", "r4"], [1, 1], "x", combination_type="linear")
    dora = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(dt.MergeError, match="DoRA"):
        dora.add_weighted_adapter(["default"], [1.0], "x", combination_type="linear")


def _two_adapters_on(folder, out):
    from transformers import AutoModelForCausalLM

    for i, targets in enumerate((["q_proj", "v_proj"], ["q_proj"])):
        base = AutoModelForCausalLM.from_pretrained(folder)
        model = dt.get_peft_model(base, dt.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=targets))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
        model.save_pretrained(out / f"a{i}")
    return out / "a0", out / "a1"


def test_cli_merge_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_llama_folder(str(tmp_path / "base"))
    first, second = _two_adapters_on(folder, tmp_path)
    runner = CliRunner()
    args = ["merge-adapters", str(first), str(second), "--weights", "0.6,0.4", "--model", folder]
    result = runner.invoke(app, [*args, "--combination", "cat", "-o", str(tmp_path / "cat"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rank"] == 4 and report["max_relative_error"] < 1e-6 and len(report["layers"]) == 4

    svd = runner.invoke(app, [*args, "--rank", "1", "-o", str(tmp_path / "svd")])
    assert svd.exit_code == 0, svd.output
    assert "(svd): rank 1, 4 layers, max relative error" in svd.output

    # the folder is the adapter add_weighted_adapter makes, and peft loads it
    ours = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), first, adapter_name="x")
    ours.load_adapter(second, adapter_name="y")
    ours.add_weighted_adapter(["x", "y"], [0.6, 0.4], "cat", combination_type="cat")
    ours.set_adapter("cat")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "cat")
    x = ids(2, 6, vocab=20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours(x).logits, atol=1e-5, rtol=1e-4)

    bad = runner.invoke(app, [*args, "--density", "0.5", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "density is used by the pruning kinds" in bad.output
