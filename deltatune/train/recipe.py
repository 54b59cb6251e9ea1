"""Recipes: a YAML file and/or `--key value` flags -> a trained, evaluated, saved adapter.

    model: all-minilm-l6-v2          # folder, hub name, .gguf file or packaged alias
    task: seq-cls                    # one of deltatune.train.tasks.TASKS: seq-cls, regression, multi-label,
                                     # token-cls, qa, causal-lm, seq2seq, summarization, translation, ...
    method: lora                     # lora | rslora | dora | qlora | ... (`deltatune train --help` lists them)
    lora: {r: 8, lora_alpha: 16}     # the method's options, under its name
    train_file: data/train.csv
    eval_file: data/dev.csv
    epochs: 3
    lr: 5e-4

The same keys work as flags, so `deltatune train --model DIR --task seq-cls --method lora --train_file train.csv`
is a complete run without a file. Every key is checked: an unknown one is an error that names the closest valid key.
Relative file paths are tried against the working directory, then the recipe's folder and each of its parents.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from deltatune import registry
from deltatune.config import check_fields
from deltatune.errors import ConfigError, MergeError
from deltatune.train.data import (
    Cleaning,
    DataError,
    LabelMap,
    clean_table,
    connected_rows,
    conversation,
    deduplicate,
    grouped_split,
    load_table,
    normalize_text,
    require_columns,
)
from deltatune.train.tasks import TASKS, Task
from deltatune.train.trainer import (
    CHECKPOINT,
    RUN_FILES,
    TrainConfig,
    Trainer,
    claim_output_dir,
    planned_steps,
    seed_everything,
)

RUN_CONFIG = "run_config.yaml"
DATA_REPORT = "data_report.json"


def recipe_tasks() -> dict[str, type[Task]]:
    """The tasks a recipe can name: those that know how to build themselves from one."""
    return {
        name: task for name, task in TASKS.items() if task.from_run.__func__ is not Task.from_run.__func__
    }


class RecipeError(ConfigError):
    """A mistake in a recipe or its overrides, with a message that says how to fix it."""


@dataclass
class RunConfig:
    """The keys of a recipe besides the trainer's (TrainConfig) and the method's options."""

    model: str = ""
    task: str = "seq-cls"
    method: str = "lora"
    train_file: str | None = None
    eval_file: str | None = None
    test_file: str | None = None
    dataset: str | None = None  # a hub dataset name (online only), used when train_file is not set
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_length: int | None = None  # None: from the data (see choose_max_length)
    packing: bool = (
        False  # causal-lm: a batch's rows end to end in one sequence, no padding (train/packing.py)
    )
    max_train_samples: int = 0  # 0: all rows; otherwise a seeded random subset
    max_eval_samples: int = 0
    max_test_samples: int = 0
    split: list[float] = field(default_factory=lambda: [0.7, 0.2, 0.1])
    clean: dict[str, bool] = field(default_factory=dict)
    group_column: str | None = None  # rows sharing this column's value (a user, a document) stay in one split
    stratify: bool = True  # split classification data label by label
    conflicting_labels: str = (
        "drop"  # one text with different labels: drop | majority (keep the majority's rows)
    )
    eval_overlap: str = "drop"  # training rows whose text is also in eval_file/test_file: drop | keep
    teacher: str | None = None  # a model (or trained adapter folder's base) whose logits the student matches
    max_new_tokens: int = 64
    generate_samples: int = 32
    dtype: str | None = None  # e.g. bfloat16 to load the base model in half precision
    quantize: str | None = None  # nf4 | fp4 | int8: a quantized base (QLoRA); the `qlora` method implies nf4
    labels: list[str | int] | None = None  # written by a run: the label names, in class-id order
    rec: dict[str, Any] | None = None  # task: rec's options (deltatune/train/tasks/rec/options.py)
    # vision: `model` is torchvision:<arch> / timm:<arch> (or a diffusers pipeline folder for text-to-image)
    weights: str | None = None  # pretrained backbone weights (.safetensors) for a torchvision/timm model
    model_options: dict[str, Any] = field(default_factory=dict)  # constructor options, e.g. {width_mult: 0.5}
    image_size: int | None = None  # images are resized to image_size x image_size (default: the task's)
    image_column: str | None = None  # default: image
    num_inference_steps: int = 20  # text-to-image sampling steps
    num_labels: int = 0  # 1 makes a seq-cls run a regression (one output, MSE); 0: from the data
    thresholds: list[float] | None = None  # multi-label: one decision threshold per label (a run fits them)
    null_threshold: float = 0.0  # extractive qa: the margin a span needs over "no answer" (a run fits it)
    generative: bool = False  # qa: write the answer out (decoder/seq2seq models) instead of picking a span
    instruction: str | None = None  # summarization/translation/generative qa: the instruction a decoder sees
    source_lang: str = "zh"  # translation
    target_lang: str = "en"
    eval_before: bool = False  # also score the untuned base model on the validation and test splits

    def __post_init__(self) -> None:
        check_fields(self, "the recipe")
        if self.max_length is not None and self.max_length < 1:
            raise RecipeError(f"max_length must be a positive number of tokens, got {self.max_length}.")


RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


# --- reading a recipe ----------------------------------------------------------------------------
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def coerce_numbers(value: Any) -> Any:
    """YAML 1.1 reads `5e-4` as a string; recipes mean the number. Only that exponent form is read: a quoted
    '0' stays the string it was written as (label names such as '0' and '1' must not become 0.0 and 1.0)."""
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    return value


def parse_value(text: str) -> Any:
    """A command-line value typed as YAML would type it: 16 -> int, 1e-4 -> float, true -> bool, [a, b] -> list."""
    try:
        return coerce_numbers(yaml.safe_load(text))
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--lora.r', '16', '--lr=1e-4', '--resume'] -> {'lora': {'r': 16}, 'lr': 0.0001, 'resume': True}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise RecipeError(f"Unexpected argument {arg!r}; overrides look like --key value or --key=value.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        key = key.replace("-", "_")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
        i += 1
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _closest(key: str, valid: set[str]) -> str:
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def method_info(name: str) -> tuple[str, dict[str, Any], type]:
    """(peft_type, implied options, config class) of a recipe's method name; an error lists what is available."""
    try:
        method, variant = registry.resolve_variant(name)
    except ConfigError:
        names = set(registry.variants())
        raise RecipeError(
            f"Unknown method {name!r}.{_closest(registry.normalize_name(name), names)} "
            f"Available: {', '.join(sorted(names))}."
        ) from None
    return method.peft_type, dict(variant.options), variant.config_class or method.config_class


def method_section_names(method: str) -> set[str]:
    """The keys that may hold this method's options: every name of the method (e.g. `lora` for `dora`)."""
    chosen = registry.resolve_variant(method)[0]
    return {name for name, (m, _) in registry.variants().items() if m is chosen}


def validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown keys (naming the closest valid one) and check the method and its options."""
    # an empty method section (e.g. `--lora null` to switch a recipe to another method) is no section at all
    method_names = set(registry.variants())
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise RecipeError(f"Recipe keys are names (model, task, lr, ...), got {odd[0]!r}.")
    raw = {k: v for k, v in raw.items() if not (k in method_names and not v)}
    method = raw.get("method", "lora")
    if not isinstance(method, str):
        raise RecipeError(f"method must be a method name such as 'lora', got {method!r}.")
    peft_type, implied, config_cls = method_info(method)
    sections = method_section_names(method)
    all_sections = method_names | {"method_options"}
    valid = RUN_KEYS | TRAIN_KEYS | sections | {"method_options"}
    for key in raw:
        if key in all_sections and raw[key] and key not in sections | {"method_options"}:
            raise RecipeError(
                f"Options under {key!r} belong to another method; this recipe uses method {method!r}."
            )
        if key not in valid:
            raise RecipeError(f"Unknown key {key!r} in the recipe.{_closest(key, valid)}")
    option_names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for section in sections | {"method_options"}:
        options = raw.get(section) or {}
        if not isinstance(options, dict):
            raise RecipeError(f"{section!r} must be a mapping of {method} options, e.g. {section}: {{r: 8}}.")
        for key in options:
            if not isinstance(key, str) or key not in option_names:
                raise RecipeError(
                    f"Unknown {method} option {section}.{key}.{_closest(key, option_names)} "
                    f"Valid options: {', '.join(sorted(option_names))}."
                )
    task = raw.get("task", "seq-cls")
    if not isinstance(task, str) or task not in recipe_tasks():
        raise RecipeError(f"Unknown task {raw.get('task')!r}; use one of: {', '.join(recipe_tasks())}.")
    for other in set(recipe_tasks()) & RUN_KEYS - {task}:  # a task's own options live under its name
        if raw.get(other):
            raise RecipeError(
                f"Options under {other!r} belong to task {other!r}; this recipe uses task {task!r}."
            )
    if raw.get("packing") and task != "causal-lm":
        raise RecipeError("packing applies to task: causal-lm (rows of text put end to end); remove it here.")
    if raw.get("packing") and "num_virtual_tokens" in option_names:
        raise RecipeError(
            f"packing cannot be used with {method}: its virtual tokens are prepended to each row, which cannot be "
            "split inside a packed sequence. Set packing: false."
        )
    lr = raw.get("lr", TrainConfig.lr)
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise RecipeError(
            f"lr must be a positive number, got {lr!r}; a typical LoRA learning rate is 1e-4 to 1e-3."
        )
    for key, allowed in (("conflicting_labels", ("drop", "majority")), ("eval_overlap", ("drop", "keep"))):
        if raw.get(key, "drop") not in allowed:
            raise RecipeError(f"{key} must be one of {', '.join(allowed)}; got {raw[key]!r}.")
    clean = raw.get("clean") or {}
    if not isinstance(clean, dict):
        raise RecipeError(
            f"clean must be a mapping of cleaning steps, e.g. clean: {{strip_html: true}}; got {clean!r}."
        )
    bad_clean = {str(k) for k in clean} - {f.name for f in dataclasses.fields(Cleaning)}
    if bad_clean:
        key = sorted(bad_clean)[0]
        raise RecipeError(
            f"Unknown cleaning step clean.{key}.{_closest(key, {f.name for f in dataclasses.fields(Cleaning)})}"
        )
    return raw


def resolve_path(path: str | None, recipe_dir: str | None) -> str | None:
    """A relative path as given if it exists from here, else from the recipe's folder or any folder above it."""
    if path is None or os.path.isabs(path) or os.path.exists(path) or recipe_dir is None:
        return path
    folder = os.path.abspath(recipe_dir)
    while True:
        candidate = os.path.normpath(os.path.join(folder, path))
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return path
        folder = parent


def load_recipe(path: str | None, overrides: list[str] | dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML recipe, apply overrides, validate, and resolve relative file paths."""
    raw: dict[str, Any] = {}
    recipe_dir = None
    if path is not None:
        if not os.path.isfile(path):
            raise RecipeError(f"Recipe file not found: {path}.")
        with open(path) as fh:
            try:
                raw = coerce_numbers(yaml.safe_load(fh) or {})
            except yaml.YAMLError as err:
                raise RecipeError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise RecipeError(
                f"{path} must hold a mapping of keys (model:, task:, ...), not {type(raw).__name__}."
            )
        recipe_dir = os.path.dirname(os.path.abspath(path))
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    raw = validate(merge(raw, extra))
    if not raw.get("model"):
        raise RecipeError(
            "No model given: pass --model (a folder, a hub name, a .gguf file or a packaged alias) or put "
            "`model:` in a recipe file. See `deltatune train --help`."
        )
    for key in ("model", "train_file", "eval_file", "test_file", "teacher", "weights"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise RecipeError(f"{key} must be a path or a name, got {raw[key]!r}.")
    for key in ("train_file", "eval_file", "test_file", "teacher", "weights"):
        raw[key] = resolve_path(raw.get(key), recipe_dir)
    for dotted in TASKS[raw.get("task", "seq-cls")].recipe_paths:
        section, key = dotted.split(".")
        if isinstance(raw.get(section), dict) and raw[section].get(key):
            raw[section] = {**raw[section], key: resolve_path(raw[section][key], recipe_dir)}
    if raw.get("model") and (os.path.sep in raw["model"] or raw["model"].startswith(".")):
        raw["model"] = resolve_path(raw["model"], recipe_dir)
    return raw


def split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`deltatune train`'s arguments as (recipe file or None, `--key value` overrides): a recipe is optional, and
    when given it comes first; flags alone are a complete run."""
    if args and not args[0].startswith("-"):
        return args[0], list(args[1:])
    return None, list(args)


def load_train_args(args: list[str]) -> dict[str, Any]:
    """The validated recipe `deltatune train ARGS` describes (a recipe file, flags, or both)."""
    path, overrides = split_train_args(args)
    return load_recipe(path, overrides)


def method_names() -> dict[str, list[str]]:
    """Each method's main name -> every name a recipe or `--method` accepts for it (from the registry)."""
    grouped: dict[str, list[str]] = {}
    by_method: dict[int, str] = {}
    for name, (method, _) in registry.variants().items():
        main = by_method.setdefault(id(method), registry.normalize_name(method.name))
        grouped.setdefault(main, []).append(name)
    return grouped


def train_help() -> str:
    """The part of `deltatune train --help` that lists methods and tasks, read from the registry and TASKS."""
    methods = "\n".join(f"  {main}: {', '.join(names)}" for main, names in method_names().items())
    return (
        f"Methods (--method):\n{methods}\n\nTasks (--task): {', '.join(recipe_tasks())}\n\n"
        "Any recipe key works as a flag (--lr 5e-4, --lora.r 16, --max_length 128); max_length, when not "
        "given, is read from the training data."
    )


def choices_markdown() -> str:
    """The README's line of method and task names (a test keeps the README equal to it)."""
    names = ", ".join(f"`{n}`" for n in registry.variants())
    return f"Methods (`--method`): {names}. Tasks (`--task`): {', '.join(f'`{t}`' for t in recipe_tasks())}."


def split_recipe(raw: dict[str, Any]) -> tuple[RunConfig, TrainConfig, dict[str, Any]]:
    """The recipe as (run keys, trainer keys, method options)."""
    sections = method_section_names(raw.get("method", "lora"))
    options: dict[str, Any] = {}
    for section in sorted(sections) + ["method_options"]:
        options.update(raw.get(section) or {})
    run = RunConfig(**{k: v for k, v in raw.items() if k in RUN_KEYS})
    train = TrainConfig(**{k: v for k, v in raw.items() if k in TRAIN_KEYS and k not in RUN_KEYS})
    return run, train, options


# --- building a run -------------------------------------------------------------------------------
# Defaults a recipe may leave out: each method's `recipe_defaults` (LoRA, AdaLoRA and IA3 adapt every linear
# layer; soft prompts get 20 virtual tokens); AdaLoRA's rank budget is spread over the run's real number of steps.


def make_peft_config(
    run: RunConfig,
    options: dict[str, Any],
    total_steps: int = 1,
    tokenizer: Any = None,
    task: Task | None = None,
    model: nn.Module | None = None,
):
    """The adapter config of a run; with the built `task` and the `model` it adapts (`task.wrap_model`'s result),
    its task type, its default targets and the modules it trains in full."""
    peft_type, implied, config_cls = method_info(run.method)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kwargs = {**implied, **options}
    defaults = dict(registry.method_for(peft_type).recipe_defaults)
    targets = task.default_targets(model) if task is not None and model is not None else None
    if targets is not None and "target_modules" in defaults:  # e.g. a CNN's convolutions, not all-linear
        defaults["target_modules"] = targets
    for key, value in defaults.items():
        if key in names and kwargs.get(key) is None:
            kwargs[key] = value
    init = kwargs.get("prompt_tuning_init")
    if str(getattr(init, "value", init)) == "TEXT" and kwargs.get("tokenizer_name_or_path") is None:
        # prompts initialised from a text use the run's own tokenizer (its model name before it is loaded)
        kwargs["tokenizer_name_or_path"] = tokenizer if tokenizer is not None else run.model
    if "total_step" in names and kwargs.get("total_step") is None:
        kwargs["total_step"] = total_steps
    if "task_type" in names:
        kwargs.setdefault("task_type", (task or TASKS[run.task]).adapter_task_type(run))
    extra = task.modules_to_save(model) if task is not None and model is not None else []
    if extra:
        if "modules_to_save" not in names:
            raise RecipeError(
                f"Task {run.task!r} trains {extra} in full beside the adapter, which {run.method} cannot save "
                "(its config has no modules_to_save); use lora, ia3 or another method that has it."
            )
        kwargs["modules_to_save"] = list(dict.fromkeys([*(kwargs.get("modules_to_save") or []), *extra]))
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"Invalid {run.method} options {options}: {err}") from err


def _subset(table, n: int, seed: int):
    if n and n < len(table):
        order = list(range(len(table)))
        random.Random(seed).shuffle(order)
        table = table.select(sorted(order[:n]))
    return table


# --- data: read, check, clean, deduplicate, split, report -----------------------------------------
def data_sources(run: RunConfig) -> dict[str, str]:
    """How each split is named in messages: its file, or the part of the training file it was split from."""
    return {
        "train": run.train_file or run.dataset,
        "validation": run.eval_file or "the validation split",
        "test": run.test_file or "the test split",
    }


def read_tables(run: RunConfig) -> dict[str, Any]:
    """The files as read: `train`, and `validation` / `test` when eval_file / test_file are given."""
    source = run.train_file or run.dataset
    if not source:
        raise RecipeError("Set train_file (a CSV/TSV/JSON/JSONL/Parquet file) or dataset (a hub name).")
    tables = {"train": load_table(source, "train")}
    if run.eval_file:
        tables["validation"] = load_table(run.eval_file, "validation")
    if run.test_file:
        tables["test"] = load_table(run.test_file, "test")
    return tables


def load_splits(run: RunConfig, seed: int) -> dict[str, Any]:
    """train / validation / test tables, checked, cleaned and leak-free (see `prepare_data`)."""
    return prepare_data(run, seed)[0]


def prepare_data(run: RunConfig, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tables, data report): every file read and checked, the training data deduplicated once, split 70/20/10
    (seeded, stratified, copies and groups kept together) when no eval/test file is given, else cleared of
    rows that also occur in them; then the optional subsets (max_train_samples, max_eval_samples)."""
    tables = read_tables(run)
    rows_read = {name: len(table) for name, table in tables.items()}
    tables = prepare_tables(run, tables, data_sources(run))
    empty = sum(rows_read[name] - len(table) for name, table in tables.items())
    tables, report = leak_free_splits(run, tables, seed)
    tables["train"] = _subset(tables["train"], run.max_train_samples, seed)
    if "validation" in tables:
        tables["validation"] = _subset(tables["validation"], run.max_eval_samples, seed)
    if "test" in tables:
        tables["test"] = _subset(tables["test"], run.max_test_samples, seed)
    report = data_report(run, tables, rows_read, {"empty": empty, **report["dropped"]}, report, seed)
    return tables, report


def load_data(run: RunConfig, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(tables, data report, sources) of a run: the task's own (rec splits one log) or the recipe's files."""
    own = TASKS[run.task].load_splits(run, seed)
    if own is not None:
        return own
    tables, report = prepare_data(run, seed)
    return tables, report, data_sources(run)


def prepare_tables(run: RunConfig, tables: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """Check the configured columns exist in every table (evaluation files need the label column too, so a
    missing one is found before training, not after it) and apply the chosen text cleaning."""
    task = TASKS[run.task]
    default_text, default_label = task.default_columns
    run.text_column = run.text_column or default_text
    run.label_column = run.label_column or default_label
    run.text_pair_column = run.text_pair_column or task.default_pair_column
    cleaning = Cleaning(**run.clean)
    for name, table in tables.items():
        columns = {
            "text_column": run.text_column,
            "text_pair_column": run.text_pair_column,
            "label_column": run.label_column,
        }
        if name == "train":
            columns["group_column"] = run.group_column
        if run.task == "causal-lm":  # conversations: their columns are checked row by row (`conversation`)
            columns = {"group_column": columns.get("group_column")}
        require_columns(table, columns, sources[name])
        tables[name] = clean_table(table, [run.text_column, run.text_pair_column], cleaning)
    return tables


def has_classes(run: RunConfig) -> bool:
    """Whether the task learns a label set (classification): one text with two labels is then a conflict."""
    return TASKS[run.task].fit_labels.__func__ is not Task.fit_labels.__func__


def column(table, name: str) -> list[Any]:
    """A column as a plain list (slicing reads it in one go; iterating a `datasets` column reads row by row)."""
    return table[name][:]


def row_keys(run: RunConfig, table) -> tuple[list[str], list[str]]:
    """Each row's normalized input (what makes two rows copies, or a leak) and its answer (label or target)."""
    if run.task == "causal-lm":
        batch = table[:]
        chats = [conversation(dict(zip(batch, values))) for values in zip(*batch.values())]
        inputs = [normalize_text(" ".join(str(m["content"]) for m in chat[:-1])) for chat in chats]
        return inputs, [normalize_text(chat[-1]["content"]) if chat else "" for chat in chats]
    columns, answer_column = TASKS[run.task].row_columns(run)  # image tasks: the image (and caption)
    inputs = [normalize_text(t) for t in column(table, columns[0])]
    for name in columns[1:]:
        inputs = [f"{a}\t{normalize_text(b)}" for a, b in zip(inputs, column(table, name))]
    if answer_column is None:
        return inputs, [""] * len(inputs)
    answer = (
        (lambda v: normalize_text(v) if isinstance(v, list) else str(v))
        if has_classes(run)
        else (
            lambda v: normalize_text(v) if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        )
    )
    return inputs, [answer(v) for v in column(table, answer_column)]


def _groups(run: RunConfig, table) -> list[str] | None:
    if not run.group_column or run.group_column not in table.column_names:
        return None
    return [str(v) for v in column(table, run.group_column)]


def leak_free_splits(
    run: RunConfig, tables: dict[str, Any], seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Deduplicate the training data once (and settle conflicting labels); split it when no eval/test file is
    given, else drop its rows whose input (or group) occurs in them. Returns the tables and what was dropped."""
    classes = has_classes(run)
    train = tables["train"]
    inputs, answers = row_keys(run, train)
    keep, dropped, conflicting = deduplicate(
        inputs,
        answers,
        Cleaning(**run.clean).drop_duplicates,
        run.conflicting_labels if classes else None,
    )
    if not keep:
        raise DataError(f"{data_sources(run)['train']}: no rows are left after dropping conflicting labels.")
    train = train.select(keep)
    inputs, answers = [inputs[i] for i in keep], [answers[i] for i in keep]
    groups = _groups(run, train)
    dropped["overlap_with_eval_test"] = 0
    held_out = [name for name in ("validation", "test") if name in tables]
    if not held_out:
        stratified = (
            classes
            and run.stratify
            and run.label_column is not None
            and not isinstance(train[0][run.label_column], list)
        )
        strata = answers if stratified else [""] * len(train)
        parts = grouped_split(connected_rows(inputs, groups), strata, run.split, seed)
        return {name: train.select(rows) for name, rows in parts.items()}, {
            "dropped": dropped,
            "conflicting_texts": conflicting,
            "split": {"ratios": list(run.split), "stratified_by_label": stratified},
        }
    seen_inputs, seen_groups = set(), set()
    for name in held_out:
        seen_inputs.update(row_keys(run, tables[name])[0])
        seen_groups.update(_groups(run, tables[name]) or ())
    leaked = [
        i
        for i, key in enumerate(inputs)
        if key in seen_inputs or (groups is not None and groups[i] in seen_groups)
    ]
    if run.eval_overlap == "drop" and leaked:
        dropped["overlap_with_eval_test"] = len(leaked)
        leaked_set = set(leaked)
        train = train.select([i for i in range(len(train)) if i not in leaked_set])
        if len(train) == 0:
            raise DataError(
                f"Every training row also occurs in {' or '.join(data_sources(run)[n] for n in held_out)}; "
                "nothing is left to train on. Check that train_file and eval_file/test_file differ."
            )
    return {**tables, "train": train}, {"dropped": dropped, "conflicting_texts": conflicting, "split": None}


def data_report(
    run: RunConfig,
    tables: dict[str, Any],
    rows_read: dict[str, int],
    dropped: dict[str, int],
    details: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """What `data_report.json` holds: rows read, dropped by reason, rows and label counts per split, how many
    rows of each evaluation split also occur in train (0 unless eval_overlap: keep), the settings and the seed."""
    sources = data_sources(run)
    train_inputs = set(row_keys(run, tables["train"])[0])
    train_groups = set(_groups(run, tables["train"]) or ())
    overlap = {}
    for name in ("validation", "test"):
        if name in tables:
            inputs = row_keys(run, tables[name])[0]
            groups = _groups(run, tables[name]) or [None] * len(inputs)
            overlap[name] = sum(1 for k, g in zip(inputs, groups) if k in train_inputs or g in train_groups)
    labels = {}
    if has_classes(run) and run.label_column:
        for name, table in tables.items():
            values = column(table, run.label_column)
            flat = [v for row in values for v in row] if values and isinstance(values[0], list) else values
            labels[name] = dict(sorted(Counter(str(v) for v in flat).items()))
    return {
        "seed": seed,
        "files": {name: sources[name] for name in rows_read},
        "rows_read": rows_read,
        "dropped": dropped,
        "conflicting_texts": details["conflicting_texts"],
        "split": details["split"],
        "rows": {name: len(table) for name, table in tables.items()},
        "labels": labels,
        "overlap_with_train": overlap,
        "settings": {
            "drop_duplicates": Cleaning(**run.clean).drop_duplicates,
            "conflicting_labels": run.conflicting_labels,
            "eval_overlap": run.eval_overlap,
            "stratify": run.stratify,
            "group_column": run.group_column,
            "max_train_samples": run.max_train_samples,
            "max_eval_samples": run.max_eval_samples,
        },
    }


def format_data_report(report: dict[str, Any]) -> str:
    """The report in a few lines, for the terminal (a task that reads its own data writes its own lines)."""
    if "summary" in report:
        return report["summary"]
    said = {
        "empty": "empty",
        "duplicate": "duplicates",
        "conflicting_label": "with conflicting labels",
        "overlap_with_eval_test": "also in eval/test",
    }
    reasons = ", ".join(f"{n} {said[reason]}" for reason, n in report["dropped"].items() if n) or "none"
    read = " + ".join(f"{n} ({report['files'][name]})" for name, n in report["rows_read"].items())
    lines = [f"data: {read} rows read; dropped: {reasons}"]
    if report["conflicting_texts"]:
        lines[0] += f" ({report['conflicting_texts']} texts had more than one label)"
    split = report["split"]
    how = (
        f"split {'/'.join(f'{100 * r:g}' for r in split['ratios'])} of the training file"
        f"{', stratified by label' if split['stratified_by_label'] else ''}"
        if split
        else "as given"
    )
    rows = ", ".join(f"{name} {n}" for name, n in report["rows"].items())
    lines.append(f"splits: {rows} ({how}, seed {report['seed']})")
    for name, counts in report["labels"].items():
        lines.append(f"  {name} labels: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        missing = sorted(set(report["labels"].get("train", {})) - set(counts))
        if missing and name != "train":
            lines.append(f"  warning: {name} has no rows labelled {', '.join(missing)}")
    for name, n in report["overlap_with_train"].items():
        if n:
            lines.append(f"  warning: {n} {name} rows also occur in train (eval_overlap: keep)")
    return "\n".join(lines)


def write_data_report(report: dict[str, Any], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, DATA_REPORT), "w") as fh:
        json.dump(report, fh, indent=2)


def build_task(run: RunConfig, tokenizer: Any, labels: LabelMap | None) -> Task:
    return recipe_tasks()[run.task].from_run(run, tokenizer, labels)


# --- max_length from the data ----------------------------------------------------------------------------------
# A recipe without max_length gets the 98th percentile of the tokenized lengths of (up to 2,000 of) its training
# rows, capped by the model: batches are padded to their longest row only, so this truncates just the long tail
# and a data set of short texts never pays for a length nobody chose.
LENGTH_PERCENTILE = 98
LENGTH_SAMPLE = 2000


def model_length_limit(model: Any, tokenizer: Any) -> int | None:
    """The most tokens the model takes (its position embeddings, or the tokenizer's limit), if it says."""
    limits = [
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ]
    known = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(known) if known else None


def choose_max_length(
    run: RunConfig, tokenizer: Any, model: Any, labels: LabelMap | None, train_table
) -> str:
    """Set `run.max_length` from the training data (see above); returns the line that reports the choice."""
    limit = model_length_limit(model, tokenizer)
    sample = _subset(train_table, LENGTH_SAMPLE, seed=0)
    probe = dataclasses.replace(run, max_length=limit or 1_000_000)
    task = build_task(probe, tokenizer, labels)
    lengths = sorted(task.lengths(task.prepare(sample, "the training data")))
    if not lengths:
        run.max_length = limit or 256
        return f"max_length {run.max_length} (no training rows to measure)."
    value = lengths[max(0, math.ceil(LENGTH_PERCENTILE / 100 * len(lengths)) - 1)]
    run.max_length = max(1, value)
    limit_text = f"; the model takes at most {limit}" if limit else ""
    return (
        f"max_length {run.max_length}: the {LENGTH_PERCENTILE}th percentile of the tokenized lengths of "
        f"{len(lengths):,} training rows (longest {lengths[-1]}){limit_text}. Set max_length to override."
    )


def fit_labels(run: RunConfig, train_table) -> LabelMap | None:
    if run.labels:
        return LabelMap(run.labels)
    return TASKS[run.task].fit_labels(run, train_table)


def check_labels(
    run: RunConfig, labels: LabelMap | None, tables: dict[str, Any], sources: dict[str, str]
) -> None:
    """Every label of the eval/test data must be one the model is trained on."""
    if labels is None:
        return
    for name, table in tables.items():
        if name == "train" or run.label_column not in table.column_names:
            continue
        for value in table[run.label_column]:
            for item in TASKS[run.task].label_items(value):  # token tags, box labels
                labels.encode(item, sources[name])


def load_base(run: RunConfig, labels: LabelMap | None):
    """The base model (with a fresh head sized for the labels) and its tokenizer."""
    import torch

    from deltatune.models import load_model_and_tokenizer

    kwargs = TASKS[run.task].head_kwargs(labels)
    built = TASKS[run.task].build_model(run, labels)
    if built is not None:
        return built
    dtype = getattr(torch, run.dtype) if run.dtype else None
    quantization = run.quantize or registry.resolve_variant(run.method)[1].quantize
    try:
        return load_model_and_tokenizer(
            run.model,
            task=TASKS[run.task].model_task(run),
            dtype=dtype,
            quantization=quantization,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise RecipeError(f"Could not load model {run.model!r}: {err}") from err


def load_teacher(run: RunConfig, labels: LabelMap | None):
    """The distillation teacher: an output_dir of `deltatune train` (base + adapter) or a plain model."""
    if not run.teacher:
        return None
    if os.path.isfile(os.path.join(run.teacher, RUN_CONFIG)):
        return load_run(run.teacher)[0]
    return load_base(RunConfig(**{**dataclasses.asdict(run), "model": run.teacher}), labels)[0]


def train_from_recipe(raw: dict[str, Any]) -> dict[str, Any]:
    """Everything `deltatune train` does: data, model, adapter, training, scores; returns metrics.json's content.

    Before step 1: the output folder is claimed (`claim_run_dir`), every file is read, checked and made
    leak-free, and every label is known. The adapter is saved before the final evaluation."""
    from deltatune.model import get_peft_model

    run, train_cfg, options = split_recipe(raw)
    if run.num_labels == 1 and run.task == "seq-cls":
        run.task = "regression"  # one output: transformers' convention for regression
    make_peft_config(run, options, train_cfg.max_steps or 10**6)  # fail on bad options before slow loading
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        claim_run_dir(train_cfg)
    continuing = train_cfg.resume and os.path.exists(os.path.join(train_cfg.output_dir, CHECKPOINT))
    seed_everything(train_cfg.seed)
    tables, report, sources = load_data(run, train_cfg.seed)
    labels = fit_labels(run, tables["train"])
    run.labels = labels.names if labels else None
    check_labels(run, labels, tables, sources)  # before the slow model load
    if main:
        print(format_data_report(report), file=sys.stderr)
        if not continuing:  # a resumed run rewrites them once the checkpoint has proved to be this run's
            write_run_files(raw, run, report, train_cfg.output_dir)
    model, tokenizer = load_base(run, labels)
    if run.max_length is None:
        chosen = choose_max_length(run, tokenizer, model, labels, tables["train"])
        if main:
            print(chosen, file=sys.stderr)
            if not continuing:  # so eval/predict/serve truncate as training did
                write_run_files(raw, run, report, train_cfg.output_dir)
    task = build_task(run, tokenizer, labels)
    features = {name: task.prepare(table, sources[name]) for name, table in tables.items()}
    if not features["train"]:
        raise DataError(f"{sources['train']}: no training rows left.")
    seed_everything(train_cfg.seed)  # the adapter's initial weights depend only on the seed
    wrapped = task.wrap_model(model)
    peft_config = make_peft_config(
        run,
        options,
        planned_steps(train_cfg, len(features["train"]), int(os.environ.get("WORLD_SIZE", "1"))),
        tokenizer,
        task,
        wrapped,
    )
    peft_model = get_peft_model(wrapped, peft_config)
    teacher = load_teacher(run, labels)
    trainer = Trainer(
        peft_model,
        task,
        features["train"],
        features.get("validation"),
        train_cfg,
        teacher=teacher,
        run_fingerprint=run_fingerprint(run, options),
    )
    before = evaluate_base(trainer, features) if run.eval_before else {}
    summary = trainer.train()  # saves the adapter, then evaluates
    results = {**before, **summary["final"]}
    fitted = {}
    if features.get("validation") and trainer.is_main:  # e.g. multi-label thresholds, QA's no-answer margin
        batch_size = train_cfg.eval_batch_size or 2 * train_cfg.batch_size
        fitted = task.calibrate(trainer.unwrapped, features["validation"], batch_size)
        for key, value in fitted.items():
            setattr(run, key, value)
    if trainer.is_main and (continuing or fitted):
        write_run_files(raw, run, report, train_cfg.output_dir)
    if features.get("test"):
        results.update(trainer.evaluate(features["test"], prefix="test"))
    if trainer.is_main:
        with open(os.path.join(train_cfg.output_dir, "metrics.json"), "w") as fh:
            json.dump(results, fh, indent=2)
        task.report(results, train_cfg.output_dir)
    return {"metrics": results, "summary": summary}


def evaluate_base(trainer: Trainer, features: dict[str, Any]) -> dict[str, Any]:
    """Scores of the untuned base model (adapters switched off) on the validation and test splits, keyed
    before_eval_* and before_test_*: the "before" of a before/after comparison."""
    model = trainer.unwrapped
    model.to(trainer.device)
    scores: dict[str, Any] = {}
    with model.disable_adapter():
        for split, prefix in (("validation", "eval"), ("test", "test")):
            if features.get(split):
                found = trainer.evaluate(features[split], prefix=prefix)
                scores.update({f"before_{k}": v for k, v in found.items()})
    return scores


def claim_run_dir(train_cfg: TrainConfig) -> None:
    """The output folder must hold no other run's files: refused (naming the run) unless `overwrite` (which
    clears them first) or `resume` (whose checkpoint must then match this recipe's fingerprint)."""
    claim_output_dir(
        train_cfg.output_dir,
        train_cfg.resume,
        train_cfg.overwrite,
        markers=RUN_FILES + (RUN_CONFIG, "metrics.json", DATA_REPORT),
        owned=RUN_FILES + (RUN_CONFIG, "metrics.json", DATA_REPORT),
        describe=describe_run,
    )


def describe_run(folder: str, files: list[str]) -> str:
    """'lora on models/bert, trained on data/train.csv' from its run_config.yaml, else the files it holds."""
    path = os.path.join(folder, RUN_CONFIG)
    try:
        with open(path) as fh:
            old = yaml.safe_load(fh) or {}
        return (
            f"{old.get('method', 'lora')} on {old.get('model')}, "
            f"trained on {old.get('train_file') or old.get('dataset')}"
        )
    except (OSError, yaml.YAMLError, AttributeError):
        return f"it has {', '.join(files)}"


def file_sha256(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# RunConfig fields left out of the fingerprint: derived labels, generation settings of the scores, and the data
# files' paths (their content is in it, so the same data found at another path still resumes).
_NOT_IN_FINGERPRINT = {"labels", "max_new_tokens", "generate_samples", "train_file", "eval_file", "test_file"}


def run_fingerprint(run: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    """What beside the trainer's settings determines a run: model, task, method and its options, columns and
    data handling, and the content (sha256) of every data file; a resume must match it."""
    fields = {k: v for k, v in dataclasses.asdict(run).items() if k not in _NOT_IN_FINGERPRINT}
    files = {k: file_sha256(getattr(run, k)) for k in ("train_file", "eval_file", "test_file")}
    return {**fields, "method_options": dict(sorted(options.items())), "data_sha256": files}


def write_run_files(raw: dict[str, Any], run: RunConfig, report: dict[str, Any], out: str) -> None:
    """The resolved recipe (labels included; what `load_run` reads) and data_report.json, at the run's start."""
    write_data_report(report, out)
    resolved = {**raw, **{k: v for k, v in dataclasses.asdict(run).items() if v is not None}}
    with open(os.path.join(out, RUN_CONFIG), "w") as fh:
        yaml.safe_dump(resolved, fh, sort_keys=False)


def read_run(adapter_dir: str) -> RunConfig:
    """The run config of a folder `deltatune train` wrote."""
    path = os.path.join(adapter_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise RecipeError(
            f"{adapter_dir} has no {RUN_CONFIG}; point at an output_dir written by `deltatune train`."
        )
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    return split_recipe(raw)[0]


def load_run(adapter_dir: str):
    """(peft model, task, run config) from a folder `deltatune train` wrote."""
    from deltatune.model import PeftModel

    run = read_run(adapter_dir)
    labels = LabelMap(run.labels) if run.labels else None
    base, tokenizer = load_base(run, labels)
    task = build_task(run, tokenizer, labels)
    model = PeftModel.from_pretrained(task.wrap_model(base), adapter_dir)
    model.eval()
    return model, task, run


def merge_run(adapter_dir: str, output: str) -> dict[str, Any]:
    """`deltatune merge`: fold a run's adapter into its base and save a plain transformers model (with the
    tokenizer) to the folder `output`, then reload what was written and check every tensor equals the merged one.

    Refuses, before any work, an `output` that is an existing file or the run's own folder: transformers would
    otherwise log an error and write nothing, or mix the model into the adapter's files."""
    if os.path.isfile(output):
        raise MergeError(
            f"{output} is an existing file; the merged model is a folder (config.json + model.safetensors). "
            "Give a folder path (it is created if missing)."
        )
    if os.path.isdir(output) and os.path.samefile(output, adapter_dir):
        raise MergeError(f"{output} is the run's own folder; write the merged model to another folder.")
    model, task, _ = load_run(adapter_dir)
    merged = model.merge_and_unload()
    if not hasattr(merged, "save_pretrained"):
        # a module the task built around the base (rec's TextTower: an encoder plus its own modules)
        if type(task).wrap_model is not Task.wrap_model:
            raise MergeError(
                f"Task {task.name!r} wraps the base model in a {type(merged).__name__}, which is no transformers "
                "model to save; use the run folder itself (deltatune predict / serve)."
            )
        # a torchvision/timm model: its state dict
        return {"output": os.path.abspath(output), "tensors_checked": save_state_dict(merged, output)}
    merged.save_pretrained(output)
    if task.tokenizer is not None:
        task.tokenizer.save_pretrained(output)
    checked = verify_saved_model(merged, output)
    return {"output": os.path.abspath(output), "tensors_checked": checked}


def save_state_dict(model, folder: str) -> int:
    """`folder`/model.safetensors: the model's state dict (what `load_state_dict` takes), reloaded and compared
    bit for bit; returns how many tensors were checked."""
    from safetensors.torch import load_file, save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.safetensors")
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_file(expected, path)
    found = load_file(path)
    if set(found) != set(expected) or any(not torch.equal(found[k], v) for k, v in expected.items()):
        raise MergeError(f"The weights saved to {path} do not reload as merged; write to an empty folder.")
    return len(expected)


def verify_saved_model(model, folder: str) -> int:
    """Reload `folder` as `model`'s class and compare every tensor bit for bit; returns how many were checked."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise MergeError(f"Nothing was written to {folder}: it holds no config.json after saving.")
    reloaded = type(model).from_pretrained(folder, dtype="auto")
    expected, found = model.state_dict(), reloaded.state_dict()
    missing = sorted(set(expected) - set(found))
    differing = [k for k in expected if k in found and not torch.equal(expected[k].cpu(), found[k].cpu())]
    if missing or differing:
        name = (missing or differing)[0]
        raise MergeError(
            f"The model saved to {folder} does not reload as merged: {len(missing)} tensors missing, "
            f"{len(differing)} different (e.g. {name}). The folder may hold files of another model; "
            "write to an empty folder."
        )
    return len(expected)
