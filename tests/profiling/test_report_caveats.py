"""Verdict reason and report.md caveats: tentative verdicts, reliable-mode note, token-limited advice, pretrained
weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_koopman.koopman.features import LayerFeatures
from hf_koopman.profiling import DecisionRule, SpectralProfile
from hf_koopman.profiling.report import render_report


def _features(near: float, *, reliable: int = 10, modes: int = 10) -> LayerFeatures:
    return LayerFeatures(near_unit_mass=near, unstable_mass=1 - near, contractive_mass=0.0, mid_mass=0.0,
                         spectral_radius=1.1, eigvec_condition=20.0, nonlinearity=0.3, kreiss=float("inf"),
                         n_modes=modes, n_reliable=reliable, degenerate=False)


def _profile(near: float, n: int, d: int = 64, *, reliable: int = 10, meta: dict | None = None) -> SpectralProfile:
    layers = [(f"layers.{i}", _features(near, reliable=reliable)) for i in range(3)]
    return SpectralProfile(layers=layers, aggregates={}, settings={"num_samples": n, "hidden_size": d, "rank": None},
                           meta=dict(meta or {}))


def _verdict_line(report: str) -> str:
    return next(line for line in report.splitlines() if line.startswith("**Verdict"))


# ---------------------------------------------------------------------------------------------- tentative verdicts
def test_verdict_whose_interval_spans_both_thresholds_is_tentative_and_names_both():
    verdict, reason = DecisionRule().decide(0.58, 20.0, num_samples=134, hidden_size=64)  # N/d = 2.1
    assert verdict == "high risk"  # the label is unchanged; the reason says how firm it is
    assert reason.startswith("tentative: ") and "spans the 0.3 and 0.5 thresholds" in reason
    report = render_report(_profile(0.58, 134))
    assert _verdict_line(report).startswith("**Verdict: HIGH RISK (tentative)** — mean M≈1 = 0.580 > 0.5")
    assert "spans the 0.3 and 0.5 thresholds, so it may change with more tokens" in report
    # 0.58 * sqrt(64 / N) < 0.08 (the nearer threshold's gap) from N = 64 * (0.58 / 0.08)^2 = 3,365
    assert "(its band clears them from about N = 3,365, 53× the width, if M≈1 stays near 0.58)" in report
    # a score a hair from a threshold: no advice to feed 10,000× the width, the verdict is borderline
    report = render_report(_profile(0.297, 134))
    assert "(M≈1 sits 0.003 from the 0.3 threshold: it would take about N = 627,264 token states, 9,801× the " \
        "width, to settle it, so read the verdict as borderline)." in report and "its band clears" not in report
    # exactly on a threshold no number of tokens settles it, and none is advised
    report = render_report(_profile(0.5, 134))
    assert "(M≈1 sits on the 0.5 threshold, so read the verdict as borderline)." in report
    assert "use more tokens" not in report


def test_verdict_whose_interval_spans_one_threshold_names_it():
    verdict, reason = DecisionRule().decide(0.25, 20.0, num_samples=64 * 16, hidden_size=64)  # 0.25 ± 0.06
    assert verdict == "safe" and "spans the 0.3 threshold," in reason and "0.5" not in reason.split("spans")[1]


def test_firm_verdict_is_stated_firmly():
    verdict, reason = DecisionRule().decide(0.1, 20.0, num_samples=64 * 16, hidden_size=64)
    assert verdict == "safe" and "tentative" not in reason
    report = render_report(_profile(0.1, 64 * 16))
    assert _verdict_line(report).startswith("**Verdict: SAFE** — mean M≈1")
    assert "spans the" not in report


def test_large_kappa_verdict_does_not_depend_on_the_score_interval():
    _, reason = DecisionRule(kappa_large=10.0).decide(0.25, 20.0, num_samples=64 * 16, hidden_size=64)
    assert "tentative" not in reason
    # nor does the report's sample line call that firm verdict changeable
    firm = dataclasses.replace(_profile(0.25, 64 * 16), rule=DecisionRule(kappa_large=10.0))
    report = render_report(firm)
    assert _verdict_line(report).startswith("**Verdict: HIGH RISK** — ") and "spans the" not in report


# ---------------------------------------------------------------------------------------------- report text
def test_few_reliable_modes_note_only_when_fewer_than_half_pass():
    assert "Few reliable modes" not in render_report(_profile(0.1, 64 * 16, reliable=10))
    assert "Few reliable modes" not in render_report(_profile(0.1, 64 * 16, reliable=5))
    assert "Few reliable modes mean individual eigenvalues are uncertain" in render_report(
        _profile(0.1, 64 * 16, reliable=4))


def test_token_limited_profile_advises_more_text_not_more_num_samples():
    # 2048 token states asked for, the inputs gave 100 and all were used: num_samples cannot raise N
    limited = _profile(0.1, 100, meta={"tokens_seen": 100, "num_samples_requested": 2048})
    verdict, reason = limited.rule.decide_profile(limited)
    assert verdict == "uninformative"
    assert "supply more or longer inputs" in reason and "max_tokens" in reason and "num_samples >=" not in reason
    report = render_report(limited)
    assert "supply more or longer inputs" in _verdict_line(report) and "profile with num_samples" not in report
    assert "use more tokens (`num_samples`" not in report and "probe_batch_size" in report
    # tokens to spare (tokens_seen > N): a larger num_samples is the fix
    _, reason = DecisionRule().decide(0.1, 20.0, num_samples=100, hidden_size=64, tokens_seen=None)
    assert "profile with num_samples >= 128 for a verdict (>= 512 for one without the sampling caution)" in reason
    spare = render_report(_profile(0.1, 200, meta={"tokens_seen": 3200, "num_samples_requested": 200}))
    assert "use more tokens (`num_samples`, `--num-samples`)" in spare and "supply more or longer inputs" not in spare


def test_inputs_that_gave_what_was_asked_for_advise_more_num_samples():
    # the synthetic probe builds exactly num_samples tokens: all are used, yet a larger num_samples is the fix
    exact = _profile(0.1, 100, meta={"tokens_seen": 100, "num_samples_requested": 100})
    _, reason = exact.rule.decide_profile(exact)
    assert "profile with num_samples >=" in reason and "supply more or longer inputs" not in reason
    assert "supply more or longer inputs" not in render_report(exact)


# ---------------------------------------------------------------------------------------------- pretrained weights
def test_pretrained_weights_make_verdict_and_risk_extrapolations():
    pretrained = _profile(0.1, 64 * 16, meta={"weights": "pretrained", "learning_rate": 3e-4})
    verdict, reason = pretrained.rule.decide_profile(pretrained)
    assert verdict == "safe" and "pretrained weights, not an initialisation" in reason
    report = render_report(pretrained)
    assert "pretrained weights, not an initialisation" in _verdict_line(report)
    assert "**Note — pretrained weights:**" in report
    assert "the verdict and any calibrated risk below are extrapolations" in report


def test_pretrained_weights_get_fine_tuning_advice_not_the_verdicts():
    from hf_koopman.risk import ADVICE, PRETRAINED_ADVICE, recommendation

    high = render_report(_profile(0.9, 64 * 16, meta={"weights": "pretrained"}))
    assert "Recommendation: These are pretrained weights" in high and "add them" not in high  # no "add norm layers"
    assert recommendation("high risk", None, pretrained=True) == PRETRAINED_ADVICE
    assert recommendation("uninformative", None, pretrained=True) == ADVICE["uninformative"]
    assert recommendation("high risk", None) == ADVICE["high risk"]  # an initialisation keeps the verdict's advice


@pytest.mark.parametrize("meta", [{"weights": "init"}, {}])
def test_weights_at_initialisation_carry_no_extrapolation_note(meta):
    report = render_report(_profile(0.1, 64 * 16, meta=meta))
    assert "pretrained" not in report and "extrapolated" not in _verdict_line(report)


def test_decide_profile_reads_the_profile_and_its_meta():
    # decide_profile = decide on the informative layers' score and kappa, the settings, and the meta's context
    short = _profile(0.4, 100, meta={"tokens_seen": 100, "num_samples_requested": 400, "weights": "pretrained"})
    explicit = DecisionRule().decide(0.4, 20.0, num_samples=100, hidden_size=64, informative=3, total=3, rank=None,
                                     tokens_seen=100, weights="pretrained")
    assert short.rule.decide_profile(short) == explicit
    assert short.verdict_reason == explicit[1]
    assert "supply more or longer inputs" in explicit[1] and "extrapolated" in explicit[1]
    strict = dataclasses.replace(_profile(0.1, 1024), rule=DecisionRule(max_nonlinearity=0.0))  # no layer informative
    assert strict.rule.decide_profile(strict)[0] == "uninformative"


def test_the_report_shows_eta_as_the_gate_reads_it_and_which_layers_are_read():
    # N/d = 3: an in-sample η_nl of 0.80 reads sqrt(191/127) x 0.80 = 0.98 after the correction, over the gate
    layers = [(f"layers.{i}", dataclasses.replace(_features(0.2), nonlinearity=eta)) for i, eta in enumerate(
        (0.80, 0.30, 0.30))]
    prof = SpectralProfile(layers=layers, aggregates={}, settings={"num_samples": 192, "hidden_size": 64, "rank": None},
                           meta={})
    report = render_report(prof)
    assert "| η_nl | η_nl corrected |" in report and "| read |" in report
    rows = [line for line in report.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    # 0.981 lies within the gate's band at N/d = 3 (0.9 ± 0.32): marked, while the verdict (safe either way) holds
    assert "| 0.981 |" in rows[0] and rows[0].rstrip().endswith("| no (near gate) |")
    assert rows[1].rstrip().endswith("| yes |")
    assert "reading them or not gives the same verdict" in report
    assert "(0.37 corrected for the fit's N/d, as the gate reads it" in report  # mean of 0.368 over the 2 layers read


# --------------------------------------------------------------------------- activations recorded in half precision
def test_autocast_activations_carry_the_precision_caveat_although_the_parameters_are_float32():
    import torch

    from hf_koopman import profile
    from hf_koopman.risk import low_precision_dtype
    from hf_koopman.testing_utils import tiny_model

    model = tiny_model("llama", head=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = profile(model, num_samples=128, progress=False)
    assert result.meta["dtype"] == "float32" and result.meta["activation_dtype"] == "bfloat16"
    assert low_precision_dtype(result) == "bfloat16"
    assert "ρ and κ(V) are unreliable: the activations were computed in bfloat16" in render_report(result)
    plain = profile(model, num_samples=128, progress=False)
    assert "activation_dtype" not in plain.meta and low_precision_dtype(plain) is None


def test_half_precision_snapshots_passed_by_hand_are_flagged():
    import torch

    from hf_koopman.profiling import profile_from_snapshots
    from hf_koopman.risk import low_precision_dtype

    X = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    Y = X + 0.1 * torch.tanh(X)
    result = profile_from_snapshots([("layers.0", X.half(), Y.half())])
    assert low_precision_dtype(result) == "float16"
    assert low_precision_dtype(profile_from_snapshots([("layers.0", X, Y)])) is None


def test_repeated_inputs_are_flagged_as_spanning_too_few_directions():
    import torch

    from hf_koopman.profiling import profile
    from hf_koopman.testing_utils import tiny_model

    model = tiny_model("llama", num_hidden_layers=2)
    one = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    repeated = profile(model, {"input_ids": one.repeat(64, 1)}, num_samples=1024)  # 20 distinct states for d = 32
    # the first block reads the embeddings (rank bounded by the distinct tokens): not judged
    assert repeated.rule.rank_deficient(repeated) == [False, True]
    assert "caution: 1 layer read spans fewer than 90% of the directions" in repeated.verdict_reason
    assert any(line.startswith("- Rank: in 1 of 2 blocks") for line in render_report(repeated).splitlines())
    varied = profile(model, num_samples=1024)  # the synthetic probe: every state distinct
    assert varied.rule.rank_deficient(varied) == [False, False] and "span fewer" not in varied.verdict_reason
    assert "- Rank:" not in render_report(varied)


def test_the_report_names_blocks_in_which_no_mode_passes_the_residual_test():
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_koopman.profiling import profile

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=128,
                                       bos_token_id=0, eos_token_id=0))
    model.transformer.h[1].mlp.c_proj.weight.data.mul_(100)  # a block far from linear: its fit explains little
    result = profile(model, num_samples=256, progress=False)
    assert [f.n_reliable > 0 for f in result.features] == [True, False]
    lines = [line for line in result.to_markdown().splitlines() if "no mode passes the residual test" in line]
    assert len(lines) == 1 and "(`transformer.h.1`)" in lines[0] and "`transformer.h.0`" not in lines[0]


def test_kappa_is_shown_to_the_two_digits_it_carries():
    # float32 eigenvectors of a non-normal operator: κ(V) moves by tens of percent with the LAPACK kernels
    layers = [(f"layers.{i}", dataclasses.replace(_features(0.2), eigvec_condition=k))
              for i, k in enumerate((4052.183, 281.27, 12200.0))]
    profile = SpectralProfile(layers=layers, aggregates={"eigvec_condition_mean": 5511.151},
                              settings={"num_samples": 2048, "hidden_size": 64, "rank": None}, meta={})
    rows = [line for line in render_report(profile).splitlines() if line.startswith("| ")]
    cells = [line.split(" | ")[7] for line in rows if line.startswith(("| 0 ", "| 1 ", "| 2 "))]
    assert cells == ["4100", "280", "1.2e+04"]
    assert any(line.startswith("| eigvec_condition | 5500 |") for line in rows)
    assert "4052" not in render_report(profile) and "two digits" in render_report(profile)


def test_blocks_the_inputs_did_not_reach_are_named_in_the_report():
    report = render_report(_profile(0.1, 64 * 16, meta={"blocks_not_run": ["vision.layers.0", "vision.layers.1"],
                                                        "num_blocks": 5}))
    assert ("**Note — blocks not run:** the inputs did not reach 2 of the 5 residual blocks (`vision.layers`); this "
            "profile and its verdict describe the others.") in report
    assert "blocks not run" not in render_report(_profile(0.1, 64 * 16))


def test_the_sample_size_that_clears_a_threshold_is_more_than_the_one_used():
    """M≈1 = 1.00 at N = 4d: the band 1 ± sqrt(d/N) ends exactly on 0.5, so it spans the threshold; the N that clears
    it is the next one up, never the N the profile already used."""
    report = render_report(_profile(1.0, 256, 64))
    assert "spans the 0.5 threshold" in report
    assert "its band clears it from about N = 257" in report
