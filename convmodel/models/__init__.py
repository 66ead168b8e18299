"""Pretraining LightningModules: one per model family, sharing PretrainingModule."""

from convmodel.models.base import PretrainingModule
from convmodel.models.bert import BertPretraining
from convmodel.models.gpt2 import Gpt2Pretraining
from convmodel.models.lean_albert_pretraining import LeanAlbertPretraining

__all__ = ["PretrainingModule", "BertPretraining", "Gpt2Pretraining", "LeanAlbertPretraining"]
