"""Training integration: `KSSTrainer` (Koopman Spectral Shaping), `RKSPCallback` (profiling + divergence guard).

Imports are lazy, so `hf_koopman.training.divergence` (the divergence rule) loads without the `Trainer` stack.
"""

from __future__ import annotations

import importlib
from typing import Any


__all__ = ["DivergedModelError", "KSSConfig", "KSSTrainer", "KSSTrainingArguments", "RKSPCallback"]

_HOMES = {
    "KSSConfig": "hf_koopman.training.arguments",
    "KSSTrainingArguments": "hf_koopman.training.arguments",
    "RKSPCallback": "hf_koopman.training.callback",
    "DivergedModelError": "hf_koopman.training.guard",
    "KSSTrainer": "hf_koopman.training.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
