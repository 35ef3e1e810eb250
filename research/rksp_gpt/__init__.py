"""RKSP research transformer: GPT-style decoder / ViT-style encoder with a switchable normalisation placement.

Importing this package registers `rksp_gpt` with the Auto classes (`import hf_koopman` does not).
"""

from __future__ import annotations

from .configuration_rksp_gpt import NORM_TYPES, RKSPGPTConfig
from .modeling_rksp_gpt import (
    RKSPGPTForCausalLM,
    RKSPGPTForSequenceClassification,
    RKSPGPTModel,
    RKSPGPTPreTrainedModel,
    RKSPViTForImageClassification,
    RKSPViTModel,
)

__all__ = [
    "NORM_TYPES",
    "RKSPGPTConfig",
    "RKSPGPTPreTrainedModel",
    "RKSPGPTModel",
    "RKSPGPTForCausalLM",
    "RKSPGPTForSequenceClassification",
    "RKSPViTModel",
    "RKSPViTForImageClassification",
    "register",
]


def register() -> None:
    """Register `rksp_gpt` with AutoConfig / AutoModel / AutoModelFor{CausalLM,SequenceClassification,ImageClassification}.

    Idempotent (`exist_ok=True`); called when `research.rksp_gpt` is imported.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    AutoConfig.register(RKSPGPTConfig.model_type, RKSPGPTConfig, exist_ok=True)
    AutoModel.register(RKSPGPTConfig, RKSPGPTModel, exist_ok=True)
    AutoModelForCausalLM.register(RKSPGPTConfig, RKSPGPTForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(RKSPGPTConfig, RKSPGPTForSequenceClassification, exist_ok=True)
    AutoModelForImageClassification.register(RKSPGPTConfig, RKSPViTForImageClassification, exist_ok=True)


register()
