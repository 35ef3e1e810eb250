"""The spectral core on a CUDA device gives the CPU's answer (skipped without a GPU; run where one is lent)."""

import pytest
import torch

from hf_koopman.koopman import whitened_dmd
from hf_koopman.profiling import profile_from_snapshots

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _snapshots(layers: int = 3, n: int = 512, d: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(layers, n, d, generator=gen) * torch.linspace(0.2, 2.0, d)
    W = torch.randn(layers, d, d, generator=gen) / d**0.5
    return X, X + 0.3 * torch.tanh(X @ W)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"left_eigenvectors": False}, {"eigenvectors": False}, {"rank": 16, "randomized": True}, {"rank": 16}],
    ids=["full", "right-only", "values-only", "rank-randomized", "rank-exact"],
)
def test_whitened_dmd_on_cuda_matches_cpu(kwargs):
    X, Y = _snapshots()
    gen_cpu, gen_gpu = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    extra = {"generator": gen_cpu} if kwargs.get("randomized") else {}
    cpu = whitened_dmd(X, Y, dtype=torch.float64, **kwargs, **extra)
    extra = {"generator": gen_gpu} if kwargs.get("randomized") else {}
    gpu = whitened_dmd(X.cuda(), Y.cuda(), dtype=torch.float64, **kwargs, **extra)
    assert gpu.eigenvalues.device.type == "cuda"
    torch.testing.assert_close(gpu.eigenvalues.abs().cpu(), cpu.eigenvalues.abs(), rtol=1e-6, atol=1e-8)


def test_profile_from_snapshots_on_cuda_matches_cpu():
    X, Y = _snapshots()
    pairs = [(f"layer.{i}", X[i], Y[i]) for i in range(X.shape[0])]
    cpu = profile_from_snapshots(pairs)
    gpu = profile_from_snapshots([(name, x.cuda(), y.cuda()) for name, x, y in pairs])
    for a, b in zip(cpu.features, gpu.features):
        assert float(a.near_unit_mass) == pytest.approx(float(b.near_unit_mass), abs=1e-6)
        assert float(a.spectral_radius) == pytest.approx(float(b.spectral_radius), rel=1e-4)
