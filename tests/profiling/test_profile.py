"""profile() end to end on tiny models: features finite, inputs of every kind, dtypes, modes, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_koopman.profiling import SpectralProfile, profile, profile_from_snapshots
from hf_koopman.testing_utils import tiny_model, tiny_peft_model

FAMILIES = ["gpt2", "llama", "mistral", "mixtral", "qwen2_moe", "mamba", "mamba2", "bert", "vit"]
FLOAT_FIELDS = (
    "near_unit_mass", "unstable_mass", "contractive_mass", "mid_mass", "spectral_radius", "eigvec_condition",
    "nonlinearity",
)


def _assert_sane(result: SpectralProfile, num_layers: int) -> None:
    assert len(result.layers) == num_layers
    for name, features in result.layers:
        for field in FLOAT_FIELDS:
            assert math.isfinite(getattr(features, field)), (name, field)
        masses = features.near_unit_mass + features.unstable_mass + features.contractive_mass + features.mid_mass
        assert masses == pytest.approx(1.0, abs=1e-6)
        assert 0 <= features.n_reliable <= features.n_modes
    assert result.verdict in ("safe", "moderate", "high risk", "uninformative")
    # the Kreiss constant is legitimately +inf when ρ > 1 (sup over |z| > 1 of (|z|-1)·||(zI-A)^-1|| diverges)
    assert all(math.isfinite(v) for k, v in result.aggregates.items() if k.endswith("_mean") and "kreiss" not in k)


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", FAMILIES)
def test_profile_every_family(arch):
    model = tiny_model(arch, num_hidden_layers=3)
    model.train()
    result = profile(model, num_samples=96, rank=8)
    _assert_sane(result, 3)
    assert model.training  # training mode restored
    assert _no_hooks_left(model)
    assert result.settings["num_samples"] == 96 and result.meta["num_blocks"] == 3


def test_profile_encoder_decoder_labels_both_stacks():
    result = profile(tiny_model("t5"), num_samples=64, rank=8)
    _assert_sane(result, 4)
    assert result.stacks == ["encoder", "encoder", "decoder", "decoder"]
    assert set(result.by_stack()) == {"encoder", "decoder"}


def test_profile_peft_lora_llama():
    model = tiny_peft_model("llama")
    result = profile(model, num_samples=64, rank=8)
    _assert_sane(result, 2)
    assert result.names == ["model.layers.0", "model.layers.1"]
    assert _no_hooks_left(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    model = tiny_model("llama", dtype=dtype)
    result = profile(model, num_samples=64, rank=8)
    _assert_sane(result, 2)
    assert result.meta["dtype"] == str(dtype).removeprefix("torch.")


def test_batch_of_one():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 128, (1, 40))
    result = profile(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, num_samples=2048, rank=8)
    _assert_sane(result, 2)
    assert result.settings["num_samples"] == 40  # fewer tokens than asked: all of them are used


def test_inputs_of_every_kind_agree():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    as_dict = profile(model, {"input_ids": ids}, num_samples=64, rank=None)
    as_tensor = profile(model, ids, num_samples=64, rank=None)
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    as_loader = profile(model, loader, num_samples=64, rank=None)
    datasets = pytest.importorskip("datasets")
    as_dataset = profile(model, datasets.Dataset.from_dict({"input_ids": ids.tolist()}), batch_size=4, num_samples=64,
                         rank=None)
    reference = [f.near_unit_mass for f in as_dict.features]
    for other in (as_tensor, as_loader, as_dataset):
        assert [f.near_unit_mass for f in other.features] == pytest.approx(reference)


def test_text_inputs_without_tokenizer_use_byte_ids():
    model = tiny_model("gpt2")
    result = profile(model, ["hello world " * 10, "koopman operators " * 8], num_samples=64, rank=8)
    _assert_sane(result, 2)
    # one id per UTF-8 byte, padding masked out, truncated to the 128 positions of the tiny GPT-2
    assert result.meta["tokens_seen"] == len(("hello world " * 10).encode()) + min(len(("koopman operators " * 8).encode()), 128)


def test_variable_length_dataset_rows_are_padded_and_masked():
    datasets = pytest.importorskip("datasets")
    rows = {"input_ids": [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]], "label": [0, 1, 0]}
    result = profile(tiny_model("bert"), datasets.Dataset.from_dict(rows), batch_size=3, num_samples=64, rank=None)
    assert result.meta["tokens_seen"] == 13


def test_unsupported_inputs_raise():
    model = tiny_model("gpt2")
    with pytest.raises(TypeError, match="unsupported inputs"):
        profile(model, 3.5)
    with pytest.raises(ValueError, match="num_samples"):
        profile(model, num_samples=1)
    with pytest.raises(TypeError, match="nn.Module"):
        profile("gpt2")


def test_nan_activation_error_names_the_layer_and_restores_mode():
    model = tiny_model("gpt2", num_hidden_layers=3)
    with torch.no_grad():
        model.transformer.h[2].mlp.c_proj.weight[0, 0] = float("inf")
    model.train()
    with pytest.raises(ValueError, match=r"block 'transformer\.h\.2'"):
        profile(model, num_samples=32, rank=4)
    assert model.training and _no_hooks_left(model)


def test_bad_layers_override_is_reported():
    with pytest.raises(ValueError, match="layers='transformer.blocks'"):
        profile(tiny_model("gpt2"), layers="transformer.blocks")


def test_identity_blocks_are_degenerate_and_uninformative():
    """ReZero/Fixup-style residual-off blocks (App. J): Y = X, the verdict must not be 'high risk'."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:  # zero the output projections: every block returns its input
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    result = profile(model, num_samples=64, rank=8)
    assert result.degenerate_layers == result.names
    assert result.verdict == "uninformative" and result.score is None
    assert "degenerate" in result.to_markdown()


def test_profile_from_snapshots_validates():
    with pytest.raises(ValueError, match="no snapshots"):
        profile_from_snapshots([])
    X = torch.randn(64, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank"):
        profile_from_snapshots([("a", X, X)], rank=0)
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="layer 'blk'"):
        profile_from_snapshots([("blk", bad, X)], rank=None)


def test_profile_from_snapshots_recovers_a_planted_spectrum():
    """Y = A X with A = 0.97·rotation on a 2-plane ⊕ 0.5·I: near-unit pair and contractive rest."""
    gen = torch.Generator().manual_seed(0)
    d = 6
    X = torch.randn(512, d, generator=gen, dtype=torch.float64)
    A = 0.5 * torch.eye(d, dtype=torch.float64)
    c, s = math.cos(0.3), math.sin(0.3)
    A[:2, :2] = 0.97 * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    result = profile_from_snapshots([("planted", X, X @ A.T)], rank=None)
    features = result.features[0]
    assert features.near_unit_mass == pytest.approx(2 / 6)
    assert features.contractive_mass == pytest.approx(4 / 6)
    assert features.spectral_radius == pytest.approx(0.97, abs=1e-3)


def test_data_parallel_wrapped_model():
    model = tiny_model("gpt2")
    result = profile(nn.DataParallel(model), num_samples=64, rank=8)
    _assert_sane(result, 2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hooks_match_hidden_states_except_the_post_norm_last_entry(arch):
    """Why hooks: output_hidden_states[-1] is post-final-norm for text models, the hooks' last Y is not."""
    from hf_koopman.profiling import ResidualStreamRecorder

    model = tiny_model(arch, head=False)
    ids = torch.randint(0, 128, (2, 10))
    with ResidualStreamRecorder(model, num_samples=None) as rec, torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    snaps = rec.snapshots()

    def same_rows(a, b):  # recorder rows are a permutation of the flattened (B*T, d) states
        return bool((torch.cdist(a, b.reshape(-1, b.shape[-1])).min(dim=1).values < 1e-5).all())

    for layer, (_, X, _) in enumerate(snaps):
        assert same_rows(X, hidden[layer])
    assert same_rows(snaps[-1][1], hidden[-2])
    assert not same_rows(snaps[-1][2], hidden[-1])  # hidden_states[-1] went through the final norm


def test_progress_bars_leave_no_hooks_and_do_not_alter_outputs():
    model = tiny_model("llama", num_hidden_layers=3)
    quiet = profile(model, num_samples=64, rank=8)
    loud = profile(model, num_samples=64, rank=8, progress=True)
    assert _no_hooks_left(model)
    assert [f.to_dict() for f in loud.features] == [f.to_dict() for f in quiet.features]


def test_hierarchical_vision_model_falls_back_to_nested_blocks():
    """Swin v2 records whole (downsampling) stages as hidden states; profile the residual blocks inside them."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("swinv2", image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                  window_size=4)
    model = AutoModel.from_config(config).eval()
    result = profile(model, num_samples=64, rank=4)
    assert result.names == ["encoder.layers.0.blocks.0", "encoder.layers.0.blocks.1", "encoder.layers.1.blocks.0",
                            "encoder.layers.1.blocks.1"]
    assert result.stacks == ["encoder.layers.0.blocks"] * 2 + ["encoder.layers.1.blocks"] * 2
    assert _no_hooks_left(model)
    with pytest.raises(ValueError, match="maps"):  # an explicit override is taken literally
        profile(model, layers="encoder.layers", num_samples=64, rank=4)


def test_forward_progress_bar_has_a_total_and_reaches_it(monkeypatch):
    from hf_koopman.profiling import profiler

    bars, real = [], profiler.tqdm

    def spy(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(profiler, "tqdm", spy)
    model = tiny_model("llama", num_hidden_layers=3)
    profile(model, num_samples=64, rank=8, progress=True)  # default probe inputs
    loader = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 100, (16,))} for _ in range(6)], batch_size=2)
    profile(model, loader, num_samples=64, rank=8, progress=True)  # 3 batches
    forward = [b for b in bars if b.desc.startswith("forward")]
    assert len(forward) == 2
    assert [b.total for b in forward] == [b.n for b in forward]  # a total, and the bar ends full
    assert forward[1].total == 3 * 3 and forward[1].desc == "forward (3 batches x 3 blocks)"  # the label says why
    # reading stops once every layer has max_tokens: the bar ends full there, and says how far it read
    long = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 100, (16,))} for _ in range(40)], batch_size=2)
    profile(model, long, num_samples=32, max_tokens=64, rank=8, progress=True)  # 2 of 20 batches
    stopped = [b for b in bars if b.desc.startswith("forward")][-1]
    assert stopped.total == stopped.n == 2 * 3 and stopped.desc.startswith("forward (2 of 20 batches x 3 blocks")


def test_compiled_model_is_profiled_through_its_eager_module():
    # torch.compile wraps the model in an OptimizedModule; the diagnostic forward runs the module it holds (the same
    # parameters), so nothing is compiled and the profile equals the uncompiled model's
    from torch._dynamo.utils import counters

    model = tiny_model("llama", num_hidden_layers=2)
    compiled = torch.compile(model)
    frames = counters["frames"]["total"]
    got = profile(compiled, num_samples=64)
    assert counters["frames"]["total"] == frames  # dynamo never ran
    ref = profile(model, num_samples=64)
    assert [f.near_unit_mass for f in got.features] == [f.near_unit_mass for f in ref.features]
    assert got.names == ref.names


def test_profile_from_snapshots_reads_numpy_arrays_and_checks_chunk_size():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=gen)
    Y = X + 0.1 * torch.tanh(X @ torch.randn(16, 16, generator=gen))
    from_numpy = profile_from_snapshots([("a", X.numpy(), Y.numpy())], progress=False)
    from_torch = profile_from_snapshots([("a", X, Y)], progress=False)
    assert from_numpy.features[0].to_dict() == from_torch.features[0].to_dict()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
            profile_from_snapshots([("a", X, Y)], chunk_size=bad)
