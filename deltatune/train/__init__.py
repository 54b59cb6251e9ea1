"""Training: data loading, tasks, the trainer, schedules, metrics, distillation and recipes."""

from deltatune.train.data import Cleaning, DataError, LabelMap, load_table
from deltatune.train.schedules import Schedule, make_optimizer
from deltatune.train.tasks import (
    CausalLMTask,
    CustomTask,
    ImageClassificationTask,
    Seq2SeqTask,
    SequenceClassificationTask,
    TokenClassificationTask,
)
from deltatune.train.trainer import TrainConfig, Trainer

__all__ = [
    "CausalLMTask",
    "Cleaning",
    "CustomTask",
    "DataError",
    "ImageClassificationTask",
    "LabelMap",
    "Schedule",
    "Seq2SeqTask",
    "SequenceClassificationTask",
    "TokenClassificationTask",
    "TrainConfig",
    "Trainer",
    "load_table",
    "make_optimizer",
]
