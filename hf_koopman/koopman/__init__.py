"""Pure-torch math core of hf_koopman: whitened DMD and Koopman spectral features (RKSP), never imports transformers.

Conventions: snapshots are rows, `X, Y: (N, d)` or `(L, N, d)` for `L` layers at once; operators act on column state
vectors in whitened coordinates. Paper: https://huggingface.co/papers/2602.22988 (RKSP / KSS).

Public API:

* [`whitened_dmd`] -> [`DMDResult`]: exact or randomized rank-r DMD after X-based ZCA whitening (Eqs. 6-9).
* [`spectral_features`] -> [`LayerFeatures`]: masses, rho, kappa(V), eta_nl, Kreiss, ResDMD reliability
  (Eqs. 5, 10-13, 29).
* [`aggregate_features`]: mean / max / min / std across layers (Alg. 1, line 11).
* [`kreiss_constant`], [`zca_whitening`], [`whiten`].
* KSS (`shaping.py`): [`kss_penalty`], [`soft_near_unit_mass`], [`differentiable_dmd_eigenvalues`] (Eqs. 14-15).
"""

from __future__ import annotations

import importlib
from typing import Any

from .aggregate import STATS, aggregate_features
from .dmd import DMDResult, whitened_dmd
from .features import (
    FEATURE_NAMES,
    LayerFeatures,
    eigvec_condition,
    nonlinearity_ratio,
    resdmd_residuals,
    spectral_features,
    spectral_masses,
)
from .kreiss import kreiss_constant
from .whitening import Whitening, whiten, zca_whitening

_SHAPING = ("kss_penalty", "soft_near_unit_mass", "differentiable_dmd_eigenvalues")

__all__ = [
    "DMDResult",
    "FEATURE_NAMES",
    "LayerFeatures",
    "STATS",
    "Whitening",
    "aggregate_features",
    "eigvec_condition",
    "kreiss_constant",
    "nonlinearity_ratio",
    "resdmd_residuals",
    "spectral_features",
    "spectral_masses",
    "whiten",
    "whitened_dmd",
    "zca_whitening",
    *_SHAPING,
]


def __getattr__(name: str) -> Any:
    # KSS lives in shaping.py (training engineer); resolved lazily so a missing module never breaks this import
    if name in _SHAPING:
        try:
            module = importlib.import_module(f"{__name__}.shaping")
        except ModuleNotFoundError as err:
            raise AttributeError(f"{name} needs hf_koopman/koopman/shaping.py, which is not available: {err}") from err
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
