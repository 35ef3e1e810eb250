"""Smoke test of `benchmarks/bench_profile.formulation_floor`: every dense operation of the analysis is timed on the
library's own operator, and a floor that drifted from the library's formulation fails loudly."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_profile


def _chained_snapshots(layers: int = 3, n: int = 256, d: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(n, d, generator=g) * torch.logspace(-0.5, 0.5, d)]
    for _ in range(layers):
        w = torch.randn(d, d, generator=g) / d**0.5
        states.append(states[-1] + 0.5 * torch.tanh(states[-1] @ w))
    stack = torch.stack(states)
    return stack[:-1], stack[1:]  # Y[l] is X[l + 1], as profile_from_snapshots stacks them


def test_floor_times_every_operation_on_the_library_operator():
    X, Y = _chained_snapshots()
    rows = bench_profile.formulation_floor(X, Y, layers=2, repeats=1)
    assert [r["calls_per_layer"] for r in rows] == [2, 2, 4, 1, 1, 2, 2, 3]
    assert all(r["cpu_s_per_layer"] >= 0 for r in rows) and sum(r["cpu_s_per_layer"] for r in rows) > 0
    assert any("eig with right eigenvectors" == r["what"] for r in rows)


def test_floor_rejects_operands_that_are_not_the_library_operator(monkeypatch):
    X, Y = _chained_snapshots()
    real_cholesky = torch.linalg.cholesky  # the floor factorises with it; the library uses cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: real_cholesky(2.0 * a))  # halves the floor's operator
    with pytest.raises(RuntimeError, match="differs from whitened_dmd"):
        bench_profile.formulation_floor(X, Y, layers=1, repeats=1)


def test_paired_ratio_interval_is_the_binomial_order_statistics():
    # n = 25: P(Bin(25, 1/2) <= 7) = 0.022 <= 0.025 < P(<= 8) = 0.054, so the 95 % interval is [r_(8), r_(18)]
    den = [1.0] * 25
    num = [1.0 + i / 100 for i in reversed(range(25))]
    r = bench_profile.paired_ratio(num, den)
    assert r["n"] == 25 and r["median"] == pytest.approx(1.12)
    assert r["low"] == pytest.approx(1.07) and r["high"] == pytest.approx(1.17)
    assert bench_profile.paired_ratio(num[:5], den[:5])["low"] is None  # 2 / 2^5 > 0.05: no 95 % interval
    with pytest.raises(ValueError):
        bench_profile.paired_ratio(num, den[:3])


def test_least_work_gives_the_library_outputs():
    X, Y = _chained_snapshots()
    states = [*X, Y[-1]]
    layers = bench_profile.least_work(states)
    bench_profile.check_least_work(X, Y, layers)  # raises when the moduli or the reliable-mode counts differ
    assert len(layers) == 3 and all(out["eigenvalues"].shape == (24,) for out in layers)
    assert bench_profile.least_work(states, parallel=True)[1]["eigenvalues"].abs().max() > 0.5


def test_least_work_check_rejects_other_outputs(monkeypatch):
    X, Y = _chained_snapshots()
    real_cholesky = torch.linalg.cholesky  # least_work factorises with it; the library uses cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: real_cholesky(2.0 * a))  # halves its operator
    layers = bench_profile.least_work([*X, Y[-1]])
    with pytest.raises(RuntimeError, match="least_work differs from whitened_dmd"):
        bench_profile.check_least_work(X, Y, layers)
