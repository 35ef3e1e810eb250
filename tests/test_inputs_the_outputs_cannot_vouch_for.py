"""The risk assessment, the report and the CLI on inputs they cannot vouch for: ρ and κ(V) of float16 / bfloat16
profiles are called unreliable, an unknown weight origin is not "within the fitted range", a new profile does not
leave an earlier one's plots behind, and --split is never silently ignored."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from hf_koopman.cli import main
from hf_koopman.profiling import profile
from hf_koopman.profiling.report import render_report, save_profile
from hf_koopman.risk import RiskEstimator, low_precision_dtype
from hf_koopman.testing_utils import tiny_config, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:N=.*rank-limited:UserWarning")  # tiny token counts by design

FAST = ["--no-plots", "--no-progress"]


@pytest.fixture(scope="module")
def init_profile():
    """A float32 tiny LLaMA at initialisation: in the shipped estimator's ranges, weights "init"."""
    prof = profile(tiny_model("llama", num_hidden_layers=2), num_samples=128, model_name="tiny-llama", progress=False)
    assert prof.meta["weights"] == "init" and prof.meta["dtype"] == "float32"  # preconditions of the tests below
    return prof


def _checkpoint(tmp_path, name="ckpt"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / name
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------ 4. float16 / bfloat16: ρ and κ(V)
def test_float32_profile_is_in_range_and_carries_no_precision_note(init_profile):
    assessment = RiskEstimator.default().assess(init_profile, learning_rate=1e-2)
    assert assessment.out_of_range is False and not assessment.unknown
    assert low_precision_dtype(init_profile) is None and "activations:**" not in render_report(init_profile)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_profile_calls_rho_and_kappa_unreliable_in_the_risk_and_the_report(init_profile, dtype):
    low = copy.deepcopy(init_profile)
    low.meta["dtype"] = dtype
    low.meta["learning_rate"] = 1e-2
    assessment = RiskEstimator.default().assess(low)
    # the shipped estimator reads spectral_radius_max and eigvec_condition_mean: unknown, not "within the fitted range"
    assert assessment.out_of_range is None and assessment.status == "ranges unknown"
    assert set(assessment.unknown) == {f"spectral_radius_max (unreliable in {dtype})",
                                       f"eigvec_condition_mean (unreliable in {dtype})"}
    note = assessment.range_note
    assert "within the fitted range" not in note and f"computed in {dtype}" in note
    assert "`--dtype fp32` on the CLI, `model.float()`" in note and "largest ρ" in note
    report = render_report(low)
    assert f"> **Note — {dtype} activations:** ρ and κ(V) are unreliable" in report
    assert "`--dtype fp32` on the CLI, `model.float()`" in report
    assert json.loads(low.to_json())["risk_assessment"]["out_of_range"] is None


def test_profile_of_a_half_precision_model_records_its_dtype_and_is_flagged():
    half = profile(tiny_model("llama", num_hidden_layers=2, dtype=torch.bfloat16), num_samples=128, progress=False)
    assert half.meta["dtype"] == "bfloat16"  # what the flag reads
    assessment = RiskEstimator.default().assess(half, learning_rate=1e-2)
    assert "spectral_radius_max (unreliable in bfloat16)" in assessment.unknown and assessment.out_of_range is not False
    assert low_precision_dtype(half) == "bfloat16"


# ------------------------------------------------------------------------------ 6. unknown weight origin
def test_profile_without_a_weight_origin_is_not_within_the_fitted_range(init_profile):
    unknown = copy.deepcopy(init_profile)
    del unknown.meta["weights"]  # what profile() records for a model without learned norm scales
    unknown.meta["learning_rate"] = 1e-2
    assessment = RiskEstimator.default().assess(unknown)
    assert assessment.out_of_range is None and assessment.unknown == ("weights (origin unknown)",)
    assert "within the fitted range" not in assessment.describe()
    note = assessment.range_note
    assert "the weights' origin is unknown" in note and 'profile.meta["weights"]' in note
    assert "the weights' origin is unknown" in render_report(unknown)
    # a bare mapping of aggregates carries no meta: the caller supplies the inputs, nothing to call unknown
    bare = RiskEstimator.default().assess(
        {**init_profile.aggregates, "model_type": "llama", "hidden_size": 32, "num_layers": 2}, learning_rate=1e-2)
    assert bare.out_of_range is False


# ------------------------------------------------------------------------------ 8. an earlier profile in the folder
def test_saving_over_an_earlier_profile_removes_only_its_stale_plots_and_warns(init_profile, tmp_path, caplog):
    out = tmp_path / "out"
    save_profile(init_profile, out, plots=False)
    for plot in ("eigenvalues.png", "masses.png"):  # the earlier run's plots
        (out / plot).write_bytes(b"png")
    (out / "notes.txt").write_text("mine")
    other = copy.deepcopy(init_profile)
    other.model_name = "other-model"
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        written = save_profile(other, out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "profile.json", "report.md"]
    assert (out / "notes.txt").read_text() == "mine" and set(written) == {"profile", "report"}
    assert json.loads((out / "profile.json").read_text())["model_name"] == "other-model"
    message = caplog.text
    assert "held an earlier profile of 'tiny-llama'" in message and "replaced profile.json, report.md" in message
    assert "removed eigenvalues.png, masses.png" in message


def test_a_folder_without_an_earlier_profile_is_left_as_it_is(init_profile, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "masses.png").write_bytes(b"not ours: no profile.json next to it")
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        save_profile(init_profile, out, plots=False)
    assert (out / "masses.png").exists() and "earlier profile" not in caplog.text


def test_cli_default_out_is_one_folder_per_model(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path, "my-ckpt")
    monkeypatch.chdir(tmp_path)
    assert main(["profile", str(folder), "--num-samples", "64", *FAST]) == 0
    assert main(["profile", str(folder), "--init", "--num-samples", "64", *FAST]) == 0
    runs = tmp_path / "hf_koopman_out"
    assert sorted(p.name for p in runs.iterdir()) == ["my-ckpt", "my-ckpt-init"]  # as the quickstart's gpt2-init
    assert (runs / "my-ckpt" / "profile.json").is_file() and (runs / "my-ckpt-init" / "report.md").is_file()


def test_cli_default_out_keeps_an_earlier_profile_of_the_same_model(tmp_path, monkeypatch, caplog):
    # profile, fine-tune, save_pretrained into the same folder, profile again: the "before" profile stays; an
    # explicit --out replaces on purpose
    folder = _checkpoint(tmp_path, "my-ckpt")
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "hf_koopman_out"
    assert main(["profile", str(folder), "--num-samples", "64", *FAST]) == 0
    before = (runs / "my-ckpt" / "profile.json").read_text()
    for _ in range(2):
        assert main(["profile", str(folder), "--num-samples", "64", *FAST]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["my-ckpt", "my-ckpt-2", "my-ckpt-3"]
    assert (runs / "my-ckpt" / "profile.json").read_text() == before
    assert "holds an earlier profile: this profile is written to hf_koopman_out/my-ckpt-2 instead" in caplog.text
    assert main(["profile", str(folder), "--num-samples", "64", *FAST, "--out", "hf_koopman_out/my-ckpt"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["my-ckpt", "my-ckpt-2", "my-ckpt-3"]
    # a default folder holding the user's own files (no profile) is passed over too, not refused
    other = _checkpoint(tmp_path, "other")
    (runs / "other").mkdir()
    (runs / "other" / "report.md").write_text("my notes")
    assert main(["profile", str(other), "--num-samples", "64", *FAST]) == 0
    assert (runs / "other" / "report.md").read_text() == "my notes" and (runs / "other-2" / "profile.json").is_file()
    assert "hf_koopman_out/other holds other files" in caplog.text


def test_cli_half_precision_run_says_rho_and_kappa_are_unreliable(tmp_path, capsys):
    folder = _checkpoint(tmp_path)
    assert main(["profile", str(folder), "--dtype", "fp16", "--num-samples", "64", *FAST,
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "ρ and κ(V) are unreliable in float16" in out and "--dtype fp32" in out
    assert "Note — float16 activations" in (tmp_path / "o" / "report.md").read_text()


# ------------------------------------------------------------------------------ 9a. --split is never ignored
def test_split_without_dataset_is_an_error_naming_the_fix(tmp_path, capsys):
    folder = _checkpoint(tmp_path)
    assert main(["profile", str(folder), "--split", "validation", *FAST, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--split validation selects a split of --dataset, and no --dataset was given" in err
    assert "drop --split" in err and not (tmp_path / "o").exists()


def test_split_of_a_data_file_other_than_train_is_an_error(tmp_path, capsys):
    pytest.importorskip("datasets")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sat on the mat " * 8}) for _ in range(8)) + "\n")
    folder = _checkpoint(tmp_path)
    args = ["profile", str(folder), "--dataset", str(data), "--num-samples", "64", *FAST]
    assert main([*args, "--split", "validation", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "is a data file" in err and "no split 'validation'" in err and "drop --split" in err
    assert main([*args, "--split", "train", "--out", str(tmp_path / "b")]) == 0


def test_split_of_a_single_saved_dataset_must_be_its_own(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    data = tmp_path / "one"
    datasets.Dataset.from_dict({"text": ["the cat sat on the mat " * 8] * 8}).save_to_disk(str(data))
    folder = _checkpoint(tmp_path)
    assert main(["profile", str(folder), "--dataset", str(data), "--split", "validation", "--num-samples", "64",
                 *FAST, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "holds one dataset" in err and "'validation' split" in err and "drop --split" in err
    # saved without a split name it reads as train, the default split, which --split train names
    assert main(["profile", str(folder), "--dataset", str(data), "--split", "train", "--num-samples", "64",
                 *FAST, "--out", str(tmp_path / "b")]) == 0


def test_cli_default_out_keeps_checkpoints_and_hub_organisations_apart(tmp_path, monkeypatch):
    from hf_koopman.cli import _default_out

    monkeypatch.chdir(tmp_path)
    for run in ("run-a", "run-b"):
        (tmp_path / run / "checkpoint-500").mkdir(parents=True)
    assert _default_out("run-a/checkpoint-500", init=False).name == "run-a--checkpoint-500"
    assert _default_out("run-b/checkpoint-500/", init=False).name == "run-b--checkpoint-500"
    assert _default_out("meta-llama/Llama-3.2-1B", init=False).name == "meta-llama--Llama-3.2-1B"
    assert _default_out("unsloth/Llama-3.2-1B", init=True).name == "unsloth--Llama-3.2-1B-init"
    assert _default_out("gpt2", init=True).name == "gpt2-init"
    assert _default_out("run-a/checkpoint-500/config.json", init=False).name == "run-a--checkpoint-500-init"


def test_a_file_that_is_not_a_model_gets_its_own_error_not_an_out_one(tmp_path, monkeypatch, capsys):
    """`hf-koopman profile out/profile.json` (a profile, not a model) without --out: the default folder is named
    without the suffix, so the error is about MODEL, not about an --out the user never gave."""
    from hf_koopman.cli import _default_out, main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "profile.json").write_text("{}")
    assert _default_out("out/profile.json", init=False).name == "out--profile"
    assert main(["profile", "out/profile.json"]) == 2
    err = capsys.readouterr().err
    assert "has no 'model_type' key" in err and "--out" not in err


def test_a_profile_that_cannot_be_written_leaves_the_folder_as_it_was(init_profile, tmp_path):
    from pathlib import Path

    save_profile(init_profile, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = copy.deepcopy(init_profile)
    broken.meta["where"] = Path("/not/json")
    with pytest.raises(TypeError):
        save_profile(broken, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cli_max_lr_in_half_precision_warns_with_the_fix(tmp_path, caplog):
    folder = _checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        assert main(["max-lr", str(folder), "--dtype", "bf16", "--num-samples", "64", "--no-progress"]) == 0
    assert any("unreliable in bfloat16" in r.getMessage() and "--dtype fp32" in r.getMessage()
               for r in caplog.records)
