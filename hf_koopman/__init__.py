"""hf_koopman: Koopman spectral diagnostics and regularisation for Hugging Face models.

* **RKSP** (Residual Koopman Spectral Profiling): `profile(model, inputs)` runs whitened DMD on the residual stream
  entering and leaving every block and turns the spectrum into a divergence verdict / probability.
* **KSS** (Koopman Spectral Shaping): `KSSTrainer` adds a differentiable spectral penalty to the training loss;
  `RKSPCallback` profiles at initialisation, logs `rksp/*` metrics and guards against divergence.
* Research models (`ReyNet*`, `EquivCNP*`): Hub-compatible `PreTrainedModel` classes, registered with the Auto
  classes when this package is imported.

The math core `hf_koopman.koopman` is pure torch: its modules never import `transformers`, and it works where
transformers is not installed. Importing the package (and so any of its modules, `hf_koopman.koopman` included)
registers the model classes with the Auto classes, which loads transformers where it is installed; every other public
name is resolved lazily, on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (resolved on first attribute access)
_LAZY: dict[str, str] = {
    # spectral core (transformers-free)
    "whitened_dmd": "hf_koopman.koopman",
    "spectral_features": "hf_koopman.koopman",
    "aggregate_features": "hf_koopman.koopman",
    "kreiss_constant": "hf_koopman.koopman",
    "DMDResult": "hf_koopman.koopman",
    "LayerFeatures": "hf_koopman.koopman",
    "FEATURE_NAMES": "hf_koopman.koopman",
    "zca_whitening": "hf_koopman.koopman",
    "whiten": "hf_koopman.koopman",
    # profiling glue
    "find_residual_blocks": "hf_koopman.profiling",
    "ResidualBlock": "hf_koopman.profiling",
    "ResidualStreamRecorder": "hf_koopman.profiling",
    "profile": "hf_koopman.profiling",
    "profile_streaming": "hf_koopman.profiling",
    "profile_from_snapshots": "hf_koopman.profiling",
    "default_probe_inputs": "hf_koopman.profiling",
    "SpectralProfile": "hf_koopman.profiling",
    # training glue
    "RKSPCallback": "hf_koopman.training",
    "KSSTrainer": "hf_koopman.training",
    "KSSConfig": "hf_koopman.training",
    "KSSTrainingArguments": "hf_koopman.training",
    # the risk step: decision rule and calibrated estimator
    "DecisionRule": "hf_koopman.risk",
    "RiskEstimator": "hf_koopman.risk",
    "RiskAssessment": "hf_koopman.risk",
    "suggest_max_lr": "hf_koopman.max_lr",
    "MaxLRSuggestion": "hf_koopman.max_lr",
    # research models
    "ReyNetConfig": "hf_koopman.models.reynet",
    "ReyNetModel": "hf_koopman.models.reynet",
    "ReyNetForGraphClassification": "hf_koopman.models.reynet",
    "ReyNetForEquivariantRegression": "hf_koopman.models.reynet",
    "ReyNetForInvariantRegression": "hf_koopman.models.reynet",
    "full_reynolds": "hf_koopman.models.reynet",
    "reductive_reynolds": "hf_koopman.models.reynet",
    "ReyNetGraphCollator": "hf_koopman.models.reynet",
    "build_graph_tensor": "hf_koopman.models.reynet",
    "EquivCNPConfig": "hf_koopman.models.equivcnp",
    "EquivCNPModel": "hf_koopman.models.equivcnp",
    "CNPConfig": "hf_koopman.models.equivcnp",
    "CNPModel": "hf_koopman.models.equivcnp",
    "ConvCNPConfig": "hf_koopman.models.equivcnp",
    "ConvCNPModel": "hf_koopman.models.equivcnp",
    "NeuralProcessCollator": "hf_koopman.models.equivcnp",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_koopman' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _register_auto_classes() -> None:
    """Register our models with AutoConfig / AutoModel* so no `trust_remote_code` is needed once imported."""
    try:
        import transformers  # noqa: F401
    except ImportError:  # the math core is usable without transformers
        return
    from hf_koopman.models import register_models

    register_models()


def _in_console_script() -> bool:
    """True inside the `hf-koopman` console script: it parses its arguments before the heavy imports (so a usage
    error comes back at once) and registers the Auto classes right after (`hf_koopman.cli.main`)."""
    import os
    import sys

    return bool(sys.argv) and os.path.basename(sys.argv[0]) in ("hf-koopman", "hf-koopman.exe")


if not _in_console_script():
    _register_auto_classes()

if TYPE_CHECKING:  # pragma: no cover - static analysers see the real names (a test keeps this list and _LAZY equal)
    from hf_koopman.koopman import (  # noqa: F401
        aggregate_features,
        DMDResult,
        FEATURE_NAMES,
        kreiss_constant,
        LayerFeatures,
        spectral_features,
        whiten,
        whitened_dmd,
        zca_whitening,
    )
    from hf_koopman.profiling import (  # noqa: F401
        default_probe_inputs,
        find_residual_blocks,
        profile,
        profile_from_snapshots,
        profile_streaming,
        ResidualBlock,
        ResidualStreamRecorder,
        SpectralProfile,
    )
    from hf_koopman.training import (  # noqa: F401
        KSSConfig,
        KSSTrainer,
        KSSTrainingArguments,
        RKSPCallback,
    )
    from hf_koopman.risk import (  # noqa: F401
        DecisionRule,
        RiskAssessment,
        RiskEstimator,
    )
    from hf_koopman.max_lr import (  # noqa: F401
        MaxLRSuggestion,
        suggest_max_lr,
    )
    from hf_koopman.models.reynet import (  # noqa: F401
        build_graph_tensor,
        full_reynolds,
        reductive_reynolds,
        ReyNetConfig,
        ReyNetForEquivariantRegression,
        ReyNetForGraphClassification,
        ReyNetForInvariantRegression,
        ReyNetGraphCollator,
        ReyNetModel,
    )
    from hf_koopman.models.equivcnp import (  # noqa: F401
        CNPConfig,
        CNPModel,
        ConvCNPConfig,
        ConvCNPModel,
        EquivCNPConfig,
        EquivCNPModel,
        NeuralProcessCollator,
    )
