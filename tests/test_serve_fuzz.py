"""The server under bad input and load, bounded to seconds: every malformed, hostile or oversized request gets a
4xx with a JSON error (never a 500), slow and silent clients are cut off, 32 clients with mixed-length prompts are
all answered, and /health answers in under a second throughout (a monitor thread polls it the whole time)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import httpx
import pytest
import torch
from helpers import save_llama_adapters, serve_in_thread, tiny_llama_folder

from deltatune.apps.serve import Engine, ServeSettings, create_app

MAX_BODY = 64 * 1024


class HealthMonitor(threading.Thread):
    """Polls /health every 50 ms and keeps the slowest answer (a failure counts as infinitely slow)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.slowest, self.polls, self.stopping = url, 0.0, 0, threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self.stopping.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - start if ok else float("inf")
                self.slowest, self.polls = max(self.slowest, took), self.polls + 1
                time.sleep(0.05)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fuzz")
    base = tiny_llama_folder(str(root / "base"))
    save_llama_adapters(base, str(root / "adapters"), ["g0", "g1"])
    engine = Engine(
        AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), "causal-lm"
    )
    engine.load("g0", str(root / "adapters" / "g0"))
    settings = ServeSettings(
        adapter_root=str(root / "adapters"),
        max_body_bytes=MAX_BODY,
        header_timeout_s=1.0,
        body_timeout_s=1.0,
        max_input_tokens=64,
        max_new_tokens=16,
        max_batch_size=16,
    )
    with serve_in_thread(create_app(engine, settings), settings) as url:
        monitor = HealthMonitor(url)
        monitor.start()
        yield {"url": url, "monitor": monitor, "statuses": []}
        monitor.stopping.set()
        monitor.join(5)
    torch.set_num_threads(before)


def post(live, path: str, body, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body)
    r = httpx.post(
        live["url"] + path, content=content, headers={"content-type": "application/json"}, timeout=60
    )
    live["statuses"].append(r.status_code)
    return r


BAD = [
    ("/v1/completions", '{"model": "g0", "prompt": "a", "temperature": NaN}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "temperature": Infinity}', 422),
    ("/v1/generate", '{"prompt": "a", "do_sample": true, "temperature": -Infinity}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": ""}', 400),
    ("/v1/generate", '{"prompt": "   "}', 400),
    ("/v1/completions", '{"model": "g0", "prompt": "good \\ud800 movie"}', 422),
    ("/v1/chat/completions", '{"model": "g0", "messages": [{"role": "user", "content": "\\udfff"}]}', 422),
    ("/v1/generate", '{"prompt": "a", "stop": ["\\ud800"]}', 422),
    ("/v1/generate", '{"prompt": "good", "max_tokens": 2}', 422),
    ("/v1/generate", '{"prompt": "good", "stream": true}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "frobnicate": 1}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "max_tokens": 0}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "max_tokens": 1000000000000000000000000}', 400),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "n": 1000}', 400),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "seed": 100000000000000000000000}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a", "top_p": 0}', 422),
    ("/v1/completions", '{"model": "../../etc/passwd", "prompt": "a"}', 404),
    ("/v1/completions", '{"model": "g0\\u0000", "prompt": "a"}', 404),
    ("/v1/completions", '{"model": "g0", "prompt": 42}', 422),
    ("/v1/chat/completions", '{"model": "g0", "messages": []}', 422),
    ("/v1/chat/completions", '{"model": "g0", "messages": [{"role": "tool", "content": "x"}]}', 422),
    ("/v1/completions", '{"model": "g0", "prompt": "a"', 422),
    ("/v1/completions", "[1, 2, 3]", 422),
    ("/v1/completions", "[" * 20000 + "]" * 20000, 400),
    ("/v1/classify", '{"inputs": "good"}', 400),
    ("/v1/predict", '{"adapter": "g0", "rows": [{"text": "good"}]}', 400),
    ("/v1/adapters", '{"name": "x", "path": "g0"}', 403),
    ("/v1/completions", json.dumps({"model": "g0", "prompt": "good " * 100}), 413),
    ("/v1/completions", json.dumps({"model": "g0", "prompt": "x" * 3000}), 413),
]


@pytest.mark.parametrize("path, body, status", BAD, ids=[f"{i}-{p}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_requests_get_a_4xx_with_a_json_error(live, path, body, status):
    r = post(live, path, body, raw=True)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["request_id"] == r.headers["x-request-id"]
    assert "/tmp" not in r.text and "Traceback" not in r.text  # no server paths, no internals


def test_vanishing_temperature_is_greedy_not_a_crash(live):
    for path, body in [
        ("/v1/completions", {"model": "g0", "prompt": "good", "max_tokens": 4, "temperature": 1e-300}),
        ("/v1/generate", {"prompt": "good", "max_new_tokens": 4, "do_sample": True, "temperature": 5e-324}),
    ]:
        assert post(live, path, body).status_code == 200


def _raw(url: str, data: bytes, read_for: float = 5.0) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it (or `read_for` seconds pass)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_for) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            received += b"<still open>"
        return received


def test_big_bodies_slow_and_silent_clients_are_cut_off(live):
    url = live["url"]
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    start = time.perf_counter()
    refused = _raw(url, (head + "Content-Length: 52428800\r\n\r\n").encode())  # 50 MB announced, none sent
    assert refused.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in refused
    assert time.perf_counter() - start < 2  # refused from the header alone
    chunked = (
        (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
        + b"%x\r\n" % (2 * MAX_BODY)
        + b"x" * (2 * MAX_BODY)
    )
    assert _raw(url, chunked + b"\r\n").startswith(b"HTTP/1.1 413")
    half_body = _raw(url, (head + "Content-Length: 100\r\n\r\n").encode() + b'{"model": "g0"')
    assert half_body.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in half_body
    assert _raw(url, head.encode()) == b""  # half a request head: closed without an answer
    silent = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(50)]
    try:
        time.sleep(1.5)
        for sock in silent:
            sock.settimeout(3)
            assert sock.recv(1) == b""  # the server closed every silent connection
    finally:
        for sock in silent:
            sock.close()


def test_32_clients_with_mixed_length_prompts(live):
    rng = random.Random(0)
    words = "good great fun bad awful the movie film plot acting story".split()

    def request() -> tuple[str, dict]:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 50)))
        model = rng.choice(["g0", "g1", "base"])
        tokens = rng.randint(1, 16)
        kind = rng.choice(["completion", "stream", "chat", "generate"])
        if kind == "generate":
            return "/v1/generate", {
                "prompt": prompt,
                "adapter": None if model == "base" else model,
                "max_new_tokens": tokens,
            }
        if kind == "chat":
            messages = [{"role": "user", "content": prompt}]
            return "/v1/chat/completions", {
                "model": model,
                "messages": messages,
                "max_tokens": tokens,
                "temperature": 0.7,
            }
        return "/v1/completions", {
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "stream": kind == "stream",
            "seed": 1,
        }

    jobs = [[request() for _ in range(3)] for _ in range(32)]

    async def client(http, mine):
        results = []
        for path, body in mine:
            r = await http.post(path, json=body)
            results.append((r.status_code, body.get("stream", False), r.text))
        return results

    async def drive():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=live["url"], timeout=120, limits=limits) as http:
            return await asyncio.gather(*(client(http, mine) for mine in jobs))

    results = [r for client_results in asyncio.run(drive()) for r in client_results]
    live["statuses"] += [status for status, _, _ in results]
    assert [status for status, _, _ in results] == [200] * len(results), [
        t for s, _, t in results if s != 200
    ][:3]
    assert all(text.rstrip().endswith("data: [DONE]") for _, stream, text in results if stream)


def test_random_requests_never_get_a_500(live):
    """Seeded random mutations of valid bodies: wrong types, extreme numbers, bad strings, extra and missing
    fields. Whatever comes in, the answer is a success or a 4xx with a JSON error."""
    rng = random.Random(1)
    valid = [
        (
            "/v1/completions",
            {"model": "g0", "prompt": "good movie", "max_tokens": 3, "temperature": 0.5, "n": 2},
        ),
        (
            "/v1/chat/completions",
            {"model": "g1", "messages": [{"role": "user", "content": "fun"}], "max_tokens": 3},
        ),
        (
            "/v1/generate",
            {"prompt": "the plot", "adapter": "g0", "max_new_tokens": 3, "do_sample": True, "top_k": 3},
        ),
    ]
    values = [
        None,
        True,
        -1,
        0,
        1,
        2**64,
        -(2**70),
        1e308,
        -1e-320,
        float("nan"),
        float("inf"),
        "",
        " ",
        "\ud800",
        "x" * 5000,
        [],
        {},
        [1, "a"],
        {"a": {"b": []}},
        "g1",
        "base",
        "stop",
    ]
    for _ in range(120):
        path, body = rng.choice(valid)
        body = json.loads(json.dumps(body))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice([*body, "stop", "seed", "stream", "top_p", "n", "echo", "extra"])
            if rng.random() < 0.2:
                body.pop(key, None)
            else:
                body[key] = rng.choice(values)
        r = post(live, path, json.dumps(body, allow_nan=True), raw=True)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert r.json()["error"]["message"]


def test_no_500_and_health_stayed_under_a_second(live):
    metrics = httpx.get(live["url"] + "/metrics").text
    assert 'status="500"' not in metrics and 500 not in live["statuses"]
    monitor = live["monitor"]
    assert monitor.polls > 20 and monitor.slowest < 1.0, monitor.slowest
