"""Shared fixtures. Everything runs offline on CPU; real data comes from $HF_KOOPMAN_DATA or ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one thread each (and in the processes they start) keeps the cores
    # from being oversubscribed
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _data_dir() -> Path:
    env = os.environ.get("HF_KOOPMAN_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data folder (WikiText-2, Tiny Shakespeare, MNIST, TU graphs); skips the test when absent."""
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set HF_KOOPMAN_DATA)")
    return path


@pytest.fixture()
def in_range_estimator(monkeypatch):
    """`install(probability)`: makes `RiskEstimator.default()` an estimator whose inputs all lie inside its fitted
    range and that gives `probability` at any learning rate (what the advice follows when it is in range)."""
    from hf_koopman.risk import RiskAssessment, RiskEstimator

    def install(probability: float) -> None:
        class InRange:
            def predict_proba(self, prof, learning_rate=None):
                return probability

            def assess(self, prof, learning_rate=None, **context):
                return RiskAssessment(probability=probability, out_of_range=False, learning_rate=learning_rate)

        monkeypatch.setattr(RiskEstimator, "default", classmethod(lambda cls: InRange()))

    return install


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
