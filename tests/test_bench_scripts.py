"""The benchmark scripts under bench/ keep running: each is exercised on a tiny model (this measures nothing)."""

import importlib.util
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("setting", ["deltatune-lora", "peft-lora"])
def test_gpu_sft_bench_runs_on_a_tiny_model(setting):
    gpu_sft = _load("gpu_sft")
    row = gpu_sft.one(setting, steps=2, warmup=1, batch=2, length=16, shape=gpu_sft.TINY)
    assert row["steps_timed"] == 2 and row["tokens_per_s"] > 0
    assert "tokens/s" in gpu_sft.markdown([row])
