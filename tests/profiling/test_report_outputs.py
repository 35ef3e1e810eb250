"""The report on what the calibrated probability is worth and the folder `save_profile` writes: no emphasis on a
probability read from an uninformative spectrum, the float16 / bfloat16 caveat once, a failed save that leaves the
folder as it was, and default `--out` names that keep two organisations' models of the same name apart."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time

import pytest

import hf_koopman.profiling.plotting as plotting
import hf_koopman.profiling.report as report
from hf_koopman.profiling import DecisionRule, profile
from hf_koopman.profiling.report import render_report, save_profile
from hf_koopman.risk import precision_caveat
from hf_koopman.testing_utils import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:N=.*rank-limited:UserWarning")  # tiny token counts by design


@pytest.fixture(scope="module")
def lr_profile():
    """A float32 tiny LLaMA at initialisation with a planned learning rate: the report shows a calibrated risk."""
    prof = profile(tiny_model("llama", num_hidden_layers=2), num_samples=128, model_name="tiny-llama",
                   learning_rate=1e-2, progress=False)
    assert prof.risk is not None and prof.verdict != "uninformative"  # preconditions of the tests below
    return prof


def _risk_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("Calibrated divergence probability"))


def _shown(risk: float) -> str:
    return "< 0.1 %" if risk < 1e-3 else f"{risk:.1%}"


def _folder(directory) -> dict[str, bytes]:
    """Every file below `directory` (hidden ones included), by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. the probability of an uninformative spectrum
def test_probability_of_an_uninformative_spectrum_is_not_emphasised_and_says_why(lr_profile):
    # no layer passes a gate of 0: the same aggregates and probability, and an uninformative verdict
    blind = dataclasses.replace(lr_profile, rule=DecisionRule(max_nonlinearity=0.0))
    assert blind.verdict == "uninformative" and blind.risk_probability() == pytest.approx(lr_profile.risk)
    assert blind.risk is None  # no number stands for an uninformative spectrum; the report gives it with the caveat
    line = _risk_line(render_report(blind))
    assert "**" not in line and f": {_shown(lr_profile.risk)} (computed from an uninformative spectrum" in line
    assert "not a reading of this model" in line
    # clipping is named only where an input lies outside the fitted range
    clipped = any(i.direction != "unseen" for i in blind.risk_assessment().outside)
    assert ("inputs clipped to the estimator's fitted range" in line) is clipped


def test_probability_of_an_informative_spectrum_stays_emphasised(lr_profile):
    line = _risk_line(render_report(lr_profile))
    assert f"(`RiskEstimator`, learning rate 0.01): **{_shown(lr_profile.risk)}** — " in line
    assert "uninformative" not in line


# ------------------------------------------------------------------ 2. the half-precision caveat, once
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_caveat_is_given_once_with_a_learning_rate(lr_profile, dtype):
    low = copy.deepcopy(lr_profile)
    low.meta["dtype"] = dtype
    text = render_report(low)
    assert text.count(precision_caveat(dtype)) == 1 and text.count("--dtype fp32") == 1
    assert f"> **Note — {dtype} activations:** {precision_caveat(dtype)}" in text  # the note keeps it in full
    # the risk line still says which inputs are not range-checked, and points at the note
    line = _risk_line(text)
    assert "not range-checked" in line and f"unreliable in {dtype} (see the {dtype} note above)" in line


def test_float32_range_note_is_left_as_it_is(lr_profile):
    assessment = lr_profile.risk_assessment()
    assert _risk_line(render_report(lr_profile)).endswith(f" — {assessment.range_note}.")


# ------------------------------------------------------------------ 3. save_profile: all or nothing
@pytest.fixture
def earlier(lr_profile, tmp_path):
    """A folder holding an earlier profile (with its plots) and a file of the user's: `(folder, its files)`."""
    out = tmp_path / "out"
    save_profile(lr_profile, out, plots=False)
    for plot in ("eigenvalues.png", "masses.png"):
        (out / plot).write_bytes(b"earlier png")
    (out / "notes.txt").write_text("mine")
    return out, _folder(out)


def _other(prof):
    other = copy.deepcopy(prof)
    other.model_name = "other-model"
    return other


def _failing_plots(profile, directory):
    """Writes one plot, then fails: a half-written set of plots."""
    (directory / "eigenvalues.png").write_bytes(b"new png")
    raise RuntimeError("plotting failed")


def _failing_report(profile, plots=None):
    raise RuntimeError("rendering failed")


@pytest.mark.parametrize("plots", [True, False])
def test_a_failing_report_leaves_the_earlier_folder_as_it_was(lr_profile, earlier, monkeypatch, plots):
    out, before = earlier
    monkeypatch.setattr(report, "render_report", _failing_report)
    with pytest.raises(RuntimeError, match="rendering failed"):
        save_profile(_other(lr_profile), out, plots=plots)
    assert _folder(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_failing_plot_leaves_the_earlier_folder_as_it_was(lr_profile, earlier, monkeypatch):
    out, before = earlier
    monkeypatch.setattr(plotting, "save_plots", _failing_plots)
    with pytest.raises(RuntimeError, match="plotting failed"):
        save_profile(_other(lr_profile), out)
    assert _folder(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_failed_move_puts_the_earlier_files_back(lr_profile, earlier, monkeypatch):
    out, before = earlier
    real = os.replace
    moved = []

    def replace(src, dst):  # the first new file moves into place, the second cannot
        if os.path.dirname(os.fspath(dst)) == os.fspath(out):
            moved.append(dst)
            if len(moved) == 2:
                raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_profile(_other(lr_profile), out, plots=False)
    monkeypatch.undo()
    assert _folder(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_failed_save_into_a_new_folder_leaves_no_folder(lr_profile, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "render_report", _failing_report)
    with pytest.raises(RuntimeError):
        save_profile(lr_profile, tmp_path / "a" / "b", plots=False)
    assert list(tmp_path.iterdir()) == []


def test_a_complete_save_replaces_the_earlier_profile_and_leaves_no_staging_folder(lr_profile, earlier, caplog):
    out, _ = earlier
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        written = save_profile(_other(lr_profile), out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "profile.json", "report.md"]
    assert written == {"profile": out / "profile.json", "report": out / "report.md"}
    assert json.loads((out / "profile.json").read_text())["model_name"] == "other-model"
    assert "other-model" in (out / "report.md").read_text() and (out / "notes.txt").read_text() == "mine"
    assert "removed eigenvalues.png, masses.png" in caplog.text


def test_plots_are_written_with_the_report(lr_profile, tmp_path):
    pytest.importorskip("matplotlib")
    written = save_profile(lr_profile, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eigenvalues.png", "masses.png", "profile.json", "report.md"]
    assert all(path.parent == tmp_path / "out" and path.is_file() for path in written.values())
    assert "](eigenvalues.png)" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------ 4. default --out of a local Hub-like folder
def test_default_out_keeps_the_organisation_of_local_hub_like_folders(tmp_path, monkeypatch):
    from hf_koopman.cli import _default_out

    monkeypatch.chdir(tmp_path)
    for folder in ("models/meta-llama/Llama-2-7b", "models/other-org/Llama-2-7b", "my-ckpt", "run-a/checkpoint-500",
                   "hub/models--org--name/snapshots/0123abc/text_encoder", "hub/models--gpt2/snapshots/0123abc"):
        (tmp_path / folder).mkdir(parents=True)
    names = {spec: _default_out(spec, init=False).name for spec in (
        "./models/meta-llama/Llama-2-7b", "models/other-org/Llama-2-7b/",
        str(tmp_path / "models/meta-llama/Llama-2-7b"), "hub/models--org--name/snapshots/0123abc",
        "hub/models--org--name/snapshots/0123abc/text_encoder",
        "hub/models--gpt2/snapshots/0123abc", "my-ckpt", str(tmp_path / "my-ckpt"), "run-a/checkpoint-500")}
    assert names == {
        "./models/meta-llama/Llama-2-7b": "meta-llama--Llama-2-7b",
        "models/other-org/Llama-2-7b/": "other-org--Llama-2-7b",
        str(tmp_path / "models/meta-llama/Llama-2-7b"): "meta-llama--Llama-2-7b",  # absolute, below the current folder
        "hub/models--org--name/snapshots/0123abc": "org--name",
        "hub/models--org--name/snapshots/0123abc/text_encoder": "org--name--text_encoder",
        "hub/models--gpt2/snapshots/0123abc": "gpt2",
        "my-ckpt": "my-ckpt",
        str(tmp_path / "my-ckpt"): "my-ckpt",
        "run-a/checkpoint-500": "run-a--checkpoint-500",
    }
    assert _default_out("hub/models--org--name/snapshots/0123abc/config.json", init=False).name == "org--name-init"
    monkeypatch.chdir(tmp_path / "run-a" / "checkpoint-500")  # the current folder, with a generic name
    assert _default_out(".", init=True).name == "run-a--checkpoint-500-init"
    # outside the current folder: its last two components
    assert _default_out(str(tmp_path / "models/other-org/Llama-2-7b"), init=False).name == "other-org--Llama-2-7b"
    assert _default_out(str(tmp_path / "my-ckpt"), init=False).name == f"{tmp_path.name}--my-ckpt"


def test_out_help_states_the_default_name_rule(capsys, monkeypatch):
    from hf_koopman.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrap inside a hyphenated name
    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    help_text = capsys.readouterr().out
    for words in ("org--name for a Hub id org/name", "last two path components joined by --",
                  "meta-llama--Llama-2-7b", "models--org--name/snapshots/HASH"):
        assert words in help_text, words


def test_a_killed_save_s_staging_folder_is_removed_by_the_next_save_once_stale(tmp_path, lr_profile):
    from hf_koopman.profiling.report import _STAGING_PREFIX, save_profile

    stale, fresh = tmp_path / f"{_STAGING_PREFIX}killed", tmp_path / f"{_STAGING_PREFIX}running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "profile.json").write_text("{}")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    save_profile(lr_profile, tmp_path, plots=False)
    assert not stale.exists() and fresh.is_dir() and user_file.read_text() == "mine"


def test_the_masses_plot_says_its_threshold_lines_are_for_the_near_unit_mass(lr_profile):
    from hf_koopman.profiling.plotting import plot_masses

    ax = plot_masses(lr_profile)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "M≈1 thresholds: safe below 0.3" in labels and "M≈1 thresholds: high risk above 0.5" in labels


def test_the_masses_legend_sits_below_the_curves_and_the_layer_colorbar_counts_layers(lr_profile):
    """The masses span [0, 1], so a legend inside the axes covers some of them; layers are whole numbers."""
    from hf_koopman.profiling.plotting import plot_profile

    fig = plot_profile(lr_profile)
    masses_ax = next(ax for ax in fig.axes if ax.get_title().startswith("Spectral masses"))
    colorbar_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "layer")
    renderer = fig.canvas.get_renderer()
    legend = masses_ax.get_legend().get_window_extent(renderer)
    assert legend.y1 <= masses_ax.get_window_extent(renderer).y0  # entirely below the plotting area
    ticks = colorbar_ax.get_yticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)


def test_a_folder_with_files_under_our_names_but_no_profile_is_refused(lr_profile, tmp_path):
    (tmp_path / "report.md").write_text("my notes")
    (tmp_path / "masses.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="holds report.md, masses.png but no profile.json"):
        lr_profile.save(tmp_path)
    assert (tmp_path / "report.md").read_text() == "my notes" and not (tmp_path / "profile.json").exists()


def test_the_precision_caveat_quotes_the_measured_ranges():
    """The ranges the caveat quotes are those of `results/half_precision.md` (MiniLM-L6's largest ρ per dtype)."""
    import re
    from pathlib import Path

    table = (Path(__file__).resolve().parents[2] / "results" / "half_precision.md").read_text()
    caveat = precision_caveat("float16")
    for dtype in ("float32", "float16", "bfloat16"):
        row = next(line for line in table.splitlines() if line.startswith(f"| MiniLM-L6, {dtype} |"))
        lo, hi = (float(x) for x in re.match(r"\| [^|]+ \| ([\d.]+)–([\d.]+) \|", row).groups())
        quoted = f"{lo:.2f}–{hi:.2f} in {dtype}" if dtype == "float32" else f"{lo:.1f}–{hi:.1f} in {dtype}"
        assert quoted in caveat, (quoted, caveat)


def test_why_no_calibrated_risk_is_said_once_per_profile(caplog):
    """Without a learning rate there is no calibrated risk: the INFO line says why once, however many outputs (the
    report, the JSON, the callback's scalars) ask for the number."""
    from transformers.utils import logging as hf_logging

    result = profile(tiny_model("llama"), num_samples=128)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO, logger="hf_koopman"):
            assert result.risk is None and result.risk_assessment() is None
            render_report(result)
            result.to_dict()
    finally:
        hf_logging.set_verbosity(verbosity)
    assert caplog.text.count("no calibrated risk for this profile") == 1


def test_the_sample_line_of_a_profile_the_verdict_reads_no_layer_of_names_no_read_layer():
    import torch

    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    uneven = profile(tiny_model("t5"), {"input_ids": ids, "decoder_input_ids": ids[:, :24]}, num_samples=256)
    assert len(set(uneven.sample_sizes)) > 1
    blind = dataclasses.replace(uneven, rule=DecisionRule(max_nonlinearity=0.0))  # the gate reads no layer
    assert not any(blind.rule.reads(blind))
    sample = next(line for line in render_report(blind).splitlines() if line.startswith("- Sample: "))
    assert "the least-sampled layer)" in sample and "the verdict reads" not in sample


def test_a_masses_plot_drawn_on_its_own_keeps_its_legend_inside_the_figure(lr_profile):
    from hf_koopman.profiling.plotting import plot_masses

    ax = plot_masses(lr_profile)
    renderer = ax.figure.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).y0 >= 0
