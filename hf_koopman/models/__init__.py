"""Research models as Hub-compatible `PreTrainedModel` classes.

`register_models()` registers every model here with the Auto classes; it is called by `import hf_koopman` and is
idempotent. The modelling files of each model package import only torch, transformers and each other, so that
`publishing.save_for_hub` / `export_for_hub` can ship them as Hub remote code for users without hf_koopman.
"""

from __future__ import annotations

import importlib

# (subpackage, its registration function) -- each subpackage's __init__ defines `register()`.
_MODEL_PACKAGES = ("reynet", "equivcnp")


def register_models() -> None:
    """Register ReyNet and EquivCNP with the Auto classes (run by `import hf_koopman`; safe to call again)."""
    for name in _MODEL_PACKAGES:
        try:
            module = importlib.import_module(f"hf_koopman.models.{name}")
        except ModuleNotFoundError as err:  # a model package not present in this build
            if err.name == f"hf_koopman.models.{name}":
                continue
            raise
        module.register()
