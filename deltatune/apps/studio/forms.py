"""The New-run form, derived from the library rather than written out: tasks from `recipe_tasks()`, methods and
their options from `deltatune.registry` (each config dataclass's fields, defaults and comments), the run and trainer
settings from `RunConfig` and `TrainConfig`.

The form *is* a recipe: a dict of recipe keys (the method's options under its name, e.g. `lora: {r: 8}`), checked
field by field so each error is keyed by the recipe key it belongs to (`lr`, `lora.r`, `train_file`), written as the
YAML `deltatune train` reads, and read back from one.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
import re
import typing
from typing import Any

import yaml

from deltatune import registry
from deltatune.apps.studio.workspace import Workspace
from deltatune.config import PeftConfig, describe_type, type_problem
from deltatune.errors import DeltatuneError
from deltatune.models import PACKAGED
from deltatune.quant import QUANT_TYPES
from deltatune.train.data import Cleaning, load_table, require_columns
from deltatune.train.recipe import (
    RunConfig,
    coerce_numbers,
    format_data_report,
    load_data,
    make_peft_config,
    method_info,
    parse_value,
    recipe_tasks,
    validate,
)
from deltatune.train.schedules import OPTIMIZERS, SCHEDULES
from deltatune.train.tasks import TASKS
from deltatune.train.trainer import TrainConfig

# Keys the studio sets itself: the run folder, and the flags its Start / Resume buttons stand for.
STUDIO_KEYS = ("output_dir", "resume", "resume_with_changes", "overwrite", "progress", "labels")
FILE_KEYS = ("train_file", "eval_file", "test_file")
COLUMN_KEYS = ("text_column", "text_pair_column", "label_column")
MODEL_KEYS = ("model", "teacher")
# Keys with a widget of their own at the top of the form; every other RunConfig/TrainConfig field is a setting.
OWN_WIDGETS = ("model", "task", "method", *FILE_KEYS, *COLUMN_KEYS, "clean")
# The settings shown first; the rest sit under "More settings".
MAIN_SETTINGS = (
    "epochs",
    "max_steps",
    "batch_size",
    "lr",
    "scheduler",
    "warmup_ratio",
    "max_length",
    "eval_every",
    "save_every",
    "seed",
    "num_threads",
)
CHOICES = {"scheduler": SCHEDULES, "optimizer": OPTIMIZERS, "quantize": QUANT_TYPES}
# The studio's defaults where the trainer's would make its buttons less useful: a checkpoint every 50 steps, so
# Stop then Resume continues the run instead of starting it over.
STUDIO_DEFAULTS = {"save_every": 50}
# PeftConfig's own fields: bookkeeping the run fills in (task_type from the task), not method options.
PEFT_BOOKKEEPING = {f.name for f in dataclasses.fields(PeftConfig)}


class FormErrors(DeltatuneError):
    """The form's mistakes, keyed by the recipe key each belongs to ('_form' for the form as a whole)."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


# --- the schema the page builds its form from ------------------------------------------------------
def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field in a dataclass's source (and its bases'): the form's hint for the field."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M):
            out[match[1]] = match[2].strip()
    return out


def annotation(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def as_text(value: Any) -> str:
    """A value as the form's text input shows it (and YAML reads it back): None is empty."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict, set)):
        value = sorted(value) if isinstance(value, set) else value
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def field_spec(f: dataclasses.Field, default: Any, help_text: dict[str, str]) -> dict[str, Any]:
    kind = annotation(f)
    spec = {
        "key": f.name,
        "type": kind,
        "default": as_text(default),
        "help": help_text.get(f.name, ""),
        "widget": "bool" if kind == "bool" else "choice" if f.name in CHOICES else "text",
    }
    if f.name in CHOICES:
        spec["choices"] = list(CHOICES[f.name])
    return spec


def method_config_class(name: str) -> type:
    method, variant = registry.resolve_variant(name)
    return variant.config_class or method.config_class


def method_options(name: str) -> list[dict[str, Any]]:
    """The options of a recipe method name: its config's fields, with the defaults a recipe gets (the method's
    `recipe_defaults`), and the options the name itself implies (`dora` -> use_dora: true) marked as fixed."""
    method, variant = registry.resolve_variant(name)
    cls = method_config_class(name)
    comments = field_comments(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in PEFT_BOOKKEEPING:
            continue
        default = default_of(f)
        if method.recipe_defaults.get(f.name) is not None and default is None:
            default = method.recipe_defaults[f.name]
        spec = field_spec(f, variant.options.get(f.name, default), comments)
        spec["fixed"] = f.name in variant.options
        specs.append(spec)
    return specs


def setting_fields() -> list[dataclasses.Field]:
    """RunConfig and TrainConfig fields the form shows as settings (not studio-controlled, no own widget)."""
    out = []
    for cls in (RunConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if f.name not in STUDIO_KEYS and f.name not in OWN_WIDGETS and f.init:
                out.append(f)
    return out


def schema(ws: Workspace) -> dict[str, Any]:
    """Everything the New-run page offers, from the registry, the task table and the config dataclasses."""
    tasks = [
        {
            "name": name,
            "title": (inspect.getdoc(task) or name).splitlines()[0],
            "text_column": task.default_columns[0],
            "label_column": task.default_columns[1],
        }
        for name, task in recipe_tasks().items()
    ]
    methods = []
    for name, (method, variant) in registry.variants().items():
        methods.append(
            {
                "name": name,
                "method": method.name,
                "title": method.title,
                "peft_type": method.peft_type,
                "section": method.name,
                "typical_lr": method.typical_lr,
                "mergeable": method.mergeable,
                "mixed_batches": method.mixed_batches,
                "quantize": variant.quantize,
                "options": method_options(name),
            }
        )
    help_text = {**field_comments(RunConfig), **field_comments(TrainConfig)}
    settings = []
    for f in setting_fields():
        spec = field_spec(f, STUDIO_DEFAULTS.get(f.name, default_of(f)), help_text)
        spec["group"] = "main" if f.name in MAIN_SETTINGS else "more"
        spec["always"] = f.name in STUDIO_DEFAULTS  # differs from the trainer's default: always written
        settings.append(spec)
    settings.sort(key=lambda s: MAIN_SETTINGS.index(s["key"]) if s["key"] in MAIN_SETTINGS else 99)
    cleaning = [
        {"key": f.name, "default": as_text(default_of(f))} for f in dataclasses.fields(Cleaning) if f.init
    ]
    return {
        "tasks": tasks,
        "methods": methods,
        "settings": settings,
        "cleaning": cleaning,
        "packaged_models": sorted(PACKAGED),
        "workspace": ws.root,
        "max_upload_bytes": ws.max_upload_bytes,
    }


# --- checking a form --------------------------------------------------------------------------------
def type_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (what the configs' own check, `config.check_fields`, holds them to)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def field_problem(key: str, value: Any, hint: Any) -> str | None:
    """'lr must be a finite number, got 'abc'.' when `value` does not fit the annotation `hint`."""
    if hint is None:
        return None
    problem = type_problem(value, hint)
    if problem is None:
        return None
    return f"{key} must be {describe_type(hint)}, got {value!r}{'; ' + problem if problem else ''}."


def parse_field(raw: Any, kind: str) -> Any:
    """A form value as the recipe holds it: text fields stay text, others are typed as YAML types them."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if text == "":
        return None
    if {p.strip() for p in kind.split("|")} <= {"str", "None"}:
        return text
    return parse_value(text)


def _first_key_named(message: str, keys: list[str]) -> str | None:
    hits = [(m.start(), key) for key in keys if (m := re.search(rf"\b{re.escape(key)}\b", message))]
    return min(hits)[1] if hits else None


def check_form(ws: Workspace, form: dict[str, Any]) -> dict[str, Any]:
    """The recipe a form describes, with paths made absolute; raises FormErrors naming each field that is wrong.

    Checked here, before anything runs: the model reference, task, method, each method option's type and the
    config it builds, each setting's type and the trainer's own checks, every data file (inside the workspace,
    readable, with the mapped columns), then the whole recipe as `deltatune train` validates it."""
    errors: dict[str, str] = {}
    recipe: dict[str, Any] = {}
    sections = {m["section"] for m in schema_methods()}
    method = str(form.get("method") or "lora")
    try:
        method_info(method)  # the recipe's own error, naming the closest method
        chosen, _ = registry.resolve_variant(method)
        recipe["method"] = method
    except DeltatuneError as err:
        errors["method"] = str(err)
        chosen = None
    task = str(form.get("task") or "seq-cls")
    if task not in recipe_tasks():
        errors["task"] = f"Unknown task {task!r}; choose one of: {', '.join(recipe_tasks())}."
    recipe["task"] = task
    for key in MODEL_KEYS:
        if form.get(key) not in (None, "") or key == "model":
            try:
                recipe[key] = ws.model_ref(str(form.get(key) or ""))
            except DeltatuneError as err:
                errors[key] = str(err)

    # settings: typed by their dataclass annotation, then each checked by the trainer's own rules
    kinds = {f.name: annotation(f) for f in setting_fields()}
    hints = {**type_hints(RunConfig), **type_hints(TrainConfig)}
    for key, raw in form.items():
        if key in kinds:
            value = parse_field(raw, kinds[key])
            problem = field_problem(key, value, hints.get(key)) if value is not None else None
            if problem:
                errors[key] = problem
            elif value is not None:
                recipe[key] = value
        elif key in STUDIO_KEYS:
            errors[key] = f"{key} is set by the studio (its Start and Resume buttons), not in the form."
        elif key not in OWN_WIDGETS and key not in MODEL_KEYS and key not in sections and key != "name":
            errors[key] = f"Unknown setting {key!r}."
    train_settings = {
        k: v for k, v in recipe.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}
    }
    for key, value in train_settings.items():
        if key not in errors:
            try:
                TrainConfig(**{**({"max_steps": 1} if key == "epochs" else {}), key: value})
            except (ValueError, TypeError, DeltatuneError) as err:
                errors[key] = str(err)
    if not errors:
        try:
            TrainConfig(**train_settings)
        except (ValueError, TypeError, DeltatuneError) as err:
            errors[_first_key_named(str(err), list(train_settings)) or "_form"] = str(err)

    # method options: typed by the config's annotations, then the config built as the run will build it
    if chosen is not None:
        option_kinds = {s["key"]: s["type"] for s in method_options(method)}
        option_hints = type_hints(method_config_class(method))
        options = {}
        for key, raw in (form.get(chosen.name) or {}).items():
            field_key = f"{chosen.name}.{key}"
            if key not in option_kinds:
                errors[field_key] = f"{method} has no option {key!r}."
                continue
            value = parse_field(raw, option_kinds[key])
            problem = field_problem(key, value, option_hints.get(key)) if value is not None else None
            if problem:
                errors[field_key] = problem
            elif value is not None:
                options[key] = value
        if options:
            recipe[chosen.name] = options
        if not any(k.startswith(chosen.name + ".") for k in errors):
            try:
                run = RunConfig(model=recipe.get("model", ""), task=task, method=method)
                steps = recipe.get("max_steps") or 10**6
                make_peft_config(run, options, steps, tokenizer="(the model's tokenizer)")
            except (DeltatuneError, ValueError, TypeError) as err:
                key = _first_key_named(str(err), list(options))
                errors[f"{chosen.name}.{key}" if key else "method"] = str(err)

    # data: files inside the workspace, readable, with the mapped columns; cleaning switches
    for key in FILE_KEYS:
        if form.get(key):
            try:
                recipe[key] = ws.resolve(str(form[key]), what="data file")
            except DeltatuneError as err:
                errors[key] = str(err)
    if not recipe.get("train_file") and not recipe.get("dataset") and "train_file" not in errors:
        errors["train_file"] = "Choose a training file (upload one or pick one from the workspace)."
    for key in COLUMN_KEYS:
        if form.get(key):
            recipe[key] = str(form[key]).strip()
    clean = form.get("clean") or {}
    known = {f.name for f in dataclasses.fields(Cleaning)}
    for key, value in clean.items():
        if key not in known:
            errors[f"clean.{key}"] = f"Unknown cleaning step {key!r}."
        elif not isinstance(value, bool):
            errors[f"clean.{key}"] = f"clean.{key} must be true or false."
    if clean:
        recipe["clean"] = {k: v for k, v in clean.items() if k in known}
    if task in recipe_tasks():
        errors.update(task_paths(ws, recipe))
        errors.update(check_columns(recipe, errors))
    if not errors:
        try:
            validate(dict(recipe))
        except DeltatuneError as err:
            errors["_form"] = str(err)
    if not errors:  # a task that reads and splits its data itself (rec) checks its options and files there
        try:
            TASKS[task].load_splits(data_run(recipe), int(recipe.get("seed", TrainConfig.seed)))
        except (DeltatuneError, TypeError, ValueError) as err:
            errors[_first_key_named(str(err), [task, *FILE_KEYS]) or "_form"] = str(err)
    if errors:
        raise FormErrors(errors)
    return recipe


def schema_methods() -> list[dict[str, Any]]:
    return [{"name": n, "section": m.name} for n, (m, _) in registry.variants().items()]


def task_paths(ws: Workspace, recipe: dict[str, Any]) -> dict[str, str]:
    """The files a task's own section names (rec.item_file: `Task.recipe_paths`), held to the workspace like
    train_file; errors are keyed by the section, the field the form shows."""
    errors: dict[str, str] = {}
    for dotted in TASKS[recipe["task"]].recipe_paths:
        section, key = dotted.split(".")
        options = recipe.get(section)
        if isinstance(options, dict) and options.get(key):
            try:
                recipe[section] = {**options, key: ws.resolve(str(options[key]), what=f"{dotted} file")}
            except DeltatuneError as err:
                errors[section] = str(err)
    return errors


def data_run(recipe: dict[str, Any]) -> RunConfig:
    """The RunConfig of a checked recipe's data keys (what data preparation reads)."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in recipe.items() if k in fields})


def check_columns(recipe: dict[str, Any], errors: dict[str, str]) -> dict[str, str]:
    """Each data file readable, and each mapped column present in it (errors keyed by file or column field)."""
    found: dict[str, str] = {}
    task = recipe_tasks()[recipe["task"]]
    columns = {
        "text_column": recipe.get("text_column") or task.default_columns[0],
        "text_pair_column": recipe.get("text_pair_column"),
        "label_column": recipe.get("label_column") or task.default_columns[1],
    }
    if recipe["task"] == "causal-lm":  # conversations: their columns are checked row by row by the run
        columns = {}
    for key in FILE_KEYS:
        if key in errors or not recipe.get(key):
            continue
        try:
            table = load_table(recipe[key])
        except DeltatuneError as err:
            found[key] = str(err)
            continue
        for role, name in columns.items():
            try:
                require_columns(table, {role: name}, os.path.basename(recipe[key]))
            except DeltatuneError as err:
                found.setdefault(role, str(err))
    return found


# --- the data preview --------------------------------------------------------------------------------
DATA_SETTINGS = (
    "group_column",
    "split",
    "stratify",
    "conflicting_labels",
    "eval_overlap",
    "max_train_samples",
    "max_eval_samples",
    "dataset",
)


def preview(ws: Workspace, form: dict[str, Any], rows: int = 5) -> dict[str, Any]:
    """The training file's columns and first rows, and the data report the run would write (data_report.json:
    rows read, dropped by reason, split sizes, label counts), computed by the run's own data preparation."""
    if not form.get("train_file"):
        raise FormErrors({"train_file": "Choose a training file to preview."})
    path = ws.resolve(str(form["train_file"]), what="data file")
    try:
        table = load_table(path)
    except DeltatuneError as err:
        raise FormErrors({"train_file": str(err)}) from err
    head = table.select(range(min(rows, len(table))))
    out: dict[str, Any] = {
        "columns": list(table.column_names),
        "rows": [{k: v if isinstance(v, str) else as_text(v) for k, v in r.items()} for r in head],
        "total_rows": len(table),
    }
    task = str(form.get("task") or "seq-cls")
    recipe: dict[str, Any] = {"task": task}
    errors: dict[str, str] = {}
    if task not in recipe_tasks():
        errors["task"] = f"Unknown task {task!r}."
    for key in FILE_KEYS:
        if form.get(key):
            try:
                recipe[key] = ws.resolve(str(form[key]), what="data file")
            except DeltatuneError as err:
                errors[key] = str(err)
    for key in COLUMN_KEYS:
        if form.get(key):
            recipe[key] = str(form[key]).strip()
    kinds = {f.name: annotation(f) for f in setting_fields()}
    for key in (*DATA_SETTINGS, "seed", *({task} & set(kinds))):  # a task's own section (rec:) too
        value = parse_field(form.get(key), kinds[key]) if key in form else None
        if value is not None:
            recipe[key] = value
    recipe["clean"] = {k: v for k, v in (form.get("clean") or {}).items() if isinstance(v, bool)}
    if not errors:
        errors = {**task_paths(ws, recipe), **check_columns(recipe, errors)}
    if errors:
        out["errors"] = errors
        return out
    try:
        _, report, _ = load_data(data_run(recipe), int(recipe.get("seed", TrainConfig.seed)))
    except (DeltatuneError, TypeError, ValueError) as err:
        out["errors"] = {_first_key_named(str(err), [task]) or "_data": str(err)}
        return out
    files = report.get("files") or {}
    report["files"] = {k: ws.relative(v) if v and os.path.isabs(v) else v for k, v in files.items()}
    out["report"] = report
    out["report_text"] = format_data_report(report)
    return out


# --- recipe files ------------------------------------------------------------------------------------
def recipe_yaml(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def form_from_yaml(ws: Workspace, text: str) -> dict[str, Any]:
    """A recipe file as form values (text the inputs show); paths in the workspace become relative to it. Keys
    the studio sets itself are reported back, not dropped in silence."""
    try:
        raw = coerce_numbers(yaml.safe_load(text) or {})
    except yaml.YAMLError as err:
        raise FormErrors({"_form": f"The file is not valid YAML: {err}"}) from err
    if not isinstance(raw, dict):
        raise FormErrors({"_form": "A recipe is a mapping of keys (model:, task:, method:, ...)."})
    try:
        validate(dict(raw))
    except DeltatuneError as err:
        raise FormErrors({"_form": str(err)}) from err
    form: dict[str, Any] = {}
    notes = []
    errors = {}
    method = raw.get("method", "lora")
    section = registry.resolve_variant(method)[0].name
    sections = {m["section"] for m in schema_methods()} | set(registry.variants())
    for key, value in raw.items():
        if key == "output_dir":
            form["name"] = os.path.basename(os.path.normpath(str(value)))
        elif key in STUDIO_KEYS:
            notes.append(f"{key}: {value!r} in the file is not used; the Start and Resume buttons set it.")
        elif key in sections or key == "method_options":
            form.setdefault(section, {}).update({k: as_text(v) for k, v in (value or {}).items()})
        elif key in FILE_KEYS and value:
            try:
                form[key] = ws.relative(ws.resolve(str(value), what="data file"))
            except DeltatuneError as err:
                form[key] = str(value)
                errors[key] = str(err)
        elif key == "clean":
            form[key] = dict(value or {})
        elif key in ("task", "method", *COLUMN_KEYS):
            form[key] = "" if value is None else str(value)
        elif key in MODEL_KEYS and value:
            inside = os.path.join(ws.root, str(value))
            is_path = os.path.isabs(str(value)) and os.path.exists(inside)
            form[key] = ws.relative(os.path.realpath(inside)) if is_path else str(value)
        else:
            form[key] = as_text(value)
    return {"form": form, "notes": notes, "errors": errors}
