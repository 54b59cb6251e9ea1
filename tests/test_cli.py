"""The `deltatune` command: train/eval/predict/merge/inspect on a tiny model, every bad input, and 2-process DDP."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import sentiment_rows, tiny_bert_folder, write_csv
from typer.testing import CliRunner

from deltatune.apps.cli import app

ROOT = os.path.dirname(os.path.dirname(__file__))
runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_bert_folder(str(root / "model"))
    rows = sentiment_rows(120)
    write_csv(str(root / "train.csv"), rows[:80])
    write_csv(str(root / "dev.csv"), rows[80:])
    recipe = {
        "model": str(root / "model"),
        "task": "seq-cls",
        "method": "lora",
        "lora": {"r": 2},
        "train_file": "train.csv",
        "eval_file": "dev.csv",
        "output_dir": str(root / "run"),
        "max_steps": 4,
        "batch_size": 8,
        "lr": 1e-2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "num_threads": 1,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def trained(workdir):
    result = cli("train", workdir / "recipe.yaml", "--lora.r", "4", "--lora.lora_alpha=8", "--seed", "1")
    assert result.exit_code == 0, result.output
    return workdir / "run"


def test_train_writes_adapter_config_and_metrics(trained):
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "run_config.yaml"} <= set(
        os.listdir(trained)
    )
    config = json.load(open(trained / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "SEQ_CLS"
    run = yaml.safe_load(open(trained / "run_config.yaml"))
    assert run["labels"] == ["0", "1"] and run["seed"] == 1
    metrics = json.load(open(trained / "metrics.json"))
    assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_f1_macro" in metrics


def test_eval_json_matches_the_training_scores(trained):
    result = cli("eval", trained, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["accuracy"] == pytest.approx(json.load(open(trained / "metrics.json"))["eval_accuracy"])


def test_predict_from_stdin_and_file(trained, workdir):
    result = cli("predict", trained, input="great fun movie\nawful dull plot\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.strip().splitlines()]
    assert len(lines) == 2 and all(x["label"] in ("0", "1") and 0.5 <= x["score"] <= 1 for x in lines)
    assert all(sum(x["scores"].values()) == pytest.approx(1.0) for x in lines)
    from_file = cli("predict", trained, "--file", workdir / "dev.csv")
    assert from_file.exit_code == 0 and len(from_file.stdout.strip().splitlines()) == 40


def test_merge_gives_a_model_transformers_loads(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.train.recipe import load_run

    result = cli("merge", trained, tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "tensors equal" in result.output  # what was written was reloaded and compared
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    peft_model, _, _ = load_run(str(trained))
    x = tok(["great fun movie", "awful plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, peft_model(**x).logits, rtol=1e-4, atol=1e-5)


def test_merge_writes_where_asked_or_refuses_with_the_reason(trained, tmp_path, monkeypatch):
    import transformers

    target = tmp_path / "merged.safetensors"
    target.write_text("keep me")
    result = cli("merge", trained, target)
    assert result.exit_code == 2 and "is an existing file" in result.output
    assert target.read_text() == "keep me"
    result = cli("merge", trained, trained)
    assert result.exit_code == 2 and "the run's own folder" in result.output
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", lambda self, path: None)
    result = cli("merge", trained, tmp_path / "nothing")  # a save that silently writes nothing is caught
    assert result.exit_code == 2 and "Nothing was written" in result.output


def test_inspect_adapter_and_model(trained, workdir):
    result = cli("inspect", trained, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["method"] == "LORA" and info["adapter_params"] > 0
    assert any(t.endswith("attention.self.query") for t in info["targets"])
    model_info = cli("inspect", workdir / "model", "--json")
    assert model_info.exit_code == 0, model_info.output
    assert "query" in json.loads(model_info.stdout)["target_module_names"]


def test_method_table_maps_names_to_config_classes():
    from deltatune.train.recipe import make_peft_config, split_recipe

    for method, flag in (("rslora", "use_rslora"), ("dora", "use_dora")):
        run, _, options = split_recipe({"model": "m", "method": method, "lora": {"r": 4}})
        config = make_peft_config(run, options)
        assert type(config).__name__ == "LoraConfig" and getattr(config, flag) and config.r == 4


# --- bad input: one clear line, exit status 2, never a traceback --------------------------------
def bad(workdir, tmp_path, *extra, recipe=None):
    path = workdir / "recipe.yaml"
    if recipe is not None:
        base = yaml.safe_load(open(path))
        base.update(recipe)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(base))
    result = cli("train", path, "--output_dir", tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    return result.output


def test_missing_file(workdir, tmp_path):
    assert "Data file not found" in bad(workdir, tmp_path, "--train_file", tmp_path / "nope.csv")
    assert "Recipe file not found" in cli("train", tmp_path / "missing.yaml").output


def test_missing_column_lists_columns(workdir, tmp_path):
    out = bad(workdir, tmp_path, "--text_column", "sentence")
    assert "no column 'sentence'" in out and "text, label" in out


def test_unknown_key_suggests_the_closest(workdir, tmp_path):
    assert "Did you mean 'epochs'" in bad(workdir, tmp_path, "--epocs", "3")
    assert "Did you mean 'lora_alpha'" in bad(workdir, tmp_path, "--lora.lora_alhpa", "3")


def test_unknown_method(workdir, tmp_path):
    out = bad(workdir, tmp_path, "--method", "lorra", recipe={"lora": None})
    assert "Unknown method 'lorra'" in out and "lora" in out


def test_eval_label_unseen_in_training(workdir, tmp_path):
    write_csv(str(tmp_path / "dev.csv"), [("good film", 1), ("meh film", 7)])
    out = bad(workdir, tmp_path, "--eval_file", tmp_path / "dev.csv")
    assert "Label 7" in out and "not seen in the training data" in out


def test_empty_dataset(workdir, tmp_path):
    write_csv(str(tmp_path / "empty.csv"), [])
    assert "empty" in bad(workdir, tmp_path, "--train_file", tmp_path / "empty.csv")


def test_negative_lr(workdir, tmp_path):
    assert "lr must be a positive number" in bad(workdir, tmp_path, "--lr", "-1e-4")


# --- data parallel ------------------------------------------------------------------------------
def test_two_process_ddp_matches_one_process(workdir, tmp_path):
    """torchrun with 2 CPU processes (gloo, DistributedDataParallel), batch 4 each, ends with the same adapter
    weights as 1 process with batch 8."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    common = [workdir / "recipe.yaml", "--max_steps", "3", "--lr", "1e-2", "--eval_file", workdir / "dev.csv"]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "deltatune",
            "train",
            *common,
            "--batch_size",
            "8",
            "--output_dir",
            tmp_path / "one",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    two = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "deltatune",
            "train",
            *common,
            "--batch_size",
            "4",
            "--output_dir",
            tmp_path / "two",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=workdir,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    initial_gap = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
        initial_gap = max(initial_gap, float((a[key]).abs().max()))
    assert initial_gap > 0  # the weights moved, so equality is not trivial
    logs = [[json.loads(x) for x in open(tmp_path / run / "log.jsonl")] for run in ("one", "two")]
    assert [r["loss"] for r in logs[0] if "loss" in r] == pytest.approx(
        [r["loss"] for r in logs[1] if "loss" in r], rel=1e-4
    )
    assert json.load(open(tmp_path / "two" / "train_summary.json"))["world_size"] == 2


def test_causal_lm_instruction_recipe_trains_evaluates_and_generates(tmp_path):
    from helpers import tiny_llama_folder

    tiny_llama_folder(str(tmp_path / "llama"))
    rows = [
        {"instruction": "say", "input": w, "output": f"{w} film"} for w in ("good", "bad", "fun", "sad")
    ] * 3
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    held_out = [{"instruction": "say", "input": w, "output": f"{w} film"} for w in ("fine", "happy")]
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in held_out))
    result = cli(
        "train",
        _write(
            tmp_path,
            {
                "model": str(tmp_path / "llama"),
                "task": "causal-lm",
                "train_file": str(tmp_path / "train.jsonl"),
                "eval_file": str(tmp_path / "dev.jsonl"),
                "max_steps": 2,
                "batch_size": 4,
                "lr": 1e-3,
                "max_new_tokens": 3,
                "generate_samples": 4,
                "output_dir": str(tmp_path / "run"),
                "progress": False,
                "tensorboard": False,
                "plot": False,
            },
        ),
    )
    assert result.exit_code == 0, result.output
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert {"eval_loss", "eval_exact_match", "eval_bleu", "eval_chrf"} <= set(metrics)
    out = cli("predict", tmp_path / "run", input='{"instruction": "say", "input": "good"}\n')
    assert out.exit_code == 0, out.output
    assert isinstance(json.loads(out.stdout)["generation"], str)


def _write(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    "method",
    [
        "rslora",
        "dora",
        "adalora",
        "ia3",
        "bottleneck",
        "bitfit",
        "freeze",
        "full",
        "prompt_tuning",
        "p_tuning",
        "prefix",
    ],
)
def test_every_registered_method_trains_from_a_recipe(workdir, tmp_path, method):
    from deltatune.registry import resolve_variant

    peft_type = resolve_variant(method)[0].peft_type
    result = cli(
        "train",
        workdir / "recipe.yaml",
        "--method",
        method,
        "--lora",
        "null",
        "--max_steps",
        "3",
        "--output_dir",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    config = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert config["peft_type"] == peft_type
