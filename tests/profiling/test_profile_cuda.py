"""`profile()` of a model on a CUDA device gives the CPU's profile (skipped without a GPU; run where one is lent)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_koopman

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=3, n_head=4))


def test_profile_on_cuda_matches_cpu():
    cpu = hf_koopman.profile(_model(), num_samples=512, learning_rate=1e-3)
    gpu = hf_koopman.profile(_model().cuda(), num_samples=512, learning_rate=1e-3)
    assert len(cpu.features) == len(gpu.features) == 3
    for a, b in zip(cpu.features, gpu.features):
        assert float(b.near_unit_mass) == pytest.approx(float(a.near_unit_mass), abs=0.01)
        assert float(b.spectral_radius) == pytest.approx(float(a.spectral_radius), rel=1e-3)
    assert gpu.verdict == cpu.verdict
    assert gpu.risk_probability() == pytest.approx(cpu.risk_probability(), abs=0.01)


def test_cli_profiles_on_cuda(tmp_path):
    from hf_koopman.cli import main

    assert main(["profile", "gpt2", "--init", "--num-layers", "2", "--num-samples", "256", "--device", "cuda",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "profile.json").is_file()
