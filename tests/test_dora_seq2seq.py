"""DoRA on Embedding and Conv1d/Conv2d layers, and soft prompts on encoder-decoder models (T5, BART), side by side
with peft 0.21.2: files load both ways with identical outputs, DoRA trains with peft's gradients and merges exactly,
and a prompted T5/BART generates peft's tokens with peft's scores."""

import copy

import peft
import pytest
import torch
from helpers import ids, randomize_adapter, tiny_cnn, tiny_llama

import deltatune as dt


def tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_bart(seed=0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=3,  # odd: every saved prefix row is used (peft's layout, see methods/prefix.py)
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


def _output(model, x):
    out = model(x)
    return getattr(out, "logits", out)


# --- DoRA on Embedding and Conv ---------------------------------------------------------------------------------
DORA_CASES = {
    "conv": (tiny_cnn, ["conv", "conv1d", "conv2", "head"], lambda: torch.randn(2, 3, 8, 8)),
    "embedding": (tiny_llama, ["embed_tokens", "q_proj"], lambda: ids()),
}


@pytest.mark.parametrize("case", DORA_CASES)
def test_dora_matches_peft_both_ways_and_merges_exactly(case, tmp_path):
    make, targets, inputs = DORA_CASES[case]
    torch.manual_seed(0)
    x, base = inputs(), make()

    def config(lib):
        return lib.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True)

    theirs = peft.get_peft_model(copy.deepcopy(base), config(peft))
    randomize_adapter(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft", is_trainable=True)
    with torch.no_grad():
        expected = _output(theirs, x)
        torch.testing.assert_close(_output(ours, x), expected, atol=1e-6, rtol=1e-5)
        assert (expected - _output(base, x)).abs().max() > 1e-2  # the adapter matters

    # training: the same loss gives peft's gradients for the factors and the magnitudes
    _output(theirs, x).square().mean().backward()
    _output(ours, x).square().mean().backward()
    theirs_grads = {
        k.replace(".weight", "") if "magnitude" in k else k: p.grad for k, p in theirs.named_parameters()
    }
    for key, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs_grads[key], atol=1e-6, rtol=1e-4)

    ours.eval()
    with torch.no_grad():
        ours.merge_adapter()
        torch.testing.assert_close(_output(ours, x), expected, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(_output(ours, x), expected, atol=1e-6, rtol=1e-5)
        state = {k: v.clone() for k, v in base.state_dict().items()}
        unmerged_base = {
            k.replace(".base_layer", ""): v for k, v in ours.get_base_model().state_dict().items()
        }
        for key, value in state.items():  # unmerge restores the base weights to float rounding
            torch.testing.assert_close(unmerged_base[key], value, atol=1e-6, rtol=1e-6)

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(_output(back, x), expected, atol=1e-6, rtol=1e-5)
    fresh = dt.get_peft_model(copy.deepcopy(base), config(dt))  # a new DoRA adapter starts as the base model
    with torch.no_grad():
        torch.testing.assert_close(_output(fresh, x), _output(base, x), atol=1e-6, rtol=1e-5)


# --- soft prompts on encoder-decoder models ---------------------------------------------------------------------
PROMPT_CONFIGS = {
    "prompt_tuning": lambda lib: lib.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
    "p_tuning": lambda lib: lib.PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=16
    ),
    "prefix_tuning": lambda lib: lib.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
}


def _seq2seq_outputs(model, x, mask, labels):
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        generated = model.generate(
            input_ids=x,
            attention_mask=mask,
            max_new_tokens=4,
            num_beams=2,
            suppress_tokens=[0, 1, 2],  # keep a random tiny model off its special tokens
            return_dict_in_generate=True,
            output_scores=True,
        )
    return out.logits, out.loss, generated.sequences, torch.stack(generated.scores)


@pytest.mark.parametrize("make", [tiny_t5, tiny_bart], ids=["t5", "bart"])
@pytest.mark.parametrize("method", PROMPT_CONFIGS)
def test_soft_prompts_on_seq2seq_match_peft_both_ways(make, method, tmp_path):
    base = make()
    x = ids(2, 6, vocab=60, seed=1) + 3
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    labels = ids(2, 4, vocab=60, seed=2) + 3

    ours = dt.get_peft_model(copy.deepcopy(base), PROMPT_CONFIGS[method](dt))
    assert ours.peft_config["default"].num_transformer_submodules == 2  # peft's default for SEQ_2_SEQ_LM
    randomize_adapter(ours, seed=4, scale=1.0)
    ours.save_pretrained(tmp_path / "ours")
    ours.eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    expected = _seq2seq_outputs(theirs, x, mask, labels)
    for got, want in zip(_seq2seq_outputs(ours, x, mask, labels), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (expected[0] - base(input_ids=x, attention_mask=mask, labels=labels).logits).abs().max() > 1e-3

    theirs.save_pretrained(tmp_path / "peft")  # and back: peft's file into deltatune
    loaded = dt.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    for got, want in zip(_seq2seq_outputs(loaded, x, mask, labels), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_seq2seq_prompt_errors():
    with pytest.raises(dt.ConfigError, match="encoder-decoder"):
        dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    with pytest.raises(dt.ConfigError, match="SEQ_2_SEQ_LM"):
        dt.get_peft_model(tiny_t5(), dt.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(dt.ConfigError, match="num_transformer_submodules"):
        dt.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=3)
