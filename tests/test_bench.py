"""`deltatune bench --quick` on a tiny model, so the command cannot rot. Speed is never asserted here."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from helpers import sentiment_rows, word_tokenizer, write_csv
from typer.testing import CliRunner

from deltatune import registry
from deltatune.apps.bench import BenchSettings, method_names
from deltatune.apps.bench.tasks import load_tables
from deltatune.apps.cli import app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer BERT 64 wide (4-bit CPU quantization needs widths divisible by 64) and SST-2-shaped TSVs."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bench")
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=2,
    )
    model_dir = str(root / "model")
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    header = ("sentence", "label")
    write_csv(str(data / "train.tsv"), sentiment_rows(160, seed=1), header, "\t")
    dev = sentiment_rows(41, seed=2)
    write_csv(str(data / "dev.tsv"), dev, header, "\t")
    return {"model": model_dir, "data": str(data), "dev": dev, "root": root}


def _bench(tiny, out: str, *extra: str):
    args = ["bench", "--quick", "--models", tiny["model"], "--data-dir", tiny["data"], "--out", out, *extra]
    return CliRunner().invoke(app, args)


def _report(out: str) -> dict:
    with open(os.path.join(out, "bench.json")) as fh:
        return json.load(fh)


def test_bench_rows_come_from_the_registry():
    """One row per distinct variant: aliases building the same adapter are one row, the more specific name kept."""
    names = method_names("seq-cls")
    assert {"lora", "rslora", "dora", "qlora", "houlsby", "pfeiffer", "parallel", "full"} <= set(names)
    assert not {"prompt", "ptuning", "bottleneck", "adapter", "prefix_tuning", "ptuning_v2"} & set(names)
    every_method = {registry.resolve_variant(n)[0].peft_type for n in names}
    assert every_method == {m.peft_type for m in registry.METHODS}
    assert len(names) == len(set(names))


def test_quick_bench_runs_every_method(tiny):
    out = str(tiny["root"] / "results")
    result = _bench(tiny, out, "--no-isolate", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    assert {"bench.json", "bench.md", "bench_sst2.png"} <= set(os.listdir(out))
    report = _report(out)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == method_names("seq-cls")
    failed = {name: r["status"] for name, r in rows.items() if r["status"] != "ok"}
    assert not failed
    for name, r in rows.items():
        assert r["steps"] == 3 and r["lr"] == pytest.approx(registry.resolve_variant(name)[0].typical_lr), (
            name
        )
        assert 0 < r["trainable_params"] <= r["total_params"], name
        assert r["stored_bytes"] > 0 and r["stored_params"] > 0, name
        assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0, name
        assert 0 <= r["dev_score"] <= 1 and 0 <= r["val_score"] <= 1, name
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"] == rows["full"]["model_params"]
    assert rows["full"]["added_params"] == 0
    assert rows["bitfit"]["added_params"] == 64 * 2 + 2  # only the trained copy of the classifier head
    lora = rows["lora"]
    assert 0 < lora["added_params"] and lora["trainable_params"] < rows["full"]["trainable_params"]
    # the majority baseline, recomputed by hand from the files
    tables = load_tables(BenchSettings.quick().task("sst2"), tiny["data"])
    assert len(tables["train"]) == 128 and len(tables["validation"]) == 32
    assert not set(tables["train"]["sentence"]) & set(tables["validation"]["sentence"]) - set(
        tables["dev"]["sentence"]
    )
    counts = Counter(tables["train"]["label"])
    assert counts[0] != counts[1]  # no tie, so the majority label is unambiguous
    majority = counts.most_common(1)[0][0]
    expected = sum(y == majority for _, y in tiny["dev"]) / len(tiny["dev"])
    assert report["baselines"]["sst2"]["score"] == pytest.approx(expected)
    table = open(os.path.join(out, "bench.md")).read()
    assert "Majority class" in table and all(f"| {name} |" in table for name in rows)
    assert "Load average" in table


def test_isolated_runs_are_cached_and_bad_input(tiny):
    out = str(tiny["root"] / "isolated")
    result = _bench(tiny, out, "--methods", "lora,ia3", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    rows = _report(out)["rows"]
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    assert all(r["status"] == "ok" and r["peak_rss_mb"] > 0 for r in rows), rows
    again = _bench(tiny, out, "--methods", "lora", "--max-steps", "2", "--report-only")
    assert again.exit_code == 0 and _report(out)["rows"][0]["dev_score"] == rows[0]["dev_score"]

    bad = _bench(tiny, out, "--methods", "lora,nope")
    assert bad.exit_code == 2 and "nope" in bad.output
    missing = CliRunner().invoke(app, ["bench", "--quick", "--data-dir", str(tiny["root"]), "--out", out])
    assert missing.exit_code == 2 and "train.tsv" in missing.output


def test_sweep_picks_on_validation_and_seeds_average(tiny):
    out = str(tiny["root"] / "seeds")
    args = (
        "--methods",
        "lora",
        "--max-steps",
        "2",
        "--seeds",
        "0,1",
        "--lr-factors",
        "0.1,1",
        "--no-isolate",
    )
    result = _bench(tiny, out, *args)
    assert result.exit_code == 0, result.output
    (row,) = _report(out)["rows"]
    sweep = {s["lr"]: s["val_score"] for s in row["sweep"]}
    assert len(sweep) == 2 and row["lr"] in sweep and row["val_score"] == max(sweep.values())
    scores = list(row["seed_scores"].values())
    assert sorted(row["seed_scores"]) == ["0", "1"] or sorted(row["seed_scores"]) == [0, 1]
    assert row["dev_score"] == pytest.approx(sum(scores) / 2)
    assert row["dev_std"] == pytest.approx(abs(scores[0] - scores[1]) / 2**0.5)
    assert "±" in open(os.path.join(out, "bench.md")).read()

    bad = _bench(tiny, out, "--methods", "lora", "--seeds", "one")
    assert bad.exit_code == 2 and "--seeds" in bad.output
    negative = _bench(tiny, out, "--methods", "lora", "--extend-sweep", "-1")
    assert negative.exit_code == 2 and "--extend-sweep" in negative.output


def test_ablations_never_share_a_cached_run():
    """A run with method options (bench/prefix_init.py's zero prefixes) is cached apart from the plain run."""
    from deltatune.apps.bench.run import RunSpec

    task = BenchSettings.quick().task("sst2")
    plain = RunSpec("m", task, "mam", 3e-4, 0, "data")
    zero = RunSpec("m", task, "mam", 3e-4, 0, "data", options={"init_weights": "zero"})
    assert plain.key() != zero.key() and plain.path("out") != zero.path("out")
    assert zero.path("out").endswith("lr0.0003-seed0-init_weights=zero.json")


def test_a_trainer_option_reaches_the_trainer_and_not_the_method(tiny, monkeypatch):
    """bench/head_lr.py's ablation: options={"head_lr": ...} trains the head in its own optimizer group."""
    from deltatune.apps.bench.run import RunSpec, run_here
    from deltatune.train import trainer

    groups = []

    class Recording(trainer.Trainer):
        def _param_groups(self):
            found = super()._param_groups()
            groups.append([(len(g["params"]), g.get("lr")) for g in found])
            return found

    monkeypatch.setattr(trainer, "Trainer", Recording)
    task = BenchSettings.quick().task("sst2")
    spec = RunSpec(
        tiny["model"], task, "prompt_tuning", 0.03, 0, tiny["data"], max_steps=1, options={"head_lr": 1e-3}
    )
    row = run_here(spec)
    assert row["status"] == "ok", row
    assert groups == [
        [(1, None), (2, 1e-3)]
    ]  # the soft prompt at lr; the classifier's weight and bias at head_lr
    assert spec.path("out").endswith("lr0.03-seed0-head_lr=0.001.json")


def test_head_lr_ablation_script_compares_both_arms(tiny):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "head_lr.py")
    spec = importlib.util.spec_from_file_location("head_lr", path)
    head_lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head_lr)
    out = str(tiny["root"] / "head_lr")
    args = [
        "--model",
        tiny["model"],
        "--methods",
        "prompt_tuning=0.03",
        "--seeds",
        "0",
        "--max-steps",
        "1",
        "--rows",
        "64",
    ]
    assert head_lr.main([*args, "--data-dir", tiny["data"], "--budget-scale", "0.02", "--out", out]) == 0
    report = json.load(open(os.path.join(out, "head_lr.json")))
    assert [(r["head_lr"], r["status"]) for r in report["runs"]] == [("the prompt's", "ok"), ("0.001", "ok")]
    table = open(os.path.join(out, "head_lr.md")).read()
    assert "| prompt_tuning | 0.03 | 0.001 | 0: " in table
    with pytest.raises(SystemExit, match="METHOD=LR"):
        head_lr.parse_methods("prompt_tuning")


def test_prefix_init_arms_reuse_the_bench_runs_and_read_the_answer_position():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "prefix_init.py")
    spec = importlib.util.spec_from_file_location("prefix_init", path)
    prefix_init = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prefix_init)
    # the arm equal to the method's default is the bench's own run (no options, the same cache file)
    assert prefix_init.arm_options("prefix", {"init_weights": None}) == {}
    assert prefix_init.arm_options("prefix", {"init_weights": "zero"}) == {"init_weights": "zero"}
    assert prefix_init.arm_options("mam", {"init_weights": "zero"}) == {}
    assert prefix_init.build_config("prefix", {"init_weights": "zero"}).num_virtual_tokens == 20
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]])  # right-padded, left-padded, full
    assert prefix_init.read_position(mask, decoder=True).tolist() == [2, 3, 3]
    assert prefix_init.read_position(mask, decoder=False).tolist() == [0, 0, 0]


def test_the_base_and_its_fresh_head_are_built_under_the_runs_seed(tiny, monkeypatch):
    """A seq-cls head is initialised while the base loads; without the run's seed there, the same run gave
    different scores in two processes (val 0.80 vs 0.78 on all-MiniLM-L6-v2)."""
    from deltatune.train import recipe

    states = []
    load_base = recipe.load_base

    def recording(run, labels):
        states.append(torch.random.get_rng_state().clone())
        return load_base(run, labels)

    monkeypatch.setattr(recipe, "load_base", recording)
    for attempt, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)  # whatever ran before in this process
        args = ("--methods", "lora", "--max-steps", "1", "--no-isolate")
        result = _bench(tiny, str(tiny["root"] / f"seeded{attempt}"), *args)
        assert result.exit_code == 0, result.output
    assert len(states) == 2 and torch.equal(states[0], states[1])


def _sweep(*vals, rates=(0.01, 0.03, 0.09)):
    return [{"lr": lr, "val_score": v, "status": "ok"} for lr, v in zip(rates, vals)]


def test_a_rate_chosen_at_the_edge_of_the_sweep_is_flagged():
    from deltatune.apps.bench import Cell
    from deltatune.apps.bench.report import sweep_edge

    def cell(sweep):
        return Cell("m", BenchSettings.quick().task("sst2"), "prompt_tuning", sweep=sweep)

    assert "top of the sweep" in sweep_edge(cell(_sweep(0.23, 0.53, 0.61)))
    assert "bottom of the sweep" in sweep_edge(cell(_sweep(0.88, 0.87, 0.87)))
    assert sweep_edge(cell(_sweep(0.5, 0.8, 0.6))) == ""  # a peak inside the sweep
    assert (
        sweep_edge(cell(_sweep(0.87, 1.0, 1.0))) == ""
    )  # a tie at the edge goes to the rate nearer typical_lr
    assert sweep_edge(cell(_sweep(0.6))) == ""  # one rate: no sweep to be at the edge of
    unrun_bottom = [
        {"lr": 0.01, "val_score": None, "status": "not run"},
        *_sweep(0.84, 0.70, rates=(0.03, 0.09)),
    ]
    assert sweep_edge(cell(unrun_bottom)) == ""  # 0.01 did not run: 0.03 is not the sweep's bottom


def test_the_sweep_goes_past_a_rising_edge_and_the_seeds_follow(tiny, monkeypatch):
    """Validation rises with the rate here (val = lr), so every sweep ends at its top: it goes one x3 step further
    per `extend_sweep`, and the other seeds train at the extended rate."""
    import deltatune.apps.bench as bench

    ran = []

    def fake_runs(specs, s, out_dir, report_only):
        ran.extend(specs)
        return [
            {"lr": x.lr, "seed": x.seed, "status": "ok", "val_score": x.lr, "dev_score": 0.5} for x in specs
        ]

    monkeypatch.setattr(bench, "_run_all", fake_runs)
    from deltatune.apps.bench import report

    monkeypatch.setattr(report, "write", lambda *a, **k: None)  # fake rows have no measurements to tabulate
    monkeypatch.setattr(report, "cell_line", lambda *a: "")
    settings = BenchSettings(
        models=[tiny["model"]], methods=["lora"], seeds=[0, 1], data_dir=tiny["data"], rows=64, extend_sweep=2
    )
    result = bench.run_bench(settings, str(tiny["root"] / "extend"), log=lambda _: None)
    (cell,) = result["cells"]
    assert [r["lr"] for r in cell.sweep] == [0.000333, 0.001, 0.003, 0.009, 0.027]
    assert [(x.lr, x.seed) for x in ran[-1:]] == [(0.027, 1)]
    assert cell.rising_edge() == 1  # still rising after both extensions: the table says so
    none = BenchSettings(**{**settings.__dict__, "extend_sweep": 0})
    (plain,) = bench.run_bench(none, str(tiny["root"] / "extend0"), log=lambda _: None)["cells"]
    assert [r["lr"] for r in plain.sweep] == [0.000333, 0.001, 0.003]


def test_a_wide_spread_over_seeds_is_explained_by_the_training_losses():
    from deltatune.apps.bench.report import _note
    from deltatune.apps.bench.run import loss_ends

    assert loss_ends([0.9] * 10 + [0.5] * 10) == {"train_loss_start": 0.9, "train_loss_end": 0.5}
    assert loss_ends([]) == {"train_loss_start": None, "train_loss_end": None}

    def run(seed, score, start, end):
        return {
            "seed": seed,
            "status": "ok",
            "dev_score": score,
            "train_loss_start": start,
            "train_loss_end": end,
        }

    majority = {"score": 0.5}
    stuck = [run(0, 0.80, 0.70, 0.30), run(1, 0.51, 0.70, 0.66)]  # seed 1 fell 0.04 against 0.40
    note = _note(stuck, [0.80, 0.51], majority)
    assert "seed(s) 1 stayed at the majority class" in note
    assert "seed 1's training loss fell 0.04 against 0.40 for seed 0" in note and "not converged" in note
    slower = [run(0, 0.80, 0.70, 0.30), run(1, 0.70, 0.70, 0.42)]  # both trained, the worst ended highest
    note = _note(slower, [0.80, 0.70], majority)
    assert "seeds disagree" in note and "loss fell 0.40, 0.28), but seed 1 ended with the highest" in note
    alike = [run(0, 0.80, 0.70, 0.30), run(1, 0.70, 0.72, 0.28)]  # both fell ~0.4, the worst ended lower
    note = _note(alike, [0.80, 0.70], majority)
    assert "fell alike (0.40, 0.44)" in note and "generalise" in note
    assert _note(alike[:1] + [run(1, 0.79, 0.7, 0.3)], [0.80, 0.79], majority) == ""  # std <= 0.03: no note
    without_losses = [{**r, "train_loss_end": None} for r in stuck]
    assert _note(without_losses, [0.80, 0.51], majority).endswith("(0: 0.800, 1: 0.510)")
