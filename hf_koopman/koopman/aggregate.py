"""Aggregate per-layer spectral features across layers (RKSP Algorithm 1, line 11: mean, max, min, std)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .features import FEATURE_NAMES, LayerFeatures

__all__ = ["STATS", "aggregate_features"]

STATS: tuple[str, ...] = ("mean", "max", "min", "std")


def _stats(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:  # e.g. kreiss disabled with compute_kreiss=False
        return dict.fromkeys(STATS, math.nan)
    if any(math.isinf(v) for v in finite):
        # inf is a legitimate value (Kreiss constant when rho > 1); keep it visible instead of turning std into NaN
        mean = sum(finite) / len(finite) if len({v for v in finite if math.isinf(v)}) == 1 else math.inf
        spread = 0.0 if all(v == finite[0] for v in finite) else math.inf
        return {"mean": mean, "max": max(finite), "min": min(finite), "std": spread}
    n = len(finite)
    mean = math.fsum(finite) / n
    var = math.fsum((v - mean) ** 2 for v in finite) / n
    return {"mean": mean, "max": max(finite), "min": min(finite), "std": math.sqrt(var)}


def aggregate_features(
    features: Sequence[LayerFeatures], *, exclude_degenerate: bool = False
) -> dict[str, float]:
    """Mean, max, min and (population, ddof=0) std of every feature in `FEATURE_NAMES` across layers.

    Args:
        features (`Sequence[LayerFeatures]`): one entry per layer, e.g. `spectral_features(batched_result)`.
        exclude_degenerate (`bool`, *optional*, defaults to `False`): leave out layers flagged `degenerate`.

    Returns:
        `dict[str, float]`: keys `f"{name}_{stat}"` for each name in `FEATURE_NAMES` and stat in mean/max/min/std,
        plus `num_layers` and `num_degenerate` (counts over the input). `inf` values (Kreiss with rho > 1) give
        `max = inf`, `mean = inf` and `std = inf` unless all values are equal; `nan` values (features that were not
        computed) are skipped.

    Raises:
        `ValueError`: empty input, or every layer degenerate with `exclude_degenerate=True`.
    """
    features = list(features)
    if not features:
        raise ValueError("aggregate_features needs at least one LayerFeatures")
    for f in features:
        if not isinstance(f, LayerFeatures):
            raise TypeError(f"expected LayerFeatures, got {type(f).__name__}")
    used = [f for f in features if not (exclude_degenerate and f.degenerate)]
    if not used:
        raise ValueError("every layer is degenerate (zero update); nothing left to aggregate -- "
                         "RKSP is uninformative here (App. J), use exclude_degenerate=False to aggregate anyway")
    out: dict[str, float] = {}
    for name in FEATURE_NAMES:
        for stat, value in _stats([float(getattr(f, name)) for f in used]).items():
            out[f"{name}_{stat}"] = value
    out["num_layers"] = float(len(features))
    out["num_degenerate"] = float(sum(f.degenerate for f in features))
    return out
