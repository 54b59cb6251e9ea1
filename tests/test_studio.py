"""`deltatune studio`'s backend: every action of the page (schema, preview, check, recipe files, start, stop, resume,
list, compare, bench, playground, export), the workspace and upload limits, and the token off localhost."""

import dataclasses
import json
import os
import time

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from helpers import sentiment_rows, tiny_bert_folder, tiny_llama_folder, write_csv
from helpers.rec import rec_events

from deltatune import registry
from deltatune.apps.studio import StudioSettings, create_app
from deltatune.train.recipe import load_recipe, load_run, recipe_tasks, train_from_recipe
from deltatune.train.trainer import TrainConfig

QUIET = {"progress": False, "tensorboard": False, "plot": False, "num_threads": 1}


def client_for(root, **settings) -> TestClient:
    app = create_app(StudioSettings(workspace=str(root), **settings))
    return TestClient(app, base_url="http://127.0.0.1", headers={"x-studio": "1"})


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    tiny_bert_folder(str(root / "models" / "bert"))
    rows = sentiment_rows(160)
    write_csv(str(root / "data" / "train.csv"), rows[:120] + rows[:6])  # 6 exact copies to drop
    write_csv(str(root / "data" / "dev.csv"), rows[120:])
    return root


@pytest.fixture(scope="module")
def client(ws):
    return client_for(ws)


def form(**changes):
    base = {
        "name": "run1",
        "model": "models/bert",
        "task": "seq-cls",
        "method": "lora",
        "lora": {"r": "4", "lora_alpha": "8"},
        "train_file": "data/train.csv",
        "eval_file": "data/dev.csv",
        "text_column": "text",
        "label_column": "label",
        "max_steps": "12",
        "batch_size": "8",
        "lr": "0.01",
        "eval_every": "6",
        "save_every": "3",
        "num_threads": "1",
        "tensorboard": False,
    }
    return {**base, **changes}


def wait_for(client, name, until, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.get(f"/api/runs/{name}").json()
        if until(run):
            return run
        time.sleep(0.2)
    raise AssertionError(
        f"run {name} never got there: {run['state']} {run.get('error')} {run.get('console')}"
    )


# --- the form ---------------------------------------------------------------------------------------------
def test_schema_offers_every_method_task_and_setting_of_the_library(client):
    schema = client.get("/api/schema").json()
    assert [m["name"] for m in schema["methods"]] == list(registry.variants())
    assert [t["name"] for t in schema["tasks"]] == list(recipe_tasks())
    lora = next(m for m in schema["methods"] if m["name"] == "lora")
    r = next(o for o in lora["options"] if o["key"] == "r")
    assert r["default"] == "8" and r["type"] == "int"
    target = next(o for o in lora["options"] if o["key"] == "target_modules")
    assert target["default"] == "all-linear"  # LoRA's recipe default, as `deltatune train` fills it in
    dora = next(m for m in schema["methods"] if m["name"] == "dora")
    assert any(o["key"] == "use_dora" and o["fixed"] and o["default"] == "true" for o in dora["options"])
    keys = {s["key"] for s in schema["settings"]}
    expected = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "output_dir",
        "resume",
        "resume_with_changes",
        "overwrite",
        "progress",
    }
    assert expected <= keys
    lr = next(s for s in schema["settings"] if s["key"] == "lr")
    assert lr["group"] == "main" and lr["default"] == str(TrainConfig.lr)
    assert next(s for s in schema["settings"] if s["key"] == "scheduler")["widget"] == "choice"


def test_check_names_each_wrong_field_in_words(client):
    response = client.post(
        "/api/check",
        json=form(
            lr="-1",
            batch_size="two",
            label_column="sentiment",
            lora={"r": "abc", "nope": "1"},
            model="no/such/model/path",
        ),
    )
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert "lr must be positive" in errors["lr"]
    assert errors["batch_size"] == "batch_size must be an integer, got 'two'."
    assert (
        errors["lora.r"] == "r must be an integer, got 'abc'." and "no option 'nope'" in errors["lora.nope"]
    )
    assert "no column 'sentiment'" in errors["label_column"] and "text, label" in errors["label_column"]
    assert "hub name" in errors["model"]
    missing = client.post("/api/check", json=form(train_file="", eval_file="", method="lorra")).json()[
        "errors"
    ]
    assert "Did you mean 'lora'" in missing["method"] and "training file" in missing["train_file"]


def test_check_and_recipe_files_round_trip_through_deltatune_train(client, ws, tmp_path):
    checked = client.post("/api/check", json=form()).json()
    recipe = checked["recipe"]
    assert recipe["lora"] == {"r": 4, "lora_alpha": 8} and recipe["lr"] == 0.01 and recipe["max_steps"] == 12
    assert recipe["train_file"] == str(ws / "data" / "train.csv")
    path = tmp_path / "recipe.yaml"
    path.write_text(checked["yaml"])
    assert load_recipe(str(path))["lora"] == {"r": 4, "lora_alpha": 8}  # the file `deltatune train` reads
    loaded = client.post("/api/recipe/parse", json={"text": checked["yaml"] + "resume: true\n"}).json()
    assert loaded["form"]["train_file"] == "data/train.csv" and loaded["form"]["lora"] == {
        "r": "4",
        "lora_alpha": "8",
    }
    assert any("resume" in note for note in loaded["notes"])  # reported, not dropped in silence
    again = client.post("/api/check", json={**loaded["form"], "name": "x"}).json()
    assert again["recipe"] == recipe
    bad = client.post("/api/recipe/parse", json={"text": "model: m\nbatchsize: 1\n"})
    assert bad.status_code == 422 and "Did you mean 'batch_size'" in bad.json()["errors"]["_form"]


def test_preview_shows_rows_and_the_data_report_the_run_writes(client):
    out = client.post("/api/preview", json=form()).json()
    assert out["columns"] == ["text", "label"] and len(out["rows"]) == 5 and out["total_rows"] == 126
    report = out["report"]
    assert report["rows_read"] == {"train": 126, "validation": 40}
    texts = [r[0] for r in sentiment_rows(160)[:120]]
    assert report["dropped"]["duplicate"] == 126 - len(set(texts))  # counted by hand
    assert sum(report["labels"]["train"].values()) == report["rows"]["train"]
    assert "dropped:" in out["report_text"]
    wrong = client.post("/api/preview", json=form(text_column="sentence")).json()
    assert "no column 'sentence'" in wrong["errors"]["text_column"]


def test_a_task_reading_its_own_data_is_previewed_and_checked_inside_the_workspace(client, ws, tmp_path):
    """task: rec splits one interaction log itself and names a second file in its own section (rec.item_file):
    the preview shows the task's own report, and that file is held to the workspace like train_file."""
    items, events = rec_events(users=12)
    write_csv(str(ws / "data" / "events.csv"), events, header=("user_id", "item_id", "rating", "timestamp"))
    lines = ["item_id,title"] + [f"{r['item_id']},{r['title']}" for r in items]
    (ws / "data" / "items.csv").write_text("\n".join(lines) + "\n")
    rec = {
        "task": "rec",
        "train_file": "data/events.csv",
        "eval_file": "",
        "text_column": "",
        "label_column": "",
        "rec": "{item_file: data/items.csv, time_column: timestamp}",
    }
    out = client.post("/api/preview", json=form(**rec)).json()
    report = out["report"]
    assert "errors" not in out and report["events"] == len(events) == out["total_rows"]
    assert report["users"] == 12 and report["files"] == {"log": "data/events.csv", "items": "data/items.csv"}
    assert out["report_text"] == report["summary"] and report["rows"]["test"] == 12  # leave-last-out: 1 each
    checked = client.post("/api/check", json=form(**rec)).json()
    assert checked["recipe"]["rec"] == {
        "item_file": str(ws / "data" / "items.csv"),
        "time_column": "timestamp",
    }
    outside = write_csv(str(tmp_path / "items.csv"), [("i0", "x")], header=("item_id", "title"))
    for section, says in (
        (f"{{item_file: {outside}}}", "outside the studio's workspace"),
        ("{item_file: data/items.csv, mode: rank}", "rec.mode must be one of ranking, preference"),
    ):
        errors = client.post("/api/check", json=form(**{**rec, "rec": section})).json()["errors"]
        assert says in errors["rec"]
    assert (
        "belong to task 'rec'"
        in client.post("/api/check", json=form(rec=rec["rec"])).json()["errors"]["_form"]
    )


# --- runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def started(client):
    """Three runs started at once, so their processes' start-up overlaps: one to finish, one to stop and resume
    (it trains until stopped), one that fails."""
    forms = (
        form(),
        form(name="long", max_steps="3000", save_every="2", eval_every="0"),
        form(name="broken", lora={"target_modules": "[no_such_layer]"}),
    )
    for body in forms:
        response = client.post("/api/runs", json=body)
        assert response.status_code == 201, response.text
        assert response.json()["state"] == "running"


@pytest.fixture(scope="module")
def finished(client, started):
    return wait_for(client, "run1", lambda r: r["state"] in ("finished", "failed"))


def test_start_runs_training_in_the_background_and_reports_its_results(client, ws, finished):
    assert finished["state"] == "finished", finished.get("error")
    folder = ws / "run1"
    metrics = json.load(open(folder / "metrics.json"))
    summary = json.load(open(folder / "train_summary.json"))
    assert finished["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert finished["progress"]["step"] == finished["progress"]["total_steps"] == 12
    assert finished["trainable_params"] == summary["trainable_params"] > 0
    assert finished["stored_bytes"] == os.path.getsize(folder / "adapter_model.safetensors")
    assert yaml.safe_load(open(folder / "recipe.yaml"))["output_dir"] == str(folder)
    names = {f["name"] for f in finished["files"]}
    assert {"run_config.yaml", "log.jsonl", "adapter_config.json", "data_report.json", "train.log"} <= names
    log = client.get("/api/runs/run1/log").json()
    assert [r["step"] for r in log["records"] if "loss" in r] == list(range(1, 13))
    assert all(r["elapsed_s"] >= 0 for r in log["records"] if "loss" in r)
    assert len(client.get("/api/runs/run1/log", params={"since": 10}).json()["records"]) == log["count"] - 10
    text = client.get("/api/runs/run1/files/run_config.yaml")
    assert text.status_code == 200 and "labels" in text.text
    again = client.post("/api/runs", json=form())
    assert again.status_code == 409 and "already has a run named 'run1'" in again.json()["detail"]


def test_stop_and_resume_continue_from_the_checkpoint(client, ws, started):
    run = wait_for(client, "long", lambda r: r["progress"]["step"] >= 6 and r["has_checkpoint"])
    assert run["state"] == "running" and run["progress"]["total_steps"] == 3000
    assert run["progress"]["eta_s"] > 0
    # a studio started anew on the same workspace finds the run as it is
    assert client_for(ws).get("/api/runs/long").json()["state"] == "running"
    stopped = client.post("/api/runs/long/stop").json()
    assert stopped["state"] == "stopped"
    assert client_for(ws).get("/api/runs/long").json()["state"] == "stopped"
    checkpoint = torch.load(ws / "long" / "checkpoint-last.pt", weights_only=False)["position"]["global_step"]
    resumed = client.post("/api/runs/long/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    run = wait_for(client, "long", lambda r: r["progress"]["step"] > checkpoint + 2)
    assert client.post("/api/runs/long/resume").status_code == 409  # already running
    client.post("/api/runs/long/stop")
    steps = [r["step"] for r in client.get("/api/runs/long/log").json()["records"] if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one curve: nothing lost or repeated across the restart
    assert any(f"Resuming from step {checkpoint}" in line for line in open(ws / "long" / "train.log"))
    assert run["starts"] == 2


def test_a_failing_run_shows_the_error_line(client, started):
    run = wait_for(client, "broken", lambda r: r["state"] != "running")
    assert run["state"] == "failed" and "no_such_layer" in run["error"]


# --- compare, playground, export -----------------------------------------------------------------------
def test_compare_lists_runs_and_opens_bench_results(client, ws, finished):
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["run1"]["method"] == "lora" and runs["run1"]["metrics"]["eval_accuracy"] >= 0
    bench = json.load(open(os.path.join(os.path.dirname(__file__), "..", "bench", "results", "bench.json")))
    (ws / "bench").mkdir(exist_ok=True)
    (ws / "bench" / "bench.json").write_text(json.dumps(bench))
    assert client.get("/api/bench").json()["files"] == ["bench/bench.json"]
    table = client.get("/api/bench/table", params={"path": "bench/bench.json"}).json()
    lora = next(r for r in table["runs"] if r["method"] == "lora")
    row = next(r for r in bench["methods"] if r["method"] == "lora")
    assert (
        lora["trainable_params"] == row["trainable_params"]
        and lora["metrics"]["dev_accuracy"] == row["dev_accuracy"]
    )


@pytest.fixture(scope="module")
def more_runs(ws):
    """An IA3 run on the same base (it cannot share a batch) and a causal-LM LoRA run, trained in-process."""
    rows = sentiment_rows(40, seed=3)
    common = {
        "train_file": str(ws / "data" / "train.csv"),
        "eval_file": str(ws / "data" / "dev.csv"),
        **QUIET,
    }
    train_from_recipe(
        load_recipe(
            None,
            {
                "model": str(ws / "models" / "bert"),
                "method": "ia3",
                "max_steps": 3,
                "lr": 0.05,
                "output_dir": str(ws / "ia3run"),
                **common,
            },
        )
    )
    tiny_llama_folder(str(ws / "models" / "llama"))
    chat = [
        {"instruction": "say", "input": text, "output": "good" if label else "bad"} for text, label in rows
    ]
    (ws / "data" / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    train_from_recipe(
        load_recipe(
            None,
            {
                "model": str(ws / "models" / "llama"),
                "task": "causal-lm",
                "train_file": str(ws / "data" / "chat.jsonl"),
                "max_steps": 3,
                "lr": 0.01,
                "max_new_tokens": 4,
                "generate_samples": 2,
                "output_dir": str(ws / "chat"),
                **QUIET,
            },
        )
    )


def test_playground_runs_base_and_adapters_in_one_batch_and_matches_predict(client, ws, finished, more_runs):
    groups = client.get("/api/playground").json()["groups"]
    bert = next(g for g in groups if g["task"] == "seq-cls")
    assert {a["name"]: a["shared_batch"] for a in bert["adapters"]} == {"run1": True, "ia3run": False}
    text = "the movie was superb"
    out = client.post(
        "/api/playground", json={"adapters": ["run1", "ia3run"], "base": True, "text": text}
    ).json()
    assert [o["name"] for o in out["outputs"]] == ["(base model)", "run1", "ia3run"]
    assert [o["pass"] for o in out["outputs"]] == ["shared batch", "shared batch", "own model"]
    for output in out["outputs"][1:]:  # the same answer `deltatune predict` gives
        model, task, _ = load_run(str(ws / output["name"]))
        (expected,) = task.predict(model, [{"text": text}])
        assert output["label"] == expected["label"]
        for label, score in expected["scores"].items():
            assert output["scores"][label] == pytest.approx(score, abs=1e-5)
    model, task, _ = load_run(str(ws / "run1"))
    with model.disable_adapter():
        (base,) = task.predict(model, [{"text": text}])
    assert out["outputs"][0]["scores"] == pytest.approx(base["scores"], abs=1e-5)

    generated = client.post(
        "/api/playground", json={"adapters": ["chat"], "base": True, "text": "good fun", "max_new_tokens": 4}
    ).json()["outputs"]
    model, task, _ = load_run(str(ws / "chat"))
    task.max_new_tokens = 4
    assert generated[1]["generation"] == task.predict(model, [{"text": "good fun"}])[0]["generation"]
    with model.disable_adapter():
        assert generated[0]["generation"] == task.predict(model, [{"text": "good fun"}])[0]["generation"]
    mixed = client.post("/api/playground", json={"adapters": ["run1", "chat"], "text": "x"})
    assert mixed.status_code == 400 and "different base models" in mixed.json()["detail"]
    sampled = client.post(
        "/api/playground",
        json={"adapters": ["chat"], "text": "good", "do_sample": True, "seed": 1, "max_new_tokens": 3},
    ).json()["outputs"]
    assert isinstance(sampled[0]["generation"], str)


def test_export_writes_a_merged_model_with_the_adapters_outputs(client, ws, finished):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = client.post("/api/runs/run1/export")
    assert out.status_code == 200, out.text
    folder = ws / "exports" / "run1-merged"
    assert out.json()["relative"] == "exports/run1-merged" and out.json()["tensors_checked"] > 0
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, task, _ = load_run(str(ws / "run1"))
    enc = tokenizer(["great fun film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, rtol=1e-5, atol=1e-5)
    assert client.post("/api/runs/run1/export").status_code == 400  # never written over
    assert "exports/run1-merged" in client.get("/api/files").json()["models"]  # a base for the next run


# --- safety --------------------------------------------------------------------------------------------
def test_files_are_read_and_written_only_under_the_workspace(client, ws, tmp_path):
    outside = write_csv(str(tmp_path / "outside.csv"), sentiment_rows(20))
    (ws / "data" / "link.csv").symlink_to(outside)
    for path in (outside, "../" + os.path.relpath(outside, ws), "data/link.csv"):
        errors = client.post("/api/check", json=form(train_file=path)).json()["errors"]
        assert "outside the studio's workspace" in errors["train_file"]
    assert client.post("/api/preview", json=form(train_file=outside)).status_code == 403
    assert "outside" in client.post("/api/check", json=form(model="/usr")).json()["errors"]["model"]
    assert client.get("/api/bench/table", params={"path": "/etc/passwd"}).status_code == 403
    assert client.get("/api/runs/run1/files/..%2F..%2Fetc%2Fpasswd").status_code in (403, 404)
    assert client.get("/api/runs/..%2F..%2Fetc/log").status_code in (400, 404)
    assert client.post("/api/runs", json=form(name="../escape")).status_code == 400
    assert (
        "outside"
        in client.post("/api/recipe/parse", json={"text": f"model: m\ntrain_file: {outside}\n"}).json()[
            "errors"
        ]["train_file"]
    )


def test_uploads_have_a_size_limit_and_a_name_check(ws, tmp_path):
    small = client_for(ws, max_upload_bytes=100)
    ok = small.post("/api/uploads", params={"name": "tiny.csv"}, content=b"text,label\na,1\n")
    assert ok.status_code == 200 and ok.json()["path"] == "data/tiny.csv"
    assert (ws / "data" / "tiny.csv").read_bytes() == b"text,label\na,1\n"
    big = small.post("/api/uploads", params={"name": "big.csv"}, content=b"x" * 101)
    assert big.status_code == 413 and not (ws / "data" / "big.csv").exists()

    def chunks():  # no declared length: counted while streaming
        yield b"x" * 60
        yield b"x" * 60

    streamed = small.post("/api/uploads", params={"name": "big2.csv"}, content=chunks())
    assert streamed.status_code == 413 and not os.path.exists(ws / "data" / "big2.csv.part")
    assert small.post("/api/uploads", params={"name": "run.sh"}, content=b"x").status_code == 400
    assert small.post("/api/uploads", params={"name": "../x.csv"}, content=b"x").status_code == 400
    assert small.post("/api/uploads", params={"name": "tiny.csv"}, content=b"x").status_code == 400


def test_token_is_required_off_localhost_and_changes_need_the_studio_header(ws, monkeypatch):
    monkeypatch.delenv("DELTATUNE_STUDIO_TOKEN", raising=False)
    with pytest.raises(ValueError, match="--token"):
        create_app(StudioSettings(workspace=str(ws), host="0.0.0.0"))
    app = create_app(StudioSettings(workspace=str(ws), host="0.0.0.0", token="s3cret"))
    anon = TestClient(app, base_url="http://studio.example")
    assert anon.get("/api/runs").status_code == 401
    assert anon.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert anon.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert anon.get("/").status_code == 200  # the page itself (no data) loads, and asks for the token
    browser = TestClient(app, base_url="http://studio.example")
    assert browser.get("/?token=s3cret").status_code == 200  # redirected to /, with the token in a cookie
    assert browser.get("/api/runs").status_code == 200
    assert browser.post("/api/runs/run1/stop").status_code == 403  # no X-Studio header: not from the page
    local = TestClient(create_app(StudioSettings(workspace=str(ws))), base_url="http://evil.example")
    assert local.get("/api/runs").status_code == 421  # DNS rebinding onto a localhost studio
