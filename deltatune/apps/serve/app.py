"""`deltatune serve`: many adapters over one shared base model, as a FastAPI app.

Requests name their adapter (or none: the base). Requests for different adapters share forward passes, and
sequences are written with continuous batching (batching.py); adapters load on first use into an LRU cache
(adapters.py); the OpenAI-compatible routes are in openai_api.py, rec and vision runs (whole runs as adapters) in
recommend.py and vision.py, the shared services in server.py, and the HTTP contract (error shape, statuses by error
class, request ids, connection limits) in http.py and docs/serving.md.
Admin endpoints (load/unload) need a bearer token and are off when no token is configured; adapter folders loaded
through the API must lie under `adapter_root`.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field

from deltatune.apps.serve.adapters import NAME_PATTERN, resolve_under_root
from deltatune.apps.serve.batching import Engine, Timeout
from deltatune.apps.serve.generation import SamplingParams
from deltatune.apps.serve.http import (
    RequestGuard,
    Text,
    guarded_h11,
    install_error_handlers,
    status_of,
    token_matches,
    valid_unicode,
)
from deltatune.apps.serve.openai_api import add_openai_routes
from deltatune.apps.serve.recommend import RecommendEngine, RecommendRequest
from deltatune.apps.serve.runs import RUN_TASKS, RunEngine
from deltatune.apps.serve.server import Server, ServeSettings, Strict, default_max_connections, strings_in
from deltatune.apps.serve.vision import VISION_ENDPOINTS, ImageRequest, VisionEngine, check_rows


class ClassifyRequest(Strict):
    inputs: Text | list[Text] = Field(..., description="One text or a list of texts.")
    adapter: str | None = Field(None, description="Adapter name; null runs the base model.")


class GenerateRequest(Strict):
    prompt: Text
    adapter: str | None = None
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    stop: list[Annotated[Text, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=4
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)


class PredictRequest(Strict):
    adapter: str = Field(..., description="An adapter written by `deltatune train` (its task does the work).")
    rows: list[dict[str, Any]] = Field(..., min_length=1)


class LoadRequest(Strict):
    name: str
    path: str


def create_app(engine: Engine | RunEngine | VisionEngine, settings: ServeSettings | None = None) -> FastAPI:
    """The HTTP app around `engine`; all model work runs on the scheduler's thread."""
    settings = settings or ServeSettings()
    token = settings.admin_token or os.environ.get("DELTATUNE_ADMIN_TOKEN") or None
    if settings.protect_all and token is None:
        raise ValueError("protect_all needs a token: pass --admin-token or set DELTATUNE_ADMIN_TOKEN.")
    server = Server(engine, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="deltatune serve", version="2", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard,
        token=token,
        protect_all=settings.protect_all,
        body_timeout_s=settings.body_timeout_s,
        max_body_bytes=settings.max_body_bytes,
    )

    async def answer(endpoint: str, adapter: str | None, work):
        """Run `work()` with the adapter held in memory, and count the answer in the metrics."""
        start, status = time.perf_counter(), 200

        async def held():
            await server.adapters.acquire(adapter)
            try:
                return await work()
            finally:
                server.adapters.release(adapter)

        try:
            try:
                return await asyncio.wait_for(held(), settings.request_timeout_s)
            except TimeoutError:
                raise Timeout("The request ran past its timeout.") from None
        except HTTPException as err:
            status = err.status_code
            raise
        except Exception as err:
            status = status_of(err)
            raise
        finally:  # unknown names share one label, so requests cannot grow the metric series without bound
            known = adapter is None or adapter in server.adapters.known or adapter in server.adapters.loaded
            server.metrics.request(
                endpoint, adapter if known else "unknown", status, time.perf_counter() - start
            )

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest) -> dict[str, Any]:
        """Labels with scores for one text or a list of texts."""
        texts = [req.inputs] if isinstance(req.inputs, str) else list(req.inputs)
        server.need_task("seq-cls", "/v1/classify")
        if not texts:
            raise HTTPException(400, "inputs is empty; send a text or a non-empty list of texts.")
        if len(texts) > settings.max_batch_size:
            raise HTTPException(
                413, f"{len(texts)} inputs in one request; the limit is {settings.max_batch_size}."
            )

        async def work():
            ids = await server.tokenize(texts)
            return {"adapter": req.adapter, "results": await server.classify(ids, req.adapter)}

        return await answer("classify", req.adapter, work)

    @app.post("/v1/generate")
    async def generate(req: GenerateRequest, request: Request) -> dict[str, Any]:
        """Continue a prompt with the named adapter (greedy unless do_sample)."""
        server.need_task("causal-lm", "/v1/generate")
        if req.max_new_tokens > settings.max_new_tokens:
            raise HTTPException(
                400, f"max_new_tokens={req.max_new_tokens} is over the limit {settings.max_new_tokens}."
            )
        params = SamplingParams(
            max_tokens=req.max_new_tokens,
            temperature=req.temperature if req.do_sample else 0.0,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=tuple(req.stop),
            seed=req.seed,
        )

        async def work():
            (ids,) = await server.tokenize([req.prompt])
            run = server.start_generation([ids], req.adapter, params)
            await server.finish(run, request)
            seq = run.seqs[0]
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(seq.tokens)}
            return {
                "adapter": req.adapter,
                "generation": seq.text,
                "finish_reason": seq.finish_reason,
                "usage": usage,
            }

        return await answer("generate", req.adapter, work)

    def check_strings(rows: list[dict[str, Any]], field: str) -> None:
        """Every string in the rows must be valid Unicode, and texts are held to the input limit (a vision row's
        strings are base64 images and prompts, bounded by --max-body-bytes)."""
        for text in strings_in(rows):
            if not isinstance(engine, VisionEngine):
                server.check_text(text, "A row's text")
            try:
                valid_unicode(text)
            except ValueError as err:
                raise HTTPException(400, f"{field}: {err}") from None

    @app.post("/v1/predict")
    async def predict(req: PredictRequest) -> dict[str, Any]:
        """Any task's predictions: the adapter's own task (from `deltatune train`) runs on the rows."""
        if len(req.rows) > settings.max_batch_size:
            raise HTTPException(
                413, f"{len(req.rows)} rows in one request; the limit is {settings.max_batch_size}."
            )
        check_strings(req.rows, "rows")

        async def work():
            return {"adapter": req.adapter, "results": await server.predict(req.adapter, req.rows)}

        return await answer("predict", req.adapter, work)

    @app.post("/v1/recommend")
    async def recommend(req: RecommendRequest) -> dict[str, Any]:
        """Top-k items for a user or a typed history (rec ranking runs), or P(Yes) for an item (preference runs);
        the same answer as `deltatune predict` on that run. An unknown user or item is the request's fault (400)."""
        server.need_task("rec", "/v1/recommend")
        for text in strings_in(req.row()):
            server.check_text(text, "A field's text")

        async def work():
            server.check_room(1)
            future = server.scheduler.call(engine.recommend, req.adapter, req.row())
            return {"adapter": req.adapter, **await asyncio.wrap_future(future)}

        return await answer("recommend", req.adapter, work)

    async def vision_answer(req: ImageRequest, task: str) -> dict[str, Any]:
        """One vision endpoint: the rows of `deltatune predict` on the named run (model thread)."""
        endpoint = VISION_ENDPOINTS[task]
        server.need_task(task, f"/v1/{endpoint}")
        if len(req.inputs) > settings.max_batch_size:
            raise HTTPException(
                413, f"{len(req.inputs)} rows in one request; the limit is {settings.max_batch_size}."
            )
        check_strings(req.inputs, "inputs")
        check_rows(req.inputs)  # refused before any adapter loads (the engine checks again, for /v1/predict)

        async def work():
            server.check_room(len(req.inputs))
            future = server.scheduler.call(engine.predict, req.adapter, req.inputs)
            return {"adapter": req.adapter, "results": await asyncio.wrap_future(future)}

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

    def describe(name: str) -> dict[str, Any]:
        entry = {"name": name, "loaded": name in server.adapters.loaded}
        if settings.protect_all and name in server.adapters.known:  # paths only to callers holding the token
            entry["path"] = server.adapters.known[name]
        return entry

    @app.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        names = sorted({*server.adapters.names(), *server.adapters.known})
        return {"adapters": [describe(n) for n in names if n not in server.adapters.draining]}

    def require_admin(authorization: str | None) -> None:
        if token is None:
            raise HTTPException(
                403, "Admin endpoints are off; start the server with --admin-token or DELTATUNE_ADMIN_TOKEN."
            )
        if not token_matches(token, authorization):
            raise HTTPException(401, "Missing or wrong admin token; send 'Authorization: Bearer <token>'.")

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(req: LoadRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Load an adapter folder (under the adapter root) under a new name."""
        require_admin(authorization)
        if not NAME_PATTERN.match(req.name) or req.name == settings.base_name:
            raise HTTPException(
                400,
                f"Bad adapter name {req.name!r}: use 1-64 letters, digits, '_', '-', '.' ({settings.base_name!r} "
                "names the base model).",
            )
        if req.name in server.adapters.loaded or req.name in server.adapters.loading:
            raise HTTPException(
                409, f"An adapter named {req.name!r} is already loaded or loading; DELETE it first."
            )
        folder = resolve_under_root(settings.adapter_root, req.path)
        await server.adapters.load(req.name, folder)
        return describe(req.name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Unload an adapter once the requests already using it have finished."""
        require_admin(authorization)
        await server.adapters.unload(name)
        server.tasks.pop(name, None)
        return {"unloaded": name}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": engine.task, "adapters": server.adapters.names()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return server.metrics.render(
            len(server.adapters.loaded), server.scheduler.queued(), server.scheduler.running()
        )

    add_openai_routes(app, server, answer)
    return app


def build_engine(
    model: str | None, adapters: dict[str, str], task: str = "seq-cls"
) -> Engine | RunEngine | VisionEngine:
    """Load the base model and the operator's adapters (trusted folders, named at start). Rec runs, the runs of
    RUN_TASKS (qa, summarization, ...) and vision runs bring their own base model (named in each run's config), so
    `model` must then be None."""
    from deltatune.models import load_model_and_tokenizer

    if task == "rec" or task in RUN_TASKS:
        if model is not None:
            raise ValueError(
                f"task {task} serves whole runs, each with the base model it was trained on; drop --model."
            )
        runs = RecommendEngine() if task == "rec" else RunEngine(task)
        for name, path in adapters.items():
            runs.load(name, path)
        return runs
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
        engine.load(name, os.path.abspath(path))
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


def server_options(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """uvicorn's options (for `uvicorn.run` or `uvicorn.Config`) with the connection limits of `settings`: idle,
    half-sent and too many connections."""
    return {
        "host": host,
        "port": port,
        "http": guarded_h11(settings.header_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections or default_max_connections(),
    }


def server_config(app: FastAPI, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, **kwargs):
    """uvicorn's config for `app` with the connection limits of `settings` (for a server run in a thread)."""
    import uvicorn

    return uvicorn.Config(app, **server_options(settings, host, port), **kwargs)
