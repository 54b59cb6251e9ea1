"""Honest numbers from `deltatune train`: no row of validation/test was seen in training, a run never reads or
returns another run's files, every file is checked before step 1, the adapter survives a failing evaluation,
and a resume with a changed recipe is refused, naming each change."""

import json
import os
import random

import pytest
import torch
import yaml
from helpers import sentiment_rows, tiny_bert_folder, tiny_mlp, write_csv
from safetensors.torch import load_file
from typer.testing import CliRunner

from deltatune import LoraConfig, get_peft_model
from deltatune.apps.cli import app
from deltatune.errors import RunError
from deltatune.train import CustomTask, TrainConfig, Trainer
from deltatune.train.data import normalize_text
from deltatune.train.recipe import load_recipe, prepare_data, split_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("honest")
    tiny_bert_folder(str(root / "model"))
    # 150 texts, each repeated 1-4 times (372 rows), with random labels: nothing to learn, much to memorize
    rng = random.Random(0)
    texts = [text for text, _ in sentiment_rows(400, seed=1)]
    texts = list(dict.fromkeys(texts))[:150]
    rows = [(text, rng.randrange(2)) for text in texts for _ in range(rng.randint(1, 4))]
    rng.shuffle(rows)
    write_csv(str(root / "dupes.csv"), rows)
    clean = sentiment_rows(120, seed=2)
    write_csv(str(root / "train.csv"), clean[:80])
    write_csv(str(root / "dev.csv"), clean[80:])
    recipe = {
        "model": str(root / "model"),
        "lora": {"r": 2},
        "train_file": str(root / "train.csv"),
        "eval_file": str(root / "dev.csv"),
        "max_steps": 2,
        "batch_size": 8,
        "lr": 1e-2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "num_threads": 1,
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def train(root, out, *extra):
    result = runner.invoke(
        app, ["train", str(root / "recipe.yaml"), "--output_dir", str(out), *map(str, extra)]
    )
    return result.exit_code, result.output


def report_of(out):
    return json.load(open(os.path.join(out, "data_report.json")))


# --- data leaks ----------------------------------------------------------------------------------
def test_a_duplicated_file_splits_with_zero_overlap_in_the_report_and_the_rows(root, tmp_path):
    """372 rows of 150 texts, one file, trained twice (the second time over the first with --overwrite): the
    report and the rows actually used agree, and no validation or test text is in train."""
    args = ("--train_file", root / "dupes.csv", "--eval_file", "null", "--clean.drop_duplicates", "true")
    code, output = train(root, tmp_path / "run", *args)
    assert code == 0, output
    first = report_of(tmp_path / "run")
    code, output = train(root, tmp_path / "run", *args, "--overwrite")
    assert code == 0, output
    report = report_of(tmp_path / "run")
    assert report == first  # the same data, dropped and split the same way

    assert report["rows_read"] == {"train": 372}
    assert report["overlap_with_train"] == {"validation": 0, "test": 0}
    dropped = report["dropped"]
    assert dropped["duplicate"] > 0 and dropped["conflicting_label"] > 0 and report["conflicting_texts"] > 0
    assert sum(report["rows"].values()) + sum(dropped.values()) == 372
    assert all(sum(report["labels"][k].values()) == report["rows"][k] for k in report["rows"])
    assert "dropped:" in output and "splits: train" in output  # the printed summary

    raw = load_recipe(str(tmp_path / "run" / "run_config.yaml"))
    run, train_cfg, _ = split_recipe(raw)
    tables, _ = prepare_data(run, train_cfg.seed)
    texts = {name: [normalize_text(t) for t in table["text"]] for name, table in tables.items()}
    assert {name: len(t) for name, t in texts.items()} == report["rows"]
    assert set(texts["train"]).isdisjoint(texts["validation"])
    assert set(texts["train"]).isdisjoint(texts["test"])
    assert len(set(texts["train"])) == len(texts["train"])  # and no copies left inside train


def test_training_rows_found_in_the_eval_file_are_dropped_and_counted(root, tmp_path):
    rows = sentiment_rows(120, seed=2)
    write_csv(str(tmp_path / "train.csv"), rows[:80] + [(t.upper(), y) for t, y in rows[80:90]])  # 10 leaks
    common = ("--train_file", tmp_path / "train.csv", "--max_steps", "1")
    code, output = train(root, tmp_path / "drop", *common)
    assert code == 0, output
    report = report_of(tmp_path / "drop")
    assert report["dropped"]["overlap_with_eval_test"] == 10 and report["rows"]["train"] <= 80
    assert report["overlap_with_train"] == {"validation": 0}
    code, output = train(root, tmp_path / "keep", *common, "--eval_overlap", "keep")
    assert code == 0, output
    assert report_of(tmp_path / "keep")["overlap_with_train"] == {"validation": 10}
    assert "10 validation rows also occur in train" in output


def test_group_column_keeps_each_group_in_one_split_through_a_recipe_run(root, tmp_path):
    """30 users with 1-5 distinct texts each, one file, `group_column: user`: every user's rows land in one split,
    in data_report.json and in the rows the run actually used; the report records the column and the seed."""
    rng = random.Random(3)
    texts = list(dict.fromkeys(text for text, _ in sentiment_rows(300, seed=5)))
    rows, n = [], 0
    for user in range(30):
        for _ in range(rng.randint(1, 5)):
            rows.append((texts[n], rng.randrange(2), f"user{user}"))
            n += 1
    write_csv(str(tmp_path / "grouped.csv"), rows, header=("text", "label", "user"))
    args = ("--train_file", tmp_path / "grouped.csv", "--eval_file", "null", "--group_column", "user")
    code, output = train(root, tmp_path / "run", *args, "--seed", "7")
    assert code == 0, output
    report = report_of(tmp_path / "run")
    assert report["seed"] == 7 and "seed 7" in output
    assert report["settings"]["group_column"] == "user"
    assert report["rows_read"] == {"train": len(rows)} and sum(report["rows"].values()) == len(rows)

    raw = load_recipe(str(tmp_path / "run" / "run_config.yaml"))
    run, train_cfg, _ = split_recipe(raw)
    assert train_cfg.seed == 7
    tables, rebuilt = prepare_data(run, train_cfg.seed)
    assert rebuilt == report
    users = {name: set(table["user"]) for name, table in tables.items()}
    assert {name: len(table) for name, table in tables.items()} == report["rows"]
    assert all(users.values()) and set.union(*users.values()) == {f"user{u}" for u in range(30)}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert users[a].isdisjoint(users[b]), (a, b)


# --- runs ----------------------------------------------------------------------------------------
def test_a_folder_holding_another_run_is_refused_and_overwrite_starts_clean(root, tmp_path):
    """The observed failure: a second run without an eval set returned the first run's checkpoint-best."""
    code, output = train(root, tmp_path / "run", "--seed", "1", "--eval_every", "1")
    assert code == 0, output
    best = torch.load(tmp_path / "run" / "checkpoint-best.pt", weights_only=False)["weights"]
    second = ("--eval_file", "null", "--test_file", root / "dev.csv", "--seed", "2", "--max_steps", "3")
    code, output = train(root, tmp_path / "run", *second)
    assert code == 2 and "already holds another run (lora on" in output and "overwrite" in output
    code, output = train(root, tmp_path / "run", *second, "--overwrite")
    assert code == 0, output
    assert not (tmp_path / "run" / "checkpoint-best.pt").exists()
    adapter = load_file(tmp_path / "run" / "adapter_model.safetensors")
    pairs = [
        (v, best[k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")])
        for k, v in adapter.items()
        if "lora_" in k
    ]
    assert pairs and all(
        not torch.equal(mine, theirs) for mine, theirs in pairs
    )  # its own weights, not run 1's


def test_every_file_is_checked_before_step_one(root, tmp_path):
    write_csv(str(tmp_path / "test.csv"), [("good film", 1)], header=("text", "stars"))
    code, output = train(root, tmp_path / "run", "--test_file", tmp_path / "test.csv")
    assert code == 2 and "has no column 'label'" in output and "test.csv" in output
    assert not (tmp_path / "run" / "log.jsonl").exists()  # refused before any training


def test_an_eval_label_the_training_set_lacks_is_refused_before_step_one(root, tmp_path):
    write_csv(str(tmp_path / "dev.csv"), [("good film", 1), ("meh film", 7)])
    code, output = train(root, tmp_path / "run", "--eval_file", tmp_path / "dev.csv", "--save_every", "1")
    assert code == 2 and "Label 7" in output and "not seen in the training data" in output
    written = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert not {n for n in written if n.startswith(("log.", "checkpoint", "adapter_", "metrics"))}, written


def test_resume_refuses_a_changed_recipe_naming_each_change(root, tmp_path):
    code, output = train(root, tmp_path / "run", "--save_every", "1")
    assert code == 0, output
    recipe_before = (tmp_path / "run" / "run_config.yaml").read_text()
    code, output = train(root, tmp_path / "run", "--resume", "--lr", "0.02", "--batch_size", "4")
    assert code == 2, output
    assert "batch_size: 8 -> 4" in output and "lr: 0.01 -> 0.02" in output
    assert (tmp_path / "run" / "run_config.yaml").read_text() == recipe_before  # the folder is untouched
    code, output = train(root, tmp_path / "run", "--resume", "--max_steps", "3")
    assert code == 2 and "max_steps: 2 -> 3" in output
    opt_in = ("--resume", "--max_steps", "3", "--save_every", "1", "--resume_with_changes")
    code, output = train(root, tmp_path / "run", *opt_in)
    assert code == 0, output
    assert json.load(open(tmp_path / "run" / "train_summary.json"))["steps"] == 3
    code, output = train(
        root, tmp_path / "run", "--resume", "--max_steps", "3"
    )  # its checkpoint's recipe now
    assert code == 0, output


def test_resume_refuses_a_changed_model_and_a_changed_data_file(root, tmp_path):
    """The model and the data files shape the run as much as the recipe's numbers: a resume against another model
    or an edited training file is refused, naming the field; the same content at another path still resumes."""
    other_model = tiny_bert_folder(str(tmp_path / "other_model"), seed=1)
    data = tmp_path / "train.csv"
    data.write_bytes((root / "train.csv").read_bytes())
    code, output = train(root, tmp_path / "run", "--train_file", data, "--save_every", "1")
    assert code == 0, output
    recipe_before = (tmp_path / "run" / "run_config.yaml").read_text()

    code, output = train(root, tmp_path / "run", "--resume", "--train_file", data, "--model", other_model)
    assert code == 2, output
    assert f"model: '{root / 'model'}' -> '{other_model}'" in " ".join(output.split())

    write_csv(
        str(data), sentiment_rows(120, seed=2)[:79] + [("an edited row", 1)]
    )  # same size, one row changed
    code, output = train(root, tmp_path / "run", "--resume", "--train_file", data)
    assert code == 2, output
    assert "data_sha256.train_file:" in output and "model:" not in output
    assert (tmp_path / "run" / "run_config.yaml").read_text() == recipe_before  # the folder is untouched

    copy = tmp_path / "elsewhere" / "same.csv"
    copy.parent.mkdir()
    copy.write_bytes((root / "train.csv").read_bytes())
    code, output = train(root, tmp_path / "run", "--resume", "--train_file", copy)
    assert code == 0, output


def test_the_adapter_is_saved_before_the_final_evaluation(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_mlp(), LoraConfig(r=2, target_modules=["lin0"]))
    data = [(torch.randint(0, 20, (5,)), i % 3) for i in range(16)]

    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    def failing_metrics(model, features):
        raise ValueError("the metric crashed")

    task = CustomTask(loss, metrics_fn=failing_metrics)
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        eval_every=100,
        progress=False,
        tensorboard=False,
        plot=False,
        batch_size=8,
    )
    with pytest.raises(ValueError, match="the metric crashed"):
        Trainer(model, task, data, data, config).train()
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_the_trainer_refuses_another_runs_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_mlp(), LoraConfig(r=2, target_modules=["lin0"]))
    data = [(torch.randint(0, 20, (5,)), i % 3) for i in range(16)]
    task = CustomTask(lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    config = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        save_every=1,
        progress=False,
        tensorboard=False,
        plot=False,
    )
    Trainer(model, task, data, None, TrainConfig(**config)).train()
    with pytest.raises(RunError, match="already holds another run"):
        Trainer(model, task, data, None, TrainConfig(**config)).train()
    Trainer(model, task, data, None, TrainConfig(**config, overwrite=True)).train()
