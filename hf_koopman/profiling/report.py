"""Markdown report of a `SpectralProfile`: verdict first, then the evidence and the caveats the paper states."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from hf_koopman.files import move_into_place, staging_folder
from hf_koopman.koopman.features import CONTRACTIVE_BELOW, NEAR_BAND
from hf_koopman.logging_utils import get_logger
from hf_koopman.risk import (
    RANK_SHARE_MIN, TENTATIVE, DecisionRule, check_learning_rate, flatten_inputs, low_precision_dtype,
    precision_caveat, recommendation, score_band, shown_probability, uninformative_caveat_shown,
)


if TYPE_CHECKING:
    from hf_koopman.profiling.spectral_profile import SpectralProfile

__all__ = ["render_report", "save_profile"]

logger = get_logger(__name__)


#: `spectral_features` options recorded in a profile's settings (`profile_from_snapshots`), listed in the report
_FEATURE_OPTIONS = ("reliable_only", "degenerate_tol", "compute_kreiss", "eps_residual", "eps_nl")


#: N/d beyond which the report does not advise more tokens to settle a tentative verdict (the largest N/d the η_nl
#: gate band was measured at, `results/eta_gate_band.md` in the repository)
_SETTLED_SAMPLES_PER_DIM = 64


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_kappa(value: object) -> str:
    """κ(V) to two significant digits (`4052.18` -> `4100`): it comes from float32 eigenvectors of a non-normal operator
    and moves by tens of percent with the CPU's LAPACK kernels and thread count; its order of magnitude is what it
    tells."""
    if not isinstance(value, float) or not math.isfinite(value) or value == 0:
        return _fmt(value)
    rounded = round(value, 1 - math.floor(math.log10(abs(value))))
    exponent = math.floor(math.log10(abs(rounded)))  # 9.96 rounds to 10: one digit fewer after the point
    return f"{rounded:.{max(0, 1 - exponent)}f}" if 1 <= abs(rounded) < 1e4 else f"{rounded:.1e}"


def _no_risk_reason(profile: SpectralProfile) -> str:
    """Why `profile` has no calibrated risk, in one sentence for the report."""
    try:
        est = profile._estimator()
    except (OSError, ValueError) as err:  # no shipped JSON, a broken one, or the profile's own estimator is missing
        return f"No calibrated risk: {str(err).rstrip('.')}."
    which = "" if est.is_shipped else f" ({est.name})"
    try:
        valid_lr = check_learning_rate(profile.meta.get("learning_rate")) is not None
    except (TypeError, ValueError):
        valid_lr = False
    if "learning_rate" in est.required_keys and not valid_lr:
        return (f"A calibrated `RiskEstimator`{which} is installed but needs the planned learning rate (a positive "
                "number): pass `profile(..., learning_rate=...)` or `--learning-rate`.")
    given = flatten_inputs(profile, {})
    missing = [key for key in est.required_keys if key not in given]
    if missing:
        return (f"The calibrated `RiskEstimator`{which} needs {', '.join(missing)}, which this profile does not carry "
                "(set them in profile.meta).")
    return (f"The calibrated `RiskEstimator`{which} could not score this profile (a non-finite input); it reads "
            f"{', '.join(est.required_keys)}.")


def _bands(profile: SpectralProfile) -> tuple[str, str, str, str]:
    """`(lo, hi, contractive_below, tau)` of this profile's settings as text (the paper's defaults when absent)."""
    lo, hi = profile.settings.get("near_band", NEAR_BAND)
    return (f"{lo:.2f}", f"{hi:.2f}", f"{profile.settings.get('contractive_below', CONTRACTIVE_BELOW):.2f}",
            f"{profile.settings.get('residual_tol', 0.1):g}")


def _pretrained(profile: SpectralProfile) -> bool:
    """Whether the weights come from a checkpoint (`meta["weights"] == "pretrained"`), not an initialisation."""
    return profile.meta.get("weights") == "pretrained"


def _token_limited(profile: SpectralProfile) -> int | None:
    """The token states the inputs gave the layer whose sample the verdict judges, when they were fewer than
    `num_samples` asked for (a larger one cannot add any); `None` otherwise (`DecisionRule.verdict_tokens_short`)."""
    return profile.rule.verdict_tokens_short(profile)


def _reliable_only(profile: SpectralProfile) -> bool:
    """Whether the masses and ρ count only the modes that pass the ResDMD test (`reliable_only=True`)."""
    return bool(profile.settings.get("reliable_only", False))


def _left_out_words(profile: SpectralProfile, reads: list[bool]) -> str:
    """Why the layers the verdict does not read are left out, with counts, e.g. "2 degenerate or not explained by a
    linear map, 1 with too few token states for its width"."""
    undersampled = profile.rule.undersampled(profile)
    few = sum(undersampled)
    unfit = sum(1 for read, short in zip(reads, undersampled) if not read and not short)
    parts = ([f"{unfit} degenerate or not explained by a linear map"] if unfit else []) + (
        [f"{few} with too few token states for {'its' if few == 1 else 'their'} width"] if few else [])
    return ", ".join(parts)


def _tokens_seen_note(profile: SpectralProfile) -> str:
    """What `meta["tokens_seen"]` is when the layers saw different counts (`meta["tokens_seen_per_layer"]`)."""
    per_layer = profile.meta.get("tokens_seen_per_layer")
    counts = [n for n in per_layer.values() if isinstance(n, int)] if isinstance(per_layer, dict) else []
    if len(set(counts)) <= 1:
        return ""
    return (f" (the fewest any block saw; {min(counts)} to {max(counts)} over the profiled layers, each layer's in "
            "`tokens_seen_per_layer` of profile.json)")


def _aggregates_scope(profile: SpectralProfile) -> list[str]:
    """Which layers the aggregates cover, when that is not every layer or when the verdict leaves some out for their
    sample: `settings["aggregates_left_out"]` (`profile_from_snapshots`) names the layers left out of them."""
    if not profile.aggregates:
        return []
    total = len(profile.layers)
    left_out = list(profile.settings.get("aggregates_left_out") or [])
    if left_out:
        names = ", ".join(f"`{name}`" for name in left_out[:12]) + (" …" if len(left_out) > 12 else "")
        least = DecisionRule().min_samples_per_dim
        return [f"Over the {total - len(left_out)} of {total} layers with enough token states for their width "
                f"(N/d ≥ {least:g}, the default rule): the {len(left_out)} with too few ({names}) are not in these "
                "aggregates, which the calibrated risk reads. Degenerate and non-informative layers are in them.", ""]
    few = sum(profile.rule.undersampled(profile))
    if few:  # a profile.json whose aggregates cover every layer
        return [f"Over all {total} layers, including the {few} the verdict leaves out for too few token states for "
                "their width.", ""]
    return []


def _spectrum_lines(profile: SpectralProfile) -> list[str]:
    """What was computed, when it is not the full spectrum of every layer."""
    spectrum = profile.settings.get("spectrum")
    if not spectrum or spectrum == "full":
        return []
    biased = ("it keeps the directions of largest output energy and is biased toward expanding modes (near-unit mass "
              "~0 on Pre-LN models whose full spectrum has ~0.16)")
    truncated = profile.settings.get("truncated_layers")
    if truncated is not None and profile.rule.truncated_rank(profile) is None:  # only layers the verdict leaves out
        return [f"- This is the **{spectrum}**: the truncated layers' masses are not those of the full spectrum "
                f"({biased}); the verdict reads none of them, only layers with their full spectrum."]
    if truncated is not None:  # mixed: rank >= min(N, d) in some layers, which then have all their modes
        return [
            f"- This is the **{spectrum}**: the truncated layers' masses are not those of the full spectrum ({biased}),"
            " so the paper's thresholds do not apply to the mean over them; profile with rank=None for the full "
            "spectrum of every layer."
        ]
    return [f"- This is the **{spectrum}**, not the full spectrum: {biased}, so the paper's thresholds do not apply "
            "to it."]


def _trust_section(profile: SpectralProfile, tentative: bool) -> list[str]:
    """Plain-words summary of what the spectrum says and how far the fit behind it can be trusted, over the layers
    the verdict reads; `tentative`: the verdict's reason says the score's sampling band reaches a threshold."""
    if not profile.features:
        return []
    reads = profile.rule.reads(profile)
    total = len(reads)
    chosen = [i for i, read in enumerate(reads) if read]
    left_out = total - len(chosen)
    none_read = not chosen
    if none_read:  # nothing the verdict reads: describe every layer, and say so
        chosen = list(range(total))
        scope = (f"None of the {total} blocks is informative for the verdict ({_left_out_words(profile, reads)}); "
                 f"across all {total} of them")
    elif left_out:
        scope = (f"Over the {len(chosen)} informative blocks the verdict reads ({left_out} of {total} left out: "
                 f"{_left_out_words(profile, reads)})")
    else:
        scope = f"Across the {total} blocks"
    feats = [profile.features[i] for i in chosen]
    n, d = profile.rule.verdict_sample(profile)
    modes = sum(f.n_modes for f in feats)
    reliable = sum(f.n_reliable for f in feats) / modes if modes else float("nan")
    fitted = [i for i, f in zip(chosen, feats) if not math.isnan(f.nonlinearity)]  # NaN: no input direction to fit
    eta = sum(profile.features[i].nonlinearity for i in fitted) / len(fitted) if fitted else math.nan
    sizes, rank = profile.rule.sample_sizes(profile), profile.settings.get("rank")
    eta_read = [profile.rule.adjusted_nonlinearity(profile.features[i].nonlinearity, *sizes[i], rank) for i in fitted]
    measured = [f for f in feats if math.isfinite(f.near_unit_mass)]  # NaN masses: no mode counted in that block
    lo, hi, below, tau = _bands(profile)
    which = "reliable modes (those that pass the ResDMD test, `reliable_only=True`)" if _reliable_only(profile) \
        else "modes"
    lines = ["## What this spectrum says", ""]
    if measured:
        near = sum(f.near_unit_mass for f in measured) / len(measured)
        unstable = sum(f.unstable_mass for f in measured) / len(measured)
        contractive = sum(f.contractive_mass for f in measured) / len(measured)
        mid = sum(f.mid_mass for f in measured) / len(measured)
        without = len(feats) - len(measured)
        lines.append(
            f"- {scope}, on average {near:.0%} of the {which} of the whitened block map are near-unit "
            f"({lo} ≤ |λ| ≤ {hi}: passed on almost unchanged), {unstable:.0%} expand (|λ| > {hi}), {contractive:.0%} "
            f"contract (|λ| < {below}) and {mid:.0%} lie in between ({below} ≤ |λ| < {lo})"
            + (f" ({without} block{'s' if without != 1 else ''} without a counted mode left out)" if without else "")
            + ". Expanding modes are normal for normalised models at initialisation (the paper's Pre-LN has 54 %); "
            "what the paper links to divergence is a large near-unit share, i.e. little damping."
        )
    else:
        mode = "reliable mode" if _reliable_only(profile) else "mode"
        lines.append(f"- {scope}, no block has a {mode} to count: there is no spectrum to describe.")
    if _reliable_only(profile):
        lines.append("- The masses count only the modes that pass the ResDMD residual test (`reliable_only=True`); the "
                     "paper's masses and thresholds count every mode.")
    lines += _spectrum_lines(profile)
    sampled = f", N/d ≥ {profile.rule.min_samples_per_dim:g}" if any(profile.rule.undersampled(profile)) else ""
    lines.append(
        (f"- Fit quality: the linear map leaves η_nl = {eta:.2f} of the block update unexplained on average"
         + (" over those blocks" if left_out and len(feats) < total else "")
         if fitted else "- Fit quality: no linear map was fitted")
        + (f" ({sum(eta_read) / len(eta_read):.2f} corrected for the fit's N/d, as the gate reads it; per layer in "
           "the table below)" if eta_read else "")
        + f"; {len(profile.informative_layers)} of {total} blocks are informative (η_nl < "
        f"{profile.rule.max_nonlinearity:g} once corrected for the fit's N/d, update not ≈ 0{sampled}); "
        + (f"{reliable:.0%} of {'their' if left_out and len(feats) < total else 'the'} modes pass the ResDMD "
           f"residual test (τ = {tau})." if modes else "no mode is identified (no input direction to fit).")
        + (" Few reliable modes mean individual eigenvalues are uncertain; the masses average over them."
           if modes and reliable < 0.5 and not _reliable_only(profile) else "")
    )
    none_pass = [profile.names[i] for i, f in zip(chosen, feats) if f.n_modes and not f.n_reliable]
    if none_pass and not _reliable_only(profile):
        shown = ", ".join(f"`{name}`" for name in none_pass[:4]) + (", ..." if len(none_pass) > 4 else "")
        lines.append(
            f"- In {len(none_pass)} of these blocks ({shown}) no mode passes the residual test: the linear map "
            "does not pin down their individual eigenvalues. Their masses still count, as in the paper, whose "
            "headline masses are over every mode and which Table 1 reproduces where few modes pass "
            "(`results/table1.md` in the repository)."
        )
    lines += _rank_lines(profile)
    if n and d:
        relative = (d / n) ** 0.5
        uniform = len(set(profile.sample_sizes)) <= 1
        line = (f"- Sample: N = {n} token states for width d = {d} (N/d = {n / d:.1f}"
                + ("" if uniform else ", the least-sampled layer" + ("" if none_read else " the verdict reads"))
                + f"); the masses carry a sampling error of roughly sqrt(d/N) = {relative:.2f} relative")
        score = profile.score
        # the band covers the masses' sampling error only; a layer whose corrected η_nl lies near the gate can also
        # change the verdict with more tokens (it changes which layers are read)
        crossed = profile.rule.score_band_crossed(profile) if tentative else ()
        borderline = False
        if crossed:
            names = " and ".join(f"{t:g}" for t in crossed)
            line += (f": the verdict's M≈1 = {score_band(score, relative)} spans the {names} "
                     f"threshold{'s' if len(crossed) > 1 else ''}, so it may change with more tokens")
            gaps = [abs(t - score) for t in crossed]
            if score > 0 and min(gaps) == 0:  # on a threshold: no number of tokens moves the band off it
                borderline = True
                line += f" (M≈1 sits on the {crossed[gaps.index(0)]:g} threshold, so read the verdict as borderline)"
            elif score > 0:
                # the band score * sqrt(d/N) clears every crossed threshold once sqrt(d/N) < gap / score, i.e. for
                # N > d (score / gap)^2 (the band includes its ends: at N = d (score / gap)^2 it still touches)
                clear = max(math.floor(d * (score / min(gaps)) ** 2) + 1, n + 1)
                borderline = clear > _SETTLED_SAMPLES_PER_DIM * d  # more tokens than anyone would feed
                if borderline:
                    nearest = crossed[gaps.index(min(gaps))]
                    line += (f" (M≈1 sits {min(gaps):.2g} from the {nearest:g} threshold: it would take about "
                             f"N = {clear:,} token states, {clear / d:,.0f}× the width, to settle it, so read the "
                             "verdict as borderline)")
                else:
                    line += (f" (its band clears {'them' if len(crossed) > 1 else 'it'} from about N = {clear:,}, "
                             f"{clear / d:.0f}× the width, if M≈1 stays near {score:.2f})")
        if n >= 8 * d or borderline:
            line += "."
        elif (seen := _token_limited(profile)) is not None:
            line += (f" — the inputs gave only {seen} token states and all were used: supply more or longer "
                     "inputs (more text or images, a larger batch or `max_tokens`; for RKSPCallback a larger "
                     "`probe_batch_size`) for a firmer estimate.")
        else:
            line += " — use more tokens (`num_samples`, `--num-samples`) for a firmer estimate."
        lines.append(line)
    lines += _gate_lines(profile)
    lines.append(
        "- How far to trust the verdict: the spectrum at initialisation separated the paper's No-Norm models from "
        "normalised ones; on our own runs it has added nothing measurable beyond normalisation type and learning rate "
        "(`results/RESULTS.md` in the hf_koopman repository). Treat it as a screen, not a guarantee. It is not about "
        "a particular learning rate: a model judged safe still diverges at a high enough one."
    )
    return lines + [""]


def _rank_lines(profile: SpectralProfile) -> list[str]:
    """The trust section's line on layers whose token states span too few directions (`rank_deficient`)."""
    flagged = profile.rule.rank_deficient(profile)
    if not any(flagged):
        return []
    shown = []
    sizes = profile.rule.sample_sizes(profile)
    for (name, _), f, (n, d), bad in zip(profile.layers, profile.features, sizes, flagged):
        if bad:
            shown.append(f"`{name}` {f.n_modes} of {min(n - 1, d)}")
    more = f" and {len(shown) - 6} more" if len(shown) > 6 else ""
    return [f"- Rank: in {len(shown)} of {len(flagged)} blocks the token states span fewer than "
            f"{RANK_SHARE_MIN:.0%} of the directions their number allows ({', '.join(shown[:6])}{more}): the inputs "
            "repeat (repeated text, padding, few distinct tokens), so N overstates the independent sample, the linear "
            "map fits the few distinct states closely (η_nl reads low) and the masses count only those directions. "
            "Profile on varied text."]


def _gate_lines(profile: SpectralProfile) -> list[str]:
    """The trust section's line on layers whose corrected η_nl lies within the band of the informative gate
    (`DecisionRule.near_gate`), and whether reading them or not can change the verdict; none when no layer does."""
    rule = profile.rule
    near = rule.near_gate(profile)
    if not any(near):
        return []
    count, total = sum(near), len(near)
    verdicts = rule.gate_verdicts(profile)
    effect = ("reading them or not can give " + " or ".join(f"'{v}'" for v in verdicts) + ", so the verdict is "
              "tentative" if len(verdicts) > 1 else "reading them or not gives the same verdict")
    return [f"- Informative gate: {count} of {total} blocks have a corrected η_nl within "
            f"±{rule.gate_band_width(profile):.2f} of "
            f"{rule.max_nonlinearity:g} ({rule.gate_band:g} sqrt(d/N)). The corrected η_nl still moves as N grows: "
            "on real models it reads low at small N/d, by up to this much in 95 % of the readings of "
            "`results/eta_gate_band.md` (hf_koopman repository), so with more token states these blocks may fall on "
            f"the other side of the gate (\"near gate\" in the table); {effect}."]


def _range_note(note: str, dtype: str | None) -> str:
    """The risk assessment's range note without the float16 / bfloat16 caveat on ρ and κ(V), which the report's
    precision note (shown whenever `dtype` is set) already gives in full: a pointer to that note stands in for it."""
    if dtype is None:
        return note
    return note.replace(precision_caveat(dtype), f"unreliable in {dtype} (see the {dtype} note above)")


def render_report(profile: SpectralProfile, plots: dict[str, str] | None = None) -> str:
    """Markdown text of the report of `profile`.

    Args:
        profile (`SpectralProfile`): the profile to describe.
        plots (`dict[str, str]`, *optional*): image captions mapped to image paths relative to the report; each is
            embedded under its caption.

    Returns:
        `str`: the Markdown report (verdict, what it means, per-layer table, caveats).
    """
    lines = [f"# RKSP spectral profile{f' of `{profile.model_name}`' if profile.model_name else ''}", ""]
    verdict, reason = profile.rule.decide_profile(profile)  # = profile.verdict, profile.verdict_reason, once
    tentative = reason.startswith(TENTATIVE)  # the bold label says it, the reason names the thresholds
    lines += [f"**Verdict: {verdict.upper()}{' (tentative)' if tentative else ''}** — "
              f"{reason.removeprefix(TENTATIVE)}.", ""]
    if _pretrained(profile):
        lines += ["> **Note — pretrained weights:** this profile is of weights loaded from a checkpoint (taken as "
                  "trained), not of a model at initialisation. The decision rule and the calibrated risk estimator "
                  "come from spectra at random initialisation, so the verdict and any calibrated risk below are "
                  "extrapolations.", ""]
    missing = profile.meta.get("weights_not_in_checkpoint") or []
    if missing:
        shown = ", ".join(f"`{name}`" for name in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                                                 else "")
        lines += [f"> **Note — partly random weights:** {len(missing)} weight(s) of the residual blocks or embeddings "
                  f"were not in the checkpoint and were randomly initialised ({shown}): this profile describes a "
                  "partly random model. Check that the checkpoint is complete and belongs to this config.", ""]
    not_run = profile.meta.get("blocks_not_run") or []
    if not_run:
        towers = ", ".join(f"`{stack}`" for stack in sorted({name.rsplit(".", 1)[0] for name in not_run}))
        lines += [f"> **Note — blocks not run:** the inputs did not reach {len(not_run)} of the "
                  f"{profile.meta.get('num_blocks', len(not_run) + len(profile.layers))} residual blocks ({towers}); "
                  "this profile and its verdict describe the others. Inputs that reach them (e.g. `pixel_values` for "
                  "a vision tower) profile them too.", ""]
    dtype = low_precision_dtype(profile)
    if dtype is not None:  # the columns ρ and κ(V) below, and the risk estimate's inputs, carry the rounding
        lines += [f"> **Note — {dtype} activations:** {precision_caveat(dtype)}. The masses and the verdict held up "
                  "there; the ρ, κ(V) and Kreiss columns below, and any risk estimate that reads ρ or κ(V), do not.",
                  ""]
    with uninformative_caveat_shown():  # also for an uninformative spectrum, shown below with that caveat
        risk = profile.risk_probability()
    rule = (
        "the paper's decision rule (App. J) on the mean near-unit mass M≈1 of the informative layers: "
        f"safe below {profile.rule.safe_below}, moderate up to {profile.rule.high_risk_above}, high risk above it"
        + (f", or high risk when the median κ(V) exceeds {profile.rule.kappa_large:g}"
           if profile.rule.kappa_large is not None else "")
    )
    if (cut := profile.rule.truncated_rank(profile)) is not None:
        rule = (f"no threshold: the paper's decision rule (App. J: safe below {profile.rule.safe_below}, high risk "
                f"above {profile.rule.high_risk_above} on the mean M≈1) reads the full spectrum, and this is a "
                f"rank-{cut} profile")
    if risk is not None:
        shown = shown_probability(risk)
        lr = profile.meta.get("learning_rate")
        assessment = profile.risk_assessment()  # the range note: outside the fitted range, or ranges unknown
        note = f" — {_range_note(assessment.range_note, dtype)}" if assessment is not None else ""
        if verdict == "uninformative":  # no emphasis: the number reads a spectrum the verdict calls uninformative
            clipped = bool(getattr(assessment, "clipped_inputs", ()))
            shown = (f"{shown} (computed from an uninformative spectrum"
                     + (", with inputs clipped to the estimator's fitted range" if clipped else "")
                     + ", so it is not a reading of this model)")
        else:
            shown = f"**{shown}**"
        name = getattr(assessment, "estimator", None)
        which = "" if name in (None, "shipped") else f" `{name}`"
        source = ("comes from training runs of tiny models (`results/heldout_risk.md`), an extrapolation where it "
                  "says so" if not which else f"comes from your estimator{which}, fitted on the runs it records")
        lines += [
            f"Calibrated divergence probability (`RiskEstimator`{which}{f', learning rate {lr:g}' if lr else ''}): "
            f"{shown}{note}.",
            "",
            f"_The verdict above follows {rule}. The two answer different questions: the verdict reads the spectrum "
            f"alone, the probability is for this learning rate and {source}._",
            "",
        ]
    else:
        lines += [f"_{_no_risk_reason(profile)} Meanwhile the verdict follows {rule}._", ""]
    advice = recommendation(verdict, profile.risk_assessment(), rank=cut, pretrained=_pretrained(profile))
    lines += [f"Recommendation: {advice}", ""]
    lines += _trust_section(profile, tentative)

    constant = profile.constant_input_layers
    degenerate = [n for n in profile.degenerate_layers if n not in constant]
    if degenerate:
        lines += [
            f"> **Note — {len(degenerate)} of {len(profile.layers)} layers are degenerate** (block output ≈ input, as "
            "with ReZero/Fixup zero-initialised residual branches): Â ≈ I there, so M≈1 ≈ 1 carries no stability "
            "information (App. J). They are excluded from the verdict: "
            + ", ".join(f"`{n}`" for n in degenerate[:12])
            + (" …" if len(degenerate) > 12 else ""),
            "",
        ]
    if constant:
        lines += [
            f"> **Note — {len(constant)} of {len(profile.layers)} layers see the same input state for every token** "
            "(up to round-off): the probe's tokens do not differ there (one token repeated, or padding, without "
            "position information), so there is no direction to fit and no mode. They are excluded from the verdict; "
            "profile on varied text: " + ", ".join(f"`{n}`" for n in constant[:12])
            + (" …" if len(constant) > 12 else ""),
            "",
        ]
    few = [(name, size) for name, size, short in
           zip(profile.names, profile.sample_sizes, profile.rule.undersampled(profile)) if short]
    if few:
        lines += [
            f"> **Note — {len(few)} of {len(profile.layers)} layers had too few token states for their width** "
            f"(N/d < {profile.rule.min_samples_per_dim:g}: the least-squares operator nearly interpolates the sample, "
            "so their spectra are mostly sampling error). They are excluded from the verdict: "
            + ", ".join(f"`{name}` (N = {n}, d = {d})" for name, (n, d) in few[:12])
            + (" …" if len(few) > 12 else "")
            + ". To include them, give them more token states: more or longer inputs (for an encoder-decoder model "
            "longer decoder inputs, e.g. `decoder_input_ids` as long as the encoder's, or more labelled target "
            "tokens where `labels != -100` mark the decoder's real positions) and a `num_samples` of at "
            f"least {profile.rule.min_samples_per_dim:g} d.",
            "",
        ]

    settings = profile.settings
    lines += ["## Settings", ""]
    uniform = len(set(profile.sample_sizes)) <= 1
    for key in ("spectrum", "rank_note", "num_samples", "hidden_size", "samples_per_dim_min", "rank", "randomized",
                "eps", "near_band", "contractive_below", "residual_tol", "seed", "eig_dtype", *_FEATURE_OPTIONS):
        if key in settings:
            first = " (first layer; per layer in the table below)" if not uniform and key in (
                "num_samples", "hidden_size") else ""
            lines.append(f"- `{key}`: {settings[key]}{first}")
    run = [(key, value) for key, value in profile.meta.items()
           if isinstance(value, (str, int, float, bool)) or value is None]
    if run:  # what the profile was made of and on: model, probe, dtype, tokens, times, version
        lines += ["", "## Run", ""]
    for key, value in run:
        note = _tokens_seen_note(profile) if key == "tokens_seen" else (
            " (the synthetic `default_probe_inputs`)" if key == "probe" and value == "default" else "")
        lines.append(f"- `{key}`: {value}{note}")
    lines.append("")

    lines += ["## Aggregates across layers", ""]
    lines += _aggregates_scope(profile)
    lines += ["| feature | mean | max | min | std |", "|---|---|---|---|---|"]
    names = sorted({k.rsplit("_", 1)[0] for k in profile.aggregates if k.rsplit("_", 1)[-1] in ("mean", "max")})
    for name in names:
        fmt = _fmt_kappa if name == "eigvec_condition" else _fmt
        row = [fmt(profile.aggregates[f"{name}_{stat}"]) if f"{name}_{stat}" in profile.aggregates else ""
               for stat in ("mean", "max", "min", "std")]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")

    by_stack = profile.by_stack()
    if len(by_stack) > 1:
        undersampled = profile.rule.undersampled(profile)
        lines += ["## Per stack", ""]
        if any(undersampled):
            lines += [f"Every layer of each stack is in this table, including the {sum(undersampled)} the verdict "
                      "leaves out for too few token states for their width (column \"left out\").", ""]
            lines += ["| stack | layers | left out | mean M≈1 | median κ(V) |", "|---|---|---|---|---|"]
        else:
            lines += ["| stack | layers | mean M≈1 | median κ(V) |", "|---|---|---|---|"]
        for stack, row in by_stack.items():
            few = sum(short for short, s in zip(undersampled, profile.stacks) if s == stack)
            lines.append(
                f"| {stack or '(main)'} | {row['num_layers']} | " + (f"{few} | " if any(undersampled) else "")
                + f"{_fmt(row['near_unit_mass_mean'])} | {_fmt_kappa(row['eigvec_condition_median'])} |"
            )
        lines.append("")

    lo, hi, below, tau = _bands(profile)
    # the paper's columns, η_nl as the verdict's gate reads it (corrected for the fit's N/d) and whether the verdict
    # reads the layer; layers of different N and d add their N and d
    sizes = "" if uniform else " N | d |"
    lines += [
        "## Per layer",
        "",
        f"| # | block | M≈1 | M>1 | M<{below} | mid | ρ | κ(V) | η_nl | η_nl corrected | Kreiss | reliable/modes | "
        f"degenerate | read |{sizes}",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("" if uniform else "---|---|"),
    ]
    rank = profile.settings.get("rank")
    reads = profile.rule.reads(profile)
    near_gate = profile.rule.near_gate(profile)
    for i, ((name, f), stack, (n, d), read) in enumerate(zip(profile.layers, profile.stacks, profile.sample_sizes,
                                                             reads)):
        label = f"{stack}: {name}" if stack and stack not in name else name
        lines.append(
            f"| {i} | `{label}` | {_fmt(f.near_unit_mass)} | {_fmt(f.unstable_mass)} | {_fmt(f.contractive_mass)} | "
            f"{_fmt(f.mid_mass)} | "
            f"{_fmt(f.spectral_radius)} | {_fmt_kappa(f.eigvec_condition)} | {_fmt(f.nonlinearity)} | "
            f"{_fmt(profile.rule.adjusted_nonlinearity(f.nonlinearity, n, d, rank))} | {_fmt(f.kreiss)} | "
            f"{f.n_reliable}/{f.n_modes} | {_fmt(bool(f.degenerate))} | {'yes' if read else 'no'}"
            f"{' (near gate)' if near_gate[i] else ''} |"
            + ("" if uniform else f" {n} | {d} |")
        )
    lines.append("")

    if plots:
        lines += ["## Plots", ""]
        for caption, path in plots.items():
            lines += [f"![{caption}]({path})", ""]

    lines += [
        "## How to read this",
        "",
        f"- M≈1 is the fraction of DMD eigenvalues with {lo} ≤ |λ| ≤ {hi} (Definition 1); larger means less damping "
        "across the block, which the paper links to divergence at high learning rates (Corollary 2).",
        "- M>1 is *not* a divergence score (whitening, local linearisation and non-normal transients break the "
        "link; Pre-LN has M>1 ≈ 0.54 yet never diverged in the paper).",
        "- κ(V) ≫ 1 means a non-normal operator: transient growth is possible even with ρ ≤ 1 (Prop. 3, Theorem 5). It "
        "is shown to two digits: computed from float32 eigenvectors, it moves by tens of percent with the CPU's LAPACK "
        "kernels and thread count, and its order of magnitude is what it tells.",
        "- η_nl is the relative DMD fit error; it grows with depth and scale and flags layers where the linear picture "
        "is unreliable; \"η_nl corrected\" undoes the fit's in-sample bias at small N/d and is what the "
        f"informative gate (< {profile.rule.max_nonlinearity:g}) reads.",
        "- read says whether the verdict reads the layer (informative and sampled with N/d ≥ "
        f"{profile.rule.min_samples_per_dim:g}); \"near gate\" marks a corrected η_nl within the gate's sampling "
        "band, which more token states may put on the other side.",
        f"- M<{below} counts contracting modes (|λ| < {below}), mid the band {below} ≤ |λ| < {lo}; the four "
        "columns sum to 1.",
        "- Kreiss is the Kreiss constant, a bound on transient growth; it is ∞ whenever ρ > 1 (an expanding mode grows "
        "without bound), which is the common case at initialisation.",
        f"- reliable/modes counts the modes that pass the ResDMD residual test (τ = {tau}); "
        + ("the masses and ρ count only those (`reliable_only=True`)." if _reliable_only(profile) else
           "the masses count every mode."),
        "- The raw M≈1 score was only moderately calibrated in the paper (ECE 0.283), and across architecture "
        "families on our runs it ranked runs near chance (AUROC 0.53 over 2,704 runs, `results/heldout_risk.md`): it "
        "is not a probability.",
        "",
    ]
    return "\n".join(lines)


#: the files `save_profile` writes: the only ones it replaces, and the only ones of an earlier profile it removes
#: (those the new profile does not write)
_OWN_FILES = ("profile.json", "report.md", "eigenvalues.png", "masses.png")

#: name prefix of the hidden folder inside the output folder where `save_profile` writes a new profile in full before
#: moving it into place
_STAGING_PREFIX = ".hf_koopman-staging-"


def files_not_from_a_profile(directory: Path, plots: bool = True) -> list[str]:
    """The files in `directory` that `save_profile(..., plots=plots)` would replace when no `profile.json` is there:
    not an earlier profile's (a user's own `report.md`)."""
    if (directory / "profile.json").is_file():
        return []
    written = _OWN_FILES if plots else ("profile.json", "report.md")
    return [name for name in written if (directory / name).exists()]


def _earlier_profile(directory: Path) -> tuple[str | None, list[str]] | None:
    """`(earlier model name, the library's files that are there)` when `directory` holds an earlier profile (one with
    a `profile.json`), `None` otherwise. Reads only: `move_into_place` replaces and removes them."""
    earlier = directory / "profile.json"
    if not earlier.is_file():
        return None
    present = [name for name in _OWN_FILES if (directory / name).is_file()]
    try:
        name = json.loads(earlier.read_text(encoding="utf-8")).get("model_name")
    except (OSError, ValueError, AttributeError):  # unreadable or not a profile: its name is unknown, still replaced
        name = None
    return name, present


def _missing_folders(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first: the folders `save_profile` creates,
    and removes again (when still empty) if it fails."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _stage(profile: SpectralProfile, staging: Path, text: str, plots: bool) -> dict[str, str]:
    """Write `profile.json` (`text`), the plots and `report.md` into `staging`; returns the file names by role
    (`"profile"`, `"report"`) or plot caption."""
    names = {"profile": "profile.json"}
    (staging / "profile.json").write_text(text, encoding="utf-8")
    images: dict[str, str] = {}
    if plots:
        try:
            from hf_koopman.profiling.plotting import save_plots  # matplotlib is an optional extra

            images = {caption: image.name for caption, image in save_plots(profile, staging).items()}
        except ImportError as err:
            logger.warning("%s; skipping plots", err)
    names.update(images)
    (staging / "report.md").write_text(render_report(profile, plots=images), encoding="utf-8")
    names["report"] = "report.md"
    return names


def _remove_created(created: list[Path]) -> None:
    """Remove, when empty, the folders `save_profile` created (`created`, deepest first)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (another process wrote there) or already gone: left as it is
            break


def save_profile(profile: SpectralProfile, directory: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write `profile.json`, `report.md` and (with matplotlib) `eigenvalues.png` / `masses.png` into `directory`.

    Everything is written into a hidden folder inside `directory` first and moved into place once complete, so that a
    failure (a profile that cannot be serialised, a plot or the report that raises, a full disk) leaves `directory` as
    it was. A folder that holds an earlier profile (a `profile.json`) gets the new one: the earlier profile's plots that
    this run does not write (`plots=False`, or no matplotlib) are removed, so that none of them sits next to the new
    report, and a warning names what was replaced and what removed. No other file in the folder is touched, and a
    folder that holds files under these names without a `profile.json` (a user's own `report.md`) is refused.

    Args:
        profile (`SpectralProfile`): the profile to write.
        directory (`str` or `Path`): the output folder (created when missing).
        plots (`bool`, defaults to `True`): also write the two plots (needs matplotlib).

    Returns:
        `dict[str, Path]`: what was written, by role (`"profile"`, `"report"`) or plot caption.

    Raises:
        FileExistsError: `directory` holds files under these names but no `profile.json` (`files_not_from_a_profile`).
    """
    directory = Path(directory)
    text = profile.to_json()  # before anything in the folder changes: a profile that cannot be written leaves it as is
    foreign = files_not_from_a_profile(directory, plots)
    if foreign:
        raise FileExistsError(
            f"{str(directory)!r} holds {', '.join(foreign)} but no profile.json, so they are not an earlier "
            f"profile's, and saving there would replace them. Pass another folder, or move them first."
        )
    created = _missing_folders(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with staging_folder(directory, _STAGING_PREFIX) as staging:  # removed on exit, with the replaced files
            names = _stage(profile, staging, text, plots)
            earlier = _earlier_profile(directory)
            stale = [f for f in earlier[1] if f not in names.values()] if earlier is not None else []
            move_into_place(staging, directory, list(names.values()), stale)
    except BaseException:
        _remove_created(created)
        raise
    written = {role: directory / name for role, name in names.items()}
    if earlier is not None:
        name, present = earlier
        replaced = [f for f in present if f in names.values()]
        removed = [f for f in present if f not in names.values()]
        logger.warning(
            "%s held an earlier profile%s: replaced %s%s. Pass another folder to keep both profiles.", directory,
            f" of {name!r}" if name else "", ", ".join(replaced) or "nothing",
            f"; removed {', '.join(removed)}, which this run does not write" if removed else "",
        )
    return written
