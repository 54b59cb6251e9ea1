"""The `deltatune` command: a thin layer that parses arguments and calls the library.

    deltatune train recipes/sst2-minilm-lora.yaml --lora.r 16 --epochs 2
    deltatune train --model DIR --task seq-cls --method lora --train_file train.csv --output_dir runs/x
    deltatune eval runs/sst2 [--file dev.tsv] [--json]
    deltatune predict runs/sst2 [--file rows.jsonl]     (or lines on stdin)
    deltatune merge runs/sst2 merged/
    deltatune merge-adapters a/ b/ --weights 0.7,0.3 --combination svd --rank 8 -o combined/
    deltatune inspect runs/sst2 | MODEL
    deltatune bench [--quick] [--models M1,M2] [--methods lora,ia3] [--seeds 0,1,2]
    deltatune studio [--workspace runs] [--host 127.0.0.1 --port 7860] [--token T]

Mistakes in the input (a missing file or column, an unknown key or method, a bad value) print one line that says
what is wrong and how to fix it, and exit with status 2. Set DELTATUNE_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Annotated, Any

import typer
import typer.core

from deltatune.errors import DeltatuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning.")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# Error class -> exit status, first match wins: the library's own errors (and a missing file) are the user's input
# to fix (2); anything else is unexpected and keeps its type in the message (1).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DeltatuneError, 2),
    (FileNotFoundError, 2),
    (typer.BadParameter, 2),
    (ValueError, 2),  # third-party checks of the user's input (transformers refusing a model folder, ...)
)


def exit_code_for(err: BaseException) -> int:
    return next((code for cls, code in EXIT_CODES if isinstance(err, cls)), 1)


def guarded(fn):
    """Turn any exception into a one-line error (the traceback stays available with DELTATUNE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as err:  # noqa: BLE001 - the point is to never show a bare traceback
            if os.environ.get("DELTATUNE_DEBUG"):
                raise
            code = exit_code_for(err)
            fail(str(err) if code == 2 else f"{type(err).__name__}: {err}", code)

    return wrapper


def _print_metrics(metrics: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    for key, value in metrics.items():
        if isinstance(value, dict) and all(isinstance(v, float) for v in value.values()):
            value = ", ".join(f"{k}={v:.4f}" for k, v in value.items())
        elif isinstance(value, (dict, list)):  # per-class reports, confusion matrices
            value = json.dumps(value)
        elif isinstance(value, float):
            value = f"{value:.4f}"
        typer.echo(f"{key}: {value}")


class TrainCommand(typer.core.TyperCommand):
    """`deltatune train --help` ends with the method and task names, read from the library when help is shown
    (so `deltatune --help` does not pay for importing torch)."""

    def format_help(self, ctx, formatter):
        from deltatune.train.recipe import train_help

        self.epilog = train_help()
        return super().format_help(ctx, formatter)


@app.command(
    cls=TrainCommand,
    no_args_is_help=True,
    options_metavar="[RECIPE.yaml] [--KEY VALUE ...]",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@guarded
def train(ctx: typer.Context):
    """Train an adapter from a recipe file, from flags alone, or both (flags override the recipe's keys).

    deltatune train recipes/sst2-minilm-lora.yaml --lr 5e-4 --lora.r 16

    deltatune train --model DIR --task seq-cls --method lora --train_file train.csv --test_file test.csv --output_dir runs/x

    Writes the adapter, run_config.yaml and metrics.json to output_dir."""
    from deltatune.train.recipe import load_train_args, train_from_recipe

    raw = load_train_args(list(ctx.args))
    result = train_from_recipe(raw)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_metrics(result["metrics"], as_json=False)
        typer.echo(f"adapter saved to {os.path.abspath(raw.get('output_dir', 'runs/deltatune'))}")
    _leave_process_group()


def _leave_process_group() -> None:
    """The processes of a torchrun job meet once more and close their process group before exiting: a rank that
    exits while another still tears down takes the job's store with it (seen as an abort in a two-node run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _rows_from_file(path: str, run) -> list[dict[str, Any]]:
    from deltatune.train.data import load_table

    return [dict(r) for r in load_table(path)]


@app.command("eval")
@guarded
def evaluate(
    adapter: str = typer.Argument(..., help="An output_dir written by `deltatune train`."),
    file: str = typer.Option(None, help="Data to score (default: the run's eval_file)."),
    batch_size: int = typer.Option(16),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
):
    """Score a trained adapter on labelled data."""
    import yaml

    from deltatune.train.data import load_table
    from deltatune.train.recipe import RUN_CONFIG, load_run, prepare_tables
    from deltatune.train.tasks import TASKS

    model, task, run = load_run(adapter)
    with open(os.path.join(adapter, RUN_CONFIG)) as fh:
        seed = int((yaml.safe_load(fh) or {}).get("seed", 0))  # the run's split subsets are seeded
    # a task that splits its own data (rec) scores its test split
    own = TASKS[run.task].load_splits(run, seed)
    if own is not None:
        if file:
            fail(f"task {run.task} scores the test split of its own data ({run.train_file}); drop --file.")
        tables, _, sources = own
        features = task.prepare(tables["test"], sources["test"])
        _print_metrics(task.evaluate(model, features, batch_size), as_json)
        return
    path = file or run.eval_file or run.test_file
    if not path:
        fail("No data to evaluate: pass --file, or train with an eval_file.")
    tables = prepare_tables(run, {"validation": load_table(path)}, {"validation": path})
    features = task.prepare(tables["validation"], path)
    _print_metrics(task.evaluate(model, features, batch_size), as_json)


@app.command()
@guarded
def predict(
    adapter: str = typer.Argument(..., help="An output_dir written by `deltatune train`."),
    file: str = typer.Option(
        None, help="CSV/TSV/JSON/JSONL/Parquet rows; default: one text per line on stdin."
    ),
    batch_size: int = typer.Option(16),
):
    """Predict labels (with scores) or generate text; one JSON object per input row on stdout."""
    from deltatune.train.recipe import load_run

    model, task, run = load_run(adapter)
    if file:
        rows = _rows_from_file(file, run)
    else:
        column = run.text_column or "text"
        rows = []
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line.strip():
                rows.append(json.loads(line) if line.lstrip().startswith("{") else {column: line})
    if not rows:
        fail("No input rows: pass --file or write lines to stdin.")
    for out in task.predict(model, rows, batch_size):
        typer.echo(json.dumps(out))


@app.command()
@guarded
def merge(
    adapter: str = typer.Argument(..., help="An output_dir written by `deltatune train`."),
    output: str = typer.Argument(..., help="Folder for the merged model (loads with transformers)."),
):
    """Fold the adapter into the base weights and save a plain transformers model with its tokenizer (a
    torchvision/timm model: model.safetensors, its state dict); what was written is reloaded and checked."""
    from deltatune.train.recipe import merge_run

    result = merge_run(adapter, output)
    typer.echo(
        f"merged model saved to {result['output']} (reloaded: {result['tensors_checked']} tensors equal)"
    )


@app.command("merge-adapters")
@guarded
def merge_adapters(
    adapters: Annotated[
        list[str], typer.Argument(help="LoRA adapter folders (peft format) on one base model.")
    ],
    weights: str = typer.Option(..., help="One weight per adapter, comma-separated (e.g. 0.7,0.3)."),
    output: str = typer.Option(..., "--output", "-o", help="Folder for the combined adapter."),
    combination: str = typer.Option(
        "svd", help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, or <kind>_svd."
    ),
    rank: int = typer.Option(None, help="svd kinds: the combined adapter's rank (default: the largest)."),
    density: float = typer.Option(None, help="Pruning kinds: the fraction of entries kept."),
    majority_sign: str = typer.Option("total", help="ties kinds: elect signs by 'total' or 'frequency'."),
    clamp: float = typer.Option(None, help="svd kinds: clamp the factors at this quantile."),
    model: str = typer.Option(None, help="Base model (default: the adapters' base_model_name_or_path)."),
    task: str = typer.Option(None, help="Model head to load (default: from the adapters' task_type)."),
    seed: int = typer.Option(0, help="Random seed (the DARE kinds drop entries at random)."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-layer report as JSON."),
):
    """Combine adapters into one (peft's add_weighted_adapter) and report its rank and relative error."""
    import torch

    from deltatune import PeftConfig, PeftModel
    from deltatune.models import load_model_and_tokenizer
    from deltatune.train.tasks import TASKS

    try:
        numbers = [float(w) for w in weights.split(",")]
    except ValueError:
        fail(f"--weights takes numbers separated by commas (e.g. 0.7,0.3), got {weights!r}.")
    first = PeftConfig.from_pretrained(adapters[0])
    base_name = model or first.base_model_name_or_path
    if not base_name:
        fail("The adapter does not name its base model; pass --model.")
    task = task or next(
        (t.name for t in TASKS.values() if t.task_type == first.task_type), "feature-extraction"
    )
    base, _ = load_model_and_tokenizer(base_name, task=task)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    torch.manual_seed(seed)
    report = peft_model.add_weighted_adapter(
        names,
        numbers,
        "default",
        combination,
        svd_rank=rank,
        svd_clamp=clamp,
        density=density,
        majority_sign_method=majority_sign,
    )
    peft_model.save_pretrained(output, selected_adapters=["default"])
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(str(report))
    typer.echo(f"combined adapter saved to {os.path.abspath(output)}", err=as_json)


@app.command()
@guarded
def inspect(
    path: str = typer.Argument(..., help="An adapter folder, or a model (folder, hub name, .gguf, alias)."),
    task: str = typer.Option("feature-extraction", help="Model head to load when PATH is a model."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Show an adapter's config, targets and size, or a model's parameters and the layers an adapter can target."""
    from deltatune.apps.report import inspect_adapter, inspect_model

    info = (
        inspect_adapter(path)
        if os.path.isfile(os.path.join(path, "adapter_config.json"))
        else inspect_model(path, task)
    )
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if isinstance(value, list):
            value = (
                ", ".join(map(str, value))
                if len(value) <= 12
                else ", ".join(map(str, value[:12])) + f", ... ({len(value)})"
            )
        typer.echo(f"{key}: {value}")


def _csv(option: str, text: str | None, kind: type = str) -> list | None:
    """A comma-separated option as a list (None when not given)."""
    if text is None:
        return None
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{option} takes comma-separated {kind.__name__} values, got {text!r}."
        ) from None
    if not items:
        raise typer.BadParameter(f"{option} needs at least one value.")
    return items


@app.command()
@guarded
def bench(
    quick: bool = typer.Option(
        False, "--quick", help="One seed, no sweep, a few steps on 128 rows: minutes."
    ),
    models: str = typer.Option(
        None, help="Comma-separated models (default: all-minilm-l6-v2; `deltatune fetch` gets the ladder)."
    ),
    tasks: str = typer.Option(
        None, help="Comma-separated tasks: sst2 (encoders), sst2-text, dates (decoders)."
    ),
    methods: str = typer.Option(
        None, help="Comma-separated subset of methods (default: every registry variant)."
    ),
    seeds: str = typer.Option(None, help="Comma-separated seeds (default: 0,1,2; 0 with --quick)."),
    lr_factors: str = typer.Option(
        None, help="The sweep: multiples of each method's typical_lr (default: 0.333,1,3; 1 with --quick)."
    ),
    extend_sweep: int = typer.Option(
        None,
        help="Rates added past an edge of the sweep while validation still rises there (default: 1; 0: none).",
    ),
    budget_scale: float = typer.Option(None, help="Times each task's training-token budget."),
    max_steps: int = typer.Option(None, help="A cap on the steps of every run (tests)."),
    data_dir: str = typer.Option(
        None, help="Folder with SST-2's train.tsv and dev.tsv (default: ../shared/data/sst2)."
    ),
    out: str = typer.Option(
        "bench/results", help="Folder for bench.json, bench.md, the plots and the run cache."
    ),
    isolate: bool = typer.Option(True, help="Run each run in its own process (its own peak memory)."),
    jobs: int = typer.Option(1, help="Runs at a time (isolated runs only)."),
    report_only: bool = typer.Option(False, help="Write the tables from the cached runs only; run nothing."),
):
    """Every method x models x seeds on the same data and token budget, each method's learning rate chosen on a
    validation split; finished runs are cached, so the benchmark resumes where it stopped."""
    from deltatune.apps.bench import BenchSettings, run_bench

    given = {
        "models": _csv("--models", models),
        "tasks": _csv("--tasks", tasks),
        "methods": _csv("--methods", methods),
        "seeds": _csv("--seeds", seeds, int),
        "lr_factors": _csv("--lr-factors", lr_factors, float),
        "extend_sweep": extend_sweep,
        "budget_scale": budget_scale,
        "max_steps": max_steps,
        "data_dir": data_dir,
        "isolate": isolate,
        "jobs": jobs,
    }
    if extend_sweep is not None and extend_sweep < 0:
        raise typer.BadParameter(f"--extend-sweep takes 0 (no extension) or more steps, got {extend_sweep}.")
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = BenchSettings.quick(**overrides) if quick else BenchSettings(**overrides)
    run_bench(settings, out, log=typer.echo, report_only=report_only)
    typer.echo(f"results written to {os.path.abspath(out)}")


@app.command()
@guarded
def fetch(
    models: list[str] = typer.Argument(None, help="Ladder aliases (default: all of them)."),  # noqa: B008
):
    """Download and convert the scale study's models (PyPI packages -> transformers folders in the model cache)."""
    from deltatune.apps.assets import LADDER
    from deltatune.apps.assets import fetch as fetch_model

    for alias in models or LADDER:
        typer.echo(f"{alias}: {fetch_model(alias)}")


@app.command()
@guarded
def estimate(
    model: str = typer.Option(
        ..., help="A config.json, a model folder or alias, or a Llama shape: llama-1b, llama-8b, llama-70b."
    ),
    method: str = typer.Option(
        "lora", help="Any method name a recipe takes: lora, qlora, full, prompt_tuning ..."
    ),
    batch_size: int = typer.Option(1, help="Sequences per step."),
    seq_len: int = typer.Option(512, help="Tokens per sequence."),
    dtype: str = typer.Option(
        "bfloat16", help="The base weights' and activations' dtype: float32 or bfloat16."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Peak training memory (weights, gradients, optimizer states, activations) from the model's config alone."""
    from deltatune.train.memory import estimate_training_memory, load_config

    if batch_size < 1 or seq_len < 1:
        raise typer.BadParameter("--batch-size and --seq-len must be at least 1.")
    estimate_ = estimate_training_memory(load_config(model), method, batch_size, seq_len, dtype)
    if as_json:
        typer.echo(json.dumps(estimate_.as_dict(), indent=2))
        return
    gib = 2**30
    typer.echo(f"{model}, {method}, batch {batch_size} x {seq_len} tokens, {dtype}:")
    for part in ("weights", "gradients", "optimizer", "activations", "total"):
        typer.echo(f"  {part:<12} {getattr(estimate_, part) / gib:9.2f} GiB")
    typer.echo(f"  trainable    {estimate_.trainable_params:,} of {estimate_.total_params:,} parameters")


@app.command()
@guarded
def serve(
    model: str = typer.Option(
        None,
        "--model",
        help="Base model: folder, hub name, .gguf or packaged alias (not for runs served whole).",
    ),
    adapter: list[str] | None = typer.Option(  # noqa: B008 - a list option (typer reads its default here)
        None, "--adapter", help="NAME=DIR, repeatable (trusted: any folder)."
    ),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    task: str = typer.Option(
        None,
        help="seq-cls (/v1/classify), causal-lm (/v1/completions, /v1/chat/completions), rec (/v1/recommend), "
        "image-cls, detection, segmentation, text-to-image (/v1/classify-image, /v1/detect, /v1/segment, "
        "/v1/generate-image), or any task for /v1/predict; for rec, qa, summarization, translation, regression, "
        "multi-label and the vision tasks each --adapter is an "
        "output_dir of `deltatune train` and --model is left out. Default: from the adapters' runs or task_type, "
        "else the model's architecture.",
    ),
    admin_token: str = typer.Option(
        None, envvar="DELTATUNE_ADMIN_TOKEN", help="Bearer token for load/unload (unset: admin off)."
    ),
    protect_all: bool = typer.Option(False, help="Require the token on every endpoint but /health."),
    adapter_root: str = typer.Option(
        ".", help="Adapters loaded by name or through the API lie under this folder."
    ),
    max_adapters: int = typer.Option(
        128, help="Adapters in memory; the least recently used idle one is evicted."
    ),
    max_batch_size: int = typer.Option(32, help="Rows per forward pass, and texts per request."),
    batching: str = typer.Option("continuous", help="continuous (join/leave per token) or static."),
    batch_window_ms: float = typer.Option(
        5.0, help="How long an idle server gathers requests into one batch."
    ),
    max_input_tokens: int = typer.Option(512),
    max_new_tokens: int = typer.Option(256),
    max_choices: int = typer.Option(8, help="OpenAI's n: choices per request."),
    max_queue: int = typer.Option(256, help="Rows waiting for the model; more get 429 with Retry-After."),
    request_timeout: float = typer.Option(120.0, help="Seconds before a request is dropped (504)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Larger request bodies are refused (413) unread."),
    threads: int = typer.Option(None, help="Torch threads for the model (default: half the CPUs)."),
    max_connections: int = typer.Option(None, help="Open connections (default: under the descriptor limit)."),
):
    """Serve many adapters over one shared base model over HTTP (OpenAI-compatible; docs at /docs)."""
    import uvicorn

    from deltatune.apps.serve.app import ServeSettings, build_engine, create_app, server_options
    from deltatune.train.task_inference import infer_task

    adapters = {}
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            fail(f"--adapter {spec!r} must look like NAME=DIR.")
        adapters[name] = path
    task, why = infer_task(model, adapters, task)
    typer.echo(f"serving task {task} ({why})", err=True)
    settings = ServeSettings(
        admin_token=admin_token,
        protect_all=protect_all,
        adapter_root=adapter_root,
        max_adapters=max_adapters,
        max_batch_size=max_batch_size,
        batching=batching,
        batch_window_ms=batch_window_ms,
        max_input_tokens=max_input_tokens,
        max_new_tokens=max_new_tokens,
        max_choices=max_choices,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_body_bytes=max_body_bytes,
        threads=threads,
        max_connections=max_connections,
    )
    uvicorn.run(
        create_app(build_engine(model, adapters, task), settings), **server_options(settings, host, port)
    )


@app.command()
@guarded
def studio(
    workspace: str = typer.Option(
        "runs", help="The only folder the studio reads and writes (runs, uploads)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind; any but localhost needs --token."),
    port: int = typer.Option(7860),
    token: str = typer.Option(
        None, envvar="DELTATUNE_STUDIO_TOKEN", help="Required on every API request (and off localhost)."
    ),
    max_upload_mb: float = typer.Option(200, help="Largest data file the page may upload, in MiB."),
):
    """Fine-tune, watch, compare and try adapters in the browser (prints the address to open)."""
    from deltatune.apps.studio import StudioSettings, serve

    serve(StudioSettings(workspace, host, port, token, int(max_upload_mb * 2**20)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
