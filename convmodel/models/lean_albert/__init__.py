"""LeanALBERT as a transformers model, registered with the Auto classes.

Importing this package registers `model_type="lean_albert"` with AutoConfig and the Auto model
classes, and marks every class for `register_for_auto_class`, so `save_pretrained` copies
configuration_lean_albert.py, modeling_lean_albert.py and lean_ops.py next to the weights and a
process without convmodel loads the folder with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_lean_albert import LeanAlbertConfig
from .modeling_lean_albert import (
    LeanAlbertForMaskedLM,
    LeanAlbertForPreTraining,
    LeanAlbertForSequenceClassification,
    LeanAlbertForTokenClassification,
    LeanAlbertModel,
    LeanAlbertPreTrainedModel,
)

_AUTO_CLASSES = {
    LeanAlbertModel: AutoModel,
    LeanAlbertForPreTraining: AutoModelForPreTraining,
    LeanAlbertForMaskedLM: AutoModelForMaskedLM,
    LeanAlbertForSequenceClassification: AutoModelForSequenceClassification,
    LeanAlbertForTokenClassification: AutoModelForTokenClassification,
}

AutoConfig.register(LeanAlbertConfig.model_type, LeanAlbertConfig, exist_ok=True)
LeanAlbertConfig.register_for_auto_class("AutoConfig")
for _model_class, _auto_class in _AUTO_CLASSES.items():
    _auto_class.register(LeanAlbertConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

__all__ = [
    "LeanAlbertConfig",
    "LeanAlbertPreTrainedModel",
    "LeanAlbertModel",
    "LeanAlbertForPreTraining",
    "LeanAlbertForMaskedLM",
    "LeanAlbertForSequenceClassification",
    "LeanAlbertForTokenClassification",
]
