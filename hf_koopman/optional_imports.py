"""Imports of packages that only some features need (`datasets`, `peft`, ...), with an error that names the fix.

The package's hard dependencies are what profiling, training, the risk model and the models need; a feature that
needs more imports it through `import_optional` when it runs, so `import hf_koopman` works without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingOptionalDependency", "import_optional"]


class MissingOptionalDependency(ImportError):
    """A package an optional feature needs is not installed; the message names the extra that installs it."""


def import_optional(name: str, *, extra: str, feature: str) -> ModuleType:
    """Import module `name`; if it is missing, raise `MissingOptionalDependency` (an `ImportError`) saying which
    `hf-koopman` extra installs it.

    Args:
        name: the module to import, e.g. `"datasets"`.
        extra: the `hf-koopman` extra that installs it, e.g. `"datasets"`.
        feature: what needs it, for the message, e.g. `"--dataset"`.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        top = name.split(".")[0]
        raise MissingOptionalDependency(
            f"{feature} needs the `{top}` package, which is not installed: pip install 'hf-koopman[{extra}]' "
            f"(or pip install {top})"
        ) from err
