"""`suggest_max_lr`: the learning rate at which the calibrated divergence probability reaches a chosen risk.

The init-time profile does not depend on the learning rate, so a `RiskEstimator` that takes log10 learning rate as an
input can be solved for it: the answer to "how high can I set the learning rate before this blows up?" at a stated
risk. The answer comes with the estimator's own caveats: an interval only when the estimator stores its coefficient
uncertainty, a flag when the model or the answer lies outside the runs the estimator was fitted on, and no answer at
all ("uninformative") when the spectrum it reads carries no signal.

Example:

```python
>>> import hf_koopman
>>> suggestion = hf_koopman.suggest_max_lr(model, inputs, risk=0.1)
>>> suggestion.max_learning_rate, suggestion.interval, suggestion.out_of_range
>>> print(suggestion.describe())
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from hf_koopman.logging_utils import get_logger
from hf_koopman.risk import RangeIssue, RiskEstimator, load_estimator


__all__ = ["MaxLRSuggestion", "suggest_max_lr"]

logger = get_logger(__name__)

#: `MaxLRSuggestion.verdict` values (the profile verdicts are `hf_koopman.risk.VERDICTS`).
SUGGESTION_VERDICTS = ("suggested", "no crossing", "uninformative")


def _ranges_without_lr(est: Any, prof: Any, context: Mapping[str, Any]) -> tuple[Any, tuple, tuple]:
    """`est.check_ranges` for an answer without a learning rate: a learning rate the profile records (not the one
    max-lr solves for) is left out of `outside` and `unknown`."""
    _, outside, unknown = est.check_ranges(prof, **context)
    outside = tuple(i for i in outside if i.key != "learning_rate")
    unknown = tuple(u for u in unknown if not u.startswith("learning_rate"))
    return (True if outside else (None if unknown else False)), outside, unknown


def _risk_text(risk: float) -> str:
    """A risk as a percentage with the digits it needs: 10%, 2.5%, 0.1%, 1e-07%, 99.9999% (never a rounded 100%)."""
    text = f"{100 * risk:.3g}"
    digits = 3
    while float(text) in (0.0, 100.0) and 0.0 < risk < 1.0 and digits < 12:  # a level that rounds to 0 or 100 %
        digits += 1
        text = f"{100 * risk:.{digits}g}"
    return f"{text}%"


def _lr_text(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0.0:
        return "0 (already above the risk at every learning rate)"
    return "unbounded" if math.isinf(value) else f"{value:.3g}"


@dataclass
class MaxLRSuggestion:
    """The learning rate at which the predicted divergence probability reaches `risk`, with its caveats.

    Attributes:
        max_learning_rate (`float`, *optional*): the learning rate; `None` unless `verdict == "suggested"`.
        risk (`float`): the target divergence probability.
        verdict (`str`): `"suggested"`; `"no crossing"` (the probability does not reach `risk` as the learning rate
            grows, or exceeds it at every learning rate: `reason` says which); `"uninformative"` (the profile's
            spectrum carries no signal, `reason` says why, and no learning rate is given).
        reason (`str`): why there is no learning rate (empty when there is one).
        interval (`tuple[float, float]`, *optional*): interval for the learning rate from the estimator's stored
            coefficient uncertainty (`interval_method` says which); `None` when the estimator stores none.
        interval_method (`str`): how the interval was obtained, or why there is none.
        out_of_range (`bool` or `None`): as `RiskAssessment.out_of_range`, at the suggested learning rate: `True` when
            the model or the learning rate lies outside the training runs, `None` when a range is not recorded.
        outside (`tuple[RangeIssue, ...]`): what lies outside, and by how much.
        unknown (`tuple[str, ...]`): inputs whose training range is not recorded.
        caveats (`list[str]`): plain sentences to print with the answer.
        model_name (`str`, *optional*): what was profiled.
        profile (`SpectralProfile`, *optional*): the profile the answer was read from.
    """

    max_learning_rate: float | None
    risk: float
    verdict: str
    reason: str = ""
    interval: tuple[float, float] | None = None
    interval_method: str = ""
    out_of_range: bool | None = None
    outside: tuple[RangeIssue, ...] = ()
    unknown: tuple[str, ...] = ()
    caveats: list[str] = field(default_factory=list)
    model_name: str | None = None
    profile: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinite bounds as the string "inf")."""

        def num(v: float | None) -> float | str | None:
            return v if v is None or math.isfinite(v) else "inf"

        return {
            "model_name": self.model_name,
            "risk": self.risk,
            "verdict": self.verdict,
            "max_learning_rate": num(self.max_learning_rate),
            "reason": self.reason,
            "interval": None if self.interval is None else [num(v) for v in self.interval],
            "interval_method": self.interval_method,
            "out_of_range": self.out_of_range,
            "outside": [i.to_dict() for i in self.outside],
            "unknown": list(self.unknown),
            "caveats": list(self.caveats),
            "profile_verdict": None if self.profile is None else self.profile.verdict,
        }

    def describe(self) -> str:
        """Multi-line plain text: the answer, then its caveats."""
        head = f"{self.model_name}: " if self.model_name else ""
        if self.verdict == "suggested":
            extrapolated = " (extrapolated: outside the fitted range, see below)" if self.out_of_range else ""
            lines = [f"{head}max learning rate at {_risk_text(self.risk)} divergence risk: "
                     f"{_lr_text(self.max_learning_rate)}{extrapolated}"]
            if self.interval is not None:
                beyond = ("; it covers the fit's own uncertainty, not the error of reading it outside the fitted "
                          "range" if self.out_of_range else "")
                lines.append(f"  interval: {_lr_text(self.interval[0])} – {_lr_text(self.interval[1])} "
                             f"({self.interval_method}{beyond})")
            else:
                lines.append(f"  interval: unavailable ({self.interval_method})")
        else:
            lines = [f"{head}no max learning rate ({self.verdict}): {self.reason}"]
        if self.verdict == "uninformative":  # no answer; the model itself may still lie outside the runs
            if self.out_of_range:
                lines.append("  range: the model lies outside the fitted range: "
                             + "; ".join(i.describe() for i in self.outside)
                             + " (an informative profile would give an extrapolation)")
        else:
            if self.out_of_range:
                status = "outside the fitted range: " + "; ".join(i.describe() for i in self.outside)
            elif self.out_of_range is None:
                status = ("ranges unknown for: " + ", ".join(self.unknown) + "; whether this model resembles the "
                          "training runs is not established")
            else:
                status = "within the fitted range"
            lines.append(f"  range: {status}")
        lines += [f"  - {c}" for c in self.caveats]
        return "\n".join(lines)


def _is_profile(obj: Any) -> bool:
    return hasattr(obj, "aggregates") and hasattr(obj, "layers") and hasattr(obj, "verdict")


#: The first caveat of a suggestion for a profile of pretrained weights (`meta["weights"] == "pretrained"`).
PRETRAINED_CAVEAT = ("extrapolated: these are pretrained weights, not an initialisation, and the risk estimator was "
                     "fitted on spectra at random initialisation; profile the architecture at initialisation "
                     "(`--init`, or a model built with `from_config`) for a reading in range")


def _refuse_rank(rank: int | None, who: str, flag: str) -> None:
    """Raises `ValueError` when a rank is given: the estimator reads the full spectrum, and a rank-r profile gets no
    verdict. `who` and `flag` name the caller and its argument in the message (`max-lr` / `--rank` on the CLI)."""
    if rank is not None:
        raise ValueError(f"{who} reads the full spectrum (the shipped estimator was fitted on it); a rank-{rank} "
                         f"profile gets no verdict and its masses are biased: drop {flag}.")


def suggest_max_lr(
    model: Any,
    inputs: Any = None,
    *,
    risk: float = 0.1,
    estimator: RiskEstimator | str | Path | None = None,
    level: float = 0.95,
    context: dict[str, Any] | None = None,
    **profile_kwargs: Any,
) -> MaxLRSuggestion:
    """The learning rate at which `estimator` predicts divergence with probability `risk`, for this model.

    Profiles `model` at its current weights (`hf_koopman.profile(model, inputs, **profile_kwargs)`; pass a
    `SpectralProfile` as `model` to reuse one) and solves the estimator's logistic for the learning rate
    (`RiskEstimator.learning_rate_at_risk`: closed form when the learning rate enters as log10, else bisection on a
    log grid).

    Args:
        model (`nn.Module` or `SpectralProfile`): the model at initialisation (or a profile of it).
        inputs (*optional*): profiling inputs, as in `profile` (default: the synthetic probe).
        risk (`float`, defaults to 0.1): the divergence probability to stay at or below, in (0, 1).
        estimator (`RiskEstimator` or path, *optional*): defaults to `RiskEstimator.default()`.
        level (`float`, defaults to 0.95): coverage of the interval.
        context (`dict`, *optional*): other inputs the estimator needs (`estimator.required_keys`), e.g. `norm`.
        **profile_kwargs: passed to `profile` (`num_samples`, `seed`, `max_tokens`, `tokenizer`, ...; not `rank`:
            the estimator reads the full spectrum).

    Returns:
        `MaxLRSuggestion`. Its `out_of_range` flag is set when the model's features or the suggested learning rate lie
        outside the estimator's training runs (the learning rate is then an extrapolation of the logistic), and its
        `verdict` is `"uninformative"` when the profile is and the estimator reads its spectrum.
    """
    if "learning_rate" in profile_kwargs or "learning_rate" in (context or {}):
        raise ValueError("suggest_max_lr solves for the learning rate; do not pass learning_rate= (nor in context).")
    _refuse_rank(profile_kwargs.get("rank"), "suggest_max_lr", "rank=")
    # a profile made with an estimator of your own answers with it (read back from its file after from_json; an
    # error where it is missing, never the shipped one's answer), unless another is passed
    own = model._estimator() if estimator is None and callable(getattr(model, "_estimator", None)) else None
    est = load_estimator(estimator if estimator is not None else own)
    context = dict(context or {})
    if _is_profile(model):
        if inputs is not None or profile_kwargs:
            raise ValueError("model is already a SpectralProfile: inputs and profiling arguments do not apply.")
        prof = model
    else:
        from hf_koopman.profiling import profile

        prof = profile(model, inputs, **profile_kwargs)
    risk = est._check_risk(risk)
    name = getattr(prof, "model_name", None)
    # profiles of checkpoints say so (`hf-koopman profile` / `max-lr` record meta["weights"] = "pretrained", and
    # profile() when the normalisation layers show trained weights)
    meta = getattr(prof, "meta", {})
    caveats: list[str] = [PRETRAINED_CAVEAT] if meta.get("weights") == "pretrained" else []
    if meta.get("weights_not_in_checkpoint"):  # the CLI records what a checkpoint lacked
        caveats.append(f"partly random: {len(meta['weights_not_in_checkpoint'])} weights of the residual blocks or "
                       "embeddings were not in the checkpoint and were randomly initialised")
    if meta.get("blocks_not_run"):
        caveats.append(f"partial: the inputs did not reach {len(meta['blocks_not_run'])} of the "
                       f"{meta.get('num_blocks')} residual blocks; the answer reads the others")
    uses_spectrum = any(f.key in prof.aggregates for f in est.features)
    if uses_spectrum and prof.verdict == "uninformative":
        flag, outside, unknown = _ranges_without_lr(est, prof, context)
        return MaxLRSuggestion(None, risk, "uninformative", reason=prof.verdict_reason,
                               interval_method="no learning rate to bound", out_of_range=flag, outside=outside,
                               unknown=unknown, caveats=[*caveats, est.training_summary()], model_name=name,
                               profile=prof)
    lr = est.learning_rate_at_risk(prof, risk, **context)
    summary = est.training_summary()
    if lr == 0.0 or math.isinf(lr):
        reason = (
            f"the predicted probability is already at or above {_risk_text(risk)} at every learning rate down to "
            "1e-10" if lr == 0.0 else
            f"the predicted probability does not grow with the learning rate (its coefficient is not positive), so no "
            f"learning rate marks where it reaches {_risk_text(risk)}"
        )
        flag, outside, unknown = _ranges_without_lr(est, prof, context)
        return MaxLRSuggestion(None, risk, "no crossing", reason=reason, interval_method="no learning rate to bound",
                               out_of_range=flag, outside=outside, unknown=unknown, caveats=[*caveats, summary],
                               model_name=name, profile=prof)
    flag, outside, unknown = est.check_ranges(prof, learning_rate=lr, **context)
    interval = est.learning_rate_interval(prof, risk, level=level, **context)
    if interval is None:
        bounds, how = None, "the estimator stores neither a coefficient covariance nor bootstrap coefficients"
    else:
        bounds, how = interval
        caveats.append("the interval covers the uncertainty of the fitted coefficients on the training runs only, not "
                       "the shift to a model family the estimator never saw")
    if est.is_shipped:  # the shipped estimator's measured accuracy (results/heldout_risk.md)
        caveats.append("held out by architecture family, the shipped estimator's suggestions were within 2x of the "
                       "measured threshold for 28 % of inits at risk 0.1 and 64 % at risk 0.5 (results/heldout_risk.md "
                       "in the hf_koopman repository): treat the answer as a starting point for a learning-rate sweep")
    lr_range = est.learning_rate_range
    if lr_range is not None and not lr_range[0] <= lr <= lr_range[1]:
        note = ""
        spec = next((f for f in est.features if f.key == "learning_rate"), None)
        at_rate = _risk_text(est.predict_proba(prof, learning_rate=lr, **context))
        if spec is not None and math.isfinite(spec.low) and math.isfinite(spec.high) and at_rate != _risk_text(risk):
            note = (f" (the estimator's own reading at that rate, which clips the rate to its fitted range, is "
                    f"{at_rate}, not {_risk_text(risk)})")
        caveats.append(f"the suggested learning rate lies outside the learning rates of the training runs "
                       f"[{lr_range[0]:.3g}, {lr_range[1]:.3g}]: it extrapolates the logistic in log learning "
                       f"rate{note}")
    feature_keys = {f.key for f in est.features}
    clipped = [i.key for i in outside if i.key in feature_keys and i.key != "learning_rate"]
    model_keys = [i.key for i in outside if i.key not in feature_keys and i.key not in ("learning_rate", "weights")]
    if clipped or model_keys:
        what = ([f"its spectrum ({', '.join(clipped)}, clipped to the fitted range)"] if clipped else []) + (
            [f"its {', '.join(model_keys)}"] if model_keys else [])
        caveats.append(f"the model lies outside the training runs in {' and '.join(what)}: the answer is an "
                       "extrapolation to a model unlike those the estimator was fitted on")
    if unknown and flag:  # with nothing outside, the range line lists them (`MaxLRSuggestion.describe`)
        caveats.append("ranges unknown for: " + ", ".join(unknown) + "; whether this model resembles the training "
                       "runs is not established")
    caveats.append(summary)
    return MaxLRSuggestion(lr, risk, "suggested", interval=bounds, interval_method=how, out_of_range=flag,
                           outside=outside, unknown=unknown, caveats=caveats, model_name=name, profile=prof)
