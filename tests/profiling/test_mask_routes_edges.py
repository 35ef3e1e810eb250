"""Mask routes at the edges of `mask_routes` and of `layers=` overrides: a connector stack (BLIP-2's Q-Former,
Idefics2's perceiver) reads query tokens and takes no text mask, also when a `layers=` override names it alone; the
encoder of an encoder-decoder model keeps `attention_mask`; sub-modules of T5 blocks named one per block form one stack
per tower, each with its tower's mask."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from hf_koopman.profiling import find_residual_blocks, profile
from hf_koopman.profiling.inputs import mask_routes
from hf_koopman.testing_utils import tiny_model

_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
_VISION_32 = dict(**_TOWER, image_size=32, patch_size=8)  # 32 px images in 8 px patches: 16 + 1 = 17 tokens
_IMAGE_TOKEN = 99  # the placeholder id of the image features in the text, inside the 100-token vocabulary
_QUERIES = 4  # query tokens of the Q-Former, latents of the perceiver: also the image placeholders per image
MISMATCH = "does not match the token grid"


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def _blip2() -> transformers.PreTrainedModel:
    """BLIP-2 with an OPT language model: the Q-Former turns 17 image tokens into 4 query tokens, which replace the 4
    image placeholders of the text."""
    return _seeded(lambda: transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
        vision_config=_VISION_32, qformer_config=dict(**_TOWER, vocab_size=100, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, word_embed_proj_dim=32),
        num_query_tokens=_QUERIES, image_token_index=_IMAGE_TOKEN)))


def _idefics2() -> transformers.PreTrainedModel:
    """Idefics2 with a 2-layer perceiver of 4 latents between the vision tower and a Mistral language model."""
    return _seeded(lambda: transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config(
        vision_config=_VISION_32,
        perceiver_config=dict(hidden_size=32, resampler_n_latents=_QUERIES, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(model_type="mistral", **_TOWER, num_key_value_heads=2, vocab_size=100),
        image_token_id=_IMAGE_TOKEN)))


def _prompts(batch: int, width: int, real: int) -> dict[str, torch.Tensor]:
    """`batch` prompts of `real` tokens, the first `_QUERIES` of them image placeholders, right-padded to `width`."""
    ids = torch.randint(3, _IMAGE_TOKEN, (batch, width), generator=torch.Generator().manual_seed(0))
    ids[:, :_QUERIES] = _IMAGE_TOKEN
    mask = torch.zeros(batch, width, dtype=torch.long)
    mask[:, :real] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


# ------------------------------------------------------------------------ connectors read query tokens
@pytest.mark.parametrize(("build", "connector", "pixels"), [
    (_blip2, "qformer.encoder.layer", (3, 32, 32)),
    (_idefics2, "model.connector.perceiver_resampler.layers", (1, 3, 32, 32)),  # one image per prompt
])
def test_layers_override_of_a_connector_alone_takes_no_text_mask(build, connector, pixels, caplog):
    """Every query token of the connector is real: the prompts' mask `(4, 10)` is not its mask, and no warning says
    that its padding is included. Auto-discovery routes the connector the same way."""
    model = build()
    assert mask_routes(model, find_residual_blocks(model, layers=connector)) == {"": None}
    assert mask_routes(model, find_residual_blocks(model))[connector] is None
    batch = {**_prompts(4, 10, 7), "pixel_values": torch.randn(4, *pixels)}
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        prof = profile(model, batch, num_samples=8, progress=False, layers=connector)
    assert MISMATCH not in caplog.text
    assert set(prof.meta["tokens_seen_per_layer"].values()) == {4 * _QUERIES}


def test_the_language_model_of_a_connector_model_keeps_the_text_mask():
    model = _blip2()
    batch = {**_prompts(4, 10, 7), "pixel_values": torch.randn(4, 3, 32, 32)}
    counts = profile(model, batch, num_samples=8, progress=False).meta["tokens_seen_per_layer"]
    assert counts == {"vision_model.encoder.layers.0": 4 * 17, "qformer.encoder.layer.0": 4 * _QUERIES,
                      "language_model.model.decoder.layers.0": 4 * 7}
    routes = mask_routes(model, find_residual_blocks(model, layers="language_model.model.decoder.layers"))
    assert routes == {"": "attention_mask"}


def test_a_connector_keeps_no_mask_when_the_batch_feeds_a_decoder():
    """With decoder inputs in the batch the language model's `decoder.layers` take the decoder's mask; the Q-Former,
    left alone with the vision tower, still takes no text mask."""
    model = _blip2()
    routes = mask_routes(model, find_residual_blocks(model), {"decoder_input_ids": torch.ones(2, 6, dtype=torch.long)})
    assert routes["language_model.model.decoder.layers"] == "decoder"
    assert routes["qformer.encoder.layer"] is None and routes["vision_model.encoder.layers"] is None


def test_a_q_former_that_embeds_the_text_keeps_its_mask():
    """BLIP-2's retrieval model embeds `input_ids` for its Q-Former (`embeddings` at the model's root): the Q-Former
    is its text tower there, alone or next to the vision tower."""
    model = _seeded(lambda: transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(
        vision_config=_VISION_32, qformer_config=dict(**_TOWER, vocab_size=100, encoder_hidden_size=32),
        num_query_tokens=_QUERIES)))
    assert mask_routes(model, find_residual_blocks(model, layers="qformer.encoder.layer")) == {"": "attention_mask"}
    assert mask_routes(model, find_residual_blocks(model))["qformer.encoder.layer"] == "attention_mask"


def test_the_encoder_of_a_speech_encoder_decoder_keeps_attention_mask():
    """Whisper's token embedding lies in its decoder; its encoder still takes `attention_mask`, the mask of the
    encoder's own inputs in an encoder-decoder model."""
    model = _seeded(lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, num_mel_bins=8, max_source_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)))
    assert mask_routes(model, find_residual_blocks(model)) == {
        "": "attention_mask", "encoder": "attention_mask", "decoder": "decoder"}
    assert mask_routes(model, find_residual_blocks(model, layers="model.encoder.layers")) == {"": "attention_mask"}


# ------------------------------------------------------------------------ T5 sub-modules, one per block
def _seq2seq_batch(model) -> tuple[dict[str, torch.Tensor], int]:
    """6 sources of 3 real tokens right-padded to 9, targets of 28 real tokens in all padded with -100 to 11."""
    generator = torch.Generator().manual_seed(0)
    lengths = [2, 7, 1, 11, 3, 4]
    labels = torch.full((len(lengths), max(lengths)), -100)
    for row, n in enumerate(lengths):
        labels[row, :n] = torch.randint(3, 128, (n,), generator=generator)
    ids = torch.randint(3, 128, (len(lengths), 9), generator=generator)
    mask = torch.zeros_like(ids)
    mask[:, :3] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "decoder_input_ids": model._shift_right(labels)}
    return batch, sum(lengths)


@pytest.mark.parametrize("sub", ["layer.0", "layer.0.SelfAttention"])
def test_t5_sub_modules_named_one_per_block_are_one_stack_per_tower(sub):
    """`encoder.block.{i}.layer.0` sit in one list per block (`encoder.block.{i}.layer`); they are the sub-modules of
    the blocks of one tower, one stack as `model.layers.{i}.mlp` are in Llama, with the tower's mask."""
    model = tiny_model("t5")
    encoder = [f"encoder.block.{i}.{sub}" for i in range(2)]
    decoder = [f"decoder.block.{i}.{sub}" for i in range(2)]
    assert {b.stack for b in find_residual_blocks(model, layers=encoder)} == {""}
    blocks = find_residual_blocks(model, layers=encoder + decoder)
    assert [b.stack for b in blocks] == ["encoder", "encoder", "decoder", "decoder"]
    batch, real = _seq2seq_batch(model)
    routes = mask_routes(model, blocks, batch)
    assert routes == {"": "attention_mask", "encoder": "attention_mask", "decoder": "decoder"}
    prof = profile(model, batch, num_samples=8, progress=False, layers=encoder + decoder)
    real_states = {**{name: 6 * 3 for name in encoder}, **{name: real for name in decoder}}  # 3 real of 9, 28 of 66
    assert prof.meta["tokens_seen_per_layer"] == real_states
    assert {stack: row["num_layers"] for stack, row in prof.by_stack().items()} == {"encoder": 2, "decoder": 2}


def test_sub_modules_of_one_t5_block_and_a_whole_block_are_one_stack():
    model = tiny_model("t5")
    layers = ["encoder.block.0", "encoder.block.1.layer.0", "encoder.block.1.layer.1"]
    blocks = find_residual_blocks(model, layers=layers)
    assert [b.stack for b in blocks] == ["", "", ""]


def test_swin_stages_named_block_by_block_stay_apart():
    """Swin's stage lists are discovered lists themselves (auto-discovery labels each stage apart): an override keeps
    them apart too."""
    model = _seeded(lambda: transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)))
    blocks = find_residual_blocks(model, layers=["encoder.layers.0.blocks.0", "encoder.layers.1.blocks.1.attention"])
    assert [b.stack for b in blocks] == ["encoder.layers.0.blocks", "encoder.layers.1.blocks"]
