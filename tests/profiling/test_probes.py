"""Default probe inputs (paper's synthetic-LM segments, Gaussian pixels) and the embedded architecture configs."""

from __future__ import annotations

import pytest
import torch

from hf_koopman.profiling import default_probe_inputs, synthetic_token_sequences
from hf_koopman.profiling.architectures import known_architectures, load_architecture_config, resolve_architecture_name
from hf_koopman.testing_utils import tiny_config, tiny_model


def test_synthetic_sequences_have_the_three_segment_kinds():
    ids = synthetic_token_sequences(16, 256, 10_000, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (16, 256) and ids.dtype == torch.long
    assert ids.min() >= 10 and ids.max() < 10_000  # ids {10, ..., V-1} (App. D.2)
    diffs = ids[:, 1:] - ids[:, :-1]
    runs_of_ones = ((diffs[:, :-3] == 1) & (diffs[:, 1:-2] == 1) & (diffs[:, 2:-1] == 1) & (diffs[:, 3:] == 1)).sum()
    assert runs_of_ones > 16  # sequential segments (runs of length >= 5)
    repeats = sum(int((ids[:, k:] == ids[:, :-k]).sum()) for k in range(2, 6))
    assert repeats > 200  # repetition segments: tokens equal to the one 2-5 positions back
    assert len(torch.unique(ids)) > 1000  # random segments


def test_synthetic_sequences_are_seeded_and_validate():
    a = synthetic_token_sequences(2, 50, 128, generator=torch.Generator().manual_seed(1))
    b = synthetic_token_sequences(2, 50, 128, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert synthetic_token_sequences(1, 30, 12).max() < 12  # tiny vocabulary: all ids usable
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic_token_sequences(1, 10, 1)


def test_text_probe_covers_num_tokens_and_respects_max_positions():
    batch = default_probe_inputs(tiny_config("gpt2"), num_tokens=300)
    assert batch["input_ids"].shape == (3, 128)  # capped at n_positions=128, ceil(300 / 128) rows
    assert batch["attention_mask"].all()
    assert batch["input_ids"].max() < 128


def test_encoder_decoder_probe_feeds_the_decoder():
    batch = default_probe_inputs(tiny_model("t5"), num_tokens=64)
    assert torch.equal(batch["decoder_input_ids"], batch["input_ids"])


def test_vision_probe_is_gaussian_pixels():
    batch = default_probe_inputs(tiny_model("vit"), num_tokens=100, seed=3)
    pixels = batch["pixel_values"]
    assert pixels.shape == (7, 3, 32, 32)  # 16 patches per image -> ceil(100 / 16) images
    assert abs(float(pixels.mean())) < 0.1 and abs(float(pixels.std()) - 1) < 0.1


@pytest.mark.parametrize(
    ("name", "model_type", "layers", "width"),
    [
        ("gpt2", "gpt2", 12, 768), ("gpt2-medium", "gpt2", 24, 1024), ("llama-2-7b", "llama", 32, 4096),
        ("mistral-7b", "mistral", 32, 4096), ("mixtral-8x7b", "mixtral", 32, 4096), ("mamba-130m", "mamba", 24, 768),
        ("bert-base", "bert", 12, 768), ("vit-base", "vit", 12, 768),
    ],
)
def test_embedded_architectures(name, model_type, layers, width):
    config = load_architecture_config(name)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == (model_type, layers, width)


def test_architecture_aliases_and_unknown_names():
    assert resolve_architecture_name("Llama-2-7B") == "llama-2-7b"
    assert resolve_architecture_name("bert-base-uncased") == "bert-base"
    assert resolve_architecture_name("no-such-model") is None
    assert {"gpt2", "llama-2-7b", "mistral-7b", "mixtral-8x7b", "mamba-130m", "bert-base", "vit-base"} <= set(
        known_architectures()
    )
    with pytest.raises(ValueError, match="embedded configs: .*gpt2"):
        load_architecture_config("no-such-model")
    assert load_architecture_config("gpt2", n_layer=2).num_hidden_layers == 2


def test_a_smaller_vocabulary_moves_the_special_token_ids_inside_it():
    # ids outside the vocabulary make transformers warn at every config built (train_kss.py --tiny, the docs)
    config = load_architecture_config("gpt2", vocab_size=256)
    assert (config.bos_token_id, config.eos_token_id) == (0, 0)
    assert load_architecture_config("gpt2", vocab_size=256, bos_token_id=7).bos_token_id == 7  # an override stands
    assert load_architecture_config("gpt2").bos_token_id == 50256  # the full vocabulary keeps them


def test_video_probe_is_a_clip_batch():
    from transformers import AutoModel, VideoMAEConfig

    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = AutoModel.from_config(config).eval()
    batch = default_probe_inputs(model, num_tokens=64)
    assert batch["pixel_values"].shape == (1, 4, 3, 32, 32)  # (B, T, C, H, W): 4 frames x 16 patches >= 64 tokens
    with torch.no_grad():
        assert model(**batch).last_hidden_state.shape == (1, 2 * 16, 32)  # 2 tubelets x 16 patches


def test_packed_patch_probe_for_qwen_vl_style_vision_encoders():
    from transformers import AutoModel
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    from hf_koopman.profiling import profile

    config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                    patch_size=4, fullatt_block_indexes=[1])
    model = AutoModel.from_config(config).eval()
    assert model.main_input_name != "hidden_states"  # inherited name; the probe must follow the forward signature
    batch = default_probe_inputs(model, num_tokens=100)
    # ceil(100 / 64) images of 8 x 8 patches, each patch C * temporal_patch * p * p = 3 * 2 * 4 * 4 values
    assert batch["hidden_states"].shape == (128, 96)
    assert batch["grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    result = profile(model, batch, num_samples=128, rank=4)
    assert len(result.layers) == 2


def test_layout_models_get_valid_boxes():
    from transformers import AutoModel, LayoutLMConfig

    config = LayoutLMConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
    model = AutoModel.from_config(config).eval()
    batch = default_probe_inputs(model, num_tokens=64)
    bbox = batch["bbox"]
    assert bbox.shape == (*batch["input_ids"].shape, 4)
    assert (bbox[..., 2] >= bbox[..., 0]).all() and (bbox[..., 3] >= bbox[..., 1]).all()  # (x0, y0, x1, y1)
    assert bbox.min() >= 0 and bbox.max() <= 1000
    assert "bbox" not in default_probe_inputs(tiny_config("gpt2"), num_tokens=64)  # only where the forward takes it
    with torch.no_grad():
        model(**batch)


def test_spectrogram_transformers_get_a_spectrogram_probe():
    from transformers import ASTConfig, ASTForAudioClassification

    from hf_koopman.profiling import profile

    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       num_mel_bins=32, max_length=64, num_labels=3)
    model = ASTForAudioClassification(config)
    probe = default_probe_inputs(model, num_tokens=256)
    assert probe["input_values"].shape[1:] == (64, 32)  # (B, frames, mel bins), not a waveform
    result = profile(model, num_samples=256, progress=False)
    assert min(result.meta["tokens_seen_per_layer"].values()) >= 256
