"""The report's numbers agree with the profile: aggregate columns, the sampling error, the fit quality over the
layers read, what an undersampled layer is called, the rank line's count (each test fails under a mutation of
report.py that a mutation review found uncaught)."""

from __future__ import annotations

import re

from hf_koopman.koopman import aggregate_features
from hf_koopman.koopman.features import LayerFeatures
from hf_koopman.profiling import SpectralProfile
from hf_koopman.profiling.report import render_report



def _f(near=0.1, eta=0.3, modes=10):
    return LayerFeatures(near_unit_mass=near, unstable_mass=1 - near, contractive_mass=0.0, mid_mass=0.0,
                         spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=eta, kreiss=float("inf"),
                         n_modes=modes, n_reliable=modes, degenerate=False)


def _prof(feats, n=4096, d=64, sizes=None, aggregates=None):
    layers = [(f"layers.{i}", f) for i, f in enumerate(feats)]
    return SpectralProfile(layers=layers, aggregates=aggregates or {}, layer_sizes=sizes or [],
                           settings={"num_samples": n, "hidden_size": d, "rank": None}, meta={})


def test_the_aggregates_table_puts_max_and_min_under_their_headers():
    feats = [_f(0.1), _f(0.2), _f(0.3)]
    agg = aggregate_features(feats)
    report = render_report(_prof(feats, aggregates=agg))
    row = next(l for l in report.splitlines() if l.startswith("| near_unit_mass |"))
    mean, mx, mn, std = [c.strip() for c in row.split("|")[2:6]]
    assert (mx, mn) == ("0.300", "0.100")


def test_the_sampling_error_is_sqrt_d_over_n():
    assert "sqrt(d/N) = 0.25 relative" in render_report(_prof([_f()] * 3, n=1024, d=64))


def test_below_8_states_per_dimension_the_report_asks_for_more_tokens():
    assert "for a firmer estimate" in render_report(_prof([_f()] * 3, n=384, d=64))


def test_the_fit_quality_averages_the_layers_read():
    report = render_report(_prof([_f(eta=0.3), _f(eta=0.3), _f(eta=0.99)]))
    assert "η_nl = 0.30 of the block update" in report, [l for l in report.splitlines() if "Fit quality" in l]


def test_an_undersampled_layer_is_not_called_degenerate():
    report = render_report(_prof([_f(), _f(), _f()], sizes=[(4096, 64), (4096, 64), (64, 64)]))
    line = next(l for l in report.splitlines() if "left out:" in l or "informative blocks" in l)
    assert "degenerate or not explained" not in line, line


def test_the_rank_line_counts_the_layers_it_does_not_name():
    report = render_report(_prof([_f(modes=2)] * 8, n=1024, d=64))
    line = next(l for l in report.splitlines() if l.startswith("- Rank:"))
    k = int(re.search(r"in (\d+) of", line).group(1))
    assert k > 6 and f" and {k - 6} more)" in line, line


def test_the_tokens_seen_note_gives_the_range_from_fewest_to_most():
    prof = _prof([_f()] * 3)
    prof.meta.update(tokens_seen=128, tokens_seen_per_layer={"layers.0": 512, "layers.1": 128, "layers.2": 256})
    assert "the fewest any block saw; 128 to 512 over the profiled layers" in render_report(prof)
