"""`deltatune serve`: many adapters over one shared base model, as a FastAPI app.

Requests name their adapter (or none: the base). Requests arriving close together share one forward pass even when
they name different adapters (see batching.py). Admin endpoints (load/unload) need a bearer token and are off when
no token is configured; adapter folders loaded through the API must lie under `adapter_root` (symlinks resolved).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import secrets
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from deltatune.apps.serve.batching import AdapterError, Batcher, Engine
from deltatune.apps.serve.recommend import RecommendEngine, RecommendRequest
from deltatune.apps.serve.vision import VISION_ENDPOINTS, ImageRequest, VisionEngine, check_rows
from deltatune.errors import DeltatuneError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ServeSettings:
    """Limits and security settings; every limit is answered with a 4xx naming the limit."""

    admin_token: str | None = None
    protect_all: bool = False  # the token is then required on every endpoint but /health
    adapter_root: str = "."
    max_batch_size: int = 32
    batch_window_ms: float = 5.0
    max_input_tokens: int = 512
    max_new_tokens: int = 256


class ClassifyRequest(BaseModel):
    inputs: str | list[str] = Field(..., description="One text or a list of texts.")
    adapter: str | None = Field(None, description="Adapter name; null runs the base model.")


class GenerateRequest(BaseModel):
    prompt: str
    adapter: str | None = None
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)


class LoadRequest(BaseModel):
    name: str
    path: str


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

    def render(self, adapters: list[str]) -> str:
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
        lines += ["# TYPE deltatune_adapters_loaded gauge", f"deltatune_adapters_loaded {len(adapters)}"]
        return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities written as strings and bytes decoded leniently: JSON has no such numbers
    and FastAPI decodes bytes strictly, and echoing a bad input back (its 422 repeats it) must not turn a client's
    mistake into a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def resolve_under_root(root: str, path: str) -> str:
    """The real folder `path` names, refused unless it (and its adapter files) lie inside `root` after resolving
    `..` and symlinks; relative paths are taken from `root`."""
    real_root = os.path.realpath(root)
    if "\x00" in path:
        raise HTTPException(400, "Adapter path contains a NUL character.")
    real = os.path.realpath(os.path.join(real_root, path))
    candidates = [real] + [os.path.realpath(os.path.join(real, f)) for f in ADAPTER_FILES]
    for candidate in candidates:
        if os.path.commonpath([candidate, real_root]) != real_root:
            raise HTTPException(
                403, f"Adapter path {path!r} is outside the allowed root {real_root}; copy the adapter there."
            )
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(real, f))]
    if missing:
        raise HTTPException(
            400,
            f"{path!r} is not an adapter folder: missing {', '.join(missing)} (only safetensors are loaded).",
        )
    return real


def create_app(
    engine: Engine | RecommendEngine | VisionEngine, settings: ServeSettings | None = None
) -> FastAPI:
    """The HTTP app around `engine`; all model work runs on one worker thread, in arrival-ordered batches."""
    settings = settings or ServeSettings()
    token = settings.admin_token or os.environ.get("DELTATUNE_ADMIN_TOKEN") or None
    if settings.protect_all and token is None:
        raise ValueError("protect_all needs a token: pass --admin-token or set DELTATUNE_ADMIN_TOKEN.")
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltatune-model")
    metrics = Metrics()
    inflight: dict[str, int] = defaultdict(int)
    draining: set[str] = set()
    window = settings.batch_window_ms / 1000

    def run_classify(_key, rows):
        return engine.classify([t for t, _ in rows], [a for _, a in rows])

    def run_generate(key, rows):
        return engine.generate([p for p, _ in rows], [a for _, a in rows], dict(key))

    classify_batcher = Batcher(
        run_classify, executor, settings.max_batch_size, window, lambda n: metrics.batch("classify", n)
    )
    generate_batcher = Batcher(
        run_generate, executor, settings.max_batch_size, window, lambda n: metrics.batch("generate", n)
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        classify_batcher.start()
        generate_batcher.start()
        yield
        await classify_batcher.stop()
        await generate_batcher.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title="deltatune serve", version="1", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable_encoder(json_safe(err.errors()))}, 422)

    def token_ok(authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), token.encode())

    if settings.protect_all:

        @app.middleware("http")
        async def require_token_everywhere(request: Request, call_next):
            if request.url.path != "/health" and not token_ok(request.headers.get("authorization")):
                return JSONResponse(
                    {"detail": "This server requires 'Authorization: Bearer <token>' on every endpoint."}, 401
                )
            return await call_next(request)

    def claim(adapter: str | None) -> None:
        if adapter is None:
            return
        if adapter not in engine.paths or adapter in draining:
            loaded = ", ".join(a for a in engine.adapters if a not in draining) or "none"
            raise HTTPException(
                404, f"No adapter named {adapter!r}; loaded: {loaded} (or null for the base)."
            )
        inflight[adapter] += 1

    def release(adapter: str | None) -> None:
        if adapter is not None:
            inflight[adapter] -= 1

    def check_length(text: str) -> None:
        n = engine.count_tokens(text)
        if n > settings.max_input_tokens:
            raise HTTPException(
                413, f"Input has {n} tokens; the limit is {settings.max_input_tokens} (--max-input-tokens)."
            )

    async def answer(endpoint: str, adapter: str | None, work):
        start = time.perf_counter()
        status = 200
        try:
            return await work()
        except HTTPException as err:
            status = err.status_code
            raise
        except Exception as err:
            status = 500
            raise HTTPException(500, f"{type(err).__name__}: {err}") from err
        finally:  # unknown names share one label, so requests cannot grow the metric series without bound
            label = adapter if adapter is None or adapter in engine.paths else "unknown"
            metrics.request(endpoint, label, status, time.perf_counter() - start)

    def need_task(task: str, endpoint: str) -> None:
        if engine.task != task:
            raise HTTPException(
                400, f"This server runs a {engine.task} model; {endpoint} needs a {task} model."
            )

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        """Labels with scores for one text or a list of texts."""
        texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)

        async def work():
            need_task("seq-cls", "/v1/classify")
            if not texts:
                raise HTTPException(400, "inputs is empty; send a text or a non-empty list of texts.")
            if len(texts) > settings.max_batch_size:
                raise HTTPException(
                    413, f"{len(texts)} inputs in one request; the limit is {settings.max_batch_size}."
                )
            for text in texts:
                check_length(text)
            claim(req.adapter)
            try:
                results = await classify_batcher.submit(None, [(t, req.adapter) for t in texts])
            finally:
                release(req.adapter)
            return {"adapter": req.adapter, "results": results}

        return await answer("classify", req.adapter, work)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        """Continue a prompt with the named adapter (greedy unless do_sample)."""

        async def work():
            need_task("causal-lm", "/v1/generate")
            if req.max_new_tokens > settings.max_new_tokens:
                raise HTTPException(
                    400, f"max_new_tokens={req.max_new_tokens} is over the limit {settings.max_new_tokens}."
                )
            check_length(req.prompt)
            claim(req.adapter)
            options = {"max_new_tokens": req.max_new_tokens, "do_sample": req.do_sample}
            if req.do_sample:
                options.update(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
            try:
                (text,) = await generate_batcher.submit(
                    tuple(sorted(options.items())), [(req.prompt, req.adapter)]
                )
            finally:
                release(req.adapter)
            return {"adapter": req.adapter, "generation": text}

        return await answer("generate", req.adapter, work)

    @app.post("/v1/recommend")
    async def recommend(req: RecommendRequest) -> dict[str, Any]:
        """Top-k items for a user or a typed history (rec ranking runs), or P(Yes) for an item (preference runs);
        the same answer as `deltatune predict` on that run."""

        async def work():
            need_task("rec", "/v1/recommend")
            claim(req.adapter)
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    executor, engine.recommend, req.adapter, req.row()
                )
            except DeltatuneError as err:  # an unknown user or item, an empty history: the request's fault
                raise HTTPException(400, str(err)) from err
            finally:
                release(req.adapter)
            return {"adapter": req.adapter, **result}

        return await answer("recommend", req.adapter, work)

    async def vision_answer(req: ImageRequest, task: str) -> dict[str, Any]:
        """One vision endpoint: the rows of `deltatune predict` on the named run."""
        endpoint = VISION_ENDPOINTS[task]

        async def work():
            need_task(task, f"/v1/{endpoint}")
            try:
                check_rows(req.inputs, settings.max_batch_size)
            except DeltatuneError as err:
                raise HTTPException(400, str(err)) from err
            claim(req.adapter)
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    executor, engine.predict, req.adapter, req.inputs
                )
            except (
                DeltatuneError
            ) as err:  # a bad image or prompt, a missing adapter name: the request's fault
                raise HTTPException(400, str(err)) from err
            finally:
                release(req.adapter)
            return {"adapter": req.adapter, "results": results}

        return await answer(endpoint, req.adapter, work)

    @app.post("/v1/classify-image")
    async def classify_image(req: ImageRequest) -> dict[str, Any]:
        """Label and class probabilities per image (an image-cls run)."""
        return await vision_answer(req, "image-cls")

    @app.post("/v1/detect")
    async def detect(req: ImageRequest) -> dict[str, Any]:
        """Boxes, labels and scores per image (a detection run); `return_image` adds the drawn boxes as PNG."""
        return await vision_answer(req, "detection")

    @app.post("/v1/segment")
    async def segment(req: ImageRequest) -> dict[str, Any]:
        """Class shares per image (a segmentation run); `return_image` adds the coloured mask as PNG."""
        return await vision_answer(req, "segmentation")

    @app.post("/v1/generate-image")
    async def generate_image(req: ImageRequest) -> dict[str, Any]:
        """One PNG (base64) per prompt and seed (a text-to-image run; adapter null: the base pipeline)."""
        return await vision_answer(req, "text-to-image")

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {
            "adapters": [{"name": n, "path": engine.paths[n]} for n in engine.adapters if n not in draining]
        }

    def require_admin(authorization: str | None) -> None:
        if token is None:
            raise HTTPException(
                403, "Admin endpoints are off; start the server with --admin-token or DELTATUNE_ADMIN_TOKEN."
            )
        if not token_ok(authorization):
            raise HTTPException(401, "Missing or wrong admin token; send 'Authorization: Bearer <token>'.")

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(req: LoadRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Hot-load an adapter folder (under the adapter root) under a new name."""
        require_admin(authorization)
        if not NAME_PATTERN.match(req.name):
            raise HTTPException(
                400, f"Bad adapter name {req.name!r}: use 1-64 letters, digits, '_', '-', '.'."
            )
        if req.name in engine.paths:
            raise HTTPException(409, f"An adapter named {req.name!r} is already loaded; DELETE it first.")
        folder = resolve_under_root(settings.adapter_root, req.path)
        try:
            await asyncio.get_running_loop().run_in_executor(executor, engine.load, req.name, folder)
        except AdapterError as err:
            raise HTTPException(400, str(err)) from err
        return {"name": req.name, "path": folder}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Unload an adapter once the requests already using it have finished."""
        require_admin(authorization)
        if name not in engine.paths or name in draining:
            raise HTTPException(404, f"No adapter named {name!r}.")
        draining.add(name)
        try:
            while inflight[name] > 0:
                await asyncio.sleep(0.005)
            await asyncio.get_running_loop().run_in_executor(executor, engine.unload, name)
        finally:
            draining.discard(name)
        return {"unloaded": name}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": engine.task, "adapters": engine.adapters}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.render(engine.adapters)

    return app


def build_engine(
    model: str | None, adapters: dict[str, str], task: str = "seq-cls"
) -> Engine | RecommendEngine | VisionEngine:
    """Load the base model and the operator's adapters (trusted folders, named at start). Rec and vision runs
    bring their own base model (named in each run's config), so `model` must then be None."""
    from deltatune.models import load_model_and_tokenizer

    if task == "rec":
        if model is not None:
            raise ValueError(
                "task rec serves whole runs, each with the base model it was trained on; drop --model."
            )
        rec = RecommendEngine()
        for name, path in adapters.items():
            rec.load(name, path)
        return rec
    if task in VISION_ENDPOINTS:
        if model is not None:
            raise ValueError(
                f"task {task} serves whole runs, which name the base they share (run_config.yaml); drop --model."
            )
        vision = VisionEngine(task)
        for name, path in adapters.items():
            vision.load(name, path)
        return vision
    if model is None:
        raise ValueError(f"task {task} needs --model: the base model the adapters share.")

    labels = run_labels(list(adapters.values())) if task == "seq-cls" else None
    kwargs = {}
    if labels is not None:  # as `deltatune train` built the head: same size, same label names
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels))}
        kwargs["label2id"] = {n: i for i, n in enumerate(labels)}
    base, tokenizer = load_model_and_tokenizer(model, task=task, **kwargs)
    engine = Engine(base, tokenizer, task)
    for name, path in adapters.items():
        engine.load(name, path)
    return engine


def run_labels(folders: list[str]) -> list[str] | None:
    """The label names recorded by `deltatune train` (run_config.yaml) in these adapter folders, if any; every
    folder that records labels must record the same ones, since the adapters share one base and its label names."""
    import yaml

    from deltatune.train.recipe import RUN_CONFIG

    found: list[str] | None = None
    for folder in folders:
        path = os.path.join(folder, RUN_CONFIG)
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            names = (yaml.safe_load(fh) or {}).get("labels")
        if not names:
            continue
        names = [str(n) for n in names]
        if found is not None and names != found:
            raise ValueError(
                f"Adapters disagree on labels ({found} vs {names} in {folder}); serve them from separate servers."
            )
        found = names
    return found
