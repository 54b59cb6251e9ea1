"""Prompts after [CLS] (`prompt_position="after_first_token"`): the encoder's head reads the real [CLS] again."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_bert_cls

import deltatune as dt
from deltatune.errors import ConfigError


def _batch():
    ids = torch.tensor(
        [[2, 11, 12, 13, 3], [2, 21, 22, 3, 0]]
    )  # [CLS] ... [SEP], the second row right-padded
    mask = (ids != 0).long()
    return ids, mask, torch.zeros_like(ids)


@pytest.mark.parametrize("config_cls", [dt.PromptTuningConfig, dt.PromptEncoderConfig])
def test_prompts_go_after_the_first_token(config_cls, tmp_path):
    model = dt.get_peft_model(
        tiny_bert_cls(),
        config_cls(task_type="SEQ_CLS", num_virtual_tokens=3, prompt_position="after_first_token"),
    )
    model.eval()
    ids, mask, types = _batch()
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits

    # the reference: the base model on [CLS], prompts, the rest, built by hand
    base = model.get_base_model()
    prompts = model.prompt_encoder["default"]().unsqueeze(0).expand(2, -1, -1)
    words = base.get_input_embeddings()(ids)
    embeds = torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1)
    full_mask = torch.cat([mask[:, :1], torch.ones(2, 3, dtype=mask.dtype), mask[:, 1:]], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    with model.disable_adapter():
        ref = base(
            inputs_embeds=embeds,
            attention_mask=full_mask,
            token_type_ids=torch.zeros_like(full_mask),
            position_ids=positions,
        ).logits
    torch.testing.assert_close(out, ref)
    front = dt.get_peft_model(tiny_bert_cls(), config_cls(task_type="SEQ_CLS", num_virtual_tokens=3)).eval()
    front.prompt_encoder["default"].load_state_dict(model.prompt_encoder["default"].state_dict())
    assert not torch.allclose(front(input_ids=ids, attention_mask=mask).logits, out)  # the placement matters

    # the option travels with the adapter; at its default it is not written (the file stays peft's)
    model.save_pretrained(str(tmp_path / "cls"))
    front.save_pretrained(str(tmp_path / "front"))
    assert json.load(open(tmp_path / "cls" / "adapter_config.json"))["prompt_position"] == "after_first_token"
    assert "prompt_position" not in json.load(open(tmp_path / "front" / "adapter_config.json"))
    loaded = dt.PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "cls")).eval()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, out)


def test_after_first_token_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="pads on the left"):
        dt.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_position="after_first_token"
        )
    with pytest.raises(ConfigError, match="prompt_position must be one of"):
        dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2, prompt_position="end")
    model = dt.get_peft_model(
        tiny_bert_cls(),
        dt.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2, prompt_position="after_first_token"),
    )
    ids = torch.tensor([[0, 2, 11, 3]])
    with pytest.raises(ValueError, match="pad on the right"):
        model(input_ids=ids, attention_mask=(ids != 0).long())
