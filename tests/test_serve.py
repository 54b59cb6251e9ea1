"""`deltatune serve`: the real server on 127.0.0.1, driven over HTTP, checked against offline prediction."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import httpx
import pytest
import torch
from helpers import sentiment_rows, tiny_bert_folder, tiny_llama_folder

from deltatune import IA3Config, LoraConfig, PeftModel, get_peft_model
from deltatune.apps.serve import Engine, ServeSettings, create_app, server_config

TOKEN = "s3cret"
CLS_ADAPTERS = ["a0", "a1", "a2", "a3"]
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and one thread cannot spin-wait on a busy shared machine (two
    threads there made each tiny forward pass 20-100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _save_cls_adapter(base_dir: str, out: str, seed: int, method: str = "lora") -> str:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    if method == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    else:
        config = IA3Config(task_type="SEQ_CLS", target_modules=["key", "value"], feedforward_modules=[])
    peft_model = get_peft_model(model, config)
    _randomize(peft_model, seed, 0.3)
    peft_model.save_pretrained(out)
    return out


def _serve(app, settings=None):
    """Start uvicorn on a free 127.0.0.1 port in a thread (with the server's connection limits); returns
    (url, server, thread)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = server_config(app, settings or ServeSettings(), "127.0.0.1", port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = tiny_bert_folder(str(root / "base"))
    adapters = root / "adapters"
    for i, name in enumerate(CLS_ADAPTERS + ["extra"]):
        _save_cls_adapter(base, str(adapters / name), seed=10 + i)
    _save_cls_adapter(base, str(adapters / "ia3"), seed=7, method="ia3")
    outside = _save_cls_adapter(base, str(root / "outside"), seed=20)
    os.symlink(outside, adapters / "escape")
    (adapters / "empty").mkdir()
    return {"root": root, "base": base, "adapters": adapters}


@pytest.fixture(scope="module")
def cls_server(folders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(folders["base"])
    engine = Engine(base, AutoTokenizer.from_pretrained(folders["base"]), "seq-cls")
    for name in CLS_ADAPTERS:
        engine.load(name, str(folders["adapters"] / name))
    settings = ServeSettings(
        admin_token=TOKEN, adapter_root=str(folders["adapters"]), max_batch_size=16, max_input_tokens=20
    )
    url, server, thread = _serve(create_app(engine, settings))
    yield url
    server.should_exit = True
    thread.join(10)


def _offline(folders, names, texts):
    """{adapter: [softmax scores per text]} from a fresh PeftModel, one text at a time, via set_adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["base"])
    plain = AutoModelForSequenceClassification.from_pretrained(folders["base"]).eval()
    model = AutoModelForSequenceClassification.from_pretrained(folders["base"])
    model = PeftModel.from_pretrained(model, str(folders["adapters"] / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders["adapters"] / name), name)
    out = {}
    with torch.no_grad():
        for name in [None] + list(names):
            if name is not None:
                model.set_adapter(name)
            net = plain if name is None else model
            out[name] = [net(**tok(t, return_tensors="pt")).logits.softmax(-1)[0].tolist() for t in texts]
    return out


def _scores(result):
    return [result["scores"][k] for k in ("LABEL_0", "LABEL_1")]


def test_health_adapters_and_openapi(cls_server):
    with httpx.Client(base_url=cls_server) as client:
        health = client.get("/health").json()
        assert health == {"status": "ok", "task": "seq-cls", "adapters": CLS_ADAPTERS}
        names = [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
        assert names == CLS_ADAPTERS
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/classify", "/v1/generate", "/v1/adapters", "/health", "/metrics"} <= set(paths)


def test_classify_matches_offline_for_each_adapter_and_base(cls_server, folders):
    texts = [t for t, _ in sentiment_rows(6, seed=5)]
    expected = _offline(folders, CLS_ADAPTERS, texts)
    with httpx.Client(base_url=cls_server) as client:
        for name in [None] + CLS_ADAPTERS:
            r = client.post("/v1/classify", json={"inputs": texts, "adapter": name})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            for got, want in zip(results, expected[name]):
                assert _scores(got) == pytest.approx(want, abs=ATOL)
                assert got["label"] == f"LABEL_{int(want[1] > want[0])}"
    # the adapters really differ from each other and from the base, so the comparison above means something
    firsts = [expected[n][0][0] for n in [None] + CLS_ADAPTERS]
    assert len({round(v, 4) for v in firsts}) == len(firsts)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"inputs": "good movie", "adapter": "nope"}, 404, "No adapter named 'nope'"),
        ({"inputs": ["good"] * 17}, 413, "limit is 16"),
        ({"inputs": " ".join(["good"] * 30)}, 413, "limit is 20"),
        ({"inputs": []}, 400, "inputs is empty"),
        ({"adapter": "a0"}, 422, "inputs"),
    ],
)
def test_classify_rejects_bad_requests(cls_server, body, status, words):
    r = httpx.post(cls_server + "/v1/classify", json=body)
    assert r.status_code == status
    assert words in r.text


def test_generate_on_a_classifier_is_a_clear_400(cls_server):
    r = httpx.post(cls_server + "/v1/generate", json={"prompt": "good", "max_new_tokens": 2})
    assert r.status_code == 400 and "seq-cls model" in r.text


def test_admin_needs_the_token(cls_server):
    body = {"name": "x", "path": "extra"}
    assert httpx.post(cls_server + "/v1/adapters", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(cls_server + "/v1/adapters", json=body, headers=wrong).status_code == 401
    assert httpx.delete(cls_server + "/v1/adapters/a0", headers=wrong).status_code == 401


@pytest.mark.parametrize(
    "name, path, status, words",
    [
        ("up", "../outside", 403, "outside the allowed root"),
        ("abs", "/etc", 403, "outside the allowed root"),
        ("link", "escape", 403, "outside the allowed root"),
        ("empty", "empty", 400, "missing adapter_config.json"),
        ("ia3", "ia3", 400, "Only LoRA adapters"),
        ("a0", "extra", 409, "already loaded"),
        ("bad/name", "extra", 400, "Bad adapter name"),
        ("nul", "a0\x00", 400, "NUL character"),
    ],
)
def test_bad_loads_are_refused_and_the_server_keeps_working(cls_server, name, path, status, words):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(cls_server + "/v1/adapters", json={"name": name, "path": path}, headers=auth)
    assert r.status_code == status, r.text
    assert words in r.text
    assert [a["name"] for a in httpx.get(cls_server + "/v1/adapters").json()["adapters"]] == CLS_ADAPTERS
    assert (
        httpx.post(cls_server + "/v1/classify", json={"inputs": "good", "adapter": "a1"}).status_code == 200
    )


def test_hot_load_then_unload_with_requests_in_flight(cls_server, folders):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    texts = [t for t, _ in sentiment_rows(20, seed=9)]
    expected = _offline(folders, ["extra"], texts)["extra"]
    with httpx.Client(base_url=cls_server) as client:
        r = client.post("/v1/adapters", json={"name": "extra", "path": "extra"}, headers=auth)
        assert r.status_code == 201, r.text
        assert "extra" in client.get("/health").json()["adapters"]

    async def drive():
        async with httpx.AsyncClient(base_url=cls_server, timeout=30) as client:
            calls = [client.post("/v1/classify", json={"inputs": t, "adapter": "extra"}) for t in texts]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.sleep(0.01)
            deleted = await client.delete("/v1/adapters/extra", headers=auth)
            return deleted, await asyncio.gather(*tasks)

    deleted, answers = asyncio.run(drive())
    assert deleted.status_code == 200, deleted.text
    # Requests admitted before the unload are answered in full; later ones load the folder again from the adapter
    # root, just in time. Either way every answer is the adapter's.
    for answer, want in zip(answers, expected):
        assert answer.status_code == 200, answer.text
        assert _scores(answer.json()["results"][0]) == pytest.approx(want, abs=ATOL)
    if "extra" in httpx.get(cls_server + "/health").json()["adapters"]:
        assert httpx.delete(cls_server + "/v1/adapters/extra", headers=auth).status_code == 200
    assert "extra" not in httpx.get(cls_server + "/health").json()["adapters"]
    assert httpx.delete(cls_server + "/v1/adapters/extra", headers=auth).status_code == 404
    assert httpx.delete(cls_server + "/v1/adapters/never-loaded", headers=auth).status_code == 404


def test_load_200_concurrent_requests_over_4_adapters(cls_server, folders):
    rows = sentiment_rows(200, seed=11)
    texts = [t for t, _ in rows]
    names = [CLS_ADAPTERS[i % 4] for i in range(len(rows))]
    expected = _offline(folders, CLS_ADAPTERS, texts)

    async def drive():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=cls_server, timeout=60, limits=limits) as client:
            calls = [
                client.post("/v1/classify", json={"inputs": t, "adapter": a}) for t, a in zip(texts, names)
            ]
            return await asyncio.gather(*calls)

    start = time.perf_counter()
    answers = asyncio.run(drive())
    assert time.perf_counter() - start < 60
    assert [a.status_code for a in answers] == [200] * len(rows)
    for i, answer in enumerate(answers):
        assert _scores(answer.json()["results"][0]) == pytest.approx(expected[names[i]][i], abs=ATOL)
    metrics = httpx.get(cls_server + "/metrics").text
    count = next(
        line
        for line in metrics.splitlines()
        if line.startswith('deltatune_batch_size_count{endpoint="classify"')
    )
    assert 'deltatune_requests_total{endpoint="classify",adapter="a3",status="200"}' in metrics
    assert "deltatune_request_latency_seconds_sum" in metrics
    assert 'adapter="nope"' not in metrics and 'adapter="unknown",status="404"' in metrics
    # requests were batched: far fewer forward passes than requests (each batch mixes adapters)
    batches = int(count.split()[-1])
    assert batches < 150


@pytest.mark.parametrize(
    "rows",
    [["a1", None, "a0", "a1"], ["a0", "a0", "a1", "a1"], ["a1"] * 4],
    ids=["scattered rows", "contiguous segments", "one adapter"],
)
def test_row_plan_equals_set_adapter_per_row(folders, rows):
    """The per-row LoRA path (index and slice segments, base rows, per-adapter heads) against running each row
    alone with set_adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["base"])
    plain = AutoModelForSequenceClassification.from_pretrained(folders["base"]).eval()
    engine = Engine(AutoModelForSequenceClassification.from_pretrained(folders["base"]), tok, "seq-cls")
    for name in ("a0", "a1"):
        engine.load(name, str(folders["adapters"] / name))
    texts = ["good movie", "the plot was awful", "fun", "not very happy story"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad(), engine.rows(rows):
        mixed = engine.net(**enc).logits
    assert all(layer.row_adapters is None for layer in engine.model.adapter_layers())
    model = engine.model
    with torch.no_grad():
        for i, name in enumerate(rows):
            one = {k: v[i : i + 1] for k, v in enc.items()}
            if name is None:
                want = plain(**one).logits
            else:
                model.set_adapter(name)
                want = model(**one).logits
            torch.testing.assert_close(mixed[i : i + 1], want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gen_setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("gen")
    base = tiny_llama_folder(str(root / "base"))
    for i, name in enumerate(["g0", "g1"]):
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = get_peft_model(
            model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "o_proj"])
        )
        _randomize(peft_model, 30 + i, 1.0)
        peft_model.save_pretrained(str(root / name))
    engine = Engine(
        AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), "causal-lm"
    )
    for name in ["g0", "g1"]:
        engine.load(name, str(root / name))
    url, server, thread = _serve(create_app(engine, ServeSettings(max_new_tokens=8, batch_window_ms=20)))
    yield {"url": url, "root": root, "base": base}
    server.should_exit = True
    thread.join(10)


def test_generate_matches_offline_greedy(gen_setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = gen_setup["base"]
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(gen_setup["root"] / "g0"), adapter_name="g0"
    )
    model.load_adapter(str(gen_setup["root"] / "g1"), "g1")
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    prompts = ["the movie was", "good fun story", "a film", "not really the plot"]
    jobs = [(p, a) for p in prompts for a in (None, "g0", "g1")]
    expected = []
    with torch.no_grad():
        for prompt, name in jobs:
            enc = tok(prompt, return_tensors="pt")
            if name is not None:
                model.set_adapter(name)
            net = plain if name is None else model
            out = net.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            expected.append(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    assert len(set(expected)) > 3  # the adapters change what is generated

    async def drive():
        async with httpx.AsyncClient(base_url=gen_setup["url"], timeout=30) as client:
            calls = [
                client.post("/v1/generate", json={"prompt": p, "adapter": a, "max_new_tokens": 6})
                for p, a in jobs
            ]
            return await asyncio.gather(*calls)

    answers = asyncio.run(drive())
    assert [a.status_code for a in answers] == [200] * len(jobs)
    assert [a.json()["generation"] for a in answers] == expected
    sampled = httpx.post(
        gen_setup["url"] + "/v1/generate",
        json={"prompt": "good", "adapter": "g1", "max_new_tokens": 4, "do_sample": True, "top_k": 5},
    )
    assert sampled.status_code == 200 and isinstance(sampled.json()["generation"], str)


def test_generate_limits_and_admin_off(gen_setup):
    url = gen_setup["url"]
    over = httpx.post(url + "/v1/generate", json={"prompt": "good", "max_new_tokens": 9})
    assert over.status_code == 400 and "over the limit 8" in over.text
    assert httpx.post(url + "/v1/generate", json={"prompt": "good", "max_new_tokens": 0}).status_code == 422
    assert httpx.post(url + "/v1/generate", json={"prompt": "good", "temperature": 0}).status_code == 422
    wrong_task = httpx.post(url + "/v1/classify", json={"inputs": "good"})
    assert wrong_task.status_code == 400 and "causal-lm model" in wrong_task.text
    off = httpx.post(
        url + "/v1/adapters", json={"name": "x", "path": "g0"}, headers={"Authorization": "Bearer any"}
    )
    assert off.status_code == 403 and "Admin endpoints are off" in off.text
    assert httpx.delete(url + "/v1/adapters/g0").status_code == 403


def test_cli_serve_starts_and_answers(folders):
    """`deltatune serve` wires the options through: a subprocess on a free port, one request, then stopped."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deltatune", "serve", "--model", folders["base"], "--task", "seq-cls"]
    cmd += ["--adapter", f"a0={folders['adapters'] / 'a0'}", "--port", str(port), "--max-input-tokens", "5"]
    env = {**os.environ, "DELTATUNE_ADMIN_TOKEN": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120  # a loaded 2-core box took over 45 s to start it
        while True:
            try:
                health = httpx.get(url + "/health")
                break
            except httpx.TransportError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(
                        proc.stdout.read().decode() if proc.poll() is not None else "no start"
                    ) from None
                time.sleep(0.2)
        assert health.json()["adapters"] == ["a0"]
        texts = ["good movie"]
        r = httpx.post(url + "/v1/classify", json={"inputs": texts, "adapter": "a0"})
        assert _scores(r.json()["results"][0]) == pytest.approx(
            _offline(folders, ["a0"], texts)["a0"][0], abs=ATOL
        )
        too_long = httpx.post(url + "/v1/classify", json={"inputs": "good " * 9})
        assert too_long.status_code == 413 and "limit is 5" in too_long.text
        off = httpx.post(url + "/v1/adapters", json={"name": "x", "path": "a1"})
        assert off.status_code == 403
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_serve_rejects_a_bad_adapter_spec(folders):
    from typer.testing import CliRunner

    from deltatune.apps.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", folders["base"], "--adapter", "no-equals-sign"])
    assert result.exit_code == 2
    assert "must look like NAME=DIR" in result.output


def test_engine_unloading_the_last_adapter_gives_back_the_base(folders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["base"])
    engine = Engine(AutoModelForSequenceClassification.from_pretrained(folders["base"]), tok, "seq-cls")
    texts = ["good movie", "awful plot"]
    before = engine.classify(texts, [None, None])
    engine.load("a2", str(folders["adapters"] / "a2"))
    with_adapter = engine.classify(texts, ["a2", "a2"])
    assert with_adapter != before
    engine.unload("a2")
    assert engine.adapters == [] and not isinstance(engine.model, PeftModel)
    assert engine.classify(texts, [None, None]) == before
    engine.load("again", str(folders["adapters"] / "a2"))
    assert engine.classify(texts, ["again", "again"]) == with_adapter


def test_served_answers_equal_deltatune_predict(tmp_path):
    """A folder written by `deltatune train`: the engine `deltatune serve` builds answers as `deltatune predict`."""
    import json

    import yaml
    from helpers import write_csv
    from typer.testing import CliRunner

    from deltatune.apps.cli import app
    from deltatune.apps.serve import build_engine

    base = tiny_bert_folder(str(tmp_path / "model"))
    write_csv(str(tmp_path / "train.csv"), [(t, "pos" if y else "neg") for t, y in sentiment_rows(40)])
    recipe = {
        "model": base,
        "task": "seq-cls",
        "method": "lora",
        "lora": {"r": 2},
        "train_file": str(tmp_path / "train.csv"),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "batch_size": 8,
        "lr": 5e-2,
        "progress": False,
        "tensorboard": False,
        "plot": False,
        "num_threads": 1,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(tmp_path / "recipe.yaml")]).exit_code == 0
    texts = ["great fun movie", "awful dull plot", "the story was not really sad"]
    predicted = runner.invoke(app, ["predict", str(tmp_path / "run")], input="\n".join(texts) + "\n")
    assert predicted.exit_code == 0, predicted.output
    expected = [json.loads(line) for line in predicted.stdout.strip().splitlines()]
    engine = build_engine(base, {"sst": str(tmp_path / "run")}, "seq-cls")
    served = engine.classify(texts, ["sst"] * len(texts))
    assert [s["label"] for s in served] == [e["label"] for e in expected]
    assert set(served[0]["scores"]) == {"neg", "pos"}
    for s, e in zip(served, expected):
        assert s["scores"] == pytest.approx(e["scores"], abs=ATOL)
    # The generic task endpoint: the adapter's own Task (from its run_config.yaml) predicts the rows.
    from fastapi.testclient import TestClient

    with TestClient(create_app(engine, ServeSettings(adapter_root=str(tmp_path)))) as client:
        r = client.post("/v1/predict", json={"adapter": "sst", "rows": [{"text": t} for t in texts]})
        assert r.status_code == 200, r.text
        for got, e in zip(r.json()["results"], expected):
            assert got["label"] == e["label"] and got["scores"] == pytest.approx(e["scores"], abs=ATOL)
        assert client.post("/v1/predict", json={"adapter": "sst", "rows": []}).status_code == 422


def test_switching_adapters_1000_times_on_bf16_never_changes_an_answer(folders):
    """Adapters are never merged into the weights, so no amount of switching can move the base: after 1,000
    switches on a bfloat16 base (single-adapter batches, the case a merged fast path would take, and mixed ones)
    every answer is bit-identical to a fresh engine's, and so are the base weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def fresh_engine():
        base = AutoModelForSequenceClassification.from_pretrained(folders["base"], dtype=torch.bfloat16)
        engine = Engine(base, AutoTokenizer.from_pretrained(folders["base"]), "seq-cls")
        for name in CLS_ADAPTERS:
            engine.load(name, str(folders["adapters"] / name))
        return base, engine

    base, engine = fresh_engine()
    originals = [(p, p.detach().clone()) for p in base.parameters()]
    _, reference = fresh_engine()
    texts = ["good movie", "the plot was awful and dull", "fun"]
    names = CLS_ADAPTERS + [None]
    want = {(t, n): reference.classify([t], [n])[0] for t in texts for n in names}
    mixed_texts, mixed_names = texts + texts[:2], names
    want_mixed = reference.classify(mixed_texts, mixed_names)
    for i in range(1000):
        text, name = texts[i % 3], names[i % 5]
        assert engine.classify([text], [name])[0] == want[(text, name)], f"switch {i}"
        if i % 100 == 0:
            assert engine.classify(mixed_texts, mixed_names) == want_mixed
    assert all(torch.equal(p, copy) for p, copy in originals)
    assert want[(texts[0], "a0")] != want[(texts[0], "a1")] != want[(texts[0], None)]  # the adapters matter


def test_an_internal_error_is_a_500_with_a_request_id_and_a_logged_traceback(folders, caplog):
    """The client gets its request id and a short message (no exception text, no paths); the log gets the
    traceback under the same id. Library errors become statuses by class."""
    import logging

    from fastapi.testclient import TestClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune import errors
    from deltatune.apps.serve.http import status_for

    engine = Engine(
        AutoModelForSequenceClassification.from_pretrained(folders["base"]),
        AutoTokenizer.from_pretrained(folders["base"]),
        "seq-cls",
    )

    def broken(ids, names):
        raise RuntimeError("secret detail in /srv/models")

    engine.classify_ids = broken
    with (
        TestClient(create_app(engine, ServeSettings()), raise_server_exceptions=False) as client,
        caplog.at_level(logging.ERROR, logger="deltatune.serve"),
    ):
        r = client.post("/v1/classify", json={"inputs": "good movie"})
        metrics = client.get("/metrics").text
    assert r.status_code == 500 and "secret" not in r.text and "/srv" not in r.text
    rid = r.json()["error"]["request_id"]
    assert rid == r.headers["x-request-id"] and rid in r.json()["error"]["message"]
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert 'endpoint="classify",adapter="base",status="500"' in metrics
    kinds = [errors.AdapterNotFoundError, errors.ConfigError, errors.DataError, errors.CheckpointError]
    kinds += [errors.UnsupportedModelError, errors.MergeError, errors.RunError]
    assert [status_for(kind("x")) for kind in kinds] == [404, 400, 400, 400, 400, 409, 409]


def test_protect_all_requires_the_token_everywhere_but_health(folders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    engine = Engine(
        AutoModelForSequenceClassification.from_pretrained(folders["base"]),
        AutoTokenizer.from_pretrained(folders["base"]),
        "seq-cls",
    )
    with pytest.raises(ValueError, match="protect_all needs a token"):
        create_app(engine, ServeSettings(protect_all=True))
    url, server, thread = _serve(create_app(engine, ServeSettings(admin_token=TOKEN, protect_all=True)))
    try:
        assert httpx.get(url + "/health").status_code == 200
        body = {"inputs": "good movie"}
        refused = httpx.post(url + "/v1/classify", json=body)
        assert refused.status_code == 401 and "Bearer" in refused.json()["detail"]
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(url + "/v1/classify", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
