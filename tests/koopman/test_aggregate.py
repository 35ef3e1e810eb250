"""Aggregation across layers (Algorithm 1, line 11)."""

from __future__ import annotations

import math

import pytest

from hf_koopman.koopman import FEATURE_NAMES, STATS, LayerFeatures, aggregate_features


def _layer(value: float, *, kreiss: float = 1.5, degenerate: bool = False) -> LayerFeatures:
    kw = {name: value for name in FEATURE_NAMES}
    kw["kreiss"] = kreiss
    return LayerFeatures(**kw, n_modes=32, n_reliable=30, degenerate=degenerate)


def test_mean_max_min_std():
    agg = aggregate_features([_layer(0.2), _layer(0.4), _layer(0.9)])
    assert set(agg) == {f"{n}_{s}" for n in FEATURE_NAMES for s in STATS} | {"num_layers", "num_degenerate"}
    assert agg["near_unit_mass_mean"] == pytest.approx(0.5)
    assert agg["near_unit_mass_max"] == pytest.approx(0.9)
    assert agg["near_unit_mass_min"] == pytest.approx(0.2)
    assert agg["near_unit_mass_std"] == pytest.approx(math.sqrt(((0.3) ** 2 + 0.1**2 + 0.4**2) / 3))
    assert agg["kreiss_std"] == 0.0 and agg["num_layers"] == 3


def test_infinite_kreiss_stays_visible_without_nan():
    agg = aggregate_features([_layer(0.1), _layer(0.2, kreiss=math.inf)])
    assert agg["kreiss_max"] == math.inf and agg["kreiss_mean"] == math.inf and agg["kreiss_std"] == math.inf
    assert agg["kreiss_min"] == 1.5
    assert not any(math.isnan(v) for v in agg.values())
    agg = aggregate_features([_layer(0.1, kreiss=math.inf)] * 2)
    assert agg["kreiss_std"] == 0.0


def test_exclude_degenerate_and_errors():
    layers = [_layer(0.1), _layer(1.0, degenerate=True)]
    assert aggregate_features(layers)["near_unit_mass_mean"] == pytest.approx(0.55)
    agg = aggregate_features(layers, exclude_degenerate=True)
    assert agg["near_unit_mass_mean"] == pytest.approx(0.1) and agg["num_degenerate"] == 1
    assert agg["num_layers"] == 2  # counts over the input, degenerate layers included
    with pytest.raises(ValueError, match="at least one"):
        aggregate_features([])
    with pytest.raises(ValueError, match="degenerate"):
        aggregate_features([_layer(1.0, degenerate=True)], exclude_degenerate=True)
    with pytest.raises(TypeError):
        aggregate_features([{"near_unit_mass": 0.1}])
