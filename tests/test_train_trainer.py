"""The Trainer: learning, accumulation, hooks, early stopping, distillation, outputs, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama, tiny_mlp

from deltatune import LoraConfig, get_peft_model
from deltatune.errors import ConfigError
from deltatune.train import CausalLMTask, CustomTask, TrainConfig, Trainer
from deltatune.train.distill import distillation_loss
from deltatune.train.trainer import fingerprint_changes

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def mlp_data(n=48, seed=0):
    """Rows of 5 token ids drawn from a range that depends on the class (6 ids per class), easy for a bag model."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randint(0, 6, (n, 5), generator=g) + 6 * y[:, None]
    return [(row, int(c)) for row, c in zip(x, y)]


def mlp_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def lora_mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return get_peft_model(
        tiny_mlp(seed),
        LoraConfig(r=4, target_modules=["lin0", "lin1"], lora_dropout=dropout, modules_to_save=["head"]),
    )


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        batch_size=8,
        lr=1e-2,
        progress=False,
        tensorboard=False,
        plot=False,
        scheduler="constant",
        num_threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_loss_goes_down_and_outputs_are_written(tmp_path):
    data = mlp_data(96)
    trainer = Trainer(
        lora_mlp(),
        CustomTask(mlp_loss),
        data,
        data[:24],
        config(tmp_path, epochs=6, lr=3e-2, tensorboard=True, plot=True, eval_every=12),
    )
    summary = trainer.train()
    out = tmp_path / "run"
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 72 and sum(losses[-12:]) / 12 < 0.6 * sum(losses[:12]) / 12
    assert all({"lr", "tokens_per_s", "grad_norm"} <= set(r) for r in log if "loss" in r)
    assert any("eval_loss" in r for r in log)
    assert (out / "curves.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    saved = json.load(open(out / "train_summary.json"))
    assert saved["trainable_params"] == summary["trainable_params"] > 0
    assert saved["total_params"] > saved["trainable_params"]
    assert saved["peak_memory_mb"] > 0 and saved["wall_time_s"] > 0 and "eval_loss" in saved["final"]


def test_the_last_epoch_is_scored_before_the_best_weights_are_restored(tmp_path):
    """Epoch-end evaluation (eval_every=0) scores every epoch, the last one included; otherwise the best weights
    restored at the end would always be an earlier epoch's and the last epoch's training would be thrown away."""
    data = mlp_data(48)
    model = lora_mlp()
    Trainer(model, CustomTask(mlp_loss), data, data[:16], config(tmp_path, epochs=2, lr=3e-2)).train()
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log if "eval_loss" in r] == [6, 12]


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    """2 micro-batches of 4 (mean loss over equal halves) give the same update as one batch of 8."""
    data = mlp_data(32)
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        model = lora_mlp()
        Trainer(
            model,
            CustomTask(mlp_loss),
            data,
            None,
            config(tmp_path / f"{bs}", batch_size=bs, grad_accum=accum, max_steps=3, optimizer="sgd"),
        ).train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    # the (4, 2) run sees the same rows per step because batches of 4 are cut from the same shuffled order
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def _one_sgd_step(tmp_path, **kw):
    """The change of every trainable tensor after one plain SGD step (no momentum, clipping or schedule)."""
    model = lora_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = config(tmp_path, max_steps=1, optimizer="sgd", momentum=0.0, max_grad_norm=0.0, **kw)
    Trainer(model, CustomTask(mlp_loss), mlp_data(32), None, cfg).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_head_lr_trains_the_task_head_at_its_own_rate(tmp_path):
    """The head (modules_to_save) moves head_lr / lr as far as it does at lr; the adapter moves exactly as before."""
    plain = _one_sgd_step(tmp_path / "plain")
    split = _one_sgd_step(tmp_path / "split", head_lr=2.5e-3)
    head = [n for n in plain if ".modules_to_save." in n]
    moved = {n for n, delta in plain.items() if delta.abs().max() > 0}  # lora_A waits for lora_B's first step
    assert head and set(head) <= moved and moved - set(head)
    for name in plain:
        expected = plain[name] * (2.5e-3 / 1e-2) if name in head else plain[name]
        torch.testing.assert_close(
            split[name], expected, rtol=1e-4, atol=5e-8
        )  # float32 rounding of p + delta


def test_head_lr_without_a_trained_head_is_refused(tmp_path):
    model = get_peft_model(tiny_mlp(0), LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    cfg = config(tmp_path, max_steps=1, head_lr=1e-3)
    with pytest.raises(ConfigError, match="head_lr is set, but no task head is trained"):
        Trainer(model, CustomTask(mlp_loss), mlp_data(16), None, cfg).train()
    with pytest.raises(ConfigError, match="head_lr must be positive"):
        config(tmp_path, head_lr=0.0)


def test_a_setting_missing_from_an_old_checkpoint_counts_as_unset():
    assert fingerprint_changes({"lr": 0.1}, {"lr": 0.1, "head_lr": None}) == []
    assert fingerprint_changes({"lr": 0.1}, {"lr": 0.1, "head_lr": 0.01}) == ["head_lr: '(unset)' -> 0.01"]


def test_on_optimizer_step_is_called_each_step(tmp_path):
    model = lora_mlp()
    seen = []
    model.on_optimizer_step = seen.append  # the PeftModel hook AdaLoRA relies on
    Trainer(model, CustomTask(mlp_loss), mlp_data(32), None, config(tmp_path, max_steps=5)).train()
    assert seen == [0, 1, 2, 3, 4]  # the 0-based index of the step just taken, as peft's loops pass it


def test_early_stopping_keeps_the_best_weights(tmp_path):
    data = mlp_data(32)
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.55, 0.9])

    def metrics_fn(model, features):
        return {"score": next(scores)}

    model = lora_mlp()
    snapshots = {}

    def remember(trainer, record):
        snapshots[trainer.pos.global_step] = {n: p.detach().clone() for n, p in trainer.trainable().items()}

    task = CustomTask(mlp_loss, metrics_fn=metrics_fn)
    cfg = config(
        tmp_path,
        max_steps=40,
        eval_every=2,
        metric="score",
        greater_is_better=True,
        early_stopping_patience=3,
    )
    trainer = Trainer(model, task, data, data[:8], cfg, callbacks=[remember])
    summary = trainer.train()
    # evaluations at steps 2, 4, ...: best (0.7) at step 4, then three without improvement -> stop at step 10
    assert summary["steps"] == 10 and summary["stopped_early"]
    best = torch.load(tmp_path / "run" / "checkpoint-best.pt", weights_only=False)
    assert best["step"] == 4
    for name, p in trainer.trainable().items():
        torch.testing.assert_close(p.detach(), snapshots[4][name])


def test_distillation_loss_matches_the_formula():
    torch.manual_seed(0)
    s, t, hard = torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.5)
    T, a = 3.0, 0.7
    kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    assert distillation_loss(s, t, hard, T, a) == pytest.approx(
        float(a * T * T * kl + (1 - a) * hard), rel=1e-5
    )
    assert distillation_loss(s, t, hard, T, 0.0) == pytest.approx(1.5)
    assert float(distillation_loss(s, s, hard, T, 1.0)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, hard, 0.0, a)


def test_distillation_pulls_the_student_toward_the_teacher(tmp_path):
    data = mlp_data(48)
    teacher = tiny_mlp(seed=5)
    student = lora_mlp()
    x = torch.stack([row for row, _ in data])

    def gap():
        with torch.no_grad():
            return float(
                F.kl_div(F.log_softmax(student(x), -1), F.softmax(teacher(x), -1), reduction="batchmean")
            )

    before = gap()
    Trainer(
        student,
        CustomTask(mlp_loss),
        data,
        None,
        config(tmp_path, epochs=5, distill_alpha=1.0, lr=3e-2),
        teacher=teacher,
    ).train()
    assert gap() < 0.5 * before


def test_bf16_autocast_on_cpu_and_gradient_checkpointing(tmp_path):
    from helpers import word_tokenizer

    tok = word_tokenizer()
    tok.chat_template = None
    rows = [
        {"instruction": "say good", "output": "good movie"},
        {"instruction": "say bad", "output": "bad film"},
    ] * 4
    task = CausalLMTask(tok, max_length=32, generate_samples=0)
    features = task.prepare(rows)
    losses = {}
    for gc in (False, True):
        model = get_peft_model(tiny_llama(vocab_size=len(tok)), LoraConfig(r=4, target_modules="all-linear"))
        Trainer(
            model,
            task,
            features,
            None,
            config(tmp_path / str(gc), max_steps=2, gradient_checkpointing=gc, lr=1e-3),
        ).train()
        losses[gc] = [json.loads(x)["loss"] for x in open(tmp_path / str(gc) / "run" / "log.jsonl")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    model = get_peft_model(tiny_llama(vocab_size=len(tok)), LoraConfig(r=4, target_modules="all-linear"))
    summary = Trainer(
        model, task, features, features, config(tmp_path / "bf16", max_steps=2, precision="bf16")
    ).train()
    assert summary["steps"] == 2 and summary["final"]["eval_loss"] > 0


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bf16 on CPU"):
        Trainer(
            lora_mlp(),
            CustomTask(mlp_loss),
            mlp_data(8),
            None,
            config(tmp_path, precision="fp16", max_steps=1),
        ).train()


# --- resume after SIGKILL ----------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from test_train_trainer import config, lora_mlp, mlp_data, mlp_loss
    from deltatune.train import CustomTask, Trainer
    import pathlib
    out, resume, delay = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
    torch.manual_seed(123)  # LoRA init; a resumed run overwrites it from the checkpoint
    model = lora_mlp(dropout=0.2)  # dropout: the resumed run must restore the RNG too
    slow = [lambda trainer, record: time.sleep(delay)]
    cfg = config(out, epochs=4, batch_size=4, save_every=5, resume=resume, lr=2e-2, optimizer="adamw",
                 scheduler="cosine", warmup_steps=3)
    Trainer(model, CustomTask(mlp_loss), mlp_data(40), None, cfg, callbacks=slow).train()
    """
)


def _run(script, out, resume, delay):
    return subprocess.Popen(
        [sys.executable, str(script), str(out), "1" if resume else "0", str(delay)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "run" / "log.jsonl")) if "loss" in r}


def test_resume_after_sigkill_reproduces_the_loss_curve(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(tests=HERE))
    reference = _run(script, tmp_path / "ref", False, 0.0)
    assert reference.wait(timeout=240) == 0, reference.stderr.read().decode()[-2000:]

    victim = _run(script, tmp_path / "kill", False, 0.2)
    ckpt = tmp_path / "kill" / "run" / "checkpoint-last.pt"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        if ckpt.exists():
            step = torch.load(ckpt, weights_only=False)["position"]["global_step"]
            if step >= 12 and max(_losses(tmp_path / "kill"), default=0) > step:
                victim.send_signal(signal.SIGKILL)  # mid-epoch (10 steps per epoch) and after the checkpoint
                killed_at = step
                break
        time.sleep(0.02)
    victim.wait(timeout=30)
    assert killed_at is not None and killed_at % 10 != 0, "the run was not killed mid-epoch"
    assert victim.returncode == -signal.SIGKILL

    resumed = _run(script, tmp_path / "kill", True, 0.0)
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read().decode()[-2000:]
    ref, res = _losses(tmp_path / "ref"), _losses(tmp_path / "kill")
    assert sorted(res) == sorted(ref) == list(range(1, 41))
    assert [res[s] for s in sorted(res)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-6, abs=1e-7)
