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


# ------------------------------------------------------------------------ 10. routes by list path, not label text
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
_VISION_32 = dict(**_TOWER, image_size=32, patch_size=8)  # 32 px images in 8 px patches: 16 + 1 = 17 tokens


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def test_blip_captioning_text_decoder_takes_the_caption_mask():
    """BLIP's captioning model is not encoder-decoder: its `text_decoder` reads `input_ids` with `attention_mask`,
    while its vision tower (labelled "encoder") has no padding."""
    model = _seeded(lambda: transformers.BlipForConditionalGeneration(
        transformers.BlipConfig(text_config=dict(**_TOWER, vocab_size=100), vision_config=_VISION_32)))
    batch = {**_captions(4, 5, 17), "pixel_values": torch.randn(4, 3, 32, 32)}
    counts = profile(model, batch, num_samples=16, progress=False).meta["tokens_seen_per_layer"]
    assert counts == {"vision_model.encoder.layers.0": 4 * 17, "text_decoder.bert.encoder.layer.0": 4 * 5}


def test_blip_question_answering_decoder_takes_the_decoder_mask_when_fed_decoder_inputs():
    model = _seeded(lambda: transformers.BlipForQuestionAnswering(
        transformers.BlipConfig(text_config=dict(**_TOWER, vocab_size=100), vision_config=_VISION_32)))
    blocks = find_residual_blocks(model)
    routes = mask_routes(model, blocks, {"decoder_input_ids": torch.ones(2, 6, dtype=torch.long)})
    assert routes["text_decoder.bert.encoder.layer"] == "decoder"
    assert routes["text_encoder.encoder.layer"] == "attention_mask" and routes["vision_model.encoder.layers"] is None
    assert mask_routes(model, blocks)["text_decoder.bert.encoder.layer"] is None  # no decoder inputs: not its tower


@pytest.mark.parametrize(("build", "image", "text"), [
    (lambda: transformers.GitForCausalLM(transformers.GitConfig(
        vision_config=_VISION_32, **_TOWER, vocab_size=100, num_image_with_embedding=None)),
     "git.image_encoder.vision_model.encoder.layers", "git.encoder.layer"),
    (lambda: transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(
        vision_config=_VISION_32, qformer_config=dict(**_TOWER, vocab_size=100, encoder_hidden_size=32),
        num_query_tokens=4)),
     "vision_model.encoder.layers", "qformer.encoder.layer"),
])
def test_tied_stacks_leave_the_image_tower_unmasked(build, image, text):
    """The token embedding shares as many path components with the image tower as with the text stack (GIT's
    `git.embeddings`, BLIP-2's root `embeddings`): the stack whose path names an image tower gets no mask."""
    model = _seeded(build)
    routes = mask_routes(model, find_residual_blocks(model))
    assert routes[image] is None and routes[text] == "attention_mask"


def test_git_image_tower_keeps_every_image_token():
    model = _seeded(lambda: transformers.GitForCausalLM(transformers.GitConfig(
        vision_config=_VISION_32, **_TOWER, vocab_size=100, num_image_with_embedding=None)))
    batch = {**_captions(4, 6, 17), "pixel_values": torch.randn(4, 3, 32, 32)}
    counts = profile(model, batch, num_samples=8, progress=False).meta["tokens_seen_per_layer"]
    assert counts["git.image_encoder.vision_model.encoder.layers.0"] == 4 * 17  # not 4 x 6 caption tokens


def test_mask_routes_unwrap_a_peft_model():
    """Under a `PeftModel` every path starts with `base_model.model`: the routes are those of the bare model (FLAVA's
    multimodal stack, which does not name an image tower, gets no text mask either)."""
    peft = pytest.importorskip("peft")
    flava = _seeded(lambda: transformers.FlavaModel(transformers.FlavaConfig(
        text_config=dict(**_TOWER, vocab_size=100), image_config=_VISION_32, multimodal_config=_TOWER)))
    model = peft.get_peft_model(flava, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    routes = mask_routes(model, find_residual_blocks(model))
    assert {label: routes[label] for label in ("text_model.encoder.layer", "image_model.encoder.layer",
                                               "multimodal_model.encoder.layer")} == {
        "text_model.encoder.layer": "attention_mask", "image_model.encoder.layer": None,
        "multimodal_model.encoder.layer": None}


# ------------------------------------------------------------------------ 11. layers= blocks from several lists
def test_layers_override_from_two_towers_keeps_each_tower_its_mask():
    model = _tiny_clip()
    batch = {**_captions(4, 10, 50), "pixel_values": torch.randn(4, 3, 63, 63)}
    prof = profile(model, batch, num_samples=16, progress=False, layers=[f"{TEXT}.0", f"{VISION}.0"])
    assert prof.meta["tokens_seen_per_layer"] == {f"{VISION}.0": 4 * 50, f"{TEXT}.0": 4 * 10}


def test_layers_override_of_the_vision_tower_alone_takes_no_text_mask():
    model = _tiny_clip()
    batch = {**_captions(4, 10, 50), "pixel_values": torch.randn(4, 3, 63, 63)}  # text and image grids coincide
    prof = profile(model, batch, num_samples=16, progress=False, layers=VISION)
    assert set(prof.meta["tokens_seen_per_layer"].values()) == {4 * 50}


def test_layers_override_of_whole_towers_keeps_them_apart():
    # the towers' encoders sit in no list: each is labelled by its parent, so the text mask stays on the text tower
    model = _tiny_clip()
    batch = {**_captions(4, 10, 50), "pixel_values": torch.randn(4, 3, 63, 63)}
    prof = profile(model, batch, num_samples=16, progress=False, layers=["text_model.encoder", "vision_model.encoder"])
    assert prof.meta["tokens_seen_per_layer"] == {"vision_model.encoder": 4 * 50, "text_model.encoder": 4 * 10}


def test_layers_override_of_sub_modules_of_one_list_is_one_stack():
    model = tiny_model("llama")
    blocks = find_residual_blocks(model, layers=[f"model.layers.{i}.mlp" for i in range(2)])
    assert [b.stack for b in blocks] == ["", ""]


def test_layers_override_labels_blocks_by_their_list():
    model = tiny_model("t5")
    assert [b.stack for b in find_residual_blocks(model, layers=["encoder.block.0", "decoder.block.0"])] == [
        "encoder", "decoder"]
    assert {b.stack for b in find_residual_blocks(model, layers=["decoder.block.0", "decoder.block.1"])} == {""}
    batch, real = _seq2seq_batch(model)
    batch["attention_mask"][:, 3:] = 0
    counts = profile(model, batch, num_samples=8, progress=False, layers=["encoder.block.0", "decoder.block.0"])
    assert counts.meta["tokens_seen_per_layer"] == {"encoder.block.0": 6 * 3, "decoder.block.0": real}


# ------------------------------------------------------------------------ 12. streaming records as profile() does
def test_streaming_reads_the_decoder_padding_from_the_labels_as_profile_does(tmp_path):
    from hf_koopman.profiling import profile_streaming

    model = tiny_model("t5")
    model.save_pretrained(tmp_path)
    batch, real = _seq2seq_batch(model)
    in_memory = profile(model, batch, num_samples=8, progress=False).meta["tokens_seen_per_layer"]
    streamed = profile_streaming(tmp_path, inputs=dict(batch), num_samples=8, progress=False)
    assert streamed.meta["tokens_seen_per_layer"] == in_memory
    assert in_memory["decoder.block.0"] == real  # not 6 x 11 = 66


def test_streaming_refuses_fewer_than_two_token_states(tmp_path):
    from hf_koopman.profiling import profile_streaming

    tiny_model("llama").save_pretrained(tmp_path)
    batch = {"input_ids": torch.tensor([[5, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 0, 0, 0]])}
    with pytest.raises(ValueError, match=r"saw 1 real token state\(s\)"):
        profile_streaming(tmp_path, inputs=batch, num_samples=8, progress=False)


def test_peft_prompt_tuning_counts_its_virtual_tokens_and_keeps_the_padding_out():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=8))
    ids = torch.randint(0, base.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0
    result = profile(model, inputs={"input_ids": ids, "attention_mask": mask}, num_samples=64)
    # 8 learned tokens in front of each row are real states of the stream; the 10 padded positions are not
    assert set(result.meta["tokens_seen_per_layer"].values()) == {4 * (8 + 30)}
    wrapped = profile(torch.nn.DataParallel(model), inputs={"input_ids": ids, "attention_mask": mask}, num_samples=64)
    assert wrapped.meta["tokens_seen_per_layer"] == result.meta["tokens_seen_per_layer"]  # found inside DP / DDP


def test_peft_prompt_tuning_leaves_room_for_its_virtual_tokens_in_the_position_table():
    peft = pytest.importorskip("peft")
    base = tiny_model("gpt2")
    base.config.n_positions = 40  # a short position table: the default probe would fill it
    base.transformer.wpe = torch.nn.Embedding(40, base.config.n_embd)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=8))
    result = profile(model, num_samples=64)  # the default probe's rows hold 40 - 8 tokens
    assert set(result.meta["tokens_seen_per_layer"].values()) == {2 * (8 + 32)}
    ids = torch.randint(0, base.config.vocab_size, (2, 40))
    with pytest.raises(ValueError, match="with the 8 virtual tokens of the PEFT adapter in front, more than the 40 "
                                         "positions of GPT2LMHeadModel; pass at most 32 tokens per row"):
        profile(model, inputs={"input_ids": ids}, num_samples=64)
    # prefix tuning's keys and values come first: the text's position ids start after them
    prefix = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=8))
    assert set(profile(prefix, num_samples=64).meta["tokens_seen_per_layer"].values()) == {2 * 32}
    crowded = peft.get_peft_model(tiny_model("gpt2"), peft.PromptTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=tiny_model("gpt2").config.n_positions))
    with pytest.raises(ValueError, match="virtual tokens take all .* positions .* use fewer num_virtual_tokens"):
        profile(crowded, num_samples=64)


def test_peft_modules_to_save_on_a_whole_block_keeps_the_block_list():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    reference = profile(base, num_samples=64, seed=3)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, target_modules=["q_proj"],
                                                      modules_to_save=["layers.1"]))
    blocks = find_residual_blocks(model)
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert type(blocks[1].module).__name__ == "ModulesToSaveWrapper"  # the copy PEFT trains runs inside it
    result = profile(model, num_samples=64, seed=3)  # LoRA B = 0 and the saved copy is the block: the same spectra
    assert [f.near_unit_mass for f in result.features] == [f.near_unit_mass for f in reference.features]


def test_an_adapter_method_peft_cannot_run_on_the_model_is_not_blamed_on_the_inputs():
    peft = pytest.importorskip("peft")
    base = transformers.GPT2ForSequenceClassification(tiny_model("gpt2").config)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=4))
    with pytest.raises(ValueError, match=r"PEFT's PeftModelForSequenceClassification raised before any block ran: .*"
                                         r"past key values.*get_base_model\(\)") as err:
        profile(model, num_samples=64)
    assert "Pass inputs this model's forward takes" not in str(err.value)
    # an input the model itself rejects stays the inputs' problem, PEFT or not
    base = tiny_model("gpt2")
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, target_modules=["c_attn"]))
    both = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "inputs_embeds": torch.randn(2, 8, base.config.n_embd)}
    with pytest.raises(ValueError, match="rejected the inputs before any block ran"):
        profile(lora, inputs=both, num_samples=8)


def test_a_shuffling_dataloader_leaves_the_global_generator_and_gives_the_same_profile():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (64, 32), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=8, shuffle=True)
    state = torch.get_rng_state()
    first = profile(model, loader, num_samples=256, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator did not move
    second = profile(model, loader, num_samples=256, progress=False)
    assert [f.to_dict() for f in first.features] == [f.to_dict() for f in second.features]


def test_padded_ids_without_a_mask_are_named_with_the_fix(caplog):
    """Token ids padded with the model's pad token and passed without attention_mask: the padding is profiled as
    tokens, so a warning names the mask; with the mask (or without padding) nothing is said."""
    from hf_koopman.profiling.inputs import logger as inputs_logger
    from hf_koopman.profiling.inputs import prepare_batch

    model = tiny_model("bert")  # pad_token_id = 0
    ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    padded = ids.clone()
    padded[:2, 10:] = 0
    inputs_logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        prepare_batch({"input_ids": ids}, model)
        prepare_batch({"input_ids": padded, "attention_mask": (padded != 0).long()}, model)
    assert "pad token" not in caplog.text
    with caplog.at_level(logging.WARNING):
        prepare_batch({"input_ids": padded}, model)
    assert "runs of the pad token (0" in caplog.text and "attention_mask" in caplog.text


def test_the_last_stage_estimate_reads_the_stem_stride_and_leaves_super_resolution_alone():
    from transformers import AutoConfig

    from hf_koopman.profiling.probes import _image_geometry

    tokens = {t: _image_geometry(AutoConfig.for_model(t))[2] for t in ("hiera", "poolformer", "swin2sr", "resnet")}
    # Hiera and PoolFormer: a 4-px stem stride (not the 7-px kernel, not patch_size 16), 4 stages: 7 x 7 at the last;
    # Swin2SR keeps its 64 x 64 one-pixel patches; ResNet (no patch size) is read as before
    assert tokens == {"hiera": 49, "poolformer": 49, "swin2sr": 64 * 64, "resnet": 196}


@pytest.mark.parametrize("model_type", ["convnext", "swin"])
def test_the_default_image_probe_feeds_the_last_stage_of_a_hierarchical_model(model_type):
    """ConvNeXt and Swin merge 2 x 2 tokens at each stage: the default probe holds enough images that the last stage
    gets `num_tokens` token states (one 224-px image gives it 49), and every profiled layer reads them."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type)  # 224 px, 4-px patches, 4 stages
    assert default_probe_inputs(config, num_tokens=2048)["pixel_values"].shape[0] == 42  # ceil(2048 / 49)
    small = AutoConfig.for_model(model_type, image_size=64, depths=[1, 1, 1], **(
        {"hidden_sizes": [8, 16, 32], "num_stages": 3} if model_type == "convnext" else {"embed_dim": 8, "num_heads": [1, 1, 1],
                                                                        "window_size": 2}))
    torch.manual_seed(0)
    result = profile(AutoModel.from_config(small), num_samples=64)
    assert min(n for n, _ in result.layer_sizes) >= 64


def test_a_one_dimensional_waveform_is_one_example():
    """A raw-audio model (wav2vec2) given one waveform `(samples,)` profiles it as a batch of one, as a 1-D tensor of
    token ids is one sequence."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("wav2vec2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    waveform = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    result = profile(model, waveform, num_samples=32)
    assert result.meta["tokens_seen"] > 0


def test_dataloaders_of_text_rows_and_of_plain_tensors_are_read():
    """A DataLoader over a text dataset yields {"text": [...]}: tokenised as a list of texts is (it reached the model
    untokenised); a DataLoader over a TensorDataset yields [tensor] batches: read as a bare tensor is (refused as
    not a dict)."""
    import datasets

    model = tiny_model("llama")
    texts = ["the residual stream carries token states from block to block " * 4] * 8
    loader = torch.utils.data.DataLoader(datasets.Dataset.from_dict({"text": texts}), batch_size=4)
    by_loader = profile(model, loader, num_samples=64)
    by_list = profile(model, texts, num_samples=64, batch_size=4)
    assert by_loader.meta["tokens_seen"] == by_list.meta["tokens_seen"] > 0
    ids = torch.randint(1, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    tensors = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    assert profile(model, tensors, num_samples=64).meta["tokens_seen"] == 8 * 32
    with pytest.raises(TypeError, match="mapping of tensors"):
        profile(model, [[1, 2, 3]], num_samples=64)
    # a GLUE-style batch with an index and labels beside the sentences is still text
    glue = torch.utils.data.DataLoader(datasets.Dataset.from_dict(
        {"sentence": texts, "label": [0, 1] * 4, "idx": list(range(8))}).with_format("torch"), batch_size=4)
    assert profile(model, glue, num_samples=64).meta["tokens_seen"] == by_list.meta["tokens_seen"]
    # an image-caption batch's text is its target: the images are the input, as before
    vit = tiny_model("vit")
    pixels = torch.randn(2, 3, vit.config.image_size, vit.config.image_size)
    captioned = {"pixel_values": pixels, "text": ["a cat", "a dog"]}
    assert profile(vit, captioned, num_samples=16).meta["tokens_seen"] == profile(
        vit, {"pixel_values": pixels}, num_samples=16).meta["tokens_seen"]


@pytest.mark.parametrize("given", ["input_ids", "pixel_values"])
def test_a_dual_encoder_given_one_towers_input_is_told_it_needs_both(given):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "clip", text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "intermediate_size": 64, "vocab_size": 99},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    inputs = {"input_ids": torch.randint(1, 99, (4, 16))} if given == "input_ids" else {
        "pixel_values": torch.randn(4, 3, 32, 32)}
    with pytest.raises(Exception) as err:
        profile(model, inputs, num_samples=32)
    text = str(err.value) + "".join(getattr(err.value, "__notes__", []))
    assert "is a dual encoder" in text and "model.text_model or model.vision_model" in text
