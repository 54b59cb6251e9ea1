"""What a new user runs into first (issue 15): `deltatune train` with flags alone, `--help` and the README listing
the methods and tasks from the registry, `max_length` read from the data, an ETA before the first step, and
`deltatune serve` picking the task from the adapters and the model."""

import math
import pathlib

import pytest
import torch
import uvicorn
import yaml
from fastapi.testclient import TestClient
from helpers import sentiment_rows, tiny_bert_folder, tiny_llama_folder, word_tokenizer, write_csv
from test_train_trainer import config, lora_mlp, mlp_data, mlp_loss
from typer.testing import CliRunner

import deltatune as dt
from deltatune import registry
from deltatune.apps.cli import app
from deltatune.errors import ConfigError
from deltatune.train import CustomTask, Trainer
from deltatune.train.data import load_table
from deltatune.train.recipe import (
    LENGTH_PERCENTILE,
    RunConfig,
    choices_markdown,
    choose_max_length,
    coerce_numbers,
    recipe_tasks,
    split_train_args,
)
from deltatune.train.task_inference import infer_task

ROOT = pathlib.Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A classifier checkpoint and a causal LM, each with a LoRA adapter of its own task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("first")
    bert, llama = tiny_bert_folder(str(root / "bert")), tiny_llama_folder(str(root / "llama"))
    cls = dt.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(bert),
        dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]),
    )
    cls.save_pretrained(root / "cls_adapter")
    lm = dt.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama),
        dt.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
    )
    lm.save_pretrained(root / "lm_adapter")
    rows = sentiment_rows(60)
    write_csv(str(root / "train.csv"), rows[:40])
    write_csv(str(root / "test.csv"), rows[40:])
    return root


# --- deltatune train: flags alone, help, README ---------------------------------------------------------------------
def test_train_with_flags_alone_is_a_complete_run(folders, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", folders / "bert", "--task", "seq-cls", "--method", "lora"]
    args += ["--train_file", folders / "train.csv", "--test_file", folders / "test.csv", "--output_dir", out]
    args += ["--max_steps", "2", "--batch_size", "8", "--tensorboard", "false", "--plot", "false"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()
    chosen = yaml.safe_load((out / "run_config.yaml").read_text())["max_length"]
    assert f"max_length {chosen}: the {LENGTH_PERCENTILE}th percentile" in result.output
    assert "ETA: about" in result.output and "for 2 steps" in result.output


def test_a_recipe_comes_first_and_flags_alone_need_a_model():
    assert split_train_args(["r.yaml", "--lr", "1"]) == ("r.yaml", ["--lr", "1"])
    assert split_train_args(["--model", "m", "--lr", "1"]) == (None, ["--model", "m", "--lr", "1"])
    result = runner.invoke(app, ["train", "--task", "seq-cls", "--train_file", "x.csv"])
    assert result.exit_code == 2 and "No model given: pass --model" in result.output


def test_only_the_exponent_form_is_read_as_a_number():
    """YAML 1.1 leaves `5e-4` a string (read as the number); a quoted label name '0' stays a string."""
    assert coerce_numbers({"lr": "5e-4", "labels": ["0", "1"]}) == {"lr": 0.0005, "labels": ["0", "1"]}


def test_train_help_shows_both_forms_and_every_method_and_task():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "deltatune train recipes/" in result.output and "deltatune train --model DIR" in result.output
    for name in list(registry.variants()) + list(recipe_tasks()):
        assert name in result.output, name


def test_readme_shows_the_flags_form_and_the_names_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert "deltatune train --model" in readme
    assert choices_markdown() in readme


def test_the_readme_recipe_form_runs_with_its_overrides(folders, tmp_path):
    """The README's first `deltatune train` line (a shipped recipe, then `--key value` overrides) run as written,
    with only the model and the SST-2 files swapped for tiny stand-ins of the same layout."""
    readme = (ROOT / "README.md").read_text()
    line = next(s for s in readme.splitlines() if s.startswith("deltatune train recipes/"))
    recipe = line.split()[2]
    overrides = line.split("overridden:", 1)[1].split()
    assert recipe.endswith(".yaml") and overrides == ["--lr", "5e-4", "--lora.r", "16"]
    rows = sentiment_rows(60, seed=3)
    train_file = write_csv(str(tmp_path / "train.tsv"), rows[:40], ("sentence", "label"), "\t")
    test_file = write_csv(str(tmp_path / "test.tsv"), rows[40:], ("sentence", "label"), "\t")
    swap = ["--model", folders / "bert", "--train_file", train_file, "--eval_file", "null"]
    swap += ["--test_file", test_file, "--output_dir", tmp_path / "run", "--max_steps", "1"]
    swap += ["--tensorboard", "false", "--plot", "false"]
    result = runner.invoke(app, ["train", str(ROOT / recipe), *overrides, *map(str, swap)])
    assert result.exit_code == 0, result.output
    shipped = yaml.safe_load((ROOT / recipe).read_text())
    ran = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())
    assert ran["lr"] == 5e-4 and ran["lora"] == {**shipped["lora"], "r": 16}
    for key in ("task", "method", "text_column", "max_length", "batch_size", "scheduler", "seed"):
        assert ran[key] == shipped[key], key
    assert "test_accuracy" in yaml.safe_load((tmp_path / "run" / "metrics.json").read_text())


# --- max_length from the data ----------------------------------------------------------------------------------------
class FakeModel:
    class config:  # noqa: N801 - stands in for a transformers config
        max_position_embeddings = 64


def test_max_length_is_the_percentile_of_tokenized_lengths_capped_by_the_model(tmp_path):
    tok = word_tokenizer()
    words = ["good"] * 120
    n_words = [1 + i % 30 for i in range(100)] + [100, 100]  # a long tail beyond the model's 64 positions
    write_csv(str(tmp_path / "t.csv"), [(" ".join(words[:n]), i % 2) for i, n in enumerate(n_words)])
    table = load_table(str(tmp_path / "t.csv"))
    run = RunConfig(model="m", task="seq-cls", text_column="text", label_column="label")
    report = choose_max_length(run, tok, FakeModel(), None, table)
    tokenized = sorted(min(n + 2, 64) for n in n_words)  # [CLS] text [SEP], truncated at the model's limit
    assert run.max_length == tokenized[math.ceil(0.98 * len(tokenized)) - 1] == 32
    assert "longest 64" in report and "the model takes at most 64" in report


# --- ETA -----------------------------------------------------------------------------------------------------------
def test_the_eta_is_printed_before_the_first_step_and_changes_nothing(tmp_path, capsys):
    runs = {}
    for progress in (False, True):
        cfg = config(tmp_path / str(progress), max_steps=6, progress=progress)
        model = lora_mlp(dropout=0.3)  # dropout: a probe that drew random numbers would change the curve
        trainer = Trainer(model, CustomTask(mlp_loss), mlp_data(32), None, cfg)
        trainer.train()
        runs[progress] = ([r["loss"] for r in trainer.history], model.state_dict())
    err = capsys.readouterr().err
    assert "ETA: about" in err and "for 6 steps" in err
    assert runs[True][0] == runs[False][0]
    for key, value in runs[False][1].items():
        assert torch.equal(runs[True][1][key], value), key


# --- deltatune serve: the task from the adapters and the model ----------------------------------------------------
def test_the_task_comes_from_the_adapters_then_the_architecture(folders):
    assert infer_task(str(folders / "llama"), {"a": str(folders / "lm_adapter")})[0] == "causal-lm"
    assert infer_task(str(folders / "llama"), {})[0] == "causal-lm"
    assert infer_task(str(folders / "bert"), {"c": str(folders / "cls_adapter")})[0] == "seq-cls"
    # a classifier adapter on a causal LM checkpoint is how a seq-cls LoRA on a decoder is trained
    assert infer_task(str(folders / "llama"), {}, "seq-cls")[0] == "seq-cls"


@pytest.mark.parametrize(
    "model,adapters,task,message",
    [
        (
            "bert",
            {"a": "lm_adapter"},
            None,
            "is a seq-cls checkpoint .a classifier., so it cannot run causal-lm",
        ),
        ("llama", {"a": "lm_adapter", "c": "cls_adapter"}, None, "adapters are for different tasks"),
        ("llama", {"a": "lm_adapter"}, "seq-cls", "Adapter 'a' is a causal-lm adapter"),
    ],
)
def test_a_mismatch_is_refused_in_one_line(folders, model, adapters, task, message):
    with pytest.raises(ConfigError, match=message) as err:
        infer_task(str(folders / model), {k: str(folders / v) for k, v in adapters.items()}, task)
    assert "\n" not in str(err.value)


def test_serve_a_causal_lm_adapter_without_task_gets_generate(folders, monkeypatch):
    """The issue's case: `deltatune serve --model <causal LM> --adapter a=DIR` started as a classifier."""
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda served, **kw: started.setdefault("app", served))
    args = ["serve", "--model", str(folders / "llama"), "--adapter", f"a={folders / 'lm_adapter'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "serving task causal-lm (the adapters' task_type)" in result.output
    with TestClient(started["app"]) as client:
        assert client.get("/health").json()["task"] == "causal-lm"
        reply = client.post("/v1/generate", json={"prompt": "good", "adapter": "a", "max_new_tokens": 2})
        assert reply.status_code == 200, reply.text


def test_serve_refuses_a_causal_lm_adapter_on_a_classifier_at_start(folders, monkeypatch):
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    args = ["serve", "--model", str(folders / "bert"), "--adapter", f"a={folders / 'lm_adapter'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "cannot run causal-lm" in lines[0]
