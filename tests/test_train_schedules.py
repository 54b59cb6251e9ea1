"""Every learning-rate schedule against its closed form, warmup included, and the loss-adaptive rule."""

import math

import pytest
import torch

from deltatune.train.schedules import Schedule, make_optimizer


def run(name, steps=10, warmup=0, losses=None, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = Schedule(opt, name, total_steps=steps, warmup_steps=warmup, **kw)
    lrs = []
    for t in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(None if losses is None else losses[t])
    return lrs


def test_constant_with_warmup():
    assert run("constant", 6, warmup=3) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])


def test_linear_decays_to_min_lr():
    lrs = run("linear", 10, warmup=2, min_lr=0.1)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    # after warmup: min + (1 - min) * (1 - t / 8), t = 0..7
    assert lrs[2:] == pytest.approx([0.1 + 0.9 * (1 - t / 8) for t in range(8)])


def test_cosine_matches_formula():
    lrs = run("cosine", 12, warmup=2)
    assert lrs[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    assert lrs[2] == pytest.approx(1.0)


def test_exponential_with_floor():
    lrs = run("exponential", 8, warmup=1, gamma=0.5, min_lr=0.05)
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.05, 0.05])


def test_loss_adaptive_follows_loss_ratio_within_bounds():
    losses = [4.0, 2.0, 1.0, 2.0, 0.001, 1.0]
    lrs = run("loss-adaptive", 6, losses=losses, min_lr=0.1, max_lr=1.5)
    # lr_{t+1} = lr_t * L_t / L_{t-1}, clamped to [0.1, 1.5]
    expected = [1.0, 1.0]
    for t in range(1, 5):
        expected.append(min(1.5, max(0.1, expected[-1] * losses[t] / losses[t - 1])))
    assert lrs == pytest.approx(expected)
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.5, 0.1])


def test_loss_adaptive_needs_loss_and_warms_up():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = Schedule(opt, "loss-adaptive", total_steps=5, warmup_steps=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs the step's loss"):
        sched.step()


def test_state_dict_round_trip_resumes_exactly():
    losses = [3.0, 2.0, 2.5, 1.0, 0.5, 0.7]
    full = run("loss-adaptive", 6, losses=losses, min_lr=0.01)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = Schedule(opt, "loss-adaptive", total_steps=6, min_lr=0.01)
    for loss in losses[:3]:
        first.step(loss)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    second = Schedule(opt2, "loss-adaptive", total_steps=6, min_lr=0.01)
    second.load_state_dict(first.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(full[3])


@pytest.mark.parametrize(
    "bad",
    [
        dict(name="triangle"),
        dict(name="linear", warmup_steps=-1),
        dict(name="exponential", gamma=1.5),
        dict(name="linear", min_lr=2.0),
    ],
)
def test_bad_schedule_options(bad):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):
        Schedule(opt, total_steps=10, **bad)


@pytest.mark.parametrize(
    "name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_optimizers(name, cls):
    assert isinstance(make_optimizer([torch.nn.Parameter(torch.zeros(1))], name, lr=0.1), cls)


@pytest.mark.parametrize("lr", [-1e-4, 0.0])
def test_non_positive_lr_is_refused(lr):
    with pytest.raises(ValueError, match="must be positive"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], "adamw", lr=lr)


@pytest.mark.parametrize(
    "rows,batch,world,accum", [(10, 3, 1, 1), (10, 3, 2, 1), (37, 4, 2, 3), (9, 2, 4, 2), (8, 8, 1, 3)]
)
def test_planned_steps_are_the_steps_the_trainer_takes(rows, batch, world, accum):
    """One rule for the number of optimizer steps: the schedule / AdaLoRA budget plan what the trainer runs."""
    from deltatune.train.trainer import TrainConfig, Trainer, planned_steps

    config = TrainConfig(batch_size=batch, grad_accum=accum, epochs=2)
    trainer = Trainer.__new__(Trainer)
    trainer.config, trainer.lengths, trainer.world, trainer.rank = config, [1] * rows, world, 0
    taken = sum(len(trainer._batches_of_epoch(epoch)) for epoch in range(2))
    assert planned_steps(config, rows, world) == taken


def test_bitsandbytes_8bit_adamw_keeps_8bit_states_and_tracks_adamw():
    """adamw_8bit stores its moments in 8 bits and takes (nearly) the steps AdamW takes."""
    pytest.importorskip("bitsandbytes")
    from deltatune.errors import ConfigError

    torch.manual_seed(0)
    x, y = torch.randn(64, 512), torch.randn(64, 512)
    losses = {}
    for name in ("adamw", "adamw_8bit"):
        torch.manual_seed(1)
        model = torch.nn.Linear(512, 512)
        opt = make_optimizer(model.parameters(), name, lr=1e-3)
        for _ in range(5):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses[name] = ((model(x) - y) ** 2).mean().item()
        if name == "adamw_8bit":
            assert {
                t.dtype for t in opt.state[model.weight].values() if torch.is_tensor(t) and t.numel() > 1
            } >= {torch.uint8}
    assert losses["adamw_8bit"] == pytest.approx(losses["adamw"], rel=0.02)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            make_optimizer(torch.nn.Linear(2, 2).parameters(), "paged_adamw")
