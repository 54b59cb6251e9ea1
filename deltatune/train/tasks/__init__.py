"""Tasks: one file per task, and `TASKS`, the one list recipes, the CLI and the server read.

Adding a task = a `Task` subclass in its own file (with `name`, `from_run` and, if it learns labels, `fit_labels`)
+ one line in `TASKS` + a recipe under recipes/.
"""

from deltatune.train.tasks.base import (
    StepOutput,
    Task,
    evaluating,
    logits_of,
    model_inputs,
    real_token_logits,
    to_device,
)
from deltatune.train.tasks.causal_lm import CausalLMTask
from deltatune.train.tasks.classification import SequenceClassificationTask
from deltatune.train.tasks.custom import CustomTask
from deltatune.train.tasks.detection import DetectionTask
from deltatune.train.tasks.image_classification import ImageClassificationTask, image_folder
from deltatune.train.tasks.multilabel import MultiLabelClassificationTask
from deltatune.train.tasks.qa import GenerativeQATask, QuestionAnsweringTask
from deltatune.train.tasks.rec import RecTask
from deltatune.train.tasks.regression import RegressionTask
from deltatune.train.tasks.segmentation import SegmentationTask
from deltatune.train.tasks.seq2seq import Seq2SeqTask
from deltatune.train.tasks.summarization import SummarizationTask
from deltatune.train.tasks.text_to_image import TextToImageTask
from deltatune.train.tasks.text_to_text import TextToTextTask
from deltatune.train.tasks.token_classification import TokenClassificationTask
from deltatune.train.tasks.translation import TranslationTask

# recipe name -> task class
TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (
        SequenceClassificationTask,
        RegressionTask,
        MultiLabelClassificationTask,
        TokenClassificationTask,
        QuestionAnsweringTask,
        CausalLMTask,
        Seq2SeqTask,
        SummarizationTask,
        TranslationTask,
        ImageClassificationTask,
        DetectionTask,
        SegmentationTask,
        TextToImageTask,
        RecTask,
        CustomTask,
    )
}

__all__ = [
    "TASKS",
    "CausalLMTask",
    "CustomTask",
    "DetectionTask",
    "GenerativeQATask",
    "ImageClassificationTask",
    "MultiLabelClassificationTask",
    "QuestionAnsweringTask",
    "RecTask",
    "RegressionTask",
    "SegmentationTask",
    "Seq2SeqTask",
    "SequenceClassificationTask",
    "StepOutput",
    "SummarizationTask",
    "Task",
    "TextToImageTask",
    "TextToTextTask",
    "TokenClassificationTask",
    "TranslationTask",
    "evaluating",
    "image_folder",
    "logits_of",
    "model_inputs",
    "real_token_logits",
    "to_device",
]
