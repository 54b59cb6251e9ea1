"""`deltatune studio`: the FastAPI app behind the page (static files in static/, the JSON API under /api).

Safety: the studio binds 127.0.0.1 unless told otherwise, and any other address needs a token (sent as
`Authorization: Bearer <token>` or the cookie the page gets from `/?token=...`). Requests that change anything
must carry the `X-Studio` header a cross-site form cannot send, and on localhost the Host header must name
localhost (no DNS rebinding). Files are read and written only under the workspace; uploads have a size limit; no
endpoint runs a shell (training runs `python -m deltatune train` with an argument list).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from deltatune.apps.studio.forms import FormErrors, check_form, form_from_yaml, preview, recipe_yaml, schema
from deltatune.apps.studio.playground import Playground
from deltatune.apps.studio.runs import Runs, read_json
from deltatune.apps.studio.workspace import OutsideWorkspace, UploadTooLarge, Workspace
from deltatune.errors import AdapterNotFoundError, DeltatuneError, RunError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
COOKIE = "deltatune_studio_token"
CHANGE_HEADER = "x-studio"
TEXT_FILES = (".json", ".jsonl", ".yaml", ".yml", ".log", ".txt", ".md", ".csv", ".tsv")


@dataclass
class StudioSettings:
    workspace: str = "runs"
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    max_upload_bytes: int = 200 * 2**20


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header, without its port ('[::1]:7860' -> '[::1]')."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


# Error class -> HTTP status, first match wins (the CLI maps the same classes to exit codes).
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (OutsideWorkspace, 403),
    (UploadTooLarge, 413),
    (AdapterNotFoundError, 404),
    (FileNotFoundError, 404),
    (RunError, 409),
    (DeltatuneError, 400),
    (ValueError, 400),
)


Form = Annotated[dict[str, Any], Body()]  # the New-run form: recipe keys (see forms.py)


class PlayRequest(BaseModel):
    adapters: list[str] = Field(default_factory=list)
    base: bool = False
    text: str = Field("", max_length=20000)
    text_pair: str | None = Field(None, max_length=20000)
    max_new_tokens: int | None = Field(None, ge=1, le=512)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    seed: int | None = None


def create_app(settings: StudioSettings | None = None) -> FastAPI:
    settings = settings or StudioSettings()
    token = settings.token or os.environ.get("DELTATUNE_STUDIO_TOKEN") or None
    if not is_loopback(settings.host) and not token:
        raise ValueError(
            f"Serving the studio on {settings.host} lets anyone who reaches it train and read the workspace; "
            "pass --token (or set DELTATUNE_STUDIO_TOKEN) to require a token there."
        )
    ws = Workspace(settings.workspace, settings.max_upload_bytes)
    runs = Runs(ws)
    playground = Playground(ws)
    app = FastAPI(title="deltatune studio", version="1", docs_url=None, redoc_url=None)
    app.state.workspace, app.state.runs, app.state.playground = ws, runs, playground
    local_hosts = {"127.0.0.1", "localhost", "[::1]", "::1"}

    def token_ok(request: Request) -> bool:
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        given = given if scheme.lower() == "bearer" else request.cookies.get(COOKIE, "")
        return bool(given) and secrets.compare_digest(given.encode(), token.encode())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = host_name(request.headers.get("host") or "")
        if is_loopback(settings.host) and host not in local_hosts:
            return JSONResponse({"detail": f"Host {host!r} is not this studio's; open it as 127.0.0.1."}, 421)
        path = request.url.path
        if path.startswith("/api/"):
            if token and not token_ok(request):
                return JSONResponse(
                    {"detail": "This studio needs its token: open the address it printed (with ?token=...)."},
                    401,
                )
            if request.method not in ("GET", "HEAD") and request.headers.get(CHANGE_HEADER) != "1":
                return JSONResponse(
                    {"detail": f"Requests that change anything need the {CHANGE_HEADER} header."}, 403
                )
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = (
            "nosniff"  # a run's files are shown as text, never as pages
        )
        return response

    @app.exception_handler(FormErrors)
    async def form_errors(_request: Request, err: FormErrors):
        return JSONResponse({"detail": "The form has mistakes.", "errors": err.errors}, 422)

    for cls, status in STATUS:

        async def handler(_request: Request, err: Exception, status: int = status):
            return JSONResponse({"detail": str(err)}, status)

        app.add_exception_handler(cls, handler)

    # --- the page ---------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        given = request.query_params.get("token")
        if given is not None and token:
            response = RedirectResponse("/", 303)
            if secrets.compare_digest(given.encode(), token.encode()):
                response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
            return response
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- the form ---------------------------------------------------------------------------------------
    @app.get("/api/schema")
    def get_schema() -> dict[str, Any]:
        return schema(ws)

    @app.get("/api/files")
    def files() -> dict[str, Any]:
        return {"data": ws.data_files(), "models": ws.model_paths()}

    @app.post("/api/uploads")
    async def upload(request: Request, name: str) -> dict[str, Any]:
        """The request body is the file (no multipart): streamed to data/<name> up to the size limit."""
        declared = request.headers.get("content-length")
        path = await ws.save_upload(name, request.stream(), int(declared) if declared else None)
        return {"path": path}

    @app.post("/api/preview")
    def post_preview(form: Form) -> dict[str, Any]:
        return preview(ws, form)

    @app.post("/api/check")
    def check(form: Form) -> dict[str, Any]:
        recipe = check_form(ws, form)
        return {"recipe": recipe, "yaml": recipe_yaml(recipe)}

    @app.post("/api/recipe/parse")
    def parse_recipe(text: Annotated[str, Body(embed=True, max_length=1_000_000)]) -> dict[str, Any]:
        return form_from_yaml(ws, text)

    # --- runs ---------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return {"runs": runs.list()}

    @app.post("/api/runs", status_code=201)
    def start_run(form: Form) -> dict[str, Any]:
        name = str(form.get("name") or "")
        ws.run_folder(name, must_exist=False)  # a bad name is refused before the form is checked
        recipe = check_form(ws, form)
        return runs.start(name, recipe)

    @app.get("/api/runs/{name}")
    def get_run(name: str) -> dict[str, Any]:
        return runs.describe(name, with_log=True)

    @app.get("/api/runs/{name}/log")
    def get_log(name: str, since: int = 0) -> dict[str, Any]:
        return runs.log(name, max(0, since))

    @app.post("/api/runs/{name}/stop")
    def stop_run(name: str) -> dict[str, Any]:
        return runs.stop(name)

    @app.post("/api/runs/{name}/resume")
    def resume_run(name: str) -> dict[str, Any]:
        return runs.resume(name)

    @app.get("/api/runs/{name}/files/{filename}")
    def run_file(name: str, filename: str):
        path = runs.file(name, filename)
        text = path.endswith(TEXT_FILES)
        media = "text/plain; charset=utf-8" if text else "image/png" if path.endswith(".png") else None
        return FileResponse(
            path,
            media_type=media or "application/octet-stream",
            filename=None if text or media else os.path.basename(path),
        )

    @app.post("/api/runs/{name}/export")
    def export(name: str) -> dict[str, Any]:
        return playground.export(name)

    # --- compare and playground ------------------------------------------------------------------------
    @app.get("/api/bench")
    def bench_files() -> dict[str, Any]:
        found = [f["path"] for f in ws.data_files() if os.path.basename(f["path"]) == "bench.json"]
        return {"files": found}

    @app.get("/api/bench/table")
    def bench_table(path: str) -> dict[str, Any]:
        """A `deltatune bench` result (bench.json in the workspace) as rows of the compare table."""
        real = ws.resolve(path, what="bench result")
        data = read_json(real)
        if not isinstance(data, dict) or "methods" not in data:
            raise DeltatuneError(f"{path} is not a bench.json written by `deltatune bench`.")
        rows = []
        for r in data["methods"]:
            if r.get("status") != "ok":
                continue
            rows.append(
                {
                    "name": r["method"],
                    "method": r["method"],
                    "state": "bench",
                    "trainable_params": r.get("trainable_params"),
                    "stored_bytes": r.get("adapter_bytes"),
                    "wall_time_s": r.get("wall_s"),
                    "peak_memory_mb": r.get("peak_memory_mb"),
                    "metrics": {k: r[k] for k in ("dev_accuracy", "dev_f1_macro") if r.get(k) is not None},
                }
            )
        return {"runs": rows, "title": f"{data.get('settings', {}).get('model')} ({data.get('date')})"}

    @app.get("/api/playground")
    def play_groups() -> dict[str, Any]:
        return {"groups": playground.groups()}

    @app.post("/api/playground")
    def play(req: PlayRequest) -> dict[str, Any]:
        options = {"do_sample": req.do_sample, "seed": req.seed, "max_new_tokens": req.max_new_tokens}
        if req.do_sample:
            options.update(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
        return playground.compare(req.adapters, req.base, req.text, req.text_pair, options)

    return app


def serve(settings: StudioSettings) -> None:
    import uvicorn

    app = create_app(settings)
    token = settings.token or os.environ.get("DELTATUNE_STUDIO_TOKEN")
    address = f"http://{settings.host}:{settings.port}/" + (f"?token={token}" if token else "")
    print(f"deltatune studio: open {address}  (workspace: {app.state.workspace.root})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
