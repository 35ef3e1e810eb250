"""Probe inputs: a long text without a tokenizer, an id at the vocabulary size, float inputs in the model's dtype, no
KV cache, Whisper's decoder inputs from labels (each test fails under a mutation of inputs.py a review found
uncaught)."""

from __future__ import annotations

import pytest
import torch

from hf_koopman.testing_utils import tiny_model

def test_one_long_text_without_a_tokenizer_is_not_truncated():
    from hf_koopman.profiling.inputs import iter_batches
    model = tiny_model("gpt2")
    batches = list(iter_batches("abcd" * 40, model=model, tokenizer=None, max_length=16, batch_size=100))
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 160


def test_an_id_equal_to_the_vocabulary_size_is_refused():
    from hf_koopman.profiling.inputs import prepare_batch
    model = tiny_model("gpt2")
    v = model.config.vocab_size
    with pytest.raises(ValueError, match="vocabulary"):
        prepare_batch({"input_ids": torch.tensor([[1, 2, v]])}, model)


def test_float_inputs_take_the_model_dtype():
    from hf_koopman.profiling.inputs import prepare_batch
    model = tiny_model("vit", dtype=torch.bfloat16)
    out = prepare_batch({"pixel_values": torch.randn(1, 3, 32, 32)}, model)
    assert out["pixel_values"].dtype == torch.bfloat16


def test_the_probe_builds_no_kv_cache():
    from hf_koopman.profiling.inputs import prepare_batch
    assert prepare_batch({"input_ids": torch.tensor([[1, 2]])}, tiny_model("gpt2"))["use_cache"] is False


def test_whisper_decoder_inputs_shift_the_labels_right():
    from transformers import AutoConfig, WhisperForConditionalGeneration
    from hf_koopman.profiling.inputs import _decoder_ids_from_labels
    config = AutoConfig.for_model(
        "whisper", d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, num_mel_bins=8,
        max_source_positions=64, max_target_positions=48, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(config)
    out = _decoder_ids_from_labels({"labels": torch.tensor([[5, 6, 7, -100]])}, model)
    assert out.tolist() == [[1, 5, 6, 7]]
