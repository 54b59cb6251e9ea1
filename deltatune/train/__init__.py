"""Training: data loading, tasks, the trainer, schedules, metrics, distillation and recipes."""

from deltatune.train.data import Cleaning, DataError, LabelMap, load_table
from deltatune.train.schedules import Schedule, make_optimizer
from deltatune.train.tasks import (
    CausalLMTask,
    CustomTask,
    ImageClassificationTask,
    MultiLabelClassificationTask,
    QuestionAnsweringTask,
    RegressionTask,
    Seq2SeqTask,
    SequenceClassificationTask,
    SummarizationTask,
    TokenClassificationTask,
    TranslationTask,
)
from deltatune.train.trainer import TrainConfig, Trainer

__all__ = [
    "CausalLMTask",
    "Cleaning",
    "CustomTask",
    "DataError",
    "ImageClassificationTask",
    "LabelMap",
    "MultiLabelClassificationTask",
    "QuestionAnsweringTask",
    "RegressionTask",
    "Schedule",
    "Seq2SeqTask",
    "SequenceClassificationTask",
    "SummarizationTask",
    "TokenClassificationTask",
    "TranslationTask",
    "TrainConfig",
    "Trainer",
    "load_table",
    "make_optimizer",
]
