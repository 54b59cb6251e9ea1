"""Quantized bases (bitsandbytes on CPU): NF4/FP4/int8 error bounds, QLoRA training, merging, kbit preparation.

Error bound used below (derived, not tuned): a 4-bit layer's weight error is checked against a pure-torch reference
of blockwise-absmax quantization to the bitsandbytes code table; for Gaussian weights (this model's init) the
expected relative Frobenius error eps of that scheme is computed by Monte Carlo from the same code table. For an
input x with isotropic covariance, E||dW x||^2 / E||W x||^2 = ||dW||_F^2 / ||W||_F^2 = eps^2, and errors of
independently quantized layers add in quadrature, so the logits' relative error should stay below
sqrt(sum_l eps_l^2) (the residual stream and norms do not amplify it in this model).
"""

import copy
import math

import pytest
import torch
from helpers import ids, tiny_llama
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import deltatune  # noqa: E402
from deltatune import LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize  # noqa: E402
from deltatune.quant import dequantize_weight, has_quantized_layers, is_quantized  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """bitsandbytes' CPU kernels use the system libgomp, torch its own: with both runtimes spin-waiting on a 2-core box
    a tiny model's step takes ~1 s instead of ~3 ms. One torch thread (or OMP_WAIT_POLICY=PASSIVE at start) avoids it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama64(seed=0, **kw):
    """Tiny Llama with in_features multiples of 64 (bitsandbytes' CPU 4-bit block; see quant.check_cpu_4bit_shapes)."""
    return tiny_llama(seed, hidden_size=64, intermediate_size=128, **kw)


def reference_4bit(w: torch.Tensor, quant_type: str, block: int = 64) -> torch.Tensor:
    """Blockwise absmax quantization to the nearest code value, on the flattened weight (bitsandbytes' layout)."""
    code = bnb.functional.get_4bit_type(quant_type, device="cpu")
    blocks = w.float().reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)
    return (code[idx] * absmax).reshape(w.shape)


def expected_gaussian_error(quant_type: str) -> float:
    w = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    return ((reference_4bit(w, quant_type) - w).norm() / w.norm()).item()


def layer_errors(float_model, quant_model) -> dict[str, float]:
    errors = {}
    floats = dict(float_model.named_modules())
    for name, module in quant_model.named_modules():
        if is_quantized(module):
            w = floats[name].weight
            errors[name] = ((dequantize_weight(module).float() - w).norm() / w.norm()).item()
    return errors


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_weights_match_reference_quantizer(quant_type):
    base = llama64()
    quant = quantize(copy.deepcopy(base), quant_type, double_quant=False)
    layer = quant.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == quant_type
    w = base.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(dequantize_weight(layer), reference_4bit(w, quant_type), atol=1e-6, rtol=0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_model_error_is_within_derived_bound(quant_type):
    base = llama64()
    quant = quantize(copy.deepcopy(base), quant_type)  # double quantization on (QLoRA default)
    assert quant.model.layers[0].self_attn.q_proj.weight.quant_state.nested
    assert isinstance(quant.lm_head, nn.Linear) and not is_quantized(quant.lm_head)  # head skipped by default
    errors = layer_errors(base, quant)
    assert len(errors) == 14
    eps = expected_gaussian_error(quant_type)
    assert 0.05 < eps < 0.2
    for (
        name,
        err,
    ) in errors.items():  # each layer near its expected error (sampling noise, absmax double-quant)
        assert 0.8 * eps < err < 1.15 * eps, (name, err, eps)
    x = ids(batch=4, length=16)
    err = relative(quant(x).logits, base(x).logits)
    bound = math.sqrt(sum(e * e for e in errors.values()))
    assert 0.1 * bound < err < bound, (err, bound)


def test_nf4_beats_fp4_on_gaussian_weights():
    base = llama64()
    nf4 = layer_errors(base, quantize(copy.deepcopy(base), "nf4"))
    fp4 = layer_errors(base, quantize(copy.deepcopy(base), "fp4"))
    assert sum(nf4.values()) < sum(fp4.values())


def test_int8_error_is_small_and_bounded():
    base = llama64()
    quant = quantize(copy.deepcopy(base), "int8")
    layer = quant.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    # row-wise absmax to 127 levels: within half a step of the row's scale, except that bitsandbytes' CPU
    # quantizer rounds values within ~0.05 of a half-step either way (measured: <1 % of entries, max 0.543 step)
    w = base.model.layers[0].mlp.down_proj.weight
    step = w.abs().amax(1, keepdim=True) / 127
    ratio = (dequantize_weight(layer) - w).abs() / step
    assert ratio.max() <= 0.55 and (ratio > 0.5).float().mean() < 0.02
    errors = layer_errors(base, quant)
    x = ids(batch=4, length=16)
    err = relative(quant(x).logits, base(x).logits)
    assert 0 < err < math.sqrt(sum(e * e for e in errors.values())) < 0.05


def train_steps(model, steps=40, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = ids(batch=4, length=16, seed=7)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_lora_trains_on_quantized_base(quant_type):
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    float_losses = train_steps(get_peft_model(llama64(), config))
    model = quantize(llama64(), quant_type)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if is_quantized(m)}
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert is_quantized(layer.base_layer) and layer.lora_A["default"].weight.dtype == torch.float32
    losses = train_steps(peft_model)
    assert losses[-1] < 0.75 * losses[0], losses
    assert abs(losses[-1] - float_losses[-1]) < 0.05  # QLoRA tracks LoRA on the float base
    after = {
        n.replace(".base_layer", ""): m.weight
        for n, m in peft_model.get_base_model().named_modules()
        if is_quantized(m)
    }
    assert all(torch.equal(before[n], after[n]) for n in before)  # the quantized base never moved


def test_bf16_compute_dtype_and_base_weight():
    model = quantize(llama64().to(torch.bfloat16), "nf4")
    q = model.model.layers[0].self_attn.q_proj
    assert q.compute_dtype == torch.bfloat16
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    w = layer.base_weight()
    assert w.shape == (64, 64) and w.is_floating_point()
    torch.testing.assert_close(w, bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16  # the adapter runs in fp32, the output keeps the model's dtype


def test_merge_dequantizes_explicitly_and_keeps_outputs():
    model = quantize(llama64(), "nf4")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    train_steps(peft_model, steps=5)
    peft_model.eval()
    x = ids()
    before = peft_model(x).logits
    with pytest.warns(UserWarning, match="dequantized"):
        peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(x).logits, before, atol=1e-5, rtol=0)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(peft_model(x).logits, before, atol=1e-5, rtol=0)
    assert has_quantized_layers(peft_model)  # unmerging puts the original quantized layers back, bit for bit
    merged = peft_model.merge_and_unload()
    assert not has_quantized_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged(x).logits, before, atol=1e-5, rtol=0)


def test_merge_and_unload_on_quantized_base_warns():
    peft_model = get_peft_model(quantize(llama64(), "nf4"), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="no longer quantized"):
        merged = peft_model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert is_quantized(merged.model.layers[0].self_attn.k_proj)  # untargeted layers stay 4-bit


def test_weight_rewriting_inits_refuse_quantized_base():
    model = quantize(llama64(), "nf4")
    with pytest.raises(TypeError, match="quantized"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert is_quantized(model.model.layers[0].self_attn.q_proj)  # nothing half-applied


def test_prepare_model_for_kbit_training():
    model = quantize(llama64().to(torch.bfloat16), "nf4")
    prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    x = ids()
    peft_model(input_ids=x, labels=x).loss.backward()
    # B starts at zero, so only B has a gradient at the first step
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adalora_on_4bit_base():
    model = quantize(llama64(), "nf4")
    cfg = deltatune.AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=4)
    peft_model = get_peft_model(model, cfg)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    x = ids()
    for step in range(1, 5):
        peft_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        peft_model.on_optimizer_step(step)
        opt.zero_grad()
    assert sum(sum(v) for v in peft_model.peft_config["default"].rank_pattern.values()) == 2 * 4


def test_quantize_errors_are_clear():
    with pytest.raises(ValueError, match="quant_type"):
        quantize(llama64(), "nf3")
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(tiny_llama(), "nf4")  # hidden size 32: bitsandbytes' CPU 4-bit kernel would be wrong
    quantize(tiny_llama(), "int8")  # int8 has no such limit
    peft_model = get_peft_model(llama64(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantize the base model first"):
        quantize(peft_model.get_base_model(), "nf4")
    kept = quantize(llama64(), "nf4", skip=["lm_head", "down_proj"])
    assert type(kept.model.layers[0].mlp.down_proj) is nn.Linear


def test_load_model_and_tokenizer_uses_bitsandbytes_config(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deltatune.models import load_model_and_tokenizer

    llama64().save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    tok.save_pretrained(tmp_path)
    model, _ = load_model_and_tokenizer(str(tmp_path), quantization="nf4")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.weight.quant_state.nested
    base = llama64()
    x = ids()
    eps = expected_gaussian_error("nf4")
    assert relative(model(x).logits, base(x).logits) < math.sqrt(14) * 1.15 * eps
    with pytest.raises(ValueError, match="quantization"):
        load_model_and_tokenizer(str(tmp_path), quantization="nf2")


def test_evaluation_does_not_cut_gradients_of_lower_layers():
    """bitsandbytes repacks 4-bit weights for a gradient-free CPU kernel after an eval pass; deltatune prevents it."""
    peft_model = get_peft_model(quantize(llama64(), "nf4"), LoraConfig(r=4, target_modules="all-linear"))
    x = ids()
    peft_model.eval()
    with torch.no_grad():
        peft_model(x)
    peft_model.train()
    peft_model(input_ids=x, labels=x).loss.backward()
    first = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert not getattr(first.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    assert first.lora_B["default"].weight.grad.abs().sum() > 0
