"""Fuzzing what users feed deltatune from disk (issue 15): adapter configs and weight files, recipes and data files.

Properties: a call succeeds or raises one of deltatune's own errors with a message; a failed `from_pretrained` or
`load_adapter` leaves the model exactly as it was; a load that succeeds gives a model that runs.
See tests/helpers/fuzz.py for how to explore with more examples.
"""

import csv
import io
import json
import os
import tempfile

import pytest
import torch
import yaml
from helpers import ids, randomize_adapter, tiny_llama, word_tokenizer
from helpers.fuzz import NASTY, VALUES, fuzz_settings, own_error_or_result
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.train import recipe

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
KINDS = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "ia3": lambda: dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt": lambda: dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "bottleneck": lambda: dt.BottleneckConfig(target_modules=["down_proj"], reduction_factor=8),
}


def fingerprint(model):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_same(before, after):
    assert after[0] == before[0], "module tree changed"
    assert after[1].keys() == before[1].keys(), "state_dict keys changed"
    for key, value in before[1].items():
        assert _equal(after[1][key], value), key
    assert after[2] == before[2], "requires_grad changed"


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved adapter per kind: its folder, config dict and tensors."""
    root = tmp_path_factory.mktemp("fuzz_adapters")
    out = {}
    for kind, make in KINDS.items():
        model = dt.get_peft_model(tiny_llama(), make())
        randomize_adapter(model)
        model.save_pretrained(root / kind)
        config = json.loads((root / kind / CONFIG).read_text())
        out[kind] = (root / kind, config, load_file(root / kind / WEIGHTS))
    return out


def load_and_check(kind, saved, folder, into_existing):
    """Load `folder` onto a fresh model, or into a PeftModel already holding a good adapter of `kind`; the fuzz
    properties: own errors only, nothing changed on failure, a runnable model on success."""
    if into_existing:
        model = dt.PeftModel.from_pretrained(tiny_llama(), saved[kind][0])
        configs = dict(model.peft_config)
    else:
        model = tiny_llama()
    before = fingerprint(model)

    def load():
        if into_existing:
            model.load_adapter(folder, adapter_name="fuzzed")
            model.set_adapter("fuzzed")
            return model
        return dt.PeftModel.from_pretrained(model, folder)

    loaded, error = own_error_or_result(load)
    if error is not None:
        assert_same(before, fingerprint(model))
        if into_existing:
            assert model.peft_config == configs
        return
    with torch.no_grad():
        own_error_or_result(lambda: loaded(ids()))


# --- adapter_config.json ------------------------------------------------------------------------------------------
@st.composite
def mutated_config(draw, config):
    data = dict(config)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "set":
            data[draw(st.sampled_from(sorted(data)))] = draw(VALUES)
        elif op == "delete" and data:
            del data[draw(st.sampled_from(sorted(data)))]
        else:
            data[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
    return data


@fuzz_settings(40)
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data(), into_existing=st.booleans())
def test_fuzzed_adapter_config(saved, kind, data, into_existing):
    folder, config, state = saved[kind]
    mutated = data.draw(mutated_config(config))
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, CONFIG), "w") as fh:
            json.dump(mutated, fh)
        load_and_check(kind, saved, tmp, into_existing)


# --- adapter_model.safetensors ------------------------------------------------------------------------------------
BASE_KEYS = ["base_model.model.model.layers.0.mlp.down_proj.weight", "base_model.model.model.norm.weight"]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool]


@st.composite
def mutated_state(draw, state):
    state = dict(state)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["drop", "base", "extra", "rename", "reshape", "dtype", "nonfinite", "scalar"])
        )
        key = draw(st.sampled_from(sorted(state))) if state else None
        if op == "drop" and key:
            del state[key]
        elif op == "base":
            name = draw(st.sampled_from(BASE_KEYS))
            state[name] = torch.zeros(load_shape(name))
        elif op == "extra":
            state[draw(st.text(min_size=1, max_size=20))] = torch.zeros(2)
        elif op == "rename" and key:
            state[key + draw(st.sampled_from([".x", "_", ".default"]))] = state.pop(key)
        elif op == "reshape" and key:
            shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
            state[key] = torch.zeros(shape)
        elif op == "dtype" and key:
            state[key] = state[key].to(draw(st.sampled_from(DTYPES)))
        elif op == "nonfinite" and key and state[key].numel():
            t = state[key].clone().float()
            t.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
            state[key] = t
        elif op == "scalar" and key:
            state[key] = torch.tensor(1.0)
    return state


def load_shape(name):
    return (32, 64) if "down_proj" in name else (32,)


@st.composite
def damaged_bytes(draw, data: bytes):
    op = draw(st.sampled_from(["truncate", "flip", "garbage", "empty", "header"]))
    if op == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if op == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if op == "garbage":
        return draw(st.binary(max_size=64))
    if op == "empty":
        return b""
    header = draw(st.sampled_from([b"{}", b"[]", b'{"a": 1}', b"{" * 50, b'{"__metadata__": 5}']))
    return len(header).to_bytes(8, "little") + header + data[8:]


@fuzz_settings(40)
@given(
    kind=st.sampled_from(sorted(KINDS)), data=st.data(), into_existing=st.booleans(), as_bytes=st.booleans()
)
def test_fuzzed_adapter_weights(saved, kind, data, into_existing, as_bytes):
    folder, config, state = saved[kind]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, CONFIG), "w") as fh:
            json.dump(config, fh)
        path = os.path.join(tmp, WEIGHTS)
        if as_bytes:
            with open(path, "wb") as fh:
                fh.write(data.draw(damaged_bytes((folder / WEIGHTS).read_bytes())))
        else:
            save_file({k: v.contiguous() for k, v in data.draw(mutated_state(state)).items()}, path)
        load_and_check(kind, saved, tmp, into_existing)


# --- recipes ------------------------------------------------------------------------------------------------------
RECIPE_KEYS = sorted(recipe.RUN_KEYS | recipe.TRAIN_KEYS) + ["lora", "ia3", "method_options", "lr ", "lora_r"]
OPTION_KEYS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "rank_pattern",
    "bias",
    "use_dora",
    "nope",
]
FLAGS = [
    "--lr",
    "--lora.r",
    "--method",
    "--task",
    "--",
    "--=",
    "--a.b.c",
    "1e-3",
    "[1,",
    "{",
    "x",
    "--resume",
]


@st.composite
def recipes(draw):
    raw = {"model": "some-model"} if draw(st.booleans()) else {}
    raw.update(draw(st.dictionaries(st.sampled_from(RECIPE_KEYS), VALUES, max_size=5)))
    if draw(st.booleans()):
        raw["lora"] = draw(st.dictionaries(st.sampled_from(OPTION_KEYS), VALUES, max_size=4))
    return raw


@fuzz_settings(60)
@given(
    raw=recipes(),
    text=st.none() | st.text(max_size=40),
    flags=st.lists(st.sampled_from(FLAGS) | st.text(max_size=6), max_size=6),
)
def test_fuzzed_recipes_and_flags(raw, text, flags):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "recipe.yaml")
        with open(path, "w") as fh:
            fh.write(text if text is not None else yaml.safe_dump(raw))

        def build():
            loaded = recipe.load_recipe(path, list(flags))
            run, train, options = recipe.split_recipe(loaded)
            return recipe.make_peft_config(run, options, 10)

        own_error_or_result(build)
        own_error_or_result(lambda: recipe.load_train_args([str(f) for f in flags]))


# --- data files ---------------------------------------------------------------------------------------------------
TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))
    | st.sampled_from(['"', "'", "\n", "\r", ",", "\t", "\\", " ", "\ufeff"]),
    max_size=16,
)
COLUMNS = ["text", "label", "extra", "Text", "label ", "instruction", "output", "input", "messages"]
CELL = TEXT | st.sampled_from(["pos", "neg", "unseen", "", "0", "1"]) | st.integers(-2, 3) | st.none() | NASTY


@st.composite
def data_file(draw, folder, name):
    """A table written the way careless files are: odd encodings, empty rows, quotes and newlines in cells,
    missing and extra columns, values of every type, now and then plain garbage."""
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl", "json"]))
    path = os.path.join(folder, f"{name}.{fmt}")
    if draw(st.integers(0, 9)) == 0:
        with open(path, "wb") as fh:
            fh.write(draw(st.binary(max_size=40)))
        return path
    columns = draw(st.lists(st.sampled_from(COLUMNS), unique=True, min_size=0, max_size=4))
    rows = draw(st.lists(st.fixed_dictionaries({c: CELL for c in columns}), max_size=8))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        writer = csv.writer(
            buf,
            delimiter="," if fmt == "csv" else "\t",
            quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
        )
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
            if draw(st.integers(0, 4)) == 0:
                buf.write("\n")  # an empty row
        text = buf.getvalue()
    elif fmt == "jsonl":
        text = "\n".join(json.dumps(r) if draw(st.integers(0, 9)) else "{broken" for r in rows)
    else:
        text = json.dumps(rows if draw(st.booleans()) else {"data": rows})
    with open(path, "w", encoding=encoding, errors="replace", newline="") as fh:
        fh.write(text)
    return path


@fuzz_settings(40)
@given(data=st.data(), task=st.sampled_from(["seq-cls", "causal-lm"]), eval_file=st.booleans())
def test_fuzzed_data_files(data, task, eval_file):
    tokenizer = word_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        raw = {"model": "unused", "task": task, "train_file": data.draw(data_file(tmp, "train"))}
        if eval_file:
            raw["eval_file"] = data.draw(data_file(tmp, "eval"))
        raw.update(data.draw(st.fixed_dictionaries({}, optional={"text_column": st.sampled_from(COLUMNS)})))

        def prepare():
            run, train, _ = recipe.split_recipe(recipe.load_recipe(None, raw))
            run.max_length = 16
            tables, _report = recipe.prepare_data(run, train.seed)  # what train_from_recipe does
            sources = recipe.data_sources(run)
            labels = recipe.fit_labels(run, tables["train"])
            recipe.check_labels(run, labels, tables, sources)
            task_ = recipe.build_task(run, tokenizer, labels)
            return {name: task_.prepare(table, sources[name]) for name, table in tables.items()}

        own_error_or_result(prepare)
