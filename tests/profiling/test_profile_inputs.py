"""What reaches profile() from the inputs: each mask reaches only its own stack (CLIP's text mask stays off the vision
tower), the decoder's padding is left out from `labels` when the batch has `decoder_input_ids`, parameters on `meta`
are refused before the forward (accelerate-offloaded ones still run), the default probe of a dual encoder feeds each
tower `num_samples` token states, and inputs with fewer than 2 real token states fail with the count and the fix."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from hf_koopman.profiling import default_probe_inputs, find_residual_blocks, profile
from hf_koopman.profiling.inputs import mask_routes
from hf_koopman.testing_utils import tiny_model

VISION, TEXT = "vision_model.encoder.layers", "text_model.encoder.layers"


def _tiny_clip(image_size: int = 63, patch_size: int = 9) -> transformers.PreTrainedModel:
    """CLIP with one 32-wide layer per tower: 63 px images in 9 px patches give 7 x 7 + 1 = 50 vision tokens."""
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.CLIPModel(config).eval()


def _captions(batch: int, real: int, width: int) -> dict[str, torch.Tensor]:
    """`batch` captions of `real` tokens each, right-padded to `width` (`input_ids`, `attention_mask` `(B, width)`)."""
    ids = torch.randint(3, 100, (batch, width))
    mask = torch.zeros(batch, width, dtype=torch.long)
    mask[:, :real] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


# ------------------------------------------------------------------------ 1. the text mask stays off the vision tower
def test_clip_text_mask_reaches_only_the_text_tower():
    """The captions' padding is left out of the text tower only; every image token reaches the vision tower, also
    when the padded caption grid `(B, 50)` has the vision tower's shape (`(B, 50)`)."""
    model = _tiny_clip()
    batch = {**_captions(4, 10, 50), "pixel_values": torch.randn(4, 3, 63, 63)}
    prof = profile(model, batch, num_samples=16, progress=False)
    assert prof.meta["tokens_seen_per_layer"] == {f"{VISION}.0": 4 * 50, f"{TEXT}.0": 4 * 10}


def test_clip_vision_tower_gets_no_mask_and_no_mismatch_warning(caplog):
    """A caption grid of another shape than the image tokens' is no reason to warn about the vision tower's
    padding: no mask belongs to it."""
    model = _tiny_clip()
    batch = {**_captions(3, 6, 20), "pixel_values": torch.randn(3, 3, 63, 63)}
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        prof = profile(model, batch, num_samples=16, progress=False)
    assert "does not match the token grid" not in caplog.text
    assert prof.meta["tokens_seen_per_layer"] == {f"{VISION}.0": 3 * 50, f"{TEXT}.0": 3 * 6}


@pytest.mark.parametrize(("arch", "expected"), [
    ("llama", {"": "attention_mask"}),
    ("t5", {"encoder": "attention_mask", "decoder": "decoder"}),
])
def test_mask_routes_of_single_stack_and_encoder_decoder_models_are_unchanged(arch, expected):
    model = tiny_model(arch)
    routes = mask_routes(model, find_residual_blocks(model))
    assert {label: routes[label] for label in expected} == expected


def test_mask_routes_of_a_dual_encoder_follow_the_token_embedding():
    model = _tiny_clip()
    routes = mask_routes(model, find_residual_blocks(model))
    assert routes[TEXT] == "attention_mask" and routes[VISION] is None


# ------------------------------------------------------------------------ 2. the decoder's padding, from the labels
def _seq2seq_batch(model) -> tuple[dict[str, torch.Tensor], int]:
    """A `DataCollatorForSeq2Seq`-style batch (labels padded with -100, `decoder_input_ids` the labels shifted right)
    and its number of real target tokens."""
    generator = torch.Generator().manual_seed(0)
    lengths = [2, 7, 1, 11, 3, 4]
    labels = torch.full((len(lengths), max(lengths)), -100)
    for row, n in enumerate(lengths):
        labels[row, :n] = torch.randint(3, 128, (n,), generator=generator)
    ids = torch.randint(3, 128, (len(lengths), 9), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "decoder_input_ids": model._shift_right(labels)}
    return batch, sum(lengths)


def test_decoder_padding_is_left_out_through_the_labels():
    model = tiny_model("t5")
    batch, real = _seq2seq_batch(model)
    counts = profile(model, batch, num_samples=8, progress=False).meta["tokens_seen_per_layer"]
    assert counts["decoder.block.0"] == counts["decoder.block.1"] == real  # not 6 x 11 = 66
    assert counts["encoder.block.0"] == 6 * 9


def test_decoder_attention_mask_wins_over_the_labels():
    model = tiny_model("t5")
    batch, _ = _seq2seq_batch(model)
    decoder_mask = torch.zeros_like(batch["labels"])
    decoder_mask[:, :2] = 1
    batch["decoder_attention_mask"] = decoder_mask
    counts = profile(model, batch, num_samples=8, progress=False).meta["tokens_seen_per_layer"]
    assert counts["decoder.block.0"] == 6 * 2


# ------------------------------------------------------------------------ 3. parameters on meta
def test_meta_parameters_are_refused_before_the_forward():
    model = tiny_model("llama")
    model.model.layers[1].mlp.to("meta")
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"3 parameter\(s\) or buffer\(s\) .* meta device") as info:
        profile(model, num_samples=64, progress=False)
    assert "model.layers.1.mlp.gate_proj.weight" in str(info.value) and "to_empty" in str(info.value)
    assert not calls


def test_a_model_built_on_meta_is_refused_with_the_fix():
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_model("llama").config)
    with pytest.raises(ValueError, match=r"\.\.\. \(\d+ more\)\. A forward would read uninitialised memory"):
        profile(model, num_samples=64, progress=False)


def test_accelerate_offloaded_parameters_still_profile():
    """Parameters that accelerate keeps on `meta` and loads in its hooks are not refused, and the inputs go to a
    device with data (not the offloaded parameters' `meta`)."""
    accelerate = pytest.importorskip("accelerate")
    plain = profile(tiny_model("llama"), num_samples=64, progress=False)
    model = tiny_model("llama")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in model.parameters())
    offloaded = profile(model, num_samples=64, progress=False)
    assert offloaded.layers[0][1].spectral_radius == pytest.approx(plain.layers[0][1].spectral_radius)


# ------------------------------------------------------------------------ 7. the default probe of a dual encoder
def test_dual_encoder_probe_feeds_each_tower_num_tokens():
    """CLIP ViT-B/32 geometry: 49 patches per image and 77 text positions; 2048 token states need 42 images, not the
    27 rows the text alone needs (27 x 49 = 1323)."""
    config = transformers.CLIPConfig(vision_config=dict(image_size=224, patch_size=32))
    batch = default_probe_inputs(config, num_tokens=2048)
    images, rows = batch["pixel_values"].shape[0], batch["input_ids"].shape[0]
    assert images * 49 >= 2048 and rows * 77 >= 2048 and images == rows


def test_dual_encoder_default_profile_gives_the_vision_tower_num_samples():
    prof = profile(_tiny_clip(), num_samples=256, progress=False)
    assert min(prof.meta["tokens_seen_per_layer"].values()) >= 256
    assert [n for n, _ in prof.layer_sizes] == [256, 256]


# ------------------------------------------------------------------------ 9b. fewer than 2 real token states
@pytest.mark.parametrize(("batch", "words"), [
    ({"input_ids": torch.tensor([[5]])}, "saw 1 real token state(s) (the inputs hold 1 position(s) in all)"),
    ({"input_ids": torch.tensor([[5, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 0, 0, 0]])},
     "saw 1 real token state(s) (the attention mask marks 3 of its 4 positions as padding)"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)},
     "saw 0 real token state(s) (the attention mask marks all 8 positions as padding)"),
])
def test_too_few_token_states_fail_with_the_count_and_the_fix(batch, words):
    with pytest.raises(ValueError) as info:
        profile(tiny_model("llama"), batch, progress=False)
    message = str(info.value)
    assert words in message
    assert "N >= 8 x hidden size = 256" in message and "Pass longer or more inputs" in message


def test_two_token_states_still_give_a_profile():
    prof = profile(tiny_model("llama"), {"input_ids": torch.tensor([[5, 6]])}, progress=False)
    assert prof.verdict == "uninformative"
