"""Training integration: `KSSTrainer` (Koopman Spectral Shaping), `RKSPCallback` (profiling + divergence guard)."""

from __future__ import annotations

from hf_koopman.training.arguments import KSSConfig, KSSTrainingArguments
from hf_koopman.training.callback import RKSPCallback
from hf_koopman.training.trainer import KSSTrainer


__all__ = ["KSSConfig", "KSSTrainer", "KSSTrainingArguments", "RKSPCallback"]
