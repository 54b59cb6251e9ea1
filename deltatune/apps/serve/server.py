"""What the server's routes share (`Server`): the engine and its model thread, the adapter cache, the tokenizer and
loader threads, the settings, the metrics, and the checks every request goes through.

The event loop only parses, checks and routes: tokenizing happens on a tokenizer thread (with its own copy of the
tokenizer), reading adapter files on a loader thread, and every forward pass on the model thread (`Scheduler`).
"""

from __future__ import annotations

import asyncio
import copy
import os
import resource
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict

from deltatune.apps.serve.adapters import AdapterCache
from deltatune.apps.serve.batching import Engine, Scheduler, Timeout
from deltatune.apps.serve.generation import SamplingParams, Sequence
from deltatune.errors import ConfigError


def default_threads() -> int:
    """Half the CPUs: torch's default (all of them) collapses when other processes share the machine."""
    return max(1, (os.cpu_count() or 2) // 2)


def default_max_connections() -> int:
    """Stay under the process's descriptor limit, leaving room for model files, logs and the listening socket."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, soft - 64)) if soft != resource.RLIM_INFINITY else 4096


@dataclass
class ServeSettings:
    """Limits and security settings; every limit is answered with a 4xx naming the limit."""

    admin_token: str | None = None
    protect_all: bool = False  # the token is then required on every endpoint but /health
    adapter_root: str = "."
    max_batch_size: int = 32  # rows per forward pass, and texts per classify request
    batch_window_ms: float = 5.0  # how long an idle server gathers arriving requests into one batch
    batching: str = "continuous"  # or "static": a batch runs to its end before the next is admitted
    max_input_tokens: int = 512
    max_new_tokens: int = 256
    max_choices: int = 8  # OpenAI's `n`
    max_adapters: int = 128  # in memory at once; least recently used idle ones are evicted
    max_queue: int = 256  # rows waiting for the model; more are refused with 429 + Retry-After
    request_timeout_s: float = 120.0
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # a client must send its whole body within this
    header_timeout_s: float = 10.0  # ... and its request head within this of connecting
    keep_alive_s: float = 5.0
    max_connections: int | None = None  # None: under the descriptor limit (default_max_connections)
    threads: int | None = None  # torch threads on the model thread; None: default_threads()
    base_name: str = "base"  # what requests call the base model (OpenAI's `model`)

    def __post_init__(self) -> None:
        if self.batching not in ("continuous", "static"):
            raise ConfigError(f"batching must be 'continuous' or 'static', not {self.batching!r}.")
        for name in ("max_batch_size", "max_input_tokens", "max_new_tokens", "max_choices", "max_adapters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.")

    @property
    def max_input_chars(self) -> int:
        """Texts longer than this are refused before tokenizing (no tokenizer makes tokens of 32+ characters
        often enough to matter); the token limit is checked after."""
        return 32 * self.max_input_tokens


class Strict(BaseModel):
    """Request bodies: unknown fields are refused (never silently ignored), NaN and infinities too."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Metrics:
    """Prometheus counters kept in memory (requests, latency, batch sizes, per adapter and endpoint)."""

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency_sum: dict[tuple[str, str], float] = defaultdict(float)
        self.latency_count: dict[tuple[str, str], int] = defaultdict(int)
        self.batches: dict[str, list[int]] = defaultdict(lambda: [0] * (len(self.BATCH_BUCKETS) + 1))
        self.batch_rows: dict[str, int] = defaultdict(int)
        self.finishes: dict[str, int] = defaultdict(int)

    def finished(self, reason: str) -> None:
        with self.lock:
            self.finishes[reason] += 1

    def request(self, endpoint: str, adapter: str | None, status: int, seconds: float) -> None:
        name = adapter or "base"
        with self.lock:
            self.requests[(endpoint, name, status)] += 1
            self.latency_sum[(endpoint, name)] += seconds
            self.latency_count[(endpoint, name)] += 1

    def batch(self, endpoint: str, size: int) -> None:
        with self.lock:
            counts = self.batches[endpoint]
            for i, bound in enumerate(self.BATCH_BUCKETS):
                if size <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self.batch_rows[endpoint] += size

    def render(self, adapters: int, queued: int, running: int) -> str:
        lines = [
            "# HELP deltatune_requests_total Requests answered, by endpoint, adapter and HTTP status.",
            "# TYPE deltatune_requests_total counter",
        ]
        with self.lock:
            for (endpoint, adapter, status), n in sorted(self.requests.items()):
                lines.append(
                    f'deltatune_requests_total{{endpoint="{endpoint}",adapter="{adapter}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP deltatune_request_latency_seconds Time from arrival to answer.",
                "# TYPE deltatune_request_latency_seconds summary",
            ]
            for (endpoint, adapter), total in sorted(self.latency_sum.items()):
                labels = f'endpoint="{endpoint}",adapter="{adapter}"'
                lines.append(f"deltatune_request_latency_seconds_sum{{{labels}}} {total:.6f}")
                lines.append(
                    f"deltatune_request_latency_seconds_count{{{labels}}} {self.latency_count[(endpoint, adapter)]}"
                )
            lines += [
                "# HELP deltatune_batch_size Rows per forward pass (mixed adapters share a pass).",
                "# TYPE deltatune_batch_size histogram",
            ]
            for endpoint, counts in sorted(self.batches.items()):
                for bound, n in zip(self.BATCH_BUCKETS, counts):
                    lines.append(f'deltatune_batch_size_bucket{{endpoint="{endpoint}",le="{bound}"}} {n}')
                lines.append(f'deltatune_batch_size_bucket{{endpoint="{endpoint}",le="+Inf"}} {counts[-1]}')
                lines.append(f'deltatune_batch_size_sum{{endpoint="{endpoint}"}} {self.batch_rows[endpoint]}')
                lines.append(f'deltatune_batch_size_count{{endpoint="{endpoint}"}} {counts[-1]}')
            lines += [
                "# HELP deltatune_sequences_total Sequences written, by how they ended (cancelled: client gone).",
                "# TYPE deltatune_sequences_total counter",
            ]
            for reason, n in sorted(self.finishes.items()):
                lines.append(f'deltatune_sequences_total{{finish_reason="{reason}"}} {n}')
        lines += [
            "# TYPE deltatune_adapters_loaded gauge",
            f"deltatune_adapters_loaded {adapters}",
            "# TYPE deltatune_queued_rows gauge",
            f"deltatune_queued_rows {queued}",
            "# TYPE deltatune_running_sequences gauge",
            f"deltatune_running_sequences {running}",
        ]
        return "\n".join(lines) + "\n"


class Run:
    """The sequences of one generation request and the queue their events arrive on (from the model thread)."""

    def __init__(self, seqs: list[Sequence], queue: asyncio.Queue, deadline: float) -> None:
        self.seqs, self.queue, self.deadline = seqs, queue, deadline

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancelled = True

    async def events(self):
        """(choice index, kind, payload) until every sequence is done; a sequence's error is raised."""
        pending = len(self.seqs)
        while pending:
            # The model thread drops rows past their deadline; waiting a little longer is only a backstop.
            backstop = max(self.deadline - time.monotonic() + 5.0, 0.1)
            try:
                index, (kind, payload) = await asyncio.wait_for(self.queue.get(), backstop)
            except TimeoutError:
                raise Timeout("The request ran past its timeout.") from None
            if kind == "error":
                raise payload
            if kind == "done":
                pending -= 1
            yield index, kind, payload


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (after the body, the next ASGI message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """What the routes share: the engine and its scheduler, the adapter cache, the tokenizer and loader threads,
    the settings and the metrics."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self.engine, self.settings = engine, settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            engine,
            max_rows=settings.max_batch_size,
            continuous=settings.batching == "continuous",
            window_s=settings.batch_window_ms / 1000,
            threads=settings.threads or default_threads(),
            on_batch=self.metrics.batch,
        )
        # The tokenizer thread has its own copy: a tokenizer is not safe to share with the model thread's decoding.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-tokenizer")
        self.loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-loader")
        self.adapters = AdapterCache(
            engine, self.scheduler, settings.adapter_root, settings.max_adapters, self.loading
        )
        self.tasks: dict[str, Any] = {}  # adapter name -> its Task, for /v1/predict

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.tokenizing.shutdown(wait=True)
        self.loading.shutdown(wait=True)

    # --- checks ------------------------------------------------------------------------------------
    def adapter_named(self, model: str | None) -> str | None:
        """OpenAI's `model`: the base model's name or an adapter's."""
        return None if model in (None, self.settings.base_name) else model

    def need_task(self, task: str, endpoint: str) -> None:
        if self.engine.task != task:
            raise HTTPException(
                400, f"This server runs a {self.engine.task} model; {endpoint} needs a {task} model."
            )

    def check_text(self, text: str, what: str = "Input") -> None:
        limit = self.settings.max_input_chars
        if len(text) > limit:
            raise HTTPException(
                413,
                f"{what} has {len(text)} characters; the limit is {limit} (32 x --max-input-tokens "
                f"{self.settings.max_input_tokens}).",
            )

    def check_room(self, rows: int) -> None:
        queued = self.scheduler.queued()
        if queued + rows > self.settings.max_queue:
            raise HTTPException(
                429,
                f"The server is busy: {queued} rows are waiting (--max-queue {self.settings.max_queue}); retry soon.",
                headers={"Retry-After": "1"},
            )

    # --- tokenizer thread ------------------------------------------------------------------------
    async def tokenize(self, texts: list[str], special: bool = True) -> list[list[int]]:
        """Token ids of each text (on the tokenizer thread), refused over --max-input-tokens or when empty."""
        for text in texts:
            self.check_text(text)
            if not text.strip():
                raise HTTPException(400, "The text is empty; send some text to work on.")

        def encode() -> list[list[int]]:
            return [self.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]

        ids = await asyncio.get_running_loop().run_in_executor(self.tokenizing, encode)
        for row in ids:
            if len(row) > self.settings.max_input_tokens:
                raise HTTPException(
                    413,
                    f"Input has {len(row)} tokens; the limit is {self.settings.max_input_tokens} (--max-input-tokens).",
                )
            if not row:
                raise HTTPException(400, "The prompt is empty (it has no tokens); send some text.")
        return ids

    async def on_tokenizer_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    # --- model thread ------------------------------------------------------------------------------
    async def classify(self, ids: list[list[int]], adapter: str | None) -> list[dict[str, Any]]:
        self.check_room(len(ids))
        future = self.scheduler.classify(ids, [adapter] * len(ids))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout_s)
        except TimeoutError:
            raise Timeout("The request ran past its timeout.") from None

    def start_generation(
        self,
        prompts: list[list[int]],
        adapter: str | None,
        params: SamplingParams,
        n: int = 1,
        stream: bool = False,
    ) -> Run:
        """Queue n sequences per prompt (choice index = prompt * n + j; with a seed, choice j uses seed + j)."""
        limit = self.engine.context_length
        for ids in prompts:
            if len(ids) + params.max_tokens > limit:
                raise HTTPException(
                    400,
                    f"The prompt has {len(ids)} tokens and asks for {params.max_tokens} more; the model's context "
                    f"is {limit} tokens. Shorten the prompt or lower max_tokens.",
                )
        self.check_room(len(prompts) * n)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + self.settings.request_timeout_s
        seqs: list[Sequence] = []
        for ids in prompts:
            for j in range(n):
                seed = None if params.seed is None else params.seed + j
                seq = Sequence(
                    list(ids), adapter, replace(params, seed=seed), deadline=deadline, stream=stream
                )
                seq.emit = self._emitter(loop, queue, len(seqs), seq)
                seqs.append(seq)
        self.scheduler.submit(seqs)
        return Run(seqs, queue, deadline)

    def _emitter(self, loop, queue: asyncio.Queue, index: int, seq: Sequence):
        """Called on the model thread: hands the event to the event loop, and counts how sequences end."""

        def emit(event) -> None:
            if event[0] in ("done", "error"):
                self.metrics.finished(seq.finish_reason or "error")
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        return emit

    async def finish(self, run: Run, request: Request) -> None:
        """Wait for every sequence of `run`; a client that disconnects meanwhile takes its rows out of the batch."""
        watcher = asyncio.ensure_future(until_disconnected(request))
        watcher.add_done_callback(lambda _: run.cancel())
        try:
            async for _ in run.events():
                pass
        finally:
            if not watcher.done():
                watcher.cancel()
            run.cancel()  # a no-op for finished rows; drops the rest when this request failed or timed out

    async def task_for(self, adapter: str):
        """The Task that `deltatune train` recorded in the adapter's folder (run_config.yaml)."""
        if adapter not in self.tasks:
            folder = self.adapters.path(adapter)
            self.tasks[adapter] = await asyncio.get_running_loop().run_in_executor(
                self.loading, task_from_folder, folder, self.engine.tokenizer, adapter
            )
        task = self.tasks[adapter]
        if task.name != self.engine.task:
            raise HTTPException(
                400,
                f"Adapter {adapter!r} was trained for task {task.name!r}; this server runs {self.engine.task!r}.",
            )
        return task

    async def predict(self, adapter: str, rows: list[dict[str, Any]]) -> list[Any]:
        if not isinstance(self.engine, Engine):  # rec and vision runs: the engine runs each run's own task
            self.check_room(len(rows))
            future = self.scheduler.call(self.engine.predict, adapter, rows)
            return await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout_s)
        task = await self.task_for(adapter)
        self.check_room(len(rows))

        def run():  # model thread: the task makes its own batches, on one adapter
            with self.engine.one_adapter(adapter):
                return task.predict(self.engine.model, rows)

        future = self.scheduler.call(run)
        return await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout_s)


def strings_in(value: Any):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def task_from_folder(folder: str, tokenizer: Any, adapter: str):
    import yaml

    from deltatune.train.data import LabelMap
    from deltatune.train.recipe import RUN_CONFIG, build_task, split_recipe

    path = os.path.join(folder, RUN_CONFIG)
    if not os.path.isfile(path):
        raise HTTPException(
            400,
            f"Adapter {adapter!r} has no {RUN_CONFIG}: /v1/predict serves adapters written by `deltatune train`. "
            "Use /v1/classify or /v1/completions for the others.",
        )
    with open(path) as fh:
        run, _, _ = split_recipe(yaml.safe_load(fh))
    labels = LabelMap(run.labels) if run.labels else None
    return build_task(run, tokenizer, labels)
