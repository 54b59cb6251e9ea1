"""The README's quickstart is executed, so it can never drift from the code."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs(tmp_path, monkeypatch, smollm2):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block_after("## Quickstart"), "README-quickstart", "exec"), namespace)
    assert (tmp_path / "outputs/quickstart-lora/adapter_model.safetensors").exists()
    assert not any("lora" in n for n, _ in namespace["merged"].named_parameters())
