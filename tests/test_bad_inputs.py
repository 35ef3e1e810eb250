"""Bad input gets a clear error, and profiling leaves the user's model and logging settings as they were."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_koopman
from hf_koopman.training import KSSConfig, KSSTrainingArguments


def _gpt2(n_layer=3):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4))


def test_profile_restores_every_submodule_mode():
    model = _gpt2()
    model.train()
    model.transformer.h[1].eval()  # the user froze one block's dropout
    hf_koopman.profile(model, num_samples=64, rank=4)
    assert model.training and [b.training for b in model.transformer.h] == [True, False, True]
    assert model.transformer.h[1].attn.training is False and model.transformer.h[0].attn.training is True


def test_embedding_as_layers_is_named_not_a_residual_block():
    # refused before the forward pass, naming the block list auto-discovery finds
    with pytest.raises(ValueError, match=r"layers='transformer.wte' names 1 single torch layer\(s\) \(Embedding\)") \
            as err:
        hf_koopman.profile(_gpt2(), layers="transformer.wte", num_samples=64, rank=4)
    assert "never called" not in str(err.value) and "auto-discovery finds the blocks in 'transformer.h'" in str(
        err.value)


def test_no_tokenizer_warning_is_printed_once(caplog):
    texts = ["residual stream token states " * 8] * 6
    with caplog.at_level(logging.WARNING):
        hf_koopman.profile(_gpt2(), texts, batch_size=2, max_length=16, num_samples=32, rank=4)
    assert caplog.text.count("no tokenizer given") == 1


def test_library_warnings_follow_the_transformers_verbosity(caplog):
    from transformers.utils import logging as hf_logging

    texts = ["residual stream token states " * 8] * 2
    before = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_error()
        with caplog.at_level(logging.WARNING):
            hf_koopman.profile(_gpt2(), texts, batch_size=2, max_length=16, num_samples=32, rank=4)
        assert "no tokenizer given" not in caplog.text
    finally:
        hf_logging.set_verbosity(before)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_kss_alpha_is_rejected(tmp_path, value):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        KSSConfig(alpha=value)
    with pytest.raises(ValueError, match="KSSTrainingArguments: kss_alpha must be a finite number"):
        KSSTrainingArguments(str(tmp_path), kss_alpha=value, use_cpu=True, report_to="none")


def test_kss_training_arguments_errors_name_the_fields_as_written(tmp_path):
    # the user typed kss_tau_l / kss_power_iters, so the message names those, not KSSConfig's field names
    with pytest.raises(ValueError, match=r"need kss_tau_l < kss_tau_u, got kss_tau_l=1.2"):
        KSSTrainingArguments(str(tmp_path), kss_tau_l=1.2, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"^KSSTrainingArguments: kss_oversample and kss_power_iters must be >= 0$"):
        KSSTrainingArguments(str(tmp_path), kss_power_iters=-1, use_cpu=True, report_to="none")
