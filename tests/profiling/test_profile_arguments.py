"""profile() / profile_from_snapshots(): argument checks before the forward pass, eig_dtype forwarding, and the
sample-size warning logged through the hf_koopman logger."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import hf_koopman.koopman
from hf_koopman.profiling import profile, profile_from_snapshots
from hf_koopman.profiling.report import render_report
from hf_koopman.testing_utils import tiny_model


def _model_without_forward():
    """A tiny model whose forward fails the test: the checks must run before it."""
    model = tiny_model("llama", num_hidden_layers=2)

    def forbid(*_):
        raise AssertionError("the forward pass ran before the argument check")

    model.register_forward_pre_hook(forbid)
    return model


def _snapshots(num_layers: int = 3, n: int = 256, d: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_layers):
        X = torch.randn(n, d, generator=generator)
        out.append((f"layers.{i}", X, X @ (0.9 * torch.eye(d)) + 0.1 * torch.randn(n, d, generator=generator)))
    return out


# ------------------------------------------------------------------------------------------- unknown keywords
def test_misspelled_keyword_is_named_before_the_forward_with_the_closest_name():
    with pytest.raises(TypeError) as err:
        profile(_model_without_forward(), num_samples=128, num_sample=3)
    message = str(err.value)
    assert "profile() got an unexpected keyword argument 'num_sample'; did you mean 'num_samples'?" in message
    assert "spectral_features" not in message
    for accepted in ("num_samples", "learning_rate", "eig_dtype", "near_band", "compute_kreiss"):
        assert accepted in message


def test_keyword_profile_sets_itself_is_named_as_such():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'stacks' \(profile\(\) sets it itself\)"):
        profile(_model_without_forward(), num_samples=64, stacks=["a", "b"])


def test_profile_from_snapshots_names_an_unknown_feature_keyword():
    with pytest.raises(TypeError, match=r"profile_from_snapshots\(\) got an unexpected keyword argument "
                                        r"'compute_kreis'; did you mean 'compute_kreiss'\?"):
        profile_from_snapshots(_snapshots(), compute_kreis=False)


def test_pass_through_keywords_still_reach_the_analysis():
    result = profile(tiny_model("llama", num_hidden_layers=2), num_samples=64, rank=8, compute_kreiss=False,
                     near_band=(0.8, 1.1))
    assert result.settings["near_band"] == [0.8, 1.1]
    assert all(np.isnan(f.kreiss) for f in result.features)


# ------------------------------------------------------------------------------------- integer-likes, learning rate
def test_num_samples_accepts_integer_likes():
    result = profile(tiny_model("llama", num_hidden_layers=2), num_samples=np.int64(64), rank=8)
    assert result.settings["num_samples"] == 64 and type(result.settings["num_samples"]) is int
    assert result.meta["num_samples_requested"] == 64 <= result.meta["tokens_seen"]  # the probe gave what was asked


def test_inputs_shorter_than_num_samples_advise_more_text():
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))  # 80 token states
    result = profile(tiny_model("llama", num_hidden_layers=2), {"input_ids": ids}, num_samples=512)
    assert result.meta["num_samples_requested"] == 512 and result.meta["tokens_seen"] == 80
    report = render_report(result)
    assert "the inputs gave only 80 token states" in report and "supply more or longer inputs" in report
    assert "use more tokens (`num_samples`" not in report


@pytest.mark.parametrize("value", [True, 64.0, np.float64(64.0), "64", 1])
def test_num_samples_rejects_bools_floats_and_too_small(value):
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        profile(_model_without_forward(), num_samples=value)


@pytest.mark.parametrize("value", [-1, 0, 0.0, -3e-4, float("nan"), float("inf")])
def test_non_positive_or_non_finite_learning_rate_is_an_error(value):
    with pytest.raises(ValueError, match="learning_rate=.* must be a positive finite number"):
        profile(_model_without_forward(), num_samples=64, learning_rate=value)


def test_learning_rate_of_the_wrong_type_is_an_error():
    with pytest.raises(TypeError, match="learning_rate must be a number"):
        profile(_model_without_forward(), num_samples=64, learning_rate="3e-4")


def test_numpy_learning_rate_is_stored_as_a_float():
    result = profile(tiny_model("llama", num_hidden_layers=2), num_samples=64, rank=8, learning_rate=np.float64(3e-4))
    assert result.meta["learning_rate"] == 3e-4 and type(result.meta["learning_rate"]) is float


# ------------------------------------------------------------------------------------------------- eig_dtype
def _spy_whitened_dmd(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = hf_koopman.koopman.whitened_dmd

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_koopman.koopman, "whitened_dmd", spy)
    return calls


def test_profile_forwards_eig_dtype_to_whitened_dmd(monkeypatch):
    calls = _spy_whitened_dmd(monkeypatch)
    result = profile(tiny_model("llama", num_hidden_layers=2), num_samples=64, eig_dtype=torch.float64)
    assert calls and all(c["eig_dtype"] is torch.float64 for c in calls)
    assert result.settings["eig_dtype"] == "float64"
    calls.clear()
    profile(tiny_model("llama", num_hidden_layers=2), num_samples=64)
    assert calls and all(c["eig_dtype"] is None for c in calls)


def test_profile_from_snapshots_eig_dtype_float64_matches_a_direct_float64_solve():
    # above 256 modes the default eigenproblem is float32: float64 must give the float64 eigenvalues
    n, d = 640, 300
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=generator)
    Y = X @ (torch.randn(d, d, generator=generator) / d**0.5)
    direct = hf_koopman.koopman.whitened_dmd(X, Y, eig_dtype=torch.float64)
    moduli = np.sort(np.abs(direct.eigenvalues[: int(direct.rank_x)].numpy()))
    exact = profile_from_snapshots([("block", X, Y)], eig_dtype=torch.float64, compute_kreiss=False)
    assert np.sort(np.abs(exact.eigenvalues[0])) == pytest.approx(moduli, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("value", ["float64", torch.float16])
def test_bad_eig_dtype_is_an_error_before_the_forward(value):
    with pytest.raises(ValueError, match="eig_dtype=.* must be torch.float32, torch.float64 or None"):
        profile(_model_without_forward(), num_samples=64, eig_dtype=value)


# ------------------------------------------------------------------------------------- sample-size warning
def test_sample_size_warning_is_logged_once_and_follows_the_transformers_verbosity(caplog, monkeypatch):
    from transformers.utils import logging as hf_logging

    import hf_koopman.profiling.profiler as profiler_module

    snapshots = _snapshots(num_layers=3, n=12, d=16)  # N < d in every chunk
    before = hf_logging.get_verbosity()
    try:
        monkeypatch.setattr(profiler_module, "_LOGGED_NOTES", set())
        hf_logging.set_verbosity_error()
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
            warnings.simplefilter("error")  # a warning that escapes would fail the call
            profile_from_snapshots(snapshots, chunk_size=1)
        assert "rank-limited" not in caplog.text
        hf_logging.set_verbosity(before)
        monkeypatch.setattr(profiler_module, "_LOGGED_NOTES", set())
        caplog.clear()
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
            warnings.simplefilter("error")
            profile_from_snapshots(snapshots, chunk_size=1)
            profile_from_snapshots(snapshots, chunk_size=1)  # a repeat (monitoring) goes to DEBUG
        records = [r for r in caplog.records if "rank-limited" in r.getMessage()]
        assert len(records) == 1 and records[0].levelno == logging.WARNING
        assert records[0].name.startswith("hf_koopman") and "N=12 snapshots for d=16" in records[0].getMessage()
    finally:
        hf_logging.set_verbosity(before)


def test_whitened_dmd_still_warns_its_direct_callers():
    X = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="N=12 snapshots for d=16 features: the DMD estimate is rank-limited"):
        hf_koopman.koopman.whitened_dmd(X, X + 0.1 * torch.tanh(X))


def test_other_warnings_of_whitened_dmd_are_re_emitted(monkeypatch):
    real = hf_koopman.koopman.whitened_dmd

    def noisy(*args, **kwargs):
        warnings.warn("something else", RuntimeWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_koopman.koopman, "whitened_dmd", noisy)
    with pytest.warns(RuntimeWarning, match="something else"):
        profile_from_snapshots(_snapshots(num_layers=1))


# ---------------------------------------------------------------------------------------- layers= hint
def test_not_a_residual_block_error_names_the_cli_option():
    with pytest.raises(ValueError, match="ran but is not a residual block") as err:
        profile(tiny_model("gpt2", num_hidden_layers=2), layers="transformer", num_samples=64, rank=4)
    assert "`layers=` (CLI: `--layers`)" in str(err.value)


def test_progress_bars_follow_the_transformers_switch_unless_asked(capsys):
    from transformers.utils import logging as hf_logging

    model = tiny_model("llama", num_hidden_layers=2)
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        profile(model, num_samples=64, rank=8)
        assert "whitened DMD" in capsys.readouterr().err  # default: shown, as transformers shows its bars
        hf_logging.disable_progress_bar()
        profile(model, num_samples=64, rank=8)
        assert "whitened DMD" not in capsys.readouterr().err
        profile(model, num_samples=64, rank=8, progress=True)  # an explicit choice wins
        assert "whitened DMD" in capsys.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def test_inputs_the_model_does_not_take_are_named():
    with pytest.raises(ValueError, match=r"GPT2Model rejected the inputs before any block ran \(given "
                                         r"\['pixel_values'\]\).*inputs=None for the default probe"):
        profile(tiny_model("gpt2", head=False), {"pixel_values": torch.randn(1, 3, 8, 8)}, num_samples=64)
