"""task: rec — data, splits, metrics against hand-computed values, and runs that must beat popularity."""

import json
import math
import os

import pandas as pd
import pytest
import torch
from helpers import tiny_bert_folder
from helpers.rec import rec_events, rec_items, tiny_llama_answers_folder, write_rec_data
from typer.testing import CliRunner

from deltatune.apps.cli import app
from deltatune.errors import ConfigError, DataError
from deltatune.train.recipe import (
    RecipeError,
    load_recipe,
    load_run,
    make_peft_config,
    split_recipe,
    train_from_recipe,
)
from deltatune.train.tasks.rec import RecOptions, TextTower
from deltatune.train.tasks.rec import metrics as M
from deltatune.train.tasks.rec.data import (
    leave_last_out,
    read_catalogue,
    read_log,
    split_log,
    time_split,
)

QUIET = {"progress": False, "tensorboard": False, "plot": False, "num_threads": 1}
QUIET_FLAGS = ["--progress", "false", "--tensorboard", "false", "--plot", "false", "--num_threads", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rec_options(item_file, **extra):
    base = {"item_file": item_file, "rating_column": "rating", "time_column": "timestamp"}
    return RecOptions(**{**base, **extra})


# --- metrics ---------------------------------------------------------------------------------------------------
def test_ranking_metrics_match_hand_computed_values():
    ranks = [[1], [3], [12], [2, 5]]  # the last case has two targets
    m = M.ranking_metrics(ranks, ks=(5, 10))
    assert m["hit@5"] == pytest.approx(3 / 4)
    assert m["hit@10"] == pytest.approx(3 / 4)
    assert m["recall@5"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    ndcg_two = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3))
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 0 + ndcg_two) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 1 / 2) / 4)


def test_target_ranks_skip_the_history_and_break_ties_by_the_given_order():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.3, 0.4, 0.5]])
    first, second = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 1, 3])
    # row 0: item 0 is in the history; items 1 and 2 tie, the tie order decides which is first
    assert M.target_ranks(scores, [[2], [0]], [[0], []], first) == [[2], [4]]
    assert M.target_ranks(scores, [[2], [0]], [[0], []], second) == [[1], [4]]
    assert M.target_ranks(scores, [[2], [0, 3]], [[0], [2]], first)[1] == [
        3,
        1,
    ]  # two targets, one excluded item


def test_preference_metrics_match_hand_computed_values():
    p = [0.9, 0.6, 0.4, 0.2, 0.7]
    liked = [True, False, True, False, True]
    m = M.preference_metrics(p, liked)
    # AUC = share of (liked, disliked) pairs ordered right: (0.9>0.6, 0.9>0.2, 0.4<0.6, 0.4>0.2, 0.7>0.6, 0.7>0.2)
    assert m["auc"] == pytest.approx(5 / 6)
    # predicted Yes: 0.9, 0.6, 0.7 -> TP 2, FP 1, FN 1, TN 1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


# --- data ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec-data")
    log, items = write_rec_data(str(folder))
    return {"folder": str(folder), "log": log, "items": items}


def test_every_log_layout_gives_the_same_time_ordered_histories(data, tmp_path):
    options = rec_options(data["items"])
    catalogue = read_catalogue(options)
    reference = read_log(options, data["log"], catalogue, positives_only=False)  # MovieLens u.data, as is
    frame = pd.read_csv(
        data["log"], sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"]
    )
    frame.to_csv(tmp_path / "log.csv", index=False)
    frame.to_json(tmp_path / "log.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "log.parquet")
    ml = frame.rename(columns={"user_id": "userId", "item_id": "movieId"})  # MovieLens ratings.csv
    ml.to_csv(tmp_path / "ratings.csv", index=False)
    for path in ("log.csv", "log.jsonl", "log.parquet"):
        assert read_log(options, str(tmp_path / path), catalogue, False).users == reference.users
    ml_options = rec_options(
        data["items"], user_column="userId", item_column="movieId", item_id_column="item_id"
    )
    assert read_log(ml_options, str(tmp_path / "ratings.csv"), catalogue, False).users == reference.users
    for events in reference.users.values():
        assert [e.time for e in events] == sorted(e.time for e in events)
    _, rows = rec_events()
    assert len(reference) == len(rows)


def test_threshold_keeps_liked_events_and_splits_take_the_last_ones(data):
    options = rec_options(data["items"], rating_threshold=4)
    log = read_log(options, data["log"], read_catalogue(options), positives_only=True)
    assert all(e.liked for events in log.users.values() for e in events)
    split = leave_last_out(log)
    events = log.users["u0"]
    (val,) = [c for c in split.validation if c.user == "u0"]
    (test,) = [c for c in split.test if c.user == "u0"]
    assert split.train["u0"] == events[:-2] == val.history
    assert val.targets == [events[-2]] and test.targets == [events[-1]] and test.history == events[:-1]

    by_time = time_split(log, [0.6, 0.2, 0.2])
    times = sorted(e.time for evs in log.users.values() for e in evs)
    cut_val, cut_test = times[round(0.6 * len(times))], times[round(0.8 * len(times))]
    assert all(e.time < cut_val for evs in by_time.train.values() for e in evs)
    assert all(cut_val <= e.time < cut_test for c in by_time.validation for e in c.targets)
    assert all(
        e.time >= cut_test and max(h.time for h in c.history) < cut_test
        for c in by_time.test
        for e in c.targets
    )


def test_movielens_u_item_layout_is_read_as_is(tmp_path):
    flags = ["0"] * 19
    flags[3] = flags[5] = "1"  # Animation, Comedy
    line = "|".join(["1", "Toy Story (1995)", "01-Jan-1995", "", "http://x", *flags])
    (tmp_path / "u.item").write_bytes((line + "\n").encode("latin-1"))
    options = RecOptions(item_file=str(tmp_path / "u.item"), item_text_column=["title", "genres"])
    catalogue = read_catalogue(options)
    assert catalogue.ids == ["1"] and catalogue.texts == ["Toy Story (1995), Animation, Comedy"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "log, extra, words",
    [
        ("u,i\na,x\na,zz\n", {}, ["'zz'", "not in the item file"]),
        ("u,i\na,x\nb,y\na,x\n", {}, ["meets item 'x' twice", "rows 1 and 3", "rec.dedupe"]),
        ("u,i,r\na,x,1\nb,y,2\n", {"rating_column": "r", "rating_threshold": 4}, ["no event has r >= 4"]),
        ("u,i\na,\n", {}, ["row 1 has no item id"]),
        (
            "u,i,t\na,x,yesterday-ish\n",
            {"time_column": "t"},
            ["'yesterday-ish'", "neither a number nor a date"],
        ),
        ("u,item\na,x\n", {}, ["no column 'i'", "Its columns are: u, item"]),
    ],
)
def test_bad_logs_are_clear_errors(tmp_path, log, extra, words):
    items = write(tmp_path, "items.csv", "id,title\nx,first\ny,second\n")
    options = RecOptions(item_file=items, user_column="u", item_column="i", item_id_column="id", **extra)
    with pytest.raises(DataError) as err:
        read_log(options, write(tmp_path, "log.csv", log), read_catalogue(options), positives_only=True)
    for word in words:
        assert word in str(err.value)


def test_dedupe_keeps_the_chosen_event_and_items_need_text(tmp_path):
    items = write(tmp_path, "items.csv", "id,title\nx,first\ny,second\n")
    log = write(tmp_path, "log.csv", "u,i,t\na,x,1\na,y,2\na,x,3\n")
    kept = {}
    for keep in ("first", "last"):
        options = RecOptions(
            item_file=items,
            user_column="u",
            item_column="i",
            item_id_column="id",
            time_column="t",
            dedupe=keep,
        )
        kept[keep] = [
            (e.item, e.time) for e in read_log(options, log, read_catalogue(options), True).users["a"]
        ]
    assert kept == {"first": [(0, 1.0), (1, 2.0)], "last": [(1, 2.0), (0, 3.0)]}
    empty = write(tmp_path, "empty.csv", "id,title\nx,\n")
    with pytest.raises(DataError, match="item 'x' has no text"):
        read_catalogue(RecOptions(item_file=empty, item_id_column="id"))


@pytest.mark.parametrize(
    "split, log, name",
    [
        ("leave-last-out", "u,i,t\na,x,1\na,y,2\nb,y,1\nb,z,2\n", "validation"),  # 2 events each: train only
        ("time", "u,i,t\na,x,1\na,y,2\na,z,3\na,x2,4\nd,x,10\n", "test"),  # d's only event is after the cut
    ],
)
def test_a_split_without_cases_is_a_clear_error(tmp_path, split, log, name):
    """No user has an event in the split with a history before it: refused, naming the split and the fix."""
    items = write(tmp_path, "items.csv", "id,title\nx,first\ny,second\nz,third\nx2,fourth\n")
    extra = {"time_split": [0.6, 0.2, 0.2]} if split == "time" else {}
    options = RecOptions(
        item_file=items,
        user_column="u",
        item_column="i",
        item_id_column="id",
        time_column="t",
        split=split,
        **extra,
    )
    path = write(tmp_path, "log.csv", log)
    with pytest.raises(DataError) as err:
        split_log(read_log(options, path, read_catalogue(options), True), options, path)
    assert f"the {name} split is empty" in str(err.value) and "use a longer log" in str(err.value)


@pytest.mark.parametrize(
    "section, words",
    [
        (
            {"item_file": "i.csv", "histroy_length": 3},
            ["rec.histroy_length", "Did you mean 'history_length'?"],
        ),
        ({"item_file": "i.csv", "mode": "preference"}, ["needs rec.rating_column and rec.rating_threshold"]),
        ({"item_file": "i.csv", "split": "time"}, ["needs rec.time_column"]),
        (
            {
                "item_file": "i.csv",
                "hybrid": True,
                "mode": "preference",
                "rating_column": "r",
                "rating_threshold": 4,
            },
            ["set rec.mode: ranking"],
        ),
        ({}, ["rec.item_file is required"]),
    ],
)
def test_bad_options_are_clear_errors(section, words):
    with pytest.raises(ConfigError) as err:
        RecOptions.from_dict(section)
    for word in words:
        assert word in str(err.value)


def test_rec_options_belong_to_task_rec():
    with pytest.raises(RecipeError, match="belong to task 'rec'"):
        load_recipe(None, {"model": "m", "task": "seq-cls", "rec": {"item_file": "i.csv"}})


# --- runs ------------------------------------------------------------------------------------------------------
def rec_recipe(model, data, out, **extra):
    rec = {
        "item_file": data["items"],
        "rating_column": "rating",
        "time_column": "timestamp",
        "rating_threshold": 4,
        "negatives": 16,
        **extra.pop("rec", {}),
    }
    raw = {
        "model": model,
        "task": "rec",
        "method": "lora",
        "train_file": data["log"],
        "rec": rec,
        "lora": {"r": 8},
        "output_dir": out,
        "epochs": 3,
        "batch_size": 16,
        "lr": 3e-3,
        **QUIET,
    }
    return load_recipe(None, {**raw, **extra})


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("rec-run")
    model = tiny_bert_folder(str(root / "bert"))
    out = str(root / "run")
    metrics = train_from_recipe(rec_recipe(model, data, out))["metrics"]
    return {"model": model, "out": out, "metrics": metrics}


def test_tuned_ranking_beats_popularity_mf_keys_and_zero_shot(ranking_run):
    m = ranking_run["metrics"]
    with open(os.path.join(ranking_run["out"], "metrics.json")) as fh:
        assert json.load(fh) == m
    for who in ("", "zeroshot_", "popularity_", "mf_"):
        for k in (5, 10, 20):
            for name in ("hit", "ndcg", "recall"):
                assert f"test_{who}{name}@{k}" in m
        assert f"test_{who}mrr" in m
    assert m["test_cases"] == 48
    assert m["test_ndcg@10"] > m["test_popularity_ndcg@10"] + 0.3
    assert m["test_ndcg@10"] > m["test_zeroshot_ndcg@10"] + 0.1
    assert m["test_hit@10"] > m["test_popularity_hit@10"]
    assert m["test_cold_hit@10"] > 0.5  # items no training event names, ranked through their text


def same_items(a, b):
    return [r["item"] for r in a] == [r["item"] for r in b] and [r["score"] for r in a] == pytest.approx(
        [r["score"] for r in b], abs=1e-5
    )


def test_saved_run_predicts_evaluates_and_serves_the_same(ranking_run, data, tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from deltatune.apps.cli import app
    from deltatune.apps.serve import ServeSettings, create_app
    from deltatune.apps.serve.app import build_engine

    model, task, run = load_run(ranking_run["out"])
    (by_user,) = task.predict(model, [{"user": "u0", "k": 5}])
    seen = {task.catalogue.ids[e.item] for e in task.user_history("u0")}
    assert len(by_user["items"]) == 5 and not seen & {r["item"] for r in by_user["items"]}
    genre = task.catalogue.texts[task.user_history("u0")[0].item].split()[0]
    (typed,) = task.predict(model, [{"history": [f"{genre} movie plot", f"{genre} film story"], "k": 3}])
    assert all(r["text"].startswith(genre) for r in typed["items"])  # the user's genre, from text alone
    with pytest.raises(DataError, match="Unknown user 'nobody'"):
        task.predict(model, [{"user": "nobody"}])
    with pytest.raises(DataError, match="history is empty"):
        task.predict(model, [{"history": [" "]}])
    with pytest.raises(DataError, match="not in the item file"):
        task.predict(model, [{"items": ["i0", "nope"]}])

    result = CliRunner().invoke(app, ["eval", ranking_run["out"], "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ndcg@10"] == pytest.approx(
        ranking_run["metrics"]["test_ndcg@10"], abs=1e-6
    )
    result = CliRunner().invoke(app, ["merge", ranking_run["out"], str(tmp_path / "merged")])
    assert result.exit_code == 2 and "TextTower" in result.output  # no transformers model to save: refused
    result = CliRunner().invoke(app, ["predict", ranking_run["out"]], input='{"user": "u0", "k": 5}\n')
    assert result.exit_code == 0, result.output
    assert same_items(json.loads(result.stdout)["items"], by_user["items"])

    with TestClient(
        create_app(build_engine(None, {"movies": ranking_run["out"]}, "rec"), ServeSettings())
    ) as client:
        reply = client.post("/v1/recommend", json={"adapter": "movies", "user": "u0", "k": 5})
        assert reply.status_code == 200, reply.text
        assert same_items(reply.json()["items"], by_user["items"])
        assert client.post("/v1/recommend", json={"adapter": "movies", "user": "nobody"}).status_code == 400
        assert client.post("/v1/recommend", json={"adapter": "other", "user": "u0"}).status_code == 404
        assert (
            client.post("/v1/recommend", json={"adapter": "movies", "user": "u0", "kk": 5}).status_code == 422
        )
        rows = client.post("/v1/predict", json={"adapter": "movies", "rows": [{"user": "u0", "k": 5}]})
        assert rows.status_code == 200, rows.text
        assert same_items(rows.json()["results"][0]["items"], by_user["items"])
        assert client.post("/v1/classify", json={"inputs": "x"}).status_code == 400


def test_hybrid_starts_as_the_text_model_and_saves_its_id_table(tmp_path, data, ranking_run):
    from safetensors.torch import load_file
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(ranking_run["model"])
    text, hybrid = TextTower(encoder), TextTower(encoder, id_rows=5)
    ids = torch.tensor([[2, 7, 9, 3]])
    mask = torch.ones_like(ids)
    assert torch.equal(text(ids, mask), hybrid(ids, mask, id_rows=torch.tensor([[1, 4]])))

    out = str(tmp_path / "hybrid")
    metrics = train_from_recipe(rec_recipe(ranking_run["model"], data, out, rec={"hybrid": True}))["metrics"]
    assert metrics["test_ndcg@10"] > metrics["test_popularity_ndcg@10"] + 0.3
    table = [
        v
        for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items()
        if "item_embedding" in k
    ]
    assert len(table) == 1 and table[0].abs().sum() > 0  # trained (it starts at zero)
    model, task, _ = load_run(out)
    assert len(task.options.hybrid_items) + 1 == table[0].shape[0]
    assert task.predict(model, [{"user": "u3"}])[0]["items"]


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_other_methods_train_the_ranking_model(tmp_path, data, ranking_run, method):
    raw = rec_recipe(
        ranking_run["model"], data, str(tmp_path / method), method=method, lora=None, max_steps=2, epochs=1
    )
    metrics = train_from_recipe(raw)["metrics"]
    assert 0 <= metrics["test_ndcg@10"] <= 1 and "test_zeroshot_ndcg@10" in metrics
    model, task, _ = load_run(str(tmp_path / method))
    assert len(task.predict(model, [{"user": "u1", "k": 3}])[0]["items"]) == 3


def test_train_task_rec_through_the_cli_with_flags_alone(tmp_path, data):
    model = tiny_bert_folder(str(tmp_path / "bert"))
    out = tmp_path / "run"
    flags = ["--model", model, "--task", "rec", "--train_file", data["log"], "--output_dir", out]
    flags += ["--rec.item_file", data["items"], "--rec.rating_column", "rating"]
    flags += ["--rec.time_column", "timestamp", "--rec.negatives", "8", "--max_steps", "2"]
    result = CliRunner().invoke(app, ["train", *map(str, flags), *QUIET_FLAGS])
    assert result.exit_code == 0, result.output
    assert "events of 48 users" in result.output  # the rec data summary
    metrics = json.loads((out / "metrics.json").read_text())
    for who in ("", "zeroshot_", "popularity_", "mf_"):
        assert 0 <= metrics[f"test_{who}ndcg@10"] <= 1
    assert metrics["test_cases"] == 48
    assert load_recipe(str(out / "run_config.yaml"))["rec"]["negatives"] == 8
    result = CliRunner().invoke(app, ["predict", str(out)], input='{"user": "u0", "k": 3}\n')
    assert result.exit_code == 0 and len(json.loads(result.stdout)["items"]) == 3, result.output


def movielens_shaped_items(path) -> str:
    """The synthetic catalogue in data/ml-100k/items.csv's columns (item_id, title, year, genres)."""
    pd.DataFrame(
        [
            {"item_id": r["item_id"], "title": r["title"], "year": 1990, "genres": r["genre"]}
            for r in rec_items()
        ]
    ).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(
    "recipe, mode", [("rec-ml100k-minilm.yaml", "ranking"), ("rec-ml100k-smollm2-pref.yaml", "preference")]
)
def test_the_movielens_recipes_validate_and_train_on_stand_in_files(tmp_path, data, recipe, mode):
    """Every key of the shipped recipes is valid; with MovieLens and the packaged model swapped for tiny stand-ins
    (same file layouts), the recipe form of `deltatune train` runs them as written."""
    path = os.path.join(ROOT, "recipes", recipe)
    raw = load_recipe(path)
    run, train_cfg, method_options = split_recipe(raw)
    options = RecOptions.from_dict(raw["rec"])
    assert run.task == "rec" and options.mode == mode
    assert make_peft_config(run, method_options).r == 16
    assert os.path.dirname(run.train_file) == os.path.dirname(options.item_file)  # bench builds both together
    assert "data/ml-100k" in run.train_file and run.train_file.endswith("u.data")

    if mode == "ranking":
        model = tiny_bert_folder(str(tmp_path / "model"))
    else:
        model = tiny_llama_answers_folder(str(tmp_path / "model"))
    swap = ["--model", model, "--train_file", data["log"], "--output_dir", tmp_path / "run"]
    swap += ["--rec.item_file", movielens_shaped_items(tmp_path / "items.csv"), "--max_steps", "1"]
    result = CliRunner().invoke(app, ["train", path, *map(str, swap), *QUIET_FLAGS])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    key = "test_ndcg@10" if mode == "ranking" else "test_auc"
    assert 0 <= metrics[key] <= 1 and f"test_mf_{key[5:]}" in metrics
    saved = load_recipe(str(tmp_path / "run" / "run_config.yaml"))
    assert saved["rec"]["history_length"] == options.history_length and saved["lr"] == train_cfg.lr


def test_preference_run_beats_zero_shot_and_popularity(tmp_path, data):
    model = tiny_llama_answers_folder(str(tmp_path / "llama"))
    raw = rec_recipe(
        model, data, str(tmp_path / "pref"), rec={"mode": "preference"}, epochs=4, lr=1e-2, max_length=128
    )
    m = train_from_recipe(raw)["metrics"]
    for key in ("auc", "accuracy", "precision", "recall", "f1", "zeroshot_auc", "popularity_auc", "mf_auc"):
        assert f"test_{key}" in m
    assert m["test_auc"] > m["test_zeroshot_auc"] + 0.1
    assert m["test_auc"] > m["test_popularity_auc"] + 0.1

    peft_model, task, _ = load_run(str(tmp_path / "pref"))
    (answer,) = task.predict(peft_model, [{"user": "u2", "item": "i5"}])
    batch = task.collate([{"input_ids": task.tokens(task.user_history("u2"), 5), "label": 0}])
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"]).logits[0, -1, task.answer_ids]
    assert answer["p_yes"] == pytest.approx(
        float(logits.softmax(-1)[1]), abs=1e-5
    )  # P(Yes) vs P(No), by hand


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rec_movielens", os.path.join(ROOT, "bench", "rec_movielens.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_movielens_files_are_built_from_recboles_layout(tmp_path):
    import zipfile

    bench = load_bench()
    wheel = tmp_path / "recbole.whl"
    with zipfile.ZipFile(wheel, "w") as zf:  # the two files as the recbole 1.2.1 wheel holds them
        zf.writestr(
            bench.INNER + "ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n",
        )
        zf.writestr(
            bench.INNER + "ml-100k.item",
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n242\tKolya\t1996\tComedy\n",
        )
    folder = bench.extract(str(wheel), str(tmp_path / "ml"))
    assert (tmp_path / "ml" / "u.data").read_text() == "196\t242\t3\t881250949\n"
    options = RecOptions(
        item_file=os.path.join(folder, "items.csv"), item_text_column=["title", "year", "genres"]
    )
    catalogue = read_catalogue(options)
    log = read_log(options, os.path.join(folder, "u.data"), catalogue, positives_only=True)
    assert catalogue.texts == ["Kolya, 1996, Comedy"] and log.users["196"][0].item == 0


def test_readme_and_docs_print_the_movielens_results_as_the_json_rounds_them():
    """Each score in the README table and in docs/rec.md is its bench/results value rounded once to 3 decimals
    (as `bench/rec_movielens.py` prints them), never a hand-rounded copy."""
    import re

    bench = load_bench()
    results = os.path.join(ROOT, "bench", "results")
    ranking = bench.rounded(json.load(open(os.path.join(results, "rec-ml100k-minilm.json")))["metrics"])
    preference = bench.rounded(
        json.load(open(os.path.join(results, "rec-ml100k-smollm2-pref.json")))["metrics"]
    )
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Recommendation (`task: rec`)") :]
    table = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:5]
    for row, who in zip(table, ("", "zeroshot_", "popularity_", "mf_")):
        assert row[1:3] == [ranking[f"test_{who}hit@10"], ranking[f"test_{who}ndcg@10"]], row
        assert row[5] == preference[f"test_{who}auc"], row
    docs = open(os.path.join(ROOT, "docs", "rec.md")).read()
    measured = docs[docs.index("## Measured") :]
    printed = re.findall(r"(?<![\d.])0\.\d{3}(?!\d)", measured.replace("0.097 at step 75", ""))
    known = set(ranking.values()) | set(preference.values())
    assert printed and not [n for n in printed if n not in known]
