"""Fuzzing `deltatune serve` over HTTP (issue 15): malformed JSON, wrong types, huge values, unknown adapters,
hostile adapter folders, and concurrent load/unload/delete.

Properties: no answer is a 5xx, and the server keeps answering /health. The tests speak only HTTP to the app (via
FastAPI's TestClient), so they hold for any server that keeps the endpoints; `start_server` is the one place that
knows how an app is built. See tests/helpers/fuzz.py for how to explore with more examples.
"""

import json
import shutil
import threading
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import tiny_bert_folder, tiny_llama_folder
from helpers.fuzz import JSON, NASTY, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune as dt

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def start_server(model_dir, adapters, adapter_root, task):
    """The app under test, with admin on (TOKEN) and loads allowed from `adapter_root`."""
    from deltatune.apps.serve.app import ServeSettings, build_engine, create_app

    settings = ServeSettings(admin_token=TOKEN, adapter_root=str(adapter_root), max_batch_size=8)
    settings.max_input_tokens, settings.max_new_tokens = 24, 40
    return create_app(build_engine(str(model_dir), {k: str(v) for k, v in adapters.items()}, task), settings)


def save_adapter(base_dir, auto_class, out, task_type, targets, seed):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_pretrained(base_dir)
    peft_model = dt.get_peft_model(model, dt.LoraConfig(task_type=task_type, r=2, target_modules=targets))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(out)


def hostile_copies(good, root):
    """Adapter folders a careless or hostile user might ask the server to load."""
    for name in ("nan", "basekey", "badconfig", "notjson", "truncated"):
        shutil.copytree(good, root / name)
    state = load_file(root / "nan" / "adapter_model.safetensors")
    next(iter(state.values())).view(-1)[0] = float("nan")
    save_file(state, root / "nan" / "adapter_model.safetensors")
    state = load_file(root / "basekey" / "adapter_model.safetensors")
    state["base_model.model.embeddings.LayerNorm.weight"] = torch.zeros(32)
    save_file(state, root / "basekey" / "adapter_model.safetensors")
    config = json.loads((root / "badconfig" / "adapter_config.json").read_text())
    (root / "badconfig" / "adapter_config.json").write_text(json.dumps({**config, "r": True}))
    (root / "notjson" / "adapter_config.json").write_text("{nope")
    data = (root / "truncated" / "adapter_model.safetensors").read_bytes()
    (root / "truncated" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "empty").mkdir()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A classifier server and a generator server, each with two adapters and a folder of loadable ones."""
    root = tmp_path_factory.mktemp("fuzz_serve")
    out = {}
    for task, maker, auto, task_type, targets in (
        ("seq-cls", tiny_bert_folder, "AutoModelForSequenceClassification", "SEQ_CLS", ["query", "value"]),
        ("causal-lm", tiny_llama_folder, "AutoModelForCausalLM", "CAUSAL_LM", ["q_proj", "v_proj"]),
    ):
        base = maker(str(root / task / "base"))
        loadable = root / task / "loadable"
        for i, name in enumerate(["a0", "a1", "g0"]):
            save_adapter(base, auto, loadable / name, task_type, targets, seed=i)
        hostile_copies(loadable / "g0", loadable)
        app = start_server(base, {"a0": loadable / "a0", "a1": loadable / "a1"}, loadable, task)
        out[task] = TestClient(app, raise_server_exceptions=False).__enter__()  # one lifespan per app
    yield out
    for client in out.values():
        client.__exit__(None, None, None)


NAMES = st.sampled_from(["a0", "a1", "g0", "hot", "x", "", "../a0", "a" * 100, "é", "a0/../a1"]) | st.text(
    max_size=6
)
PATHS = st.sampled_from(
    [
        "g0",
        "a0",
        "nan",
        "basekey",
        "badconfig",
        "notjson",
        "truncated",
        "empty",
        "missing",
        "..",
        "../..",
        "/etc",
        "g0/../../..",
        "\x00",
        "",
    ]
) | st.text(max_size=8)
TEXTS = st.text(max_size=30) | st.sampled_from(["good " * 40, "", "\x00", "\ud7ff" * 3])
HEADERS = st.sampled_from([AUTH, {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}])


@st.composite
def requests(draw):
    """(method, path, kwargs for TestClient.request)."""
    kind = draw(st.sampled_from(["classify", "generate", "load", "delete", "raw", "get"]))
    if kind == "classify":
        body = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "inputs": TEXTS | st.lists(TEXTS, max_size=12) | JSON,
                    "adapter": st.none() | NAMES | NASTY,
                },
            )
        )
        return "POST", "/v1/classify", {"json": body}
    if kind == "generate":
        number = (
            st.integers(0, 6)
            | st.integers(-5, 10**12)
            | NASTY
            | st.floats(allow_nan=True, allow_infinity=True)
        )
        body = draw(
            st.fixed_dictionaries(
                {"prompt": TEXTS | JSON},
                optional={
                    "adapter": st.none() | NAMES,
                    "max_new_tokens": number,
                    "do_sample": st.booleans() | NASTY,
                    "temperature": number,
                    "top_p": number,
                    "top_k": number,
                },
            )
        )
        return "POST", "/v1/generate", {"json": body}
    if kind == "load":
        body = draw(st.fixed_dictionaries({}, optional={"name": NAMES | NASTY, "path": PATHS | NASTY}))
        return "POST", "/v1/adapters", {"json": body, "headers": draw(HEADERS)}
    if kind == "delete":
        return "DELETE", f"/v1/adapters/{quote(draw(NAMES), safe='')}", {"headers": draw(HEADERS)}
    if kind == "get":
        path = draw(
            st.sampled_from(["/health", "/metrics", "/v1/adapters", "/docs", "/openapi.json", "/nope"])
        )
        return "GET", path, {}
    method = draw(st.sampled_from(["POST", "PUT", "DELETE", "PATCH"]))
    path = draw(
        st.sampled_from(["/v1/classify", "/v1/generate", "/v1/adapters", "/v1/adapters/a0", "/health"])
    )
    content_type = draw(
        st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
    )
    body = draw(
        st.binary(max_size=60) | st.sampled_from([b"{", b"[]", b"null", b'{"inputs": NaN}', b"1e999"])
    )
    return method, path, {"content": body, "headers": {"content-type": content_type}}


def check_answers(client, method, path, kwargs):
    if "json" in kwargs:  # encoded here: NaN and infinity go on the wire as Python's json writes them
        body = json.dumps(kwargs.pop("json")).encode()
        kwargs = {
            **kwargs,
            "content": body,
            "headers": {**kwargs.get("headers", {}), "content-type": "application/json"},
        }
    reply = client.request(method, path, **kwargs)
    assert reply.status_code < 500, (method, path, kwargs, reply.status_code, reply.text[:300])
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_fuzzed_requests_never_get_a_500(servers, task):
    client = servers[task]

    @fuzz_settings(60)
    @given(sequence=st.lists(requests(), min_size=1, max_size=4))
    def run(sequence):
        for method, path, kwargs in sequence:
            check_answers(client, method, path, kwargs)

    run()
    loaded = client.get("/health").json()["adapters"]
    for name in loaded:  # leave the module's server as it was
        if name not in ("a0", "a1"):
            assert client.delete(f"/v1/adapters/{quote(name, safe='')}", headers=AUTH).status_code == 200
    for name in {"a0", "a1"} - set(loaded):
        assert client.post("/v1/adapters", json={"name": name, "path": name}, headers=AUTH).status_code == 201


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_concurrent_load_unload_and_requests(servers, task):
    """Threads load, unload and use one adapter name while others run requests: no 5xx, /health answers, and
    the adapter list ends consistent."""
    endpoint, field = ("/v1/classify", "inputs") if task == "seq-cls" else ("/v1/generate", "prompt")
    statuses, errors = [], []
    client = servers[task]

    def worker(kind, rounds=6):
        try:
            for _ in range(rounds):
                if kind == "load":
                    reply = client.post("/v1/adapters", json={"name": "hot", "path": "g0"}, headers=AUTH)
                elif kind == "unload":
                    reply = client.delete("/v1/adapters/hot", headers=AUTH)
                else:
                    body = {field: "good film", "adapter": "hot" if kind == "use" else "a0"}
                    body.update({"max_new_tokens": 2} if task == "causal-lm" else {})
                    reply = client.post(endpoint, json=body)
                statuses.append((kind, reply.status_code, reply.text[:200]))
                assert client.get("/health").status_code == 200
        except Exception as err:  # noqa: BLE001 - reported below with the statuses
            errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("load", "unload", "use", "use", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(code < 500 for _, code, _ in statuses), [s for s in statuses if s[1] >= 500]
    assert any(code == 200 for kind, code, _ in statuses if kind == "base"), statuses  # requests were served
    listed = {a["name"] for a in client.get("/v1/adapters").json()["adapters"]}
    healthy = set(client.get("/health").json()["adapters"])
    assert healthy == listed, (healthy, listed, statuses)
    if "hot" in listed:
        assert client.delete("/v1/adapters/hot", headers=AUTH).status_code == 200
