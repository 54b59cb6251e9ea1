"""`deltatune serve` as LoRA servers are used today: the official `openai` client against a live server on a tiny
Llama (chat, completions, streaming, /v1/models), continuous batching, the adapter cache, backpressure, timeouts and
disconnects. Every generated text is checked against `generate()` of a PeftModel loaded offline."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import save_llama_adapters, serve_in_thread, tiny_llama_folder

from deltatune import PeftModel
from deltatune.apps.serve import Engine, SamplingParams, Scheduler, ServeSettings, create_app
from deltatune.apps.serve.generation import Sequence
from deltatune.train.data import render_prompt

TOKEN = "s3cret"
ADAPTERS = ["g0", "g1", "g2", "g3"]
PROMPTS = ["the movie was", "good fun story", "a film", "not really the plot very very good fun"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and one thread cannot spin-wait on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _engine(base: str, root, names=("g0", "g1")) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(
        AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base), "causal-lm"
    )
    for name in names:
        engine.load(name, str(root / name))
    return engine


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A live server with g0, g1 loaded (g2, g3 only under the adapter root), and the offline reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("llm")
    base = tiny_llama_folder(str(root / "base"))
    adapters = root / "adapters"
    save_llama_adapters(base, str(adapters), ADAPTERS)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(adapters / "g0"), adapter_name="g0"
    )
    for name in ADAPTERS[1:]:
        reference.load_adapter(str(adapters / name), name)
    settings = ServeSettings(
        admin_token=TOKEN, adapter_root=str(adapters), max_adapters=3, max_new_tokens=100, max_batch_size=8
    )
    app = create_app(_engine(base, adapters), settings)
    with serve_in_thread(app, settings) as url:
        yield {
            "url": url,
            "base": base,
            "adapters": adapters,
            "tok": AutoTokenizer.from_pretrained(base),
            "reference": reference.eval(),
            "plain": AutoModelForCausalLM.from_pretrained(base).eval(),
            "server": app.state.server,
        }


def offline(llm, ids: list[int], name: str | None, max_tokens: int) -> tuple[str, int, str]:
    """(text, tokens generated, finish reason) of greedy `generate()` on one prompt, as the server should write."""
    model = llm["plain"] if name is None else llm["reference"]
    if name is not None:
        model.set_adapter(name)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    new = out[0, len(ids) :].tolist()
    finish = "stop" if new and new[-1] == 3 else "length"
    return llm["tok"].decode(new, skip_special_tokens=True), len(new), finish


def client(llm) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_models_chat_completions_and_streams(llm):
    tok, c = llm["tok"], client(llm)
    assert {"base", "g0", "g1"} <= {m.id for m in c.models.list().data}

    messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "good movie"}]
    chat = c.chat.completions.create(model="g0", messages=messages, max_tokens=8, temperature=0)
    ids = tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"]
    text, count, finish = offline(llm, ids, "g0", 8)
    assert chat.choices[0].message.content == text and chat.choices[0].finish_reason == finish
    assert chat.model == "g0" and chat.choices[0].message.role == "assistant"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), count)
    assert chat.usage.total_tokens == len(ids) + count

    done = c.completions.create(model="g1", prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    for choice, prompt in zip(done.choices, PROMPTS[:2]):
        text, _, finish = offline(llm, tok(prompt)["input_ids"], "g1", 6)
        assert (choice.text, choice.finish_reason) == (text, finish)
    base = c.completions.create(model="base", prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert base.choices[0].text == offline(llm, tok(PROMPTS[2])["input_ids"], None, 6)[0]

    stream = c.chat.completions.create(
        model="g0",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == chat.choices[0].message.content
    )
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    sampled = dict(model="g1", prompt=PROMPTS[3], max_tokens=8, temperature=1.0, seed=5, n=2)
    first, again = c.completions.create(**sampled), c.completions.create(**sampled)
    assert [ch.text for ch in first.choices] == [
        ch.text for ch in again.choices
    ]  # a seed makes it repeatable
    assert first.choices[0].text != first.choices[1].text  # choice j draws with seed + j
    streamed = {0: "", 1: ""}
    for ch in c.completions.create(**sampled, stream=True):
        streamed[ch.choices[0].index] += ch.choices[0].text
    assert [streamed[0], streamed[1]] == [ch.text for ch in first.choices]


def test_stop_tiny_temperature_echo_and_refusals(llm):
    tok, c = llm["tok"], client(llm)
    ids = tok(PROMPTS[0])["input_ids"]
    text, _, _ = offline(llm, ids, "g0", 10)
    stop = text.split()[2]
    cut = c.completions.create(
        model="g0", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop, "zzz"]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    tiny = c.completions.create(model="g0", prompt=PROMPTS[0], max_tokens=10, temperature=1e-300, seed=1)
    assert tiny.choices[0].text == text  # the limit of a vanishing temperature is greedy decoding
    echoed = c.completions.create(model="g0", prompt=PROMPTS[0], max_tokens=10, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + text

    with pytest.raises(openai.UnprocessableEntityError, match="frobnicate"):
        c.completions.create(model="g0", prompt="a", max_tokens=2, extra_body={"frobnicate": 1})
    with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):
        c.completions.create(model="g0", prompt="a", max_tokens=2, presence_penalty=0.5)
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="over the limit 100"):
        c.completions.create(model="g0", prompt="a", max_tokens=101)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="g0", prompt="good " * 40, max_tokens=100)
    assert c.completions.create(
        model="g0", prompt="a", max_tokens=2, presence_penalty=0, logit_bias={}
    ).choices


def _scheduled(engine: Engine, continuous: bool, long_ids, short_ids) -> tuple[int, Sequence, Sequence]:
    """Drive a scheduler tick by tick: a long sequence starts, a short one arrives two tokens later."""
    scheduler = Scheduler(engine, max_rows=8, continuous=continuous, window_s=0)
    long = Sequence(long_ids, "g0", SamplingParams(max_tokens=12))
    short = Sequence(short_ids, "g1", SamplingParams(max_tokens=3))
    scheduler.submit([long])
    scheduler.tick()
    scheduler.tick()
    scheduler.submit([short])
    ticks = 0
    while not short.done:
        scheduler.tick()
        ticks += 1
    while not long.done:
        scheduler.tick()
    return ticks, long, short


def test_requests_join_and_leave_the_batch_at_token_boundaries(llm):
    """Continuous batching: a request that arrives while another is being written joins at the next token and
    leaves when done (3 ticks for 3 tokens, the long one still running); static batching makes it wait for the
    whole batch. Both write exactly what `generate()` writes, on mixed adapters in one batch."""
    tok = llm["tok"]
    long_ids, short_ids = tok(PROMPTS[3])["input_ids"], tok(PROMPTS[1])["input_ids"]
    engine = _engine(llm["base"], llm["adapters"])
    ticks, long, short = _scheduled(engine, True, long_ids, short_ids)
    assert ticks == 3 and len(long.tokens) == 12
    assert long.text == offline(llm, long_ids, "g0", 12)[0]
    assert short.text == offline(llm, short_ids, "g1", 3)[0]
    static_ticks, static_long, static_short = _scheduled(engine, False, long_ids, short_ids)
    assert static_ticks == 10 + 3  # the rest of the long one first
    assert (static_long.text, static_short.text) == (long.text, short.text)


def test_short_requests_finish_while_a_long_stream_runs(llm):
    """Over HTTP: short requests (mixed adapters) sent while a long stream is running finish before it does."""
    tok, url = llm["tok"], llm["url"]
    long_ids = tok(PROMPTS[3])["input_ids"]
    shorts = [(PROMPTS[0], "g1"), (PROMPTS[1], "base"), (PROMPTS[2], "g0"), (PROMPTS[0], "g0")]

    async def drive():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"model": "g0", "prompt": PROMPTS[3], "max_tokens": 90, "temperature": 0, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.aiter_lines()
                first = await anext(lines)
                calls = [
                    http.post(
                        "/v1/completions", json={"model": m, "prompt": p, "max_tokens": 3, "temperature": 0}
                    )
                    for p, m in shorts
                ]
                answers = await asyncio.gather(*calls)
                shorts_done = time.perf_counter()
                rest = [line async for line in lines]
                return first, rest, answers, shorts_done, time.perf_counter()

    first, rest, answers, shorts_done, long_done = asyncio.run(drive())
    events = [json.loads(line[6:]) for line in [first, *rest] if line.startswith("data: {")]
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert "".join(e["choices"][0]["text"] for e in events) == offline(llm, long_ids, "g0", 90)[0]
    for answer, (prompt, model) in zip(answers, shorts):
        assert answer.status_code == 200, answer.text
        name = None if model == "base" else model
        assert answer.json()["choices"][0]["text"] == offline(llm, tok(prompt)["input_ids"], name, 3)[0]
    assert shorts_done < long_done
    metrics = httpx.get(url + "/metrics").text
    sizes = [
        line
        for line in metrics.splitlines()
        if line.startswith('deltatune_batch_size_bucket{endpoint="generate",le="1"}')
    ]
    total = [
        line
        for line in metrics.splitlines()
        if line.startswith('deltatune_batch_size_count{endpoint="generate"}')
    ]
    assert int(sizes[0].split()[-1]) < int(
        total[0].split()[-1]
    )  # some steps ran several rows (mixed adapters)


def _loaded(llm) -> list[str]:
    return httpx.get(llm["url"] + "/health").json()["adapters"]


def test_adapter_cache_loads_just_in_time_and_evicts_the_least_recently_used(llm):
    tok, c = llm["tok"], client(llm)
    server = llm["server"]

    def ask(name):
        answer = (
            c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text
        )
        assert answer == offline(llm, tok(PROMPTS[1])["input_ids"], name, 4)[0]

    for name in ("g0", "g1"):
        ask(name)
    ask("g2")  # under the adapter root, never loaded: loaded on its first request
    assert _loaded(llm) == ["g0", "g1", "g2"]
    ask("g1")
    ask("g2")
    ask("g3")  # the cache holds 3: the least recently used idle adapter (g0) makes room
    assert _loaded(llm) == ["g1", "g2", "g3"]
    ask("g0")  # and comes back on its next request
    assert _loaded(llm) == ["g0", "g2", "g3"]

    listing = httpx.get(llm["url"] + "/v1/adapters").json()["adapters"]
    assert listing and all("path" not in entry for entry in listing)  # no server paths without --protect-all

    # Every slot in use by a waiting request: a fourth adapter cannot evict any of them (503, Retry-After).
    gate = threading.Event()
    server.scheduler.call(gate.wait)

    async def in_use():
        async with httpx.AsyncClient(base_url=llm["url"], timeout=60) as http:
            holders = [
                asyncio.ensure_future(
                    http.post(
                        "/v1/completions", json={"model": m, "prompt": "a", "max_tokens": 2, "temperature": 0}
                    )
                )
                for m in _loaded(llm)
            ]
            await asyncio.sleep(0.3)
            refused = await http.post("/v1/completions", json={"model": "g1", "prompt": "a", "max_tokens": 2})
            gate.set()
            return refused, await asyncio.gather(*holders)

    refused, held = asyncio.run(in_use())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert [r.status_code for r in held] == [200, 200, 200]

    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def twice():
        async with httpx.AsyncClient(base_url=llm["url"], timeout=60, headers=auth) as http:
            body = {"name": "dup", "path": "g3"}
            return await asyncio.gather(
                http.post("/v1/adapters", json=body), http.post("/v1/adapters", json=body)
            )

    statuses = sorted(r.status_code for r in asyncio.run(twice()))
    assert statuses == [201, 409]
    assert httpx.delete(llm["url"] + "/v1/adapters/dup", headers=auth).status_code == 200


def test_backpressure_timeouts_and_disconnects(llm):
    """A full queue answers 429 with Retry-After; a request past its timeout 504; a client that leaves takes its
    rows out of the batch (counted as cancelled), all without holding up the others."""
    server, url = llm["server"], llm["url"]
    settings = server.settings
    gate = threading.Event()
    server.scheduler.call(gate.wait)
    old_queue, old_timeout = settings.max_queue, settings.request_timeout_s
    settings.max_queue, settings.request_timeout_s = 2, 1.0
    body = {
        "model": "base",
        "prompt": "good",
        "max_tokens": 2,
        "temperature": 0,
    }  # no adapter load to wait for
    try:

        async def flood():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                waiting = [asyncio.ensure_future(http.post("/v1/completions", json=body)) for _ in range(2)]
                await asyncio.sleep(0.3)
                refused = await http.post("/v1/completions", json=body)
                await asyncio.sleep(1.2)  # past the 1 s timeout while the model thread is held
                gate.set()
                return refused, await asyncio.gather(*waiting)

        refused, waited = asyncio.run(flood())
    finally:
        gate.set()
        settings.max_queue, settings.request_timeout_s = old_queue, old_timeout
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "--max-queue" in refused.json()["error"]["message"]
    assert [r.status_code for r in waited] == [504, 504]
    assert all(r.json()["error"]["type"] == "timeout_error" for r in waited)

    def cancelled() -> int:
        for line in httpx.get(url + "/metrics").text.splitlines():
            if line.startswith('deltatune_sequences_total{finish_reason="cancelled"}'):
                return int(line.split()[-1])
        return 0

    before = cancelled()
    long = {"model": "g0", "prompt": PROMPTS[3], "max_tokens": 90, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as stream:
        next(stream.iter_lines())  # the stream has started; now the client goes away
    deadline = time.time() + 20
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
