"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2 on tiny Llama, GPT-2 and BERT models.

peft 0.21 is the reference: both libraries must read each other's folders and give the same logits."""

import json
import os
import warnings

import pytest
import torch
from helpers import ids, randomize_adapter, tiny_bert_cls, tiny_gpt2, tiny_llama

import deltatune as dt

peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", module="peft")

TOL = 1e-5
N = 3  # virtual tokens


def causal_configs(lib):
    """name -> config, for the same method in deltatune and in peft."""
    return {
        "prompt": lib.PromptTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"),
        "ptuning-mlp": lib.PromptEncoderConfig(
            num_virtual_tokens=N, task_type="CAUSAL_LM", encoder_hidden_size=12
        ),
        "ptuning-lstm": lib.PromptEncoderConfig(
            num_virtual_tokens=N,
            task_type="CAUSAL_LM",
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=8,
        ),
        "prefix": lib.PrefixTuningConfig(num_virtual_tokens=N, task_type="CAUSAL_LM"),
        "prefix-proj": lib.PrefixTuningConfig(
            num_virtual_tokens=N, task_type="CAUSAL_LM", prefix_projection=True, encoder_hidden_size=10
        ),
    }


def cls_configs(lib):
    prefix = dt.PTuningV2Config if lib is dt else lib.PrefixTuningConfig
    return {
        "prompt": lib.PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_CLS"),
        "ptuning-v2": prefix(num_virtual_tokens=N, task_type="SEQ_CLS"),
    }


# Every method on Llama (rotary positions, grouped-query attention); the main ones on GPT-2 (learned positions).
CAUSAL = [(tiny_llama, k) for k in causal_configs(dt)] + [
    (tiny_gpt2, k) for k in ("prompt", "ptuning-mlp", "prefix")
]
CLS = list(cls_configs(dt))


def make(build, config, seed=3):
    model = dt.get_peft_model(build(), config)
    randomize_adapter(model, seed=seed, scale=1.0)
    return model.eval()


def padded(side: str, batch: int = 3, length: int = 7):
    """A batch whose rows have 7, 5 and 3 real tokens, padded on `side` with token 0."""
    x = ids(batch, length)
    mask = torch.ones_like(x)
    for row, real in enumerate((7, 5, 3)[:batch]):
        pad = slice(0, length - real) if side == "left" else slice(real, length)
        mask[row, pad] = 0
        x[row, pad] = 0
    return x, mask


def real_tokens(x, mask, row):
    return x[row][mask[row].bool()].unsqueeze(0)


# --- padding ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("build,name", CAUSAL, ids=[f"{b.__name__}-{n}" for b, n in CAUSAL])
def test_padded_rows_match_rows_alone_causal(build, name, side):
    model = make(build, causal_configs(dt)[name])
    x, mask = padded(side)
    with torch.no_grad():
        batch_logits = model(input_ids=x, attention_mask=mask).logits
        for row in range(x.shape[0]):
            alone = model(input_ids=real_tokens(x, mask, row)).logits[0]
            in_batch = batch_logits[row, -x.shape[1] :][mask[row].bool()]
            assert torch.allclose(in_batch, alone[-in_batch.shape[0] :], atol=TOL), (row, side)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", CLS)
def test_padded_rows_match_rows_alone_bert(name, side):
    if side == "left" and name == "ptuning-v2":
        pytest.skip("BERT pools its first position, so left padding changes a plain BERT's output too")
    model = make(tiny_bert_cls, cls_configs(dt)[name])
    x, mask = padded(side)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits
        for row in range(x.shape[0]):
            alone = model(input_ids=real_tokens(x, mask, row)).logits[0]
            assert torch.allclose(logits[row], alone, atol=TOL), (row, side)


# --- generation ---------------------------------------------------------------------------------------------------
def greedy_loop(model, x, mask, steps):
    """Reference decoding: re-run the full sequence every step, no cache."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = (
                model(input_ids=x, attention_mask=mask, use_cache=False)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
        x, mask = torch.cat([x, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return x


@pytest.mark.parametrize("build,name", CAUSAL, ids=[f"{b.__name__}-{n}" for b, n in CAUSAL])
def test_generate_equals_greedy_loop(build, name):
    model = make(build, causal_configs(dt)[name])
    x, mask = padded("left")
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, greedy_loop(model, x, mask, 5))
    alone = model.generate(input_ids=real_tokens(x, mask, 2), max_new_tokens=5, do_sample=False)
    assert torch.equal(out[2, -8:], alone[0])


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_generate_options(name):
    model = make(tiny_llama, causal_configs(dt)[name])
    x = ids(2, 6)
    base_len = model.get_base_model().generate(x, max_length=10, do_sample=False).shape
    assert model.generate(x, max_length=10, do_sample=False).shape == base_len == (2, 10)
    assert model.generate(x, max_new_tokens=3, num_beams=2, num_return_sequences=2).shape == (4, 9)
    assert model.generate(x, max_new_tokens=3, do_sample=True, num_return_sequences=3).shape == (6, 9)
    embeds = model.get_input_embeddings()(x)
    from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert torch.equal(from_embeds, model.generate(x, max_new_tokens=3, do_sample=False)[:, 6:])


# --- interop with peft ----------------------------------------------------------------------------------------------
def peft_model(build, config):
    model = peft.get_peft_model(build(), config)
    randomize_adapter(model, seed=5, scale=1.0)
    return model.eval()


def logits(model, x, mask, **extra):
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask, **extra).logits


def max_diff_on_tokens(a, b, mask):
    """Largest difference over the real (and virtual) tokens; padding positions carry no meaning."""
    if a.dim() == 2:  # one row of logits per sequence
        return (a - b).abs().max()
    keep = torch.cat(
        [torch.ones(mask.shape[0], a.shape[1] - mask.shape[1], dtype=mask.dtype), mask], 1
    ).bool()
    return (a - b).abs()[keep].max()


INTEROP = [(m, k, causal_configs) for m, k in CAUSAL] + [(tiny_bert_cls, k, cls_configs) for k in CLS]
INTEROP_IDS = [f"{b.__name__}-{n}" for b, n, _ in INTEROP]


@pytest.mark.parametrize("build,name,configs", INTEROP, ids=INTEROP_IDS)
def test_deltatune_folder_loads_in_peft(tmp_path, build, name, configs):
    ours = make(build, configs(dt)[name])
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    x, mask = padded("right")
    assert max_diff_on_tokens(logits(ours, x, mask), logits(theirs, x, mask), mask) <= TOL


@pytest.mark.parametrize("build,name,configs", INTEROP, ids=INTEROP_IDS)
def test_peft_folder_loads_in_deltatune(tmp_path, build, name, configs):
    theirs = peft_model(build, configs(peft)[name])
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.PeftModel.from_pretrained(build(), tmp_path / "peft")
    x, mask = padded("right")
    assert max_diff_on_tokens(logits(ours, x, mask), logits(theirs, x, mask), mask) <= TOL
    # The config deltatune writes back holds the same fields and values as peft's.
    ours.save_pretrained(tmp_path / "ours")
    mine, original = (
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft")
    )
    for key in ("peft_version", "auto_mapping", "modules_to_save"):
        original.pop(key, None), mine.pop(key, None)
    assert mine == original


def test_same_config_fields_as_peft():
    """A fresh adapter fills token_dim/num_layers/heads like peft (GQA prefixes sized for the key/value heads)."""
    for build, name in CAUSAL:
        ours = dt.get_peft_model(build(), causal_configs(dt)[name]).peft_config["default"].to_dict()
        theirs = peft.get_peft_model(build(), causal_configs(peft)[name]).peft_config["default"].to_dict()
        for key in ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules"):
            assert ours[key] == theirs[key], (build.__name__, name, key)
        assert ours.get("encoder_hidden_size") == theirs.get("encoder_hidden_size")
    prefix = dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=2)).peft_config[
        "default"
    ]
    assert (prefix.token_dim, prefix.num_attention_heads) == (16, 2)  # 2 kv heads of width 8


def test_labels_and_token_types_match_peft(tmp_path):
    theirs = peft_model(tiny_llama, causal_configs(peft)["prompt"])
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    x = ids(2, 6)
    assert abs(ours(input_ids=x, labels=x).loss - theirs(input_ids=x, labels=x).loss) <= TOL
    bert_theirs = peft_model(tiny_bert_cls, cls_configs(peft)["prompt"])
    bert_theirs.save_pretrained(tmp_path / "bert")
    bert_ours = dt.PeftModel.from_pretrained(tiny_bert_cls(), tmp_path / "bert")
    types = torch.zeros_like(x)
    types[:, 3:] = 1
    mask = torch.ones_like(x)
    labels = torch.tensor([0, 1])
    a = bert_ours(input_ids=x, attention_mask=mask, token_type_ids=types, labels=labels)
    b = bert_theirs(input_ids=x, attention_mask=mask, token_type_ids=types, labels=labels)
    assert (a.logits - b.logits).abs().max() <= TOL and abs(a.loss - b.loss) <= TOL


# --- training -------------------------------------------------------------------------------------------------------
def train(model, batch, steps=40, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("name", ["prompt", "ptuning-mlp", "prefix-proj"])
def test_loss_falls_causal(name):
    """Task: answer token 7 everywhere. A wider init than the default 0.02 lets 3 virtual tokens steer the output."""
    model = dt.get_peft_model(tiny_llama(initializer_range=0.2), causal_configs(dt)[name])
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable)
    x, mask = padded("right", batch=2)
    labels = torch.full_like(x, 7).masked_fill(mask == 0, -100)
    losses = train(model, {"input_ids": x, "attention_mask": mask, "labels": labels}, steps=30, lr=0.1)
    assert losses[-1] < 0.5 * losses[0], losses
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, base_before[key]), key


def test_loss_falls_ptuning_v2_classifier():
    model = dt.get_peft_model(tiny_bert_cls(), dt.PTuningV2Config(num_virtual_tokens=4))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder", "base_model"}  # the prefixes and the classifier copy
    x, mask = padded("right", batch=3)
    losses = train(
        model, {"input_ids": x, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}, lr=0.02
    )
    assert losses[-1] < 0.5 * losses[0], losses


# --- save / load / disable ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,name,configs", INTEROP, ids=INTEROP_IDS)
def test_save_load_roundtrip(tmp_path, build, name, configs):
    model = make(build, configs(dt)[name])
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(build(), tmp_path)
    x, mask = padded("right")
    assert torch.equal(logits(model, x, mask), logits(loaded, x, mask))
    saved = loaded.peft_config["default"]
    assert saved.inference_mode and type(saved) is type(dt.PeftConfig.from_pretrained(tmp_path))
    report = model.parameter_report()["stored_bytes"]["default"]
    assert report == os.path.getsize(tmp_path / "adapter_model.safetensors") - _header_bytes(tmp_path)


def _header_bytes(folder):
    with open(folder / "adapter_model.safetensors", "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def test_load_for_training(tmp_path):
    plain = make(tiny_llama, causal_configs(dt)["prompt"])
    plain.save_pretrained(tmp_path / "prompt")
    resumed = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "prompt", is_trainable=True)
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == [
        "prompt_encoder.default.embedding.weight"
    ]
    encoded = make(tiny_llama, causal_configs(dt)["ptuning-mlp"])
    encoded.save_pretrained(tmp_path / "ptuning")
    with pytest.raises(ValueError, match="is_trainable=False"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ptuning", is_trainable=True)


@pytest.mark.parametrize("build,name,configs", INTEROP, ids=INTEROP_IDS)
def test_disable_gives_base_outputs(build, name, configs):
    model = make(build, configs(dt)[name])
    reference = build()
    x, mask = padded("left" if build is not tiny_bert_cls else "right")
    with model.disable_adapter():
        assert torch.equal(logits(model, x, mask), logits(reference, x, mask))
        if build is not tiny_bert_cls:
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False)
            assert torch.equal(
                out, reference.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False)
            )
    assert not torch.equal(logits(model, x, mask), logits(reference, x, mask))


# --- init, adapters, errors ------------------------------------------------------------------------------------------
class CharTokenizer:
    """A stand-in tokenizer object: one id per character."""

    name_or_path = "char-tokenizer"

    def __call__(self, text):
        return {"input_ids": [ord(c) % 64 for c in text]}


def test_text_init_with_tokenizer_object(tmp_path):
    config = dt.PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="abc",
        tokenizer_name_or_path=CharTokenizer(),
    )
    model = dt.get_peft_model(tiny_llama(), config)
    words = model.get_input_embeddings().weight
    expected = words[torch.tensor([ord(c) % 64 for c in "abcab"])]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["tokenizer_name_or_path"] == "char-tokenizer"
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path), peft.PromptTuningConfig)


def test_sample_vocab_init_uses_vocabulary_rows():
    model = dt.get_peft_model(
        tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")
    )
    words = model.get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (words == row).all(-1).any()


def test_several_adapters_switch_and_delete():
    model = make(tiny_llama, causal_configs(dt)["prompt"])
    model.add_adapter("other", dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    x = ids(1, 5)
    first = logits(model, x, None)
    model.set_adapter("other")
    assert logits(model, x, None).shape[1] == 5 + 2 and first.shape[1] == 5 + N
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "prompt_encoder.other.embedding.weight"
    }
    model.delete_adapter("other")
    assert list(model.prompt_encoder) == ["default"] and torch.equal(logits(model, x, None), first)


def test_clear_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        dt.PromptTuningConfig()
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        dt.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="encoder-decoder"):
        dt.get_peft_model(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"))
    model = make(tiny_llama, causal_configs(dt)["prefix"])
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="past_key_values"):
        model(input_ids=ids(1, 4), past_key_values=model.base_model(input_ids=ids(1, 2)).past_key_values)


# --- the real SmolLM2-135M ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_text_init_and_prefix_generation(smollm2, tmp_path):
    import copy

    base, tokenizer = smollm2
    text = "Answer with one word."
    config = dt.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=8,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer,
    )
    prompted = dt.get_peft_model(copy.deepcopy(base), config)
    ids_of_text = (tokenizer(text)["input_ids"] * 8)[:8]
    expected = base.get_input_embeddings().weight[ids_of_text].float()
    assert torch.equal(prompted.prompt_encoder["default"].embedding.weight, expected)

    model = make(
        lambda: copy.deepcopy(base), dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    assert (model.peft_config["default"].token_dim, model.peft_config["default"].num_attention_heads) == (
        192,
        3,
    )
    tokenizer.padding_side = "left"
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    x, mask = batch["input_ids"], batch["attention_mask"]
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, greedy_loop(model, x, mask, 4))
    alone = logits(model, x[1:, -1:], None)[0, -1]
    assert (logits(model, x, mask)[1, -1] - alone).abs().max() <= 1e-4  # left padding moves no position
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    # peft numbers a left-padded row's positions from the first pad, so compare on right padding.
    tokenizer.padding_side = "right"
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    x, mask = batch["input_ids"], batch["attention_mask"]
    assert max_diff_on_tokens(logits(model, x, mask), logits(theirs, x, mask), mask) <= TOL


@pytest.mark.parametrize("method", ["prefix", "mam", "unipelt"])
def test_prefix_methods_refuse_mpnet_with_a_clear_error(method):
    """MPNet's relative position bias is sized to the input tokens, not the prefix keys: torch used to fail deep
    inside its attention (seen in the scale study on all-mpnet-base-v2). The error now names the model and the fix."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from deltatune.errors import UnsupportedModelError
    from deltatune.train.recipe import RunConfig, make_peft_config

    config = MPNetConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = MPNetForSequenceClassification(config)
    peft_config = make_peft_config(RunConfig(task="seq-cls", method=method), {})
    with pytest.raises(UnsupportedModelError, match="MPNet.*relative position bias.*LoRA"):
        dt.get_peft_model(model, peft_config)
