"""deltatune: parameter-efficient fine-tuning for PyTorch, with the API and file format of the `peft` package.

import deltatune as peft
model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules="all-linear"))
"""

from deltatune.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from deltatune.config import PeftConfig, TaskType
from deltatune.errors import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    DataError,
    DeltatuneError,
    MergeError,
    UnsupportedModelError,
)
from deltatune.functional import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from deltatune.integrations import transformers as _transformers_integration
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.adapters import BottleneckConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.freeze import FreezeConfig, FullConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.methods.mam import MAMConfig
from deltatune.methods.prefix import PrefixTuningConfig, PTuningV2Config
from deltatune.methods.prompt import (
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from deltatune.methods.prompt_learning import PromptLearningConfig
from deltatune.methods.unipelt import UniPELTConfig
from deltatune.model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from deltatune.quant import prepare_model_for_kbit_training, quantize
from deltatune.registry import METHODS, PeftType
from deltatune.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from deltatune.version import __version__ as __version__

# transformers' Trainer and trl treat deltatune models as peft models (see deltatune/integrations/transformers.py).
_transformers_integration.install()

__all__ = [
    "METHODS",
    "AdaLoraConfig",
    "AdapterNotFoundError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeltatuneError",
    "MergeError",
    "UnsupportedModelError",
    "BitFitConfig",
    "BottleneckConfig",
    "FreezeConfig",
    "FullConfig",
    "IA3Config",
    "LoraConfig",
    "MAMConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PTuningV2Config",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "UniPELTConfig",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "set_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "quantize",
]
