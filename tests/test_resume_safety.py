"""Resume checkpoints (issue 15): `checkpoint-last.pt` is read with `weights_only=True`, so resuming never runs code
hidden in a pickle, and a damaged or foreign checkpoint is a clear CheckpointError, never a raw unpickling error."""

import os
import pickle

import pytest
import torch
from test_train_trainer import config, lora_mlp, mlp_data, mlp_loss

from deltatune.errors import CheckpointError
from deltatune.train import CustomTask, Trainer
from deltatune.train.trainer import CHECKPOINT

MARKER = "deltatune-pickle-payload-ran"


class Payload:
    """An object whose unpickling would create a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def trainer(tmp_path, **kw):
    cfg = config(tmp_path, **{"max_steps": 4, "save_every": 2, **kw})
    return Trainer(lora_mlp(), CustomTask(mlp_loss), mlp_data(16), None, cfg)


def test_resume_round_trips_without_unpickling_objects(tmp_path):
    trainer(tmp_path).train()
    path = os.path.join(tmp_path, "run", CHECKPOINT)
    state = torch.load(path, weights_only=True)  # raises if anything but tensors and plain values is inside
    assert state["position"]["global_step"] == 4
    resumed = trainer(tmp_path, resume=True, resume_with_changes=True, max_steps=6)
    summary = resumed.train()
    assert summary["steps"] == 6


def test_a_pickled_object_in_the_checkpoint_is_never_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / MARKER
    with open(out / CHECKPOINT, "wb") as fh:
        pickle.dump({"weights": Payload(str(marker))}, fh, protocol=2)
    with pytest.raises(
        CheckpointError, match=f"{CHECKPOINT} cannot be read: it holds Python objects.*delete"
    ):
        trainer(tmp_path, resume=True).train()
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "list", "foreign"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    trainer(tmp_path).train()
    path = tmp_path / "run" / CHECKPOINT
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "list":
        torch.save([1, 2, 3], path)
    else:  # a checkpoint of another model: weights under other names
        state = torch.load(path, weights_only=True)
        state["weights"] = {"other.weight": torch.zeros(2)}
        torch.save(state, path)
    with pytest.raises(CheckpointError, match=CHECKPOINT):
        trainer(tmp_path, resume=True).train()
