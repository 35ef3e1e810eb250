"""Inputs with no direction to fit: a layer whose input state is the same for every sample up to round-off (one token
repeated, without position information) has no identified mode and is degenerate, not a spectrum of round-off; a
constant feature does not steer the randomized sketch (the ridge would scale it by eps^-1/2)."""

from __future__ import annotations

import pytest
import torch
from _planted import anisotropic_states, planted_operator

from hf_koopman import profile
from hf_koopman.koopman import whitened_dmd
from hf_koopman.profiling.report import render_report
from hf_koopman.testing_utils import tiny_model


def _round_off_constant(n: int, d: int, dtype: torch.dtype, value: float = 0.1, units: int = 2) -> torch.Tensor:
    """`(n, d)` states equal to `value` up to `units` of round-off (as a block computes them per token; ~200 float32
    units with TF32 attention products)."""
    eps = torch.finfo(dtype).eps
    g = torch.Generator().manual_seed(0)
    wobble = torch.randint(-units, units + 1, (n, d), generator=g).to(torch.float64) * eps * value
    return (torch.full((n, d), value, dtype=torch.float64) + wobble).to(dtype)


@pytest.mark.parametrize("units", [2, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_input_constant_up_to_round_off_has_no_mode_and_is_degenerate(dtype, units):
    X = _round_off_constant(64, 4, dtype, units=units)
    Y = X + 0.01 * torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    res = whitened_dmd(X, Y)
    assert int(res.rank_x) == 0 and bool(res.degenerate) and torch.isfinite(res.eigenvalues).all()
    exact = whitened_dmd(torch.full((64, 4), 0.1, dtype=torch.float64), Y.double())  # the mean itself not exact
    assert int(exact.rank_x) == 0 and bool(exact.degenerate)


def test_small_real_variation_is_kept_and_only_the_constant_layer_is_flagged():
    g = torch.Generator().manual_seed(0)
    varied = 10.0 + 1e-2 * torch.randn(256, 8, generator=g)  # relative spread 1e-3: ~8000 float32 units
    X = torch.stack([_round_off_constant(256, 8, torch.float32), varied])
    A, _ = planted_operator([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], seed=1)
    Y = X + (X - X.mean(-2, keepdim=True)) @ (A.T.float() - torch.eye(8)) + 0.01
    res = whitened_dmd(X, Y)
    assert res.rank_x.tolist() == [0, 8] and res.degenerate.tolist() == [True, False]


@pytest.mark.parametrize("value", [4.0, 0.1, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_constant_feature_does_not_blow_up_the_randomized_sketch(value, dtype):
    X = anisotropic_states(400, 5).to(dtype)
    X[:, 2] = value  # a dead feature: the ridge whitening scales it by eps^-1/2 = 316
    A, _ = planted_operator([0.9, 0.8, 0.5, 1.1, 0.3], seed=2)
    Y = X @ A.T.to(dtype)
    sketch = {rank: whitened_dmd(X, Y, rank=rank, randomized=True, generator=torch.Generator().manual_seed(0))
              for rank in (3, 4)}
    assert all(res.randomized for res in sketch.values())
    assert float(sketch[3].eigenvalues.abs().max()) < 2  # 4.2e6 when the constant feature steered the sketch
    # rank 4 spans the four directions the input visits: the full spectrum's identified modes (4.5e7 before)
    full = whitened_dmd(X, Y)
    modes = full.eigenvalues[: int(full.rank_x)].abs()
    assert torch.allclose(sketch[4].eigenvalues.abs().sort().values, modes.sort().values, atol=1e-4)


@pytest.mark.parametrize("value", [0.1, 1 / 3])
def test_a_constant_feature_whose_mean_is_not_exact_is_counted_out(value):
    # the pivot guards: X[:, 2] = 4.0 makes the Cholesky factorisation fail outright, 0.1 leaves a round-off pivot
    X = anisotropic_states(400, 5).double()
    X[:, 2] = value
    A, _ = planted_operator([0.9, 0.8, 0.5, 1.1, 0.3], seed=2)
    Y = X @ A.T.double()
    full = whitened_dmd(X, Y)
    assert int(full.rank_x) == 4 and float(full.eigenvalues.abs().max()) < 1.2
    for rank in (4, 5):
        assert float(whitened_dmd(X, Y, rank=rank).eigenvalues.abs().max()) < 1.2


def test_duplicated_float32_samples_keep_the_update_ratio_of_float64():
    # N < d with duplicated rows: the row-space fallback's rank threshold keeps round-off directions out
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 32, generator=g, dtype=torch.float64).repeat(3, 1)[:20]
    Y = X @ (0.3 * torch.randn(32, 32, generator=g, dtype=torch.float64)) \
        + 0.1 * torch.randn(20, 32, generator=g, dtype=torch.float64)
    with pytest.warns(UserWarning):
        r32, r64 = whitened_dmd(X.float(), Y.float()), whitened_dmd(X, Y)
    assert float(r32.update_ratio) == pytest.approx(float(r64.update_ratio), rel=0.05)


def test_an_update_that_overflows_float32_products_is_recomputed_in_float64():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64) / 8 ** 0.5
    Y = (X.double() @ A.T * 1e18).float()  # finite, but its float32 Gram overflows (X's does not)
    res, ref = whitened_dmd(X, Y), whitened_dmd(X.double(), Y.double())
    assert float(res.update_ratio) == pytest.approx(float(ref.update_ratio), rel=1e-4)


def test_one_repeated_token_gives_an_uninformative_profile_that_says_why():
    model = tiny_model("llama")  # RoPE: the positions are not in the residual stream
    result = profile(model, {"input_ids": torch.full((8, 64), 7)}, num_samples=512)
    assert result.verdict == "uninformative"
    assert result.constant_input_layers == [name for name, _ in result.layers]
    assert "the others see the same input state for every token" in result.verdict_reason
    report = render_report(result)
    assert "layers see the same input state for every token" in report
    assert "no mode is identified" in report and "nan%" not in report
    # no mode: no κ(V) or Kreiss constant of round-off either (NaN, which the aggregates skip), so no risk estimate
    import math

    assert all(math.isnan(f.eigvec_condition) and math.isnan(f.kreiss) and math.isnan(f.nonlinearity)
               for _, f in result.layers)
    assert "- Fit quality: no linear map was fitted;" in report
    assert math.isnan(result.aggregates["eigvec_condition_mean"]) and result.risk_assessment() is None
    varied = profile(model, num_samples=512)  # the default probe: varied tokens
    assert varied.constant_input_layers == [] and "same input state" not in varied.verdict_reason


def test_the_kreiss_constant_searches_every_angle_of_a_real_matrix():
    # the peak of a non-normal 2x2 block at lambda = -0.7 lies at angle pi, away from the leading eigenvalues' angles
    from hf_koopman.koopman import kreiss_constant

    J = torch.tensor([[-0.7, 2.0], [0.0, -0.7]], dtype=torch.float64)
    big = torch.block_diag(J, 0.9 * torch.eye(70, dtype=torch.float64))
    assert kreiss_constant(big) == pytest.approx(1.8166666666666662, rel=1e-3)


def test_aggregates_skip_nan_layers():
    import math

    from hf_koopman.koopman import FEATURE_NAMES, LayerFeatures, aggregate_features

    base = {n: 0.5 for n in FEATURE_NAMES}

    def layer(kreiss):
        return LayerFeatures(**{**base, "kreiss": kreiss}, n_modes=4, n_reliable=4, degenerate=False)

    agg = aggregate_features([layer(1.5), layer(math.nan), layer(2.5)])
    assert (agg["kreiss_mean"], agg["kreiss_max"], agg["kreiss_min"], agg["kreiss_std"]) == (2.0, 2.5, 1.5, 0.5)


def test_a_layer_that_varies_on_a_few_samples_only_is_not_called_constant():
    from hf_koopman.koopman.dmd import _constant_input

    X = torch.full((1, 2048, 4), 0.5)
    X[0, 1::64] += torch.randn(32, 4, generator=torch.Generator().manual_seed(0))  # between the sampled rows
    layers, columns = _constant_input(X, torch.finfo(torch.float32).eps)
    assert not bool(layers[0]) and not bool(columns.any())


def test_the_reason_keeps_the_left_out_layers_and_the_rank_r_truncation_out_of_the_constant_layers_story():
    llama = tiny_model("llama")
    rank_r = profile(llama, {"input_ids": torch.full((8, 64), 7)}, num_samples=512, rank=8)
    assert rank_r.verdict_reason.startswith("0 of 2 layers are informative; the others see the same input state")
    assert "rank=None" not in rank_r.verdict_reason  # the full spectrum would not help
    # T5: relative position bias, so one repeated encoder token is constant there; 4 decoder tokens are too few
    t5 = tiny_model("t5")
    inputs = {"input_ids": torch.full((4, 64), 7),
              "decoder_input_ids": torch.randint(1, 100, (4, 4), generator=torch.Generator().manual_seed(0))}
    mixed = profile(t5, inputs, num_samples=256)
    assert mixed.constant_input_layers == ["encoder.block.0", "encoder.block.1"]
    assert "2 of 4 layers were left out for too few token states" in mixed.verdict_reason
    assert "; the other 2 see the same input state for every token" in mixed.verdict_reason
