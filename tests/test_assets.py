"""The ladder's ONNX -> BertModel conversion, on a tiny BERT exported here (the real file is fetched on demand)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from deltatune.apps.assets import onnx_bert_weights
from deltatune.models import resolve_model_path

onnx = pytest.importorskip("onnx", reason="the ladder extra (onnx) converts ONNX exports")


class _TokenEmbeddings(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_onnx_export_converts_back_to_the_same_bert(tmp_path):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    source = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2)  # every tensor distinct, as in a trained model
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = source(
            input_ids=ids, attention_mask=mask
        ).last_hidden_state  # before export touches the model
    path = str(tmp_path / "bert.onnx")
    torch.onnx.export(
        _TokenEmbeddings(source), (ids, mask), path, input_names=["input_ids", "attention_mask"], dynamo=False
    )
    state = {k.removeprefix("model."): torch.from_numpy(v.copy()) for k, v in onnx_bert_weights(path).items()}
    target = transformers.BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m]
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=ids, attention_mask=mask).last_hidden_state, expected)


def test_unfetched_ladder_models_say_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="deltatune fetch all-mpnet-base-v2"):
        resolve_model_path("all-mpnet-base-v2")
    folder = tmp_path / "models" / "all-mpnet-base-v2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_model_path("All-MPNet-Base-v2") == os.fspath(folder)
