"""profile() at the edges a user meets: layers with fewer token states than their width (the verdict, the aggregates and
the token-shortage advice), train() overrides, ranks that cover every mode, analysis options, in-place compiled models,
integer pixels, iterable datasets, argument checks, the masses plot, and position tables with and without an offset."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch
from test_profile_arguments import _model_without_forward  # the forward fails: checks run before it
from torch import nn

from hf_koopman.koopman.features import LayerFeatures
from hf_koopman.profiling import DecisionRule, SpectralProfile, default_probe_inputs, profile, profile_from_snapshots
from hf_koopman.profiling.report import render_report
from hf_koopman.testing_utils import tiny_model


def _snapshots(sizes, seed: int = 0):
    """`(name, X, Y)` per `(N, d)` in `sizes`: a contracting linear map plus noise (an informative layer)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, d) in enumerate(sizes):
        X = torch.randn(n, d, generator=generator)
        out.append((f"layers.{i}", X, 0.5 * X + 0.3 * torch.randn(n, d, generator=generator)))
    return out


def _features(near: float, *, degenerate: bool = False, eta: float = 0.3, reliable: int = 10) -> LayerFeatures:
    return LayerFeatures(near_unit_mass=near, unstable_mass=1 - near, contractive_mass=0.0, mid_mass=0.0,
                         spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=eta, kreiss=float("inf"),
                         n_modes=10, n_reliable=reliable, degenerate=degenerate)


# ------------------------------------------------------------------------ 1. every layer's own N/d, not the first's
def test_layers_with_too_few_token_states_for_their_width_are_left_out_of_the_score():
    result = profile_from_snapshots(_snapshots([(256, 16), (256, 16), (16, 16), (16, 16)]))
    assert result.layer_sizes == [(256, 16), (256, 16), (16, 16), (16, 16)]
    assert result.settings["num_samples"] == 256 and result.settings["samples_per_dim_min"] == 1.0
    assert result.undersampled_layers == ["layers.2", "layers.3"]
    assert result.informative_layers == ["layers.0", "layers.1"]
    first_two = np.mean([f.near_unit_mass for f in result.features[:2]])
    assert result.score == pytest.approx(first_two)
    assert "2 of 4 layers were left out for too few token states for their width (N/d < 2" in result.verdict_reason
    assert "longer decoder inputs" in result.verdict_reason
    report = render_report(result)
    assert "> **Note — 2 of 4 layers had too few token states for their width**" in report
    assert "`layers.2` (N = 16, d = 16)" in report
    assert "| 2 | `layers.2` |" in report and report.count("| no |") == 2  # per-layer N, d and whether it is read
    # profile.json carries every layer's N and d, and reads back to the same verdict
    data = json.loads(result.to_json())
    assert [(row["num_samples"], row["hidden_size"]) for row in data["layers"]] == result.layer_sizes
    assert data["undersampled_layers"] == ["layers.2", "layers.3"]
    again = SpectralProfile.from_json(result.to_json())
    assert again.layer_sizes == result.layer_sizes and again.verdict_reason == result.verdict_reason


def test_fewer_than_half_the_layers_adequately_sampled_is_uninformative_and_says_why():
    result = profile_from_snapshots(_snapshots([(256, 16), (16, 16), (16, 16), (16, 16)]))
    assert result.verdict == "uninformative"
    assert result.verdict_reason.startswith("1 of 4 layers are informative; 3 of 4 layers were left out for too few "
                                            "token states for their width")
    assert "barely change" not in result.verdict_reason  # all three are left out for their sample


def test_uniform_profiles_keep_the_sample_size_verdict_and_their_score():
    # one N and d for every layer: below 2 d the whole profile is uninformative on the sample size
    result = profile_from_snapshots(_snapshots([(24, 16)] * 3))
    assert result.verdict == "uninformative" and result.verdict_reason.startswith("N = 24 token states for width "
                                                                                  "d = 16 (N/d = 1.50 < 2)")
    assert result.undersampled_layers == [] and result.score is not None
    assert len(result.informative_layers) == 3


def test_encoder_decoder_with_short_decoder_inputs_reads_the_encoder_only():
    model = tiny_model("t5")
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 100, (8, 64), generator=generator),
             "decoder_input_ids": torch.randint(5, 100, (8, 4), generator=generator)}
    result = profile(model, batch, num_samples=256)
    assert result.undersampled_layers == ["decoder.block.0", "decoder.block.1"]
    assert [size for size in result.layer_sizes] == [(256, 32), (256, 32), (32, 32), (32, 32)]
    assert result.score == pytest.approx(np.mean([f.near_unit_mass for f in result.features[:2]]))
    assert "2 of 4 layers were left out for too few token states" in result.verdict_reason


def _tiny_t5_batch(encoder_length: int, decoder_length: int) -> dict[str, torch.Tensor]:
    """8 rows of random ids for the tiny T5: `encoder_length` encoder and `decoder_length` decoder tokens a row."""
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 100, (8, encoder_length), generator=generator),
            "decoder_input_ids": torch.randint(5, 100, (8, decoder_length), generator=generator)}


def test_aggregates_and_the_risk_leave_out_the_layers_left_out_for_their_sample():
    from hf_koopman.koopman.aggregate import aggregate_features
    from hf_koopman.risk import RiskEstimator

    result = profile(tiny_model("t5"), _tiny_t5_batch(64, 4), num_samples=256, learning_rate=0.1)
    assert result.undersampled_layers == ["decoder.block.0", "decoder.block.1"]
    encoder = result.features[:2]
    expected = dict(aggregate_features(encoder))
    expected["near_unit_mass_x_log10_kappa_mean"] = float(
        np.mean([f.near_unit_mass * np.log10(max(f.eigvec_condition, 1.0)) for f in encoder]))
    assert result.aggregates == expected
    assert result.aggregates["near_unit_mass_mean"] == pytest.approx(result.score)  # the encoder's layers are read
    assert result.settings["aggregates_left_out"] == ["decoder.block.0", "decoder.block.1"]
    estimator = RiskEstimator.default()
    assert result.risk == pytest.approx(estimator.predict_proba(expected, learning_rate=0.1))
    every_layer = dict(aggregate_features(result.features))
    assert result.risk != pytest.approx(estimator.predict_proba(every_layer, learning_rate=0.1), rel=0.05)
    report = render_report(result)
    assert ("Over the 2 of 4 layers with enough token states for their width (N/d ≥ 2, the default rule): the 2 with "
            "too few (`decoder.block.0`, `decoder.block.1`) are not in these aggregates") in report
    assert "including the 2 the verdict leaves out for too few token states" in report  # the per-stack table
    assert "| decoder | 2 | 2 |" in report and "| encoder | 2 | 0 |" in report
    # the estimator's range check reads the model's depth (4 blocks), not the aggregated count (2)
    assert result.aggregates["num_layers"] == 2
    assert estimator._inputs(result, 0.1, {})["num_layers"] == 4
    assert estimator._inputs(result.to_dict(), 0.1, {})["num_layers"] == 4  # and from its profile.json form
    again = SpectralProfile.from_json(result.to_json())
    assert again.aggregates == result.aggregates and render_report(again) == render_report(result)
    del again.settings["aggregates_left_out"]  # a profile.json whose aggregates cover every layer
    assert "Over all 4 layers, including the 2 the verdict leaves out for too few token states" in render_report(again)


def test_uniform_models_aggregate_every_layer_degenerate_ones_included():
    from hf_koopman.koopman.aggregate import aggregate_features

    model = tiny_model("llama", num_hidden_layers=3)
    block = model.model.layers[1]  # a zero-initialised residual branch: the block passes its input on
    for weight in (block.self_attn.o_proj.weight, block.mlp.down_proj.weight):
        torch.nn.init.zeros_(weight)
    result = profile(model, num_samples=128)
    assert result.degenerate_layers == ["model.layers.1"] and len(set(result.layer_sizes)) == 1
    assert "model.layers.1" not in result.informative_layers  # the verdict leaves it out, the aggregates do not
    expected = dict(aggregate_features(result.features))
    expected["near_unit_mass_x_log10_kappa_mean"] = float(
        np.mean([f.near_unit_mass * np.log10(max(f.eigvec_condition, 1.0)) for f in result.features]))
    assert result.aggregates == expected and result.aggregates["num_degenerate"] == 1
    assert "aggregates_left_out" not in result.settings
    report = render_report(result)
    assert "## Aggregates across layers\n\n| feature |" in report


def test_token_shortage_is_judged_on_the_layers_the_verdict_reads():
    model = tiny_model("t5")
    # the encoder saw 512 token states and used 96; only the left-out decoder (32) ran short of tokens
    result = profile(model, _tiny_t5_batch(64, 4), num_samples=96)
    sample = next(line for line in render_report(result).splitlines() if line.startswith("- Sample"))
    assert sample.endswith("— use more tokens (`num_samples`, `--num-samples`) for a firmer estimate.")
    assert "cannot help" not in result.verdict_reason
    assert result.meta["tokens_seen"] == 32 and result.meta["tokens_seen_per_layer"] == {
        "encoder.block.0": 512, "encoder.block.1": 512, "decoder.block.0": 32, "decoder.block.1": 32}
    # no layer adequately sampled: the encoder (64 token states, 48 used) is judged, and more num_samples helps
    result = profile(model, _tiny_t5_batch(8, 2), num_samples=48)
    assert result.verdict == "uninformative" and result.verdict_reason.endswith(
        "profile with num_samples >= 64 for a verdict (>= 256 for one without the sampling caution)")
    assert profile(model, _tiny_t5_batch(8, 2), num_samples=64).verdict != "uninformative"
    # the judged encoder runs short itself: its own count (32 token states), not the decoder's 16
    result = profile(model, _tiny_t5_batch(4, 2), num_samples=48)
    assert "the inputs gave only 32 token states, all of them used, so a larger num_samples cannot help" in (
        result.verdict_reason)
    result = profile(model, _tiny_t5_batch(8, 2), num_samples=128)  # read encoder: 64 of 128, N/d = 2
    assert result.undersampled_layers == ["decoder.block.0", "decoder.block.1"]
    assert "— the inputs gave only 64 token states and all were used" in render_report(result)
    # a profile.json without per-layer counts reads tokens_seen
    del result.meta["tokens_seen_per_layer"]
    assert "— the inputs gave only 16 token states and all were used" in render_report(result)


def _tiny_whisper(**overrides):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "whisper", **{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                      "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
                      "num_mel_bins": 8, "max_source_positions": 64, "max_target_positions": 48, "pad_token_id": 0,
                      "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1, **overrides})
    return AutoModel.from_config(config).eval()


def test_whisper_default_probe_gives_the_decoder_at_least_num_samples_distinct_tokens():
    model = _tiny_whisper()
    batch = default_probe_inputs(model, num_tokens=256)
    decoder = batch["decoder_input_ids"]
    # 64 encoder frames a row would need 4 rows; 48 decoder positions a row need ceil(256 / 48) = 6
    assert batch["input_features"].shape[0] == decoder.shape[0] == 6 and decoder.shape[1] == 43
    assert decoder.numel() >= 256 and decoder.shape[1] <= 48
    assert bool((decoder[:, 0] == 1).all()) and decoder[:, 1:].unique().numel() > 10
    result = profile(model, num_samples=256)
    assert result.layer_sizes == [(256, 32), (256, 32)] and result.undersampled_layers == []
    # the encoder needs more rows than the decoder: its count stands
    assert default_probe_inputs(_tiny_whisper(max_target_positions=448), num_tokens=256)["input_features"].shape[0] == 4


def test_whisper_given_input_features_only_gets_synthetic_decoder_tokens():
    # what a feature extractor returns: the decoder gets its start token and synthetic tokens up to its positions
    model = _tiny_whisper()
    result = profile(model, inputs={"input_features": torch.randn(3, 8, 128)}, num_samples=64)
    decoder = [n for n in result.meta["tokens_seen_per_layer"] if n.startswith("decoder.")]
    assert decoder and all(result.meta["tokens_seen_per_layer"][n] == 3 * 48 for n in decoder)


def test_a_seq2seq_batch_with_labels_feeds_the_decoder_the_shifted_labels():
    # as in training (DataCollatorForSeq2Seq without model=): the decoder reads the labels, padded with -100
    from transformers import T5ForConditionalGeneration

    from hf_koopman.testing_utils import tiny_config

    model = T5ForConditionalGeneration(tiny_config("t5")).eval()
    ids = torch.randint(1, 50, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(1, 50, (4, 10), generator=torch.Generator().manual_seed(1))
    labels[:2, 7:] = -100
    result = profile(model, inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                     num_samples=16)
    seen = result.meta["tokens_seen_per_layer"]
    decoder = [n for n in seen if n.startswith("decoder.")]
    encoder = [n for n in seen if n.startswith("encoder.")]
    assert decoder and encoder
    assert all(seen[n] == int((labels != -100).sum()) for n in decoder)  # 34 label tokens, not the 96 source tokens
    assert all(seen[n] == 96 for n in encoder)
    # the base model takes no labels (its decoder never sees them in training): the decoder reads the source tokens
    base = profile(tiny_model("t5"), inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                              "labels": labels}, num_samples=16)
    assert all(n == 96 for n in base.meta["tokens_seen_per_layer"].values())


def test_a_tokenized_seq2seq_dataset_feeds_the_decoder_its_labels_column():
    pytest.importorskip("datasets")
    from datasets import Dataset
    from transformers import T5ForConditionalGeneration

    from hf_koopman.testing_utils import tiny_config

    model = T5ForConditionalGeneration(tiny_config("t5")).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 50, (10 + i,), generator=gen).tolist(),
             "labels": torch.randint(1, 50, (3 + i,), generator=gen).tolist()} for i in range(6)]
    result = profile(model, inputs=Dataset.from_list(rows), num_samples=16, batch_size=3)
    seen = result.meta["tokens_seen_per_layer"]
    assert all(seen[n] == sum(len(r["labels"]) for r in rows) for n in seen if n.startswith("decoder."))  # 33
    assert all(seen[n] == sum(len(r["input_ids"]) for r in rows) for n in seen if n.startswith("encoder."))  # 75


def test_whisper_given_labels_feeds_its_decoder_the_shifted_labels_and_their_padding():
    # Whisper has no prepare_decoder_input_ids_from_labels: it shifts the labels inside its forward in training
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(_tiny_whisper().config).eval()
    labels = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    labels[:, 5:] = -100
    result = profile(model, inputs={"input_features": torch.randn(4, 8, 128), "labels": labels}, num_samples=16)
    seen = result.meta["tokens_seen_per_layer"]
    decoder = [n for n in seen if "decoder." in n]
    assert decoder and all(seen[n] == 20 for n in decoder)  # 4 x 5 label tokens, not 4 x 48 synthetic ones


def test_an_encoder_decoder_without_a_decoder_start_token_falls_back_to_the_encoder_tokens():
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**small), BertConfig(**small, is_decoder=True, add_cross_attention=True))
    config.pad_token_id = 0  # no decoder_start_token_id: the model's own label shift refuses
    model = EncoderDecoderModel(config=config).eval()
    ids = torch.randint(1, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    result = profile(model, inputs={"input_ids": ids, "labels": labels}, num_samples=16)
    assert all(n == 96 for n in result.meta["tokens_seen_per_layer"].values())


# ------------------------------------------------------------------------ 2. training flags come back through train()
class _Recording(nn.Module):
    """A module whose `train()` override records every call, like LeViT's cache reset."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls: list[bool] = []

    def forward(self, x):
        return x + self.linear(x)

    def train(self, mode: bool = True):
        self.calls.append(mode)
        return super().train(mode)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Recording() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_train_overrides_run_when_the_mode_comes_back_and_mixed_modes_survive():
    model = _Toy().train()
    model.layers[1].eval()  # a frozen block inside a training model
    model.layers[2].linear.eval()
    before = {name: m.training for name, m in model.named_modules()}
    for layer in model.layers:
        layer.calls.clear()
    profile(model, torch.randn(4, 16, 4), num_samples=32, layers="layers")
    assert {name: m.training for name, m in model.named_modules()} == before
    # layer 0 went eval -> train: its override saw the switch back, as after the caller's own model.train()
    assert model.layers[0].calls[0] is False and model.layers[0].calls[-1] is True
    assert model.layers[1].calls[-1] is False and model.layers[2].calls[-1] is True


def test_levit_attention_bias_cache_is_cleared_when_the_model_returns_to_training():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("levit", image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
                                  depths=[2, 2, 2], key_dim=[8, 8, 8], patch_size=16, stride=2, kernel_size=3)
    model = AutoModel.from_config(config).train()
    attention = next(m for m in model.modules() if hasattr(m, "attention_bias_cache"))
    profile(model, {"pixel_values": torch.randn(2, 3, 64, 64)}, num_samples=16)
    assert model.training and attention.attention_bias_cache == {}  # no bias cached from the eval forward


# ------------------------------------------------------------------------ 3. a rank that covers every mode
def test_rank_at_or_above_every_layers_modes_is_recorded_as_the_full_spectrum():
    snapshots = _snapshots([(256, 16)] * 2)
    full, covered = profile_from_snapshots(snapshots), profile_from_snapshots(snapshots, rank=100)
    for a, b in zip(full.eigenvalues, covered.eigenvalues):
        np.testing.assert_allclose(np.sort_complex(a), np.sort_complex(b))
    assert covered.settings["spectrum"] == "full" and covered.settings["randomized"] is False
    assert covered.settings["rank"] == 100 and "every layer" in covered.settings["rank_note"]
    assert covered.verdict_reason == full.verdict_reason
    assert "not the full spectrum" not in render_report(covered)
    # randomized=True asks for the range finder, which a layer with every mode computed does not need
    assert profile_from_snapshots(snapshots, rank=100, randomized=True).settings["randomized"] is False


def test_rank_that_truncates_some_layers_only_says_so():
    result = profile_from_snapshots(_snapshots([(256, 16), (8, 16)]), rank=12)  # min(N, d): 16 and 8
    assert result.settings["spectrum"] == "rank-12 approximation in 1 of 2 layers, full spectrum in the others"
    assert result.settings["truncated_layers"] == 1 and result.settings["randomized"] is True
    assert "This is the **rank-12 approximation in 1 of 2 layers" in render_report(result)
    assert profile_from_snapshots(_snapshots([(256, 16)]), rank=8).settings["spectrum"] == "rank-8 approximation"


# ------------------------------------------------------------------------ 4. the summary reads what the verdict reads
def test_report_summary_averages_over_the_layers_the_verdict_reads():
    layers = [("layers.0", _features(1.0, degenerate=True)), ("layers.1", _features(1.0, degenerate=True)),
              ("layers.2", _features(0.1)), ("layers.3", _features(0.3))]
    result = SpectralProfile(layers=layers, aggregates={}, settings={"num_samples": 4096, "hidden_size": 64})
    report = render_report(result)
    assert ("- Over the 2 informative blocks the verdict reads (2 of 4 left out: 2 degenerate or not explained by a "
            "linear map), on average 20% of the modes") in report
    assert "unexplained on average over those blocks" in report


# ------------------------------------------------------------------------ 5. analysis options are recorded and followed
def test_feature_options_passed_through_profile_are_recorded_and_the_report_follows_them():
    model = tiny_model("llama", num_hidden_layers=2)
    result = profile(model, num_samples=128, reliable_only=True, degenerate_tol=0.5)
    assert result.settings["reliable_only"] is True and result.settings["degenerate_tol"] == 0.5
    assert result.settings["compute_kreiss"] is True  # the defaults are recorded too
    report = render_report(result)
    assert "the masses count every mode" not in report
    assert "the masses and ρ count only those (`reliable_only=True`)" in report
    assert "`reliable_only`: True" in report
    plain = profile_from_snapshots(_snapshots([(256, 16)]))
    assert plain.settings["reliable_only"] is False and "the masses count every mode" in render_report(plain)


# ------------------------------------------------------------------------ 6. model.compile() in place
def test_model_compiled_in_place_is_profiled_eagerly_and_keeps_its_compiled_call():
    # nn.Module.compile() stores torch.compile(self._call_impl) as `_compiled_call_impl`, which __call__ prefers
    assert "_compiled_call_impl" in inspect.getsource(nn.Module.compile)
    model = tiny_model("gpt2", head=False)

    def compiled(*args, **kwargs):
        raise AssertionError("the profile ran the compiled call")

    model._compiled_call_impl = compiled  # what model.compile() installs, without paying for a compilation here
    result = profile(model, num_samples=64)
    assert len(result.layers) == 2 and model._compiled_call_impl is compiled


# ------------------------------------------------------------------------ 7. integer pixels, errors that name inputs
@pytest.mark.parametrize("as_dict", [False, True])
def test_integer_pixel_values_are_refused_with_the_fix(as_dict):
    model = tiny_model("vit")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"ViTModel takes floating-point pixel_values, got a uint8 tensor of shape "
                                         r"\(2, 3, 32, 32\); pass the output of the model's processor"):
        profile(model, {"pixel_values": pixels} if as_dict else pixels, num_samples=16)


def test_integer_pixel_values_in_a_dataset_keep_their_dtype_and_are_refused():
    datasets = pytest.importorskip("datasets")
    model = tiny_model("vit")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32)).astype(np.uint8)
    for dataset in (datasets.Dataset.from_dict({"pixel_values": pixels}),
                    datasets.Dataset.from_dict({"pixel_values": pixels}).with_format("numpy"),
                    datasets.Dataset.from_dict({"pixel_values": pixels}).to_iterable_dataset()):
        with pytest.raises(ValueError, match="ViTModel takes floating-point pixel_values, got a uint8 tensor"):
            profile(model, dataset, num_samples=16)
    floats = datasets.Dataset.from_dict({"pixel_values": pixels.astype(np.float32) / 255})
    assert profile(model, floats, num_samples=16).meta["tokens_seen"] == 4 * 17
    # a transform that turns the stored integers into floats: the rows it returns are what the model gets
    scaled = datasets.Dataset.from_dict({"pixel_values": pixels}).with_transform(
        lambda batch: {"pixel_values": [np.asarray(x, dtype=np.float32) / 255 for x in batch["pixel_values"]]})
    assert profile(model, scaled, num_samples=16).meta["tokens_seen"] == 4 * 17


def test_errors_before_and_after_the_blocks_name_the_inputs_passed():
    model = tiny_model("gpt2", head=False)
    handle = model.register_forward_pre_hook(lambda *_: None.missing)  # an AttributeError before any block
    with pytest.raises(ValueError, match=r"rejected the inputs before any block ran .*AttributeError.*called with "
                                         r"input_ids \(\d+, \d+\) int64"):
        profile(model, num_samples=64)
    handle.remove()

    def fail(*_):
        raise RuntimeError("boom")

    model.h[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom") as err:
        profile(model, num_samples=64)
    assert any("forward failed on input_ids" in note for note in getattr(err.value, "__notes__", [""]))


# ------------------------------------------------------------------------ 8. iterable datasets
def test_iterable_dataset_of_token_ids_is_read_row_by_row_until_enough_tokens():
    datasets = pytest.importorskip("datasets")
    read = []

    def rows():
        for i in range(1000):
            read.append(i)
            yield {"input_ids": [(7 * i + j) % 90 + 5 for j in range(16)], "label": 0}

    dataset = datasets.IterableDataset.from_generator(rows)
    result = profile(tiny_model("llama", num_hidden_layers=2), dataset, num_samples=64, max_tokens=256)
    assert result.meta["tokens_seen"] >= 256 and len(read) < 100  # stopped after max_tokens, not at the end
    assert result.layer_sizes[0] == (64, 32)
    # with known columns (Dataset.to_iterable_dataset), labels dropped and rows of different lengths padded
    ids = [[(3 * i + j) % 90 + 5 for j in range(8 + i % 5)] for i in range(64)]
    known = datasets.Dataset.from_dict({"input_ids": ids, "label": [0] * 64}).to_iterable_dataset()
    result = profile(tiny_model("llama", num_hidden_layers=2), known, num_samples=64, max_tokens=128)
    assert 128 <= result.meta["tokens_seen"] < 64 * 8


# ------------------------------------------------------------------------ 9. arguments checked before the forward
@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"max_length": 1}, "max_length must be an int >= 2, got 1"),
    ({"max_tokens": 0}, "max_tokens must be an int >= 1, got 0"),
    ({"max_tokens": -1}, "max_tokens must be an int >= 1, got -1"),
    ({"seed": 1.5}, "seed must be an int, got 1.5"),
    ({"rank": 0}, r"rank must be a positive int or None \(the full spectrum\), got 0; pass e.g. rank=32"),
    ({"rank": 8.0}, "rank must be a positive int or None"),
    ({"randomized": True}, r"randomized=True needs a rank.*Pass a rank as well \(e.g. rank=32"),
])
def test_bad_arguments_fail_before_the_forward_pass_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        profile(_model_without_forward(), num_samples=64, **kwargs)


def test_randomized_without_rank_fails_before_the_analysis_too():
    with pytest.raises(ValueError, match="randomized=True needs a rank"):
        profile_from_snapshots(_snapshots([(64, 8)]), randomized=True)


# ------------------------------------------------------------------------ 10. the masses plot says what it counts
def test_masses_plot_labels_follow_the_bands_and_the_tentative_verdict():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hf_koopman.profiling.plotting import plot_masses

    layers = [(f"layers.{i}", _features(0.25)) for i in range(3)]
    result = SpectralProfile(layers=layers, aggregates={}, settings={"num_samples": 640, "hidden_size": 64})
    assert result.verdict_reason.startswith("tentative: ")
    ax = plot_masses(result)
    try:
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert "M<0.80 (contracting, |λ| < 0.80)" in labels and not any("M<1" in label for label in labels)
        assert ax.get_title() == "Spectral masses vs depth — verdict: safe (tentative)"
    finally:
        plt.close(ax.figure)


# ------------------------------------------------------------------------ 11. position tables with an offset
def test_roberta_style_position_offset_caps_the_probe_and_text_length():
    from transformers import AutoConfig, AutoModel

    from hf_koopman.profiling.probes import max_sequence_length

    config = AutoConfig.for_model("roberta", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, vocab_size=100, max_position_embeddings=130, pad_token_id=1)
    model = AutoModel.from_config(config).eval()
    assert max_sequence_length(model) == 128  # 130 positions less padding_idx + 1
    assert default_probe_inputs(model, num_tokens=128)["input_ids"].shape[1] == 128
    assert len(profile(model, num_samples=128).layers) == 2
    text = "abdefghij " * 100  # no byte maps to the padding id 1
    result = profile(model, [text, text], num_samples=128, max_length=600)
    assert result.meta["tokens_seen"] == 2 * 128


def test_position_tables_that_count_from_zero_keep_every_position():
    from transformers import AutoConfig, AutoModel

    from hf_koopman.profiling.probes import max_sequence_length

    # LXMERT's table has padding_idx=0, but its embeddings count positions 0..T-1 (no RoBERTa offset)
    config = AutoConfig.for_model("lxmert", hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                                  x_layers=1, r_layers=1, vocab_size=100, max_position_embeddings=64)
    model = AutoModel.from_config(config)
    assert model.embeddings.position_embeddings.padding_idx == 0 and max_sequence_length(model) == 64


def test_layer_sizes_must_match_the_layers():
    with pytest.raises(ValueError, match="layer_sizes has 1 entries for 2 layers"):
        SpectralProfile(layers=[("a", _features(0.1)), ("b", _features(0.1))], aggregates={}, layer_sizes=[(8, 4)])
    assert DecisionRule().is_sampled(None, 64) and not DecisionRule().is_sampled(16, 64)
    assert dataclasses.fields(SpectralProfile)[-1].name == "layer_sizes"


def test_a_batch_encoding_counts_as_one_batch_in_the_progress_bar():
    from transformers import BatchEncoding, BatchFeature

    from hf_koopman.profiling.profiler import _expected_batches

    ids = torch.zeros(2, 4, dtype=torch.long)
    assert _expected_batches(BatchEncoding({"input_ids": ids, "attention_mask": ids}), 8) == 1
    assert _expected_batches(BatchFeature({"pixel_values": torch.zeros(2, 3, 8, 8), "labels": ids}), 8) == 1


def test_the_short_sample_note_names_the_layers_that_fell_short(caplog):
    import logging

    from hf_koopman.testing_utils import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with caplog.at_level(logging.WARNING):
        profile(model, inputs={"input_ids": ids}, num_samples=64, progress=False)
    layers = model.config.num_hidden_layers
    assert f"only 32 valid token states reached some layers ({layers} of {layers}, fewest in 'model.layers.0'" in (
        caplog.text)
