r"""Calibrated divergence risk: $P(\text{diverge} \mid \text{init spectrum}, \log \text{LR}, \dots)$.

The RKSP paper reads the raw near-unit mass $M_{\approx 1}$ as a probability (App. H, ECE 0.283). Here a small
logistic model on standardised features is fitted to a sweep of training runs (`research/scripts/fit_risk.py`) and
shipped as JSON (`hf_koopman/data/risk_estimator.json`; never pickle). Init-time spectra do not depend on the learning
rate, so the learning rate is an input: `predict_proba(profile, learning_rate=...)`.

The shipped estimator is fitted on init features from the default recipe (the full spectrum of the whitened DMD
operator); profiles made with a rank-r approximation are not what it was fitted on. Its `metadata` says which runs it
was fitted on, with which label and horizon, and how it did on runs it was not fitted on.

The JSON (format version 2) stores, next to the coefficients, the ranges of the training runs (per input min/max or the
categories seen, the learning-rate range, the model types and families) and, when the fit recorded it, the
coefficients' uncertainty. `RiskEstimator.assess(...)` returns the probability together with a `RiskAssessment` of
whether the inputs lie inside those ranges; outside them the probability is an extrapolation and says so. Version-1
files load: their per-feature clip ranges are the training ranges of the features, and what they do not record (the
model types) is reported as unknown, never as in range. `learning_rate_at_risk` solves for the learning rate at which
the probability crosses a given risk (`hf_koopman.suggest_max_lr` wraps it around a profile).

Example:

```python
>>> import hf_koopman, torch
>>> from transformers import AutoConfig, AutoModelForCausalLM
>>> config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
...                               num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)
>>> _ = torch.manual_seed(0)
>>> model = AutoModelForCausalLM.from_config(config)
>>> prof = hf_koopman.profile(model, num_samples=512, progress=False)
>>> estimator = hf_koopman.RiskEstimator.default()
>>> print(f"{estimator.predict_proba(prof, learning_rate=3e-3):.1e}")  # the planned rate: low risk
2.4e-04
>>> print(f"{estimator.predict_proba(prof, learning_rate=3e-1):.2f}")  # 100x that rate
0.53

```
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hf_koopman.files import write_text_whole
from hf_koopman.logging_utils import get_logger

__all__ = [
    "FeatureSpec", "RangeIssue", "RiskAssessment", "RiskEstimator", "DEFAULT_ESTIMATOR_FILE", "FORMAT_VERSION",
    "ADVICE",
    "PRETRAINED_ADVICE", "RANK_ADVICE", "RANK_SHARE_MIN", "RISK_BUDGET", "below_risk_budget", "check_learning_rate",
    "in_fitted_range", "load_estimator", "shown_probability",
    "recommendation",
    "score_band",
    "DecisionRule", "VERDICTS", "VERDICT_LEVELS", "LOW_PRECISION_DTYPES", "low_precision_dtype", "precision_caveat",
    "optimizer_family",
]

logger = get_logger(__name__)

DEFAULT_ESTIMATOR_FILE = "risk_estimator.json"
#: version of the JSON layout `RiskEstimator.to_dict` writes; `from_dict` reads this one and version 1.
FORMAT_VERSION = 2
_FORMAT = "hf_koopman.risk_estimator"
_TRANSFORMS = ("identity", "log10")
_LR = "learning_rate"
#: inputs that describe the model itself; `fit` records their training ranges when the rows carry them, and a profile
#: supplies them (`meta["model_type"]`, `settings["hidden_size"]`, the number of profiled blocks).
MODEL_KEYS = ("model_type", "hidden_size", "num_layers")
#: learning rates (log10) over which `learning_rate_at_risk` searches when the learning rate does not enter as one
#: log10 feature.
_LR_GRID = np.arange(-10.0, 3.0 + 1e-9, 0.05)
_INTERVAL_DRAWS = 4000


@dataclass(frozen=True)
class FeatureSpec:
    """One input of the logistic model.

    Args:
        key (`str`): where the raw value comes from: a key of `SpectralProfile.aggregates` (e.g.
            `"near_unit_mass_mean"`) or of the context (`"learning_rate"`, `"warmup_steps"`, `"norm"`, ...).
        transform (`str`, *optional*, defaults to `"identity"`): `"identity"`, `"log10"` (raw value clipped below at
            1e-12), or `"onehot:<value>"` (1.0 when the raw value equals `<value>`, for categorical context).
        mean, std (`float`): standardisation fitted on the training runs.
        low, high (`float`): range of the transformed value on the training runs; inputs are clipped to it, so the
            estimator never extrapolates (and `inf` spectra, e.g. an infinite eigenvector condition, stay finite).
    """

    key: str
    transform: str = "identity"
    mean: float = 0.0
    std: float = 1.0
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if self.transform not in _TRANSFORMS and not self.transform.startswith("onehot:"):
            raise ValueError(f"transform={self.transform!r} must be one of {_TRANSFORMS} or 'onehot:<value>'.")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"feature {self.key!r} needs a finite mean and a finite std > 0; got mean={self.mean}, "
                             f"std={self.std}.")
        if math.isnan(self.low) or math.isnan(self.high) or not self.low <= self.high:
            raise ValueError(f"feature {self.key!r} needs a clip range low <= high (infinite ends allowed); got "
                             f"[{self.low}, {self.high}].")

    @property
    def name(self) -> str:
        """The feature's name in the JSON and in messages: the key, wrapped in its transform (`log10(key)`)."""
        return self.key if self.transform == "identity" else f"{self.transform}({self.key})"

    def transformed(self, raw: Any) -> float:
        """Apply the transform (no standardisation, no clipping)."""
        if self.transform.startswith("onehot:"):
            return 1.0 if str(raw) == self.transform.split(":", 1)[1] else 0.0
        if isinstance(raw, bool) or not isinstance(raw, (int, float, np.floating, np.integer)):
            raise TypeError(f"feature {self.key!r} must be a number, got {type(raw).__name__} ({raw!r}).")
        x = float(raw)
        if math.isnan(x):
            raise ValueError(f"feature {self.key!r} is NaN (degenerate spectrum?); the risk is undefined for it.")
        if self.transform == "log10":
            x = math.log10(max(x, 1e-12)) if math.isfinite(x) else math.inf
        return x

    def standardized(self, raw: Any) -> float:
        """The model's input for a raw value: transformed, clipped to `[low, high]`, then `(x - mean) / std`."""
        x = min(max(self.transformed(raw), self.low), self.high)
        if not math.isfinite(x):  # unbounded spec (hand-built) and an infinite input
            raise ValueError(f"feature {self.key!r} is infinite and the estimator has no clipping range for it.")
        return (x - self.mean) / self.std

    def raw_bound(self, x: float) -> float:
        """The raw value whose transform is `x` (identity and log10 features), used to read version-1 clip ranges."""
        return 10.0**x if self.transform == "log10" else x


def _json_number(v: Any, name: str, *, ends: bool = False) -> float:
    """A number field of an estimator JSON: a JSON number (not a boolean, not a numeric string), or for a clip range
    end (`ends`) also the strings "inf" / "-inf" that `_num` writes."""
    if ends and v in ("inf", "-inf"):
        return float(v)
    if not _is_number(v):
        raise ValueError(f"risk-estimator JSON: {name} must be a number, got {v!r}; the file is corrupted or was not "
                         "written by save_json.")
    return float(v)


def _num(v: float) -> float | str:
    """A float as JSON: finite as is, ±inf as the strings "inf" / "-inf"."""
    v = float(v)
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


def _g(v: Any) -> str:
    return f"{v:.3g}" if _is_number(v) else repr(v)


def _percent(p: float) -> str:
    return "< 0.1 %" if p < 1e-3 else ("> 99.9 %" if p > 0.999 else f"{p:.1%}")


#: True while predict_proba's caller shows the uninformative-profile caveat itself (the report); per thread / task
_QUIET_UNINFORMATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet_uninformative", default=False)


@lru_cache(maxsize=256)
def _warn_once(message: str) -> None:
    """Log `message` as a warning the first time only (the report, the callback and a user's loop read one profile's
    probability many times)."""
    logger.warning(message)


@contextlib.contextmanager
def uninformative_caveat_shown() -> Iterator[None]:
    """Inside, `predict_proba` does not warn about an uninformative profile: the caller (the report) shows that
    caveat next to the number itself."""
    token = _QUIET_UNINFORMATIVE.set(True)
    try:
        yield
    finally:
        _QUIET_UNINFORMATIVE.reset(token)


def _part(profile: Any, name: str, default: Any = None) -> Any:
    """`profile.<name>` of a `SpectralProfile`, or `profile[name]` of its `to_dict()` / profile.json form."""
    return profile.get(name, default) if isinstance(profile, Mapping) else getattr(profile, name, default)


def optimizer_family(name: Any) -> str:
    """The optimizer a risk estimator's range reads: `"adamw"` for the AdamW implementations `TrainingArguments.optim`
    names (`adamw_torch`, `adamw_torch_fused`, `adamw_8bit`, `paged_adamw_32bit`, ...) and their classes (`AdamW`,
    `AdamW8bit`, `PagedAdamW32bit`), else the lower-cased name itself (`sgd`, `adafactor`, `adam`, and AdamW variants
    that change the update, such as `schedule_free_adamw` or `galore_adamw`)."""
    name = str(getattr(name, "value", name)).lower()
    changed = "schedule" in name  # schedule-free AdamW (`schedule_free_adamw`, `AdamWScheduleFree`)
    return "adamw" if name.removeprefix("paged").removeprefix("_").startswith("adamw") and not changed else name


def _model_context(profile: Any) -> dict[str, Any]:
    """Model-level inputs a `SpectralProfile` carries: model type, width and number of profiled blocks."""
    out: dict[str, Any] = {}
    meta, settings = _part(profile, "meta"), _part(profile, "settings")
    if isinstance(meta, Mapping) and meta.get("model_type") is not None:
        out["model_type"] = meta["model_type"]
    if isinstance(settings, Mapping) and settings.get("hidden_size") is not None:
        out["hidden_size"] = settings["hidden_size"]
    layers = _part(profile, "layers")
    if isinstance(layers, Sequence) and not isinstance(layers, str) and layers:
        out["num_layers"] = len(layers)
    return out


def flatten_inputs(profile: Any, context: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a SpectralProfile (or a mapping of aggregates, or None) with the context into one flat mapping."""
    values: dict[str, Any] = {}
    if profile is not None:
        aggregates = _part(profile, "aggregates", profile)  # a bare mapping holds the aggregates itself
        if not isinstance(aggregates, Mapping):
            raise TypeError(
                "profile must be a SpectralProfile, a mapping of aggregate features, or None; got "
                f"{type(profile).__name__}."
            )
        values.update(aggregates)
        meta = _part(profile, "meta")
        if isinstance(meta, Mapping):  # e.g. a learning rate recorded by the training callback
            values.update({k: v for k, v in meta.items() if v is not None and k not in values})
        # the model's depth (every profiled block) also where the aggregates leave under-sampled layers out
        values.update({k: v for k, v in _model_context(profile).items() if k not in values or k == "num_layers"})
    values.update({k: v for k, v in context.items() if v is not None})
    return values


#: The `unknown` entry of an "uninformative" profile whose spectrum the estimator reads.
_UNINFORMATIVE_SPECTRUM = "the spectrum (the profile is uninformative; its verdict reason says why)"
#: The `unknown` entry of a profile that does not record whether its weights are an initialisation
#: (`meta["weights"]` unset: no learned normalisation scale to read it from, or one kept in float16 / bfloat16).
_WEIGHTS_UNKNOWN = "weights (origin unknown)"
#: model dtypes (`meta["dtype"]`) whose rounding of the recorded activations makes ρ and κ(V) unreliable.
LOW_PRECISION_DTYPES = ("float16", "bfloat16")
#: aggregate-key prefixes of the features that rounding to float16 / bfloat16 makes unreliable: ρ and κ(V).
_PRECISION_SENSITIVE = ("spectral_radius", "eigvec_condition")


def low_precision_dtype(profile: Any) -> str | None:
    """`"float16"` or `"bfloat16"` when the profile's activations were computed in that dtype, else `None`:
    `meta["activation_dtype"]` (set by `profile` under autocast and by `profile_from_snapshots` for half-precision
    snapshots), else the model's dtype `meta["dtype"]`.

    The recorded activations then carry that dtype's rounding, which moves the spectral radius ρ and the eigenvector
    condition κ(V) far more than the masses (`precision_caveat` gives the numbers); `profile` may be a
    `SpectralProfile`, its `to_dict()` / profile.json form, or a flat mapping carrying `"dtype"`.
    """
    meta = _part(profile, "meta")
    source = meta if isinstance(meta, Mapping) else (profile if isinstance(profile, Mapping) else {})
    for key in ("activation_dtype", "dtype"):
        dtype = source.get(key)
        dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
        if dtype in LOW_PRECISION_DTYPES:
            return dtype
    return None


def precision_caveat(dtype: str) -> str:
    """Why ρ and κ(V) of a profile made in `dtype` (float16 / bfloat16) are unreliable, with the measured effect, and
    the fix: profile a float32 copy."""
    return (f"ρ and κ(V) are unreliable: the activations were computed in {dtype}, whose rounding moves them "
            "(results/half_precision.md; MiniLM-L6, N = 3072, five probe seeds: the largest ρ 1.43–1.50 in float32, "
            "1.9–20.5 in float16 and 1.5–3.0 in bfloat16, the median κ(V) 1.2–2.1x lower, the mean M≈1 within 0.01; "
            "a tiny LLaMA (d = 128) kept its largest ρ and its κ(V) moved 0.6–1.7x either way, as a bfloat16 model "
            "and under bfloat16 autocast: the size and direction differ between models); profile a float32 copy "
            "(`--dtype fp32` on the CLI, `model.float()` outside autocast, or "
            "`profile_streaming(..., dtype='float32')` in Python) for them")


def _precision_sensitive(key: str) -> bool:
    return key.startswith(_PRECISION_SENSITIVE)


def _unreliable_entry(key: str, dtype: str | None) -> str:
    """The `RiskAssessment.unknown` entry of a ρ or κ(V) input that `dtype`'s rounding makes unreliable."""
    return f"{key} (unreliable in {dtype})"


@dataclass(frozen=True)
class RangeIssue:
    """One input that lies outside what the estimator's training runs covered.

    Attributes:
        key (`str`): the input (`"learning_rate"`, `"near_unit_mass_mean"`, `"model_type"`, ...).
        value: its value here.
        low (`float`, *optional*): lower end of the training range of a numeric input (`None` for a categorical one).
        high (`float`, *optional*): upper end of that range.
        seen (`tuple[str, ...]`): the categories of the training runs (categorical inputs).
        excess (`float`): how far outside: in decades when `log_scale`, else in the input's own units; `inf` for a
            category the training runs never had.
        log_scale (`bool`): whether `excess` is in decades (the learning rate and inputs the estimator reads as log10).
    """

    key: str
    value: Any
    low: float | None = None
    high: float | None = None
    seen: tuple[str, ...] = ()
    excess: float = math.inf
    log_scale: bool = False

    @property
    def direction(self) -> str:
        """`"above"`, `"below"` or `"unseen"` (a category absent from the training runs)."""
        if self.low is None or self.high is None:
            return "unseen"
        return "above" if _is_number(self.value) and float(self.value) > self.high else "below"

    def describe(self) -> str:
        """One line: the input, its value and the range (or the categories) the estimator was fitted on."""
        if self.direction == "unseen":
            return f"{self.key} = {_g(self.value)} (fitted on {', '.join(self.seen) or 'other values'})"
        amount = (
            f"{self.excess:.2g} decade{'s' if self.excess != 1 else ''}" if self.log_scale else f"{self.excess:.3g}"
        )
        bound = self.high if self.direction == "above" else self.low
        digits = 3  # enough digits that the value and the bound it crosses print differently (4.1 vs 4.096)
        while digits < 8 and _is_number(self.value) and f"{self.value:.{digits}g}" == f"{bound:.{digits}g}":
            digits += 1
        low, high, value = (f"{v:.{digits}g}" if _is_number(v) else repr(v) for v in (self.low, self.high, self.value))
        return f"{self.key} = {value} is {amount} {self.direction} the fitted [{low}, {high}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this range issue (non-finite numbers as strings)."""
        value = _num(self.value) if _is_number(self.value) else self.value
        low, high = (None if b is None else _num(b) for b in (self.low, self.high))
        return {"key": self.key, "value": value, "low": low, "high": high, "seen": list(self.seen),
                "excess": _num(self.excess), "log_scale": self.log_scale, "direction": self.direction}


@dataclass(frozen=True)
class RiskAssessment:
    """A divergence probability and whether its inputs lie where the estimator was fitted.

    Attributes:
        probability (`float`): P(divergence) in (0, 1); inputs outside the training range are clipped to it first.
        out_of_range (`bool` or `None`): `True` when an input lies outside the training ranges (`outside` says which);
            `None` when none is known to, but the estimator does not record the range of some input (`unknown`), so
            being in range is not established; `False` only when every checked input is inside a recorded range.
        outside (`tuple[RangeIssue, ...]`): the inputs outside, and by how much.
        unknown (`tuple[str, ...]`): inputs whose training range is not recorded, or that were not given; also
            `"weights (origin unknown)"` for a profile that does not record whether its weights are an
            initialisation, and `"<key> (unreliable in float16)"` (or bfloat16) for a ρ or κ(V) input of a profile
            made in that dtype, which is not range-checked (`precision_caveat` says why).
        learning_rate (`float`, *optional*): the learning rate the probability is for.
        unreliable (`tuple[str, ...]`): the ρ and κ(V) inputs left out of the range check because the profile was
            made in `low_precision` (their `unknown` entries say so too).
        low_precision (`str`, *optional*): `"float16"` or `"bfloat16"` when the profile was made in that dtype
            (`low_precision_dtype`).
        features (`tuple[str, ...]`): the input keys the estimator reads (an input outside its range is clipped; one
            it only range-checks, such as the width for the shipped estimator, is not).
        estimator (`str`, *optional*): which estimator gave the probability (`RiskEstimator.name`).
    """

    probability: float
    out_of_range: bool | None
    outside: tuple[RangeIssue, ...] = ()
    unknown: tuple[str, ...] = ()
    learning_rate: float | None = None
    unreliable: tuple[str, ...] = ()
    low_precision: str | None = None
    features: tuple[str, ...] = ()
    estimator: str | None = None

    @property
    def status(self) -> str:
        """`"outside the fitted range"`, `"ranges unknown"` or `"within the fitted range"`."""
        if self.out_of_range:
            return "outside the fitted range"
        return "ranges unknown" if self.out_of_range is None else "within the fitted range"

    @property
    def clipped_inputs(self) -> tuple[RangeIssue, ...]:
        """The numeric inputs outside their fitted range that the estimator reads: they are clipped to the range, so
        the probability is the one at its edge, a value the estimator never saw this model at. A category outside the
        runs, or a model key it only range-checks (the width, the depth), changes nothing in the formula."""
        read = set(self.features) if self.features else {i.key for i in self.outside}
        return tuple(i for i in self.outside if i.key != "weights" and i.direction != "unseen" and i.key in read)

    @property
    def range_note(self) -> str:
        """One sentence on the ranges, e.g.
        `"outside the fitted range: learning_rate = 50 is 1.1 decades above ..."`."""
        parts = []
        clipped = [i for i in self.outside if i.key != "weights"]
        if clipped:
            numeric = bool(self.clipped_inputs)
            parts.append("outside the fitted range: " + "; ".join(i.describe() for i in clipped)
                         + (" (numbers are clipped to the fitted range: the probability is the one at its edge, not "
                            "a reading for this input)" if numeric else
                            " (the training runs did not include it: whether the fit carries over is unknown)"))
        if len(clipped) < len(self.outside):
            parts.append(("outside the fitted range: " if not clipped else "")
                         + "the weights are not an initialisation (the estimator was fitted on spectra at "
                         "initialisation)")
        special = {_UNINFORMATIVE_SPECTRUM, _WEIGHTS_UNKNOWN,
                   *(_unreliable_entry(key, self.low_precision) for key in self.unreliable)}
        missing = [u for u in self.unknown if u not in special]
        if missing:
            parts.append("ranges unknown for: " + ", ".join(missing)
                         + " (the estimator does not record them, or they were not given)")
        if _UNINFORMATIVE_SPECTRUM in self.unknown:
            parts.append("the spectrum is uninformative (see the verdict), so its place in the fitted range is unknown")
        if self.unreliable and self.low_precision:
            parts.append(f"{', '.join(self.unreliable)} not range-checked (the probability still reads them as they "
                         "are): " + precision_caveat(self.low_precision))
        if _WEIGHTS_UNKNOWN in self.unknown:
            parts.append("the weights' origin is unknown (no learned normalisation scale to read it from, or one kept "
                         "in float16 / bfloat16), and the estimator was fitted on spectra at initialisation; set "
                         "profile.meta[\"weights\"] to \"init\" or \"pretrained\" to say which")
        return "; ".join(parts) if parts else "within the fitted range"

    def describe(self) -> str:
        """One line: P(divergence), the learning rate it is for, and whether the inputs lie in the fitted range."""
        lr = f" at learning rate {self.learning_rate:g}" if self.learning_rate is not None else ""
        return f"P(divergence){lr} = {_percent(self.probability)} — {self.range_note}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the assessment (probability, range status, the inputs outside or unknown)."""
        return {"probability": self.probability, "learning_rate": self.learning_rate, "out_of_range": self.out_of_range,
                "status": self.status, "outside": [i.to_dict() for i in self.outside], "unknown": list(self.unknown),
                "note": self.range_note, "estimator": self.estimator}

    def __float__(self) -> float:
        return float(self.probability)


def _sigmoid(z: float | np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + exp(-z)), elementwise, without overflow for any logit (`exp` of a logit below
    -709 overflows float64); a scalar gives a 0-d array."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _newton(x: np.ndarray, y: np.ndarray, penalty: np.ndarray,
            max_iter: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Penalised logistic maximum likelihood by Newton / IRLS -> `(weights (p,), penalised Hessian (p, p),
    converged)`."""
    w = np.zeros(x.shape[1])
    converged = False
    for _ in range(max_iter):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            converged = True
            break
    p = _sigmoid(x @ w)
    hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(len(w))
    return w, hess, converged


def _record_ranges(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Training range of each key every row carries: numeric min/max of the finite values (an infinite spectrum is
    clipped to the finite range, so it is no evidence of coverage), or the categories seen."""
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(keys):
        values = [r.get(key) for r in rows]
        if any(v is None for v in values):
            continue  # not recorded for every run: a partial range would claim coverage it does not have
        if all(_is_number(v) for v in values):
            numbers = [float(v) for v in values if math.isfinite(float(v))]
            if numbers:
                out[key] = {"min": min(numbers), "max": max(numbers)}
        else:
            out[key] = {"values": sorted({str(v) for v in values})}
    return out


def _ranges_to_json(ranges: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(ranges)
    out["inputs"] = {k: ({"min": _num(v["min"]), "max": _num(v["max"])} if "min" in v
                         else {"values": list(v["values"])})
                     for k, v in ranges.get("inputs", {}).items()}
    return out


def _ranges_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError("training_ranges must be a JSON object.")
    out = dict(data)
    inputs = {}
    for key, rng in dict(data.get("inputs", {})).items():
        if "values" in rng:
            inputs[key] = {"values": [str(v) for v in rng["values"]]}
        elif "min" in rng and "max" in rng:
            inputs[key] = {"min": float(rng["min"]), "max": float(rng["max"])}
            if not inputs[key]["min"] <= inputs[key]["max"]:
                raise ValueError(f"training_ranges.inputs[{key!r}] has min {rng['min']} above max {rng['max']}.")
        else:
            raise ValueError(f"training_ranges.inputs[{key!r}] needs 'min' and 'max', or 'values'; got {sorted(rng)}.")
    out["inputs"] = inputs
    return out


def _fit_value(spec: FeatureSpec, row: Mapping[str, Any], index: int) -> float:
    """The transformed value of `spec` in training row `index`, with an error naming the row and the fix for a missing
    key, a NaN, or a learning rate that is not a positive number."""
    if spec.key not in row:
        raise ValueError(f"training row {index} has no {spec.key!r} (it has {sorted(row)[:12]}); every row needs each "
                         "feature key. RiskEstimator.row(profile, learning_rate=...) builds one from a profile.")
    value = row[spec.key]
    if spec.key == _LR:
        try:
            check_learning_rate(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"training row {index}: {err}") from None
    try:
        return spec.transformed(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"training row {index}: {err} Drop the row (a failed profile) or fill the value.") from None


@dataclass
class RiskEstimator:
    r"""Logistic model $P(D=1) = \sigma(b + \sum_i w_i z_i)$ on standardised features $z_i$ (see `FeatureSpec`).

    Args:
        features (`list[FeatureSpec]`): inputs, in coefficient order.
        coef (`list[float]`): one weight per feature.
        intercept (`float`): bias `b`.
        metadata (`dict`, *optional*): provenance (training runs, held-out AUROC / ECE, ...), stored in the JSON.
        training_ranges (`dict`, *optional*): what the training runs covered: `"inputs"` maps an input key to
            `{"min", "max"}` (raw units) or `{"values": [...]}` (categories, e.g. `model_type`); optional
            `"families"` (descriptive names of the model families) and `"n_rows"`. Set by `fit`; checked by `assess`.
        coef_cov (`list[list[float]]`, *optional*): covariance of `(intercept, *coef)`, shape `(p + 1, p + 1)`; `fit`
            stores the inverse penalised Hessian (Laplace approximation). Gives `learning_rate_interval`.
        bootstrap_coefs (`list[list[float]]`, *optional*): refitted `(intercept, *coef)` rows, shape `(B, p + 1)`;
            used for the interval when there is no covariance.
    """

    features: list[FeatureSpec]
    coef: list[float]
    intercept: float
    metadata: dict[str, Any] = field(default_factory=dict)
    training_ranges: dict[str, Any] = field(default_factory=dict)
    coef_cov: list[list[float]] | None = None
    bootstrap_coefs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        if len(self.features) != len(self.coef):
            raise ValueError(f"{len(self.features)} features but {len(self.coef)} coefficients.")
        if not all(math.isfinite(c) for c in [*self.coef, self.intercept]):
            raise ValueError("coefficients and intercept must be finite.")
        size = len(self.coef) + 1
        if self.coef_cov is not None:
            cov = np.asarray(self.coef_cov, dtype=np.float64)
            if cov.shape != (size, size) or not np.all(np.isfinite(cov)) or not np.allclose(cov, cov.T, atol=1e-10):
                raise ValueError(f"coef_cov must be a finite symmetric ({size}, {size}) matrix over "
                                 f"(intercept, *coef); got shape {cov.shape}.")
            lowest = float(np.linalg.eigvalsh(cov)[0])
            if lowest < -1e-9 * max(float(np.abs(cov).max()), 1e-300):  # a covariance has no negative variance
                raise ValueError(f"coef_cov must be positive semi-definite (a covariance); its smallest eigenvalue is "
                                 f"{lowest:.3g}.")
        if self.bootstrap_coefs is not None:
            boot = np.asarray(self.bootstrap_coefs, dtype=np.float64)
            if boot.ndim != 2 or boot.shape[1] != size or not np.all(np.isfinite(boot)):
                raise ValueError(f"bootstrap_coefs must be finite rows of (intercept, *coef), shape (B, {size}); got "
                                 f"shape {boot.shape}.")

    # ------------------------------------------------------------------ prediction
    @property
    def required_keys(self) -> list[str]:
        """The profile / row keys this estimator reads, sorted (a row passed to `fit` or `predict` needs each)."""
        return sorted({f.key for f in self.features})

    @property
    def learning_rate_range(self) -> tuple[float, float] | None:
        """`(min, max)` learning rate of the training runs, or `None` when the estimator does not record it."""
        rng = self.training_ranges.get("inputs", {}).get(_LR)
        return (rng["min"], rng["max"]) if rng and "min" in rng else None

    def _logit(self, values: Mapping[str, Any], *, row: int | None = None) -> float:
        missing = [f.key for f in self.features if f.key not in values]
        if missing:
            if row is not None:
                raise ValueError(f"row {row} has no {missing}; every row needs {self.required_keys}.")
            hint = " (pass learning_rate=... )" if _LR in missing else ""
            raise ValueError(
                f"risk estimator needs {missing}{hint}; available inputs: {sorted(values)[:20]}"
                + (" ..." if len(values) > 20 else "")
            )
        z = [f.standardized(values[f.key]) for f in self.features]
        return self.intercept + float(np.dot(self.coef, z))

    @staticmethod
    def _inputs(profile: Any, learning_rate: float | None, context: Mapping[str, Any]) -> dict[str, Any]:
        if learning_rate is not None and (not _is_number(learning_rate) or not 0 < learning_rate < math.inf):
            raise ValueError(f"learning_rate={learning_rate!r} must be a positive finite number.")
        return flatten_inputs(profile, {_LR: learning_rate, **context})

    def predict_proba(self, profile: Any = None, learning_rate: float | None = None, **context: Any) -> float:
        """Probability that a training run diverges (paper label: loss > 50 or grad norm > 500 at any step).

        Inputs outside the training range are clipped to it; `assess` returns the same probability together with
        which inputs were outside.

        Args:
            profile (`SpectralProfile` or mapping): the init-time profile (its `aggregates`), or a plain mapping of
                aggregate features. May be `None` for estimators that use context only.
            learning_rate (`float`, *optional*): peak learning rate of the run (required by estimators that use it;
                read from `profile.meta["learning_rate"]` when not given).
            **context: other non-spectral inputs the estimator was fitted with (see `required_keys`), e.g. `norm`.

        Returns:
            `float` in (0, 1). For an "uninformative" profile whose spectrum the estimator reads, a warning says that
            the probability rests on a spectrum the decision rule does not trust (`assess` lists it as unknown).
        """
        values = self._inputs(profile, learning_rate, context)
        probability = float(_sigmoid(self._logit(values)))  # first: a missing input raises, with nothing said before
        if self._reads_uninformative_spectrum(profile) and not _QUIET_UNINFORMATIVE.get():
            reason = _part(profile, "verdict_reason") or "see its verdict"
            # the verdict's reason names what would make the spectrum informative (more token states, the full
            # spectrum instead of a rank-r one, varied text): no fix is repeated here that may not be the one
            _warn_once(f"predict_proba: the profile is uninformative ({reason}), so the probability rests on a "
                       "spectrum the decision rule does not trust; assess() lists the inputs it cannot vouch for.")
        return probability

    def _reads_uninformative_spectrum(self, profile: Any) -> bool:
        """Whether `profile` is "uninformative" and this estimator reads a spectral aggregate of it."""
        aggregates = _part(profile, "aggregates", profile)
        return _part(profile, "verdict") == "uninformative" and isinstance(aggregates, Mapping) and any(
            f.key != _LR and f.key in aggregates for f in self.features)

    def check_ranges(
        self, profile: Any = None, learning_rate: float | None = None, **context: Any
    ) -> tuple[bool | None, tuple[RangeIssue, ...], tuple[str, ...]]:
        """`(out_of_range, outside, unknown)` for these inputs (see `RiskAssessment` for their meaning).

        Checked: every input of the model, the model keys (`model_type`, `hidden_size`, `num_layers`) whose range the
        estimator records, and `model_type` always (a model type the estimator does not record is unknown). A
        profile of weights other than an initialisation (`meta["weights"]` `"pretrained"` or `"trained"`) is
        outside (the training runs were profiled at initialisation), and a profile without `meta["weights"]` (nor
        a `weights` context) has its weights unknown; the spectrum of an "uninformative" profile is unknown when the
        estimator reads it. For a profile made in float16 / bfloat16 (`meta["dtype"]`, `low_precision_dtype`) the ρ
        and κ(V) inputs are unknown rather than range-checked: the dtype's rounding, not the model, sets them. A
        bare mapping of aggregates has no meta: its weights are not called unknown, and its ρ and κ(V) only when it
        (or the context) carries a `dtype`.
        """
        values = self._inputs(profile, learning_rate, context)
        ranges = self.training_ranges.get("inputs", {})
        log_keys = {f.key for f in self.features if f.transform == "log10"} | {_LR}
        keys = [
            *dict.fromkeys(f.key for f in self.features), *(k for k in MODEL_KEYS if k in ranges or k == "model_type")
        ]
        outside: list[RangeIssue] = []
        unknown: list[str] = []
        low_precision = low_precision_dtype(values)
        for key in dict.fromkeys(keys):
            rng, value = ranges.get(key), values.get(key)
            if low_precision is not None and _precision_sensitive(key):
                unknown.append(_unreliable_entry(key, low_precision))  # rounding, not the model, sets its value
                continue
            if rng is None:
                unknown.append(key)
                continue
            if value is None:
                unknown.append(f"{key} (not given)")
                continue
            if "values" in rng:
                if str(value) not in rng["values"]:
                    outside.append(RangeIssue(key, value, seen=tuple(rng["values"])))
                continue
            if not _is_number(value) or math.isnan(float(value)):
                unknown.append(f"{key} (not a number)")
                continue
            x, low, high = float(value), rng["min"], rng["max"]
            tol = 1e-9 * max(1.0, abs(low), abs(high)) if math.isfinite(low) and math.isfinite(high) else 0.0
            if low - tol <= x <= high + tol:
                continue
            log_scale = key in log_keys
            bound = high if x > high else low
            if log_scale:
                excess = math.inf if x <= 0 or bound <= 0 or math.isinf(x) else abs(math.log10(x / bound))
            else:
                excess = abs(x - bound)
            outside.append(RangeIssue(key, x, low, high, excess=excess, log_scale=log_scale))
        weights = values.get("weights")  # meta["weights"], or the context's
        if weights is not None and weights != "init":  # the training runs were profiled at initialisation
            outside.append(RangeIssue("weights", weights, seen=("init",)))
        elif weights is None and isinstance(_part(profile, "meta"), Mapping):
            unknown.append(_WEIGHTS_UNKNOWN)  # a profile that cannot say whether it is of an initialisation
        optimizer, seen = values.get("optimizer"), ranges.get("optimizer")  # checked where both are known
        if optimizer is not None and seen is not None and optimizer_family(optimizer) not in seen.get("values", ()):
            outside.append(RangeIssue("optimizer", optimizer, seen=tuple(seen.get("values", ()))))
        if self._reads_uninformative_spectrum(profile):
            unknown.append(_UNINFORMATIVE_SPECTRUM)
        flag = True if outside else (None if unknown else False)
        return flag, tuple(outside), tuple(unknown)

    def assess(self, profile: Any = None, learning_rate: float | None = None, **context: Any) -> RiskAssessment:
        """`predict_proba` plus whether the inputs lie inside the training ranges, as a `RiskAssessment`.

        Same arguments as `predict_proba`. The learning rate in the result is the one used (argument or
        `profile.meta["learning_rate"]`).
        """
        values = self._inputs(profile, learning_rate, context)
        probability = float(_sigmoid(self._logit(values)))
        flag, outside, unknown = self.check_ranges(profile, learning_rate, **context)
        lr = values.get(_LR)
        low_precision = low_precision_dtype(values)
        keys = dict.fromkeys(f.key for f in self.features)
        unreliable = tuple(k for k in keys if _unreliable_entry(k, low_precision) in unknown) if low_precision else ()
        return RiskAssessment(probability, flag, outside, unknown, float(lr) if _is_number(lr) else None,
                              unreliable, low_precision, tuple(keys), self.name)

    def predict_proba_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Vectorised `predict_proba` over flat rows (aggregates and context in one mapping, e.g. a sweep table).

        Shapes:
            rows: `N` mappings -> `(N,)` probabilities.
        """
        for i, r in enumerate(rows):
            try:
                if _LR in self.required_keys:
                    check_learning_rate(r.get(_LR))
            except (TypeError, ValueError) as err:
                raise ValueError(f"row {i}: {err}") from None
        logits = np.array([self._logit(r, row=i) for i, r in enumerate(rows)], dtype=np.float64)
        return _sigmoid(logits)

    @staticmethod
    def row(profile: Any, learning_rate: float | None = None, **context: Any) -> dict[str, Any]:
        """The flat row of `profile` at `learning_rate` that `fit` and `predict_proba_rows` read: the profile's
        aggregates (every spectral input an estimator may use), the learning rate, the model type, width and depth
        (whose ranges `fit` records for the range flag), and `context`. Add the run's label to build a training table
        for `fit` (the library's rule: loss > 50, gradient norm > 500 or non-finite at any step, which the guard of
        `RKSPCallback` applies).

        Args:
            profile (`SpectralProfile` or mapping): the profile at initialisation (or its `to_dict()` form).
            learning_rate (`float`, *optional*): the run's peak learning rate (else `meta["learning_rate"]`).
            **context: other inputs, e.g. `norm="pre_ln"`.

        Returns:
            `dict[str, Any]`: one row.
        """
        check_learning_rate(learning_rate)
        aggregates = _part(profile, "aggregates", profile)
        if not isinstance(aggregates, Mapping):
            raise TypeError(f"profile must be a SpectralProfile or its to_dict() form, got {type(profile).__name__}.")
        meta = _part(profile, "meta")
        lr = learning_rate if learning_rate is not None else (meta or {}).get(_LR)
        out = {k: (float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v)  # profile.json's strings
               for k, v in aggregates.items()}
        out.update(_model_context(profile))
        if lr is not None:
            out[_LR] = float(lr)
        out.update({k: v for k, v in context.items() if v is not None})
        return out

    # ------------------------------------------------------------------ learning rate at a given risk
    def _solve_lr(self, values: Mapping[str, Any], risk: float, params: np.ndarray, *, exact: bool) -> np.ndarray:
        """Learning rate at which the probability first reaches `risk`, for each row of `params` `(D, p + 1)` =
        `(intercept, *coef)` -> `(D,)`: `inf` when it never does as the learning rate grows, `0.0` when it is at or
        above `risk` at every learning rate searched. The learning rate enters unclipped (an extrapolation outside the
        training range); the other inputs are clipped as in `predict_proba`."""
        lr_idx = [i for i, f in enumerate(self.features) if f.key == _LR]
        if not lr_idx:
            raise ValueError("this risk estimator does not use the learning rate, so it cannot suggest one.")
        missing = [f.key for f in self.features if f.key != _LR and f.key not in values]
        if missing:
            raise ValueError(f"risk estimator needs {missing}; available inputs: {sorted(values)[:20]}")
        others = {**values, _LR: 1.0}  # placeholder: the lr columns are replaced below
        z = np.array([0.0 if i in lr_idx else f.standardized(others[f.key]) for i, f in enumerate(self.features)])
        target = math.log(risk / (1.0 - risk))
        base = params[:, 0] + params[:, 1:] @ z  # (D,)
        if len(lr_idx) == 1 and self.features[lr_idx[0]].transform == "log10":
            spec, w = self.features[lr_idx[0]], params[:, 1 + lr_idx[0]]
            with np.errstate(divide="ignore", invalid="ignore"):
                x = spec.mean + spec.std * (target - base) / w
                out = np.where(w > 0, 10.0 ** np.clip(x, -300, 300), math.inf)
            return out
        specs = [self.features[i] for i in lr_idx]

        def lr_block(log_lr: np.ndarray) -> np.ndarray:  # (len(lr_idx), G) standardised, unclipped
            return np.array([[(s.transformed(10.0**g) - s.mean) / s.std for g in log_lr] for s in specs])

        weights = params[:, [1 + i for i in lr_idx]]  # (D, k)
        logits = base[:, None] + weights @ lr_block(_LR_GRID)  # (D, G)
        above = logits >= target
        out = np.full(len(params), math.inf)
        for d in range(len(params)):
            hits = np.flatnonzero(above[d])
            if hits.size == 0:
                continue
            k = int(hits[0])
            if k == 0:
                out[d] = 0.0
                continue
            lo, hi = _LR_GRID[k - 1], _LR_GRID[k]
            if exact:
                for _ in range(60):
                    mid = 0.5 * (lo + hi)
                    if base[d] + weights[d] @ lr_block(np.array([mid]))[:, 0] >= target:
                        hi = mid
                    else:
                        lo = mid
                out[d] = 10.0 ** (0.5 * (lo + hi))
            else:  # linear interpolation of the logit inside the grid cell
                a, b = logits[d, k - 1], logits[d, k]
                out[d] = 10.0 ** (lo + (hi - lo) * (target - a) / (b - a) if b > a else hi)
        return out

    @staticmethod
    def _check_risk(risk: float) -> float:
        if not _is_number(risk) or not 0.0 < float(risk) < 1.0:
            raise ValueError(f"risk={risk!r} must be a probability strictly between 0 and 1, e.g. 0.1.")
        return float(risk)

    def learning_rate_at_risk(self, profile: Any = None, risk: float = 0.1, **context: Any) -> float:
        r"""The learning rate at which the predicted divergence probability reaches `risk`.

        When the learning rate enters as one `log10` feature, the logistic is solved in closed form:
        $\log_{10}\eta^* = \mu + \sigma\,(\operatorname{logit}(r) - b - \sum_{j \ne \eta} w_j z_j) / w_\eta$.
        Otherwise the crossing is found by bisection in log10 learning rate on [1e-10, 1e3]. The learning rate is not
        clipped to the training range here (that would leave no crossing); the result may therefore lie outside it,
        which `check_ranges(profile, learning_rate=result)` reports.

        Args:
            profile: as in `predict_proba` (a learning rate in it is ignored).
            risk (`float`, defaults to 0.1): target divergence probability, in (0, 1).
            **context: other inputs the estimator needs (see `required_keys`).

        Returns:
            `float`: the learning rate; `math.inf` when the probability never reaches `risk` as the learning rate grows
            (its coefficient is not positive), `0.0` when it is at or above `risk` at every learning rate.
        """
        risk = self._check_risk(risk)
        values = flatten_inputs(profile, context)
        values.pop(_LR, None)
        params = np.array([[self.intercept, *self.coef]], dtype=np.float64)
        return float(self._solve_lr(values, risk, params, exact=True)[0])

    @property
    def interval_source(self) -> str | None:
        """Where `learning_rate_interval` takes the coefficient uncertainty from: `"covariance"`, `"bootstrap"` or
        `None` (the estimator stores neither)."""
        if self.coef_cov is not None:
            return "covariance"
        return "bootstrap" if self.bootstrap_coefs else None

    def learning_rate_interval(
        self, profile: Any = None, risk: float = 0.1, *, level: float = 0.95, **context: Any
    ) -> tuple[tuple[float, float], str] | None:
        """Interval for `learning_rate_at_risk` from the stored coefficient uncertainty, or `None` without one.

        With `coef_cov`, `(intercept, *coef)` are drawn from the Gaussian it describes (4000 draws, fixed seed); with
        `bootstrap_coefs` only, the stored refits are used. The interval holds the central `level` of the solved
        learning rates. It covers the uncertainty of the fitted coefficients on the training distribution only, not
        the shift to a model family the estimator never saw.

        Returns:
            `((low, high), description)`; bounds may be `0.0` or `inf` (see `learning_rate_at_risk`).
        """
        risk = self._check_risk(risk)
        if not 0.0 < level < 1.0:
            raise ValueError(f"level={level!r} must be in (0, 1), e.g. 0.95.")
        theta = np.array([self.intercept, *self.coef], dtype=np.float64)
        central = f"{level * 100:.10g} %"  # 0.975 reads "97.5 %", not a rounded "98%"
        if self.coef_cov is not None:
            cov = np.asarray(self.coef_cov, dtype=np.float64)
            eigval, eigvec = np.linalg.eigh(0.5 * (cov + cov.T))
            root = eigvec * np.sqrt(np.clip(eigval, 0.0, None))
            draws = theta + np.random.default_rng(0).standard_normal((_INTERVAL_DRAWS, len(theta))) @ root.T
            how = f"the central {central} of {_INTERVAL_DRAWS} draws from the stored coefficient covariance"
        elif self.bootstrap_coefs:
            draws = np.asarray(self.bootstrap_coefs, dtype=np.float64)
            how = f"the central {central} of {len(draws)} stored bootstrap refits"
        else:
            return None
        values = flatten_inputs(profile, context)
        values.pop(_LR, None)
        solved = np.sort(self._solve_lr(values, risk, draws, exact=False))
        tail = (1.0 - level) / 2.0  # order statistics (1e-9 absorbs the rounding of e.g. 0.05 * 100)
        low = solved[int(math.floor(tail * (len(solved) - 1) + 1e-9))]
        high = solved[int(math.ceil((1.0 - tail) * (len(solved) - 1) - 1e-9))]
        return (float(low), float(high)), how

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        rows: Sequence[Mapping[str, Any]],
        labels: Sequence[int],
        features: Sequence[FeatureSpec | tuple[str, str] | str],
        *,
        l2: float = 1.0,
        max_iter: int = 100,
        metadata: Mapping[str, Any] | None = None,
        range_keys: Sequence[str] = MODEL_KEYS,
        families: Sequence[str] | None = None,
        n_bootstrap: int = 0,
        seed: int = 0,
    ) -> RiskEstimator:
        r"""Fit by L2-penalised maximum likelihood (Newton / IRLS); the intercept is not penalised.

        Args:
            rows: flat mappings holding every feature key; labels: 0/1 per row.
            features: `FeatureSpec`, `(key, transform)` or `key`; standardisation and clip ranges are set from `rows`.
            l2 (`float`, *optional*, defaults to 1.0): ridge strength on the standardised coefficients
                (penalty $\frac{l2}{2}\|w\|^2$ added to the summed negative log-likelihood).
            max_iter (`int`, *optional*, defaults to 100): most Newton steps.
            metadata (*optional*): JSON-ready provenance stored with the estimator (`RiskEstimator.metadata`), e.g.
                the sweep it was fitted on.
            range_keys (*optional*): extra row keys whose training range is recorded next to the features' (defaults
                to `MODEL_KEYS`: model type, width, depth; a key missing from some row is not recorded).
            families (*optional*): names of the model families the rows come from, stored as provenance.
            n_bootstrap (`int`, defaults to 0): also store this many refits on resampled rows (same
                standardisation), an alternative coefficient uncertainty to the stored Laplace covariance.
            seed (`int`, defaults to 0): seed of the resampling.

        The fitted estimator stores `training_ranges` (min/max or categories of every feature key and `range_keys`)
        and `coef_cov`, the inverse penalised Hessian at the optimum.
        """
        y = np.asarray(labels, dtype=np.float64)
        if y.ndim != 1 or len(y) != len(rows) or not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0/1, one per row.")
        if len(rows) < 2 or y.min() == y.max():
            raise ValueError("need at least one diverged and one stable run to fit a risk estimator.")
        if not _is_number(l2) or not 0 <= float(l2) < math.inf:
            raise ValueError(f"l2={l2!r} must be a finite number >= 0 (the ridge strength; 1.0 by default).")
        specs = []
        for f in features:
            spec = f if isinstance(f, FeatureSpec) else FeatureSpec(*(f if isinstance(f, tuple) else (f,)))
            raw = np.array([_fit_value(spec, r, i) for i, r in enumerate(rows)], dtype=np.float64)
            finite = raw[np.isfinite(raw)]
            if finite.size == 0:
                raise ValueError(f"feature {spec.key!r} has no finite value in the training rows.")
            low, high = float(finite.min()), float(finite.max())
            clipped = np.clip(raw, low, high)
            std = float(clipped.std())
            specs.append(
                FeatureSpec(spec.key, spec.transform, float(clipped.mean()), std if std > 1e-12 else 1.0, low, high)
            )
        z = np.array([[s.standardized(r[s.key]) for s in specs] for r in rows], dtype=np.float64)  # checked above
        x = np.hstack([np.ones((len(rows), 1)), z])
        penalty = np.full(x.shape[1], float(l2))
        penalty[0] = 0.0
        w, hess, converged = _newton(x, y, penalty, max_iter)
        if not converged:
            logger.warning("RiskEstimator.fit: Newton's method did not converge in max_iter=%d steps (largest "
                           "coefficient %.3g); the classes may be separable by the features: raise l2, or add runs "
                           "near the boundary.", max_iter, float(np.max(np.abs(w[1:]))) if len(w) > 1 else 0.0)
        cov = np.linalg.inv(hess)
        boot = []
        rng = np.random.default_rng(seed)
        for _ in range(int(n_bootstrap)):
            idx = rng.integers(0, len(rows), len(rows))
            if y[idx].min() == y[idx].max():
                continue  # a one-class resample has no finite maximum-likelihood fit
            boot.append([float(v) for v in _newton(x[idx], y[idx], penalty, max_iter)[0]])  # (w, hess, converged)
        ranges: dict[str, Any] = {
            "inputs": _record_ranges(rows, [*(s.key for s in specs), *range_keys]),
            "n_rows": len(rows),
            "source": "fit",
        }
        if families is not None:
            ranges["families"] = [str(f) for f in families]
        return cls(specs, [float(v) for v in w[1:]], float(w[0]), dict(metadata or {}), ranges,
                   coef_cov=(0.5 * (cov + cov.T)).tolist(), bootstrap_coefs=boot or None)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in format version 2 (`FORMAT_VERSION`): named features each with its coefficient."""
        names = ["intercept", *(f.name for f in self.features)]
        out: dict[str, Any] = {
            "format": _FORMAT,
            "version": FORMAT_VERSION,
            "features": [
                {"name": f.name, "key": f.key, "transform": f.transform, "coef": c, "mean": f.mean, "std": f.std,
                 "clip": [_num(f.low), _num(f.high)]}
                for f, c in zip(self.features, self.coef)
            ],
            "intercept": self.intercept,
            "training_ranges": _ranges_to_json(self.training_ranges),
        }
        if self.coef_cov is not None:
            out["coef_covariance"] = {"order": names, "matrix": [list(map(float, r)) for r in self.coef_cov]}
        if self.bootstrap_coefs:
            out["bootstrap_coefs"] = {"order": names, "draws": [list(map(float, r)) for r in self.bootstrap_coefs]}
        out["metadata"] = self.metadata
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiskEstimator:
        """Read format version 2 or version 1 (whose clip ranges become the feature training ranges)."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"not a risk-estimator JSON (format={got!r}, expected {_FORMAT!r}).")
        version = data.get("version")
        if version == 1:
            return cls._from_v1(data)
        if version != FORMAT_VERSION:
            newer = _is_number(version) and version > FORMAT_VERSION
            raise ValueError(
                f"risk-estimator JSON has format version {version!r}; this hf_koopman reads versions 1 and "
                f"{FORMAT_VERSION}. "
                + ("It was written by a newer hf_koopman: upgrade (pip install -U hf-koopman)." if newer else
                   "Re-save it with RiskEstimator.save_json, or refit it with research/scripts/fit_risk.py from the "
                   "hf_koopman repository.")
            )
        try:
            feats = []
            for f in data["features"]:
                low, high = f.get("clip", ["-inf", "inf"])
                feats.append(FeatureSpec(f["key"], f["transform"], _json_number(f["mean"], "mean"),
                                         _json_number(f["std"], "std"), _json_number(low, "clip", ends=True),
                                         _json_number(high, "clip", ends=True)))
            coef = [_json_number(f["coef"], "coef") for f in data["features"]]
            intercept = _json_number(data["intercept"], "intercept")
        except KeyError as err:
            raise ValueError(
                f"risk-estimator JSON (version 2) lacks the field {err}; the file is incomplete."
            ) from None
        names = ["intercept", *(f.name for f in feats)]
        stored: dict[str, list[list[float]] | None] = {}
        for field_name, inner in (("coef_covariance", "matrix"), ("bootstrap_coefs", "draws")):
            block = data.get(field_name)
            if block is None:
                stored[field_name] = None
                continue
            if list(block.get("order", [])) != names:
                raise ValueError(f"{field_name}.order {block.get('order')} does not match (intercept, features) "
                                 f"{names}; the file is inconsistent.")
            stored[field_name] = [[float(v) for v in r] for r in block[inner]]
        for f, name in zip(data["features"], names[1:]):
            if f.get("name", name) != name:
                raise ValueError(f"feature name {f.get('name')!r} does not match its key/transform ({name!r}).")
        return cls(feats, coef, intercept, dict(data.get("metadata", {})),
                   _ranges_from_json(data.get("training_ranges", {})),
                   coef_cov=stored["coef_covariance"], bootstrap_coefs=stored["bootstrap_coefs"])

    @classmethod
    def _from_v1(cls, data: Mapping[str, Any]) -> RiskEstimator:
        feats = [
            FeatureSpec(f["key"], f["transform"], float(f["mean"]), float(f["std"]), float(f["low"]), float(f["high"]))
            for f in data["features"]
        ]
        inputs: dict[str, dict[str, float]] = {}
        for f in feats:  # fit() set low/high to the min/max of the transformed training values
            if f.key not in inputs and not f.transform.startswith("onehot:") and math.isfinite(f.low) \
                    and math.isfinite(f.high):
                inputs[f.key] = {"min": f.raw_bound(f.low), "max": f.raw_bound(f.high)}
        ranges = {"inputs": inputs, "source": "version-1 file: per-feature clip ranges (min/max of the training rows)"}
        return cls(feats, [float(c) for c in data["coef"]], float(data["intercept"]), dict(data.get("metadata", {})),
                   ranges)

    def save_json(self, path: str | Path) -> Path:
        """Write the estimator as JSON (`to_dict`, format version 2) to `path`, creating parent folders; returns it.
        The file is written whole or not at all: a failure leaves an earlier estimator there as it was."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> RiskEstimator:
        """Load an estimator written by `save_json` (format versions 1 and 2); a clear error for a missing or
        non-JSON file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no risk-estimator JSON at {path}.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a JSON file ({err}); a risk estimator is saved with save_json.") from None
        try:
            loaded = cls.from_dict(data)
            loaded._source = str(path.absolute())  # a profile reads it back from any working directory
            return loaded
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            # a hand-edited file: name the file and what in it is wrong, not only the Python error
            what = f"missing field {err}" if isinstance(err, KeyError) else f"{err}"
            raise ValueError(f"{path} is not a valid risk estimator ({type(err).__name__}: {what}); "
                             "a risk estimator is written by save_json (or research/scripts/fit_risk.py).") from err

    @classmethod
    def default(cls) -> RiskEstimator:
        """The estimator shipped with the package (`hf_koopman/data/risk_estimator.json`, fitted by
        `research/scripts/fit_risk.py`; `metadata` names the runs). Each call returns its own copy (read once), so
        changing one never changes another."""
        return copy.deepcopy(_load_default())

    def training_summary(self) -> str:
        """One line on what the training runs covered (the recorded ranges and families)."""
        ranges = self.training_ranges.get("inputs", {})
        if not ranges:
            return "the estimator records no training ranges"
        parts = [f"{k} {_g(v['min'])}–{_g(v['max'])}" if "min" in v else f"{k} in {{{', '.join(v['values'])}}}"
                 for k, v in ranges.items()]
        if self.training_ranges.get("families"):
            parts.append("families " + ", ".join(self.training_ranges["families"]))
        rows = self.training_ranges.get("n_rows")
        summary = (f"fitted on {rows} runs: " if rows else "fitted on: ") + "; ".join(parts)
        horizon = self.metadata.get("horizon_steps") if isinstance(self.metadata, Mapping) else None
        if isinstance(horizon, int):
            # P(diverged by step T) cannot fall as T grows: a longer run's threshold is the same or lower
            summary += (f"; the label is divergence within {horizon} steps, so for a longer run the probability is a "
                        "lower bound and the suggested learning rate an upper one")
        return summary

    @property
    def name(self) -> str:
        """What outputs call this estimator: `metadata["name"]` when set, `"shipped"` for `default()`, the file a
        `from_json` estimator came from, else `"custom"`."""
        if self.is_shipped:
            return "shipped"
        given = self.metadata.get("name") if isinstance(self.metadata, Mapping) else None
        if given and str(given) != "shipped":  # "shipped" names the package's own only
            return str(given)
        return getattr(self, "_source", None) or "custom"

    @property
    def file(self) -> str | None:
        """The absolute path of the JSON this estimator was read from (`from_json`), else `None`."""
        source = getattr(self, "_source", None)
        return None if source in (None, "shipped") else source

    @property
    def is_shipped(self) -> bool:
        """Whether this is the estimator shipped with the package (`default()`)."""
        return getattr(self, "_source", None) == "shipped"

    def __repr__(self) -> str:
        terms = ", ".join(f"{f.name}: {c:+.3f}" for f, c in zip(self.features, self.coef))
        return f"RiskEstimator(intercept={self.intercept:+.3f}, {terms})"


def load_estimator(estimator: RiskEstimator | str | Path | None) -> RiskEstimator:
    """A `RiskEstimator` from what a user passes: `None` for the shipped one (`RiskEstimator.default()`), an estimator,
    or the path of a JSON written by `save_json`."""
    if estimator is None:
        return RiskEstimator.default()
    if isinstance(estimator, RiskEstimator):
        return estimator
    if isinstance(estimator, (str, Path)):
        return RiskEstimator.from_json(estimator)
    raise TypeError(f"risk estimator must be a RiskEstimator, a path to its JSON, or None (the shipped one); got "
                    f"{type(estimator).__name__}.")


@lru_cache(maxsize=1)
def _load_default() -> RiskEstimator:
    ref = resources.files("hf_koopman") / "data" / DEFAULT_ESTIMATOR_FILE
    if not ref.is_file():
        raise FileNotFoundError(
            f"no shipped risk estimator at hf_koopman/data/{DEFAULT_ESTIMATOR_FILE}; fit one with "
            "research/scripts/fit_risk.py from the hf_koopman repository"
        )
    shipped = RiskEstimator.from_dict(json.loads(ref.read_text(encoding="utf-8")))
    shipped._source = "shipped"
    return shipped


# ---------------------------------------------------------------------------------------------------- decision rule
#: The verdicts of `DecisionRule.decide`, from least to most alarming, then the one that withholds judgement.
VERDICTS = ("safe", "moderate", "high risk", "uninformative")

#: Numeric level of each verdict, logged by `RKSPCallback` as `rksp/verdict_level` (a scalar a dashboard can plot).
VERDICT_LEVELS = {"uninformative": -1.0, "safe": 0.0, "moderate": 1.0, "high risk": 2.0}

#: The recommendation for a rank-r profile, which gets no threshold verdict ("uninformative").
RANK_ADVICE = ("Profile the full spectrum (leave `rank` / `--rank` out): the verdict's thresholds read all min(N - 1, "
               "d) modes, which the rank-r approximation does not measure.")

#: What to do about each verdict when no in-range calibrated probability is at hand (`recommendation`): the
#: "Recommendation" of the profile report and the advice the callback logs.
ADVICE = {
    "safe": ("Proceed: nothing in the spectrum calls for a change (no spectral penalty such as KSS). A safe "
             "verdict holds for no particular learning rate, so keep a divergence guard on during training (add "
             "`RKSPCallback()` to the Trainer; its guard is on by default)."),
    "moderate": (
        "Borderline: the paper leaves 0.3 ≤ M≈1 ≤ 0.5 to context. Keep the divergence guard on "
        "(`RKSPCallback(on_divergence=\"rollback\")`) and be careful with learning rates above 2× the standard one."
    ),
    "high risk": (
        "Lower the learning rate (and if the blocks have no normalisation layers, add them: the paper's high-risk "
        "family is No-Norm), and keep the divergence guard on "
        "(`RKSPCallback(on_divergence=\"rollback\")` continues past a blow-up). KSS (`KSSTrainer`) did not lower "
        "divergence in our measurements in the paper's own No-Norm regime (results/kss_v2.md in the hf_koopman "
        "repository)."
    ),
    "uninformative": (
        "Do what the reason above names: profile on more token states where it says the sample is too small "
        "(num_samples, more or longer inputs), or again after a little training where the spectrum at "
        "initialisation carries no signal (degenerate or nonlinear blocks, App. J)."
    ),
}


#: `DecisionRule.rank_deficient`: a layer whose token states span fewer than this share of the min(N - 1, d)
#: directions their number allows is flagged (a heuristic: a LayerNorm output spans d - 1 of d)
RANK_SHARE_MIN = 0.9

#: the risk budget of `recommendation`: a calibrated probability at or below it needs no lower learning rate (the
#: default `risk` of `suggest_max_lr` and `hf-koopman max-lr`)
RISK_BUDGET = 0.1

_GUARD = "keep the divergence guard on (`RKSPCallback(on_divergence=\"rollback\")` continues past a blow-up)"

#: `recommendation` for a profile of pretrained weights with a threshold verdict
PRETRAINED_ADVICE = (
    "These are pretrained weights, which the verdict says little about: fine-tune at the learning rate recommended "
    f"for this model (a fraction of its pre-training rate is usual), and {_GUARD}."
)


def score_band(score: float, relative: float) -> str:
    """`score ± score·relative` as text, the sampling band of a mass; a mass lies in [0, 1], so a band that would
    pass 1 is written as the interval up to 1."""
    spread = score * relative
    if score + spread <= 1.0:
        return f"{score:.2f} ± {spread:.2f}"
    return f"{score:.2f} (band {max(0.0, score - spread):.2f} to 1, a mass cannot exceed 1)"


def check_learning_rate(learning_rate: Any) -> float | None:
    """`learning_rate` as a float (`None` stays `None`); a `TypeError` for a non-number (a bool included), a
    `ValueError` naming the fix for a number that is not positive and finite."""
    if learning_rate is None:
        return None
    if isinstance(learning_rate, (bool, np.bool_)) or not isinstance(learning_rate, numbers.Real):
        raise TypeError(
            f"learning_rate must be a number (the planned peak learning rate, e.g. 3e-4) or None, got "
            f"{type(learning_rate).__name__} {learning_rate!r}."
        )
    if not (math.isfinite(float(learning_rate)) and learning_rate > 0):
        raise ValueError(
            f"learning_rate={learning_rate!r} must be a positive finite number (the planned peak learning rate, e.g. "
            "3e-4), or None to profile without the calibrated risk."
        )
    return float(learning_rate)


def shown_probability(probability: float) -> str:
    """A probability as the report, the advice and the CLI show it: one decimal of a percent, `< 0.1 %` below."""
    return "< 0.1 %" if probability < 1e-3 else f"{probability:.1%}"


def below_risk_budget(probability: float) -> bool:
    """Whether `probability`, as shown to one decimal of a percent, lies at or below `RISK_BUDGET` (so that the same
    shown number never falls on both sides of it, and the rate `suggest_max_lr` gives for that risk reads as within
    it)."""
    return round(probability, 3) <= RISK_BUDGET


def in_fitted_range(assessment: RiskAssessment | None) -> bool:
    """Whether `assessment` is a calibrated probability at a given learning rate with every input inside the
    estimator's fitted range (`out_of_range is False`: none outside, none unknown)."""
    return (assessment is not None and getattr(assessment, "out_of_range", None) is False
            and getattr(assessment, "learning_rate", None) is not None)


def _below_fitted_learning_rates(assessment: RiskAssessment | None) -> RangeIssue | None:
    """The learning rate's range issue when it is the only input outside the fitted range, below it, every input is
    known, and the probability at the range's lower edge is at or below `RISK_BUDGET`; else `None`."""
    if assessment is None or getattr(assessment, "learning_rate", None) is None or assessment.unknown:
        return None
    if len(assessment.outside) != 1 or not below_risk_budget(assessment.probability):
        return None
    (issue,) = assessment.outside
    return issue if issue.key == _LR and issue.direction == "below" and issue.low is not None else None


def recommendation(verdict: str, assessment: RiskAssessment | None = None, *, rank: int | None = None,
                   pretrained: bool = False) -> str:
    """What to do: `RANK_ADVICE` for a profile whose read layers a rank-`rank` approximation truncated
    (`DecisionRule.truncated_rank`); `PRETRAINED_ADVICE` for `pretrained` weights with a threshold verdict (the
    verdict extrapolates a rule fitted at initialisation, and the advice of a verdict at initialisation, such as
    adding normalisation layers, does not apply to a checkpoint); from the calibrated probability when `assessment` is
    at the planned learning rate and inside the estimator's fitted range (`out_of_range is False`) and the verdict is
    not "uninformative" (the probability then reads a spectrum that is no reading of the model); from the verdict's
    `ADVICE` otherwise.

    The verdict reads the spectrum alone, which on held-out architecture families added nothing beyond the
    configuration, the loss curvature and the learning rate (it lowered the held-out AUROC, `results/heldout_risk.md`);
    the calibrated probability reads the spectrum and the learning rate, so
    where it is in range it decides the advice: at or below `RISK_BUDGET` no lower learning rate, above it a
    lower one.
    """
    if rank is not None:
        return RANK_ADVICE
    if verdict == "uninformative":  # the probability reads a spectrum that is no reading of the model
        return ADVICE[verdict]
    in_range = in_fitted_range(assessment)
    if pretrained and not in_range:
        return PRETRAINED_ADVICE
    below = None if in_range else _below_fitted_learning_rates(assessment)
    if not in_range and below is None:
        return ADVICE[verdict]
    p, lr = assessment.probability, assessment.learning_rate
    shown = shown_probability(p)
    if below is not None:
        return (f"The planned learning rate {lr:g} lies below every rate the risk estimator was fitted on "
                f"({below.low:g} to {below.high:g}); at the lowest of them it reads {shown}, which bounds the risk "
                f"here if risk grows with the learning rate. No lower learning rate is indicated: the '{verdict}' "
                "verdict reads the spectrum alone, which on held-out "
                f"architecture families added nothing beyond configuration, loss curvature and learning rate. As "
                f"always, {_GUARD}.")
    if below_risk_budget(p):
        return (f"At learning rate {lr:g} the calibrated divergence probability is {shown}, inside the estimator's "
                f"fitted range: no lower learning rate is needed for stability; the '{verdict}' verdict reads the "
                "spectrum alone, which on held-out "
                f"architecture families added nothing beyond configuration, loss curvature and learning rate. As "
                f"always, {_GUARD}.")
    return (f"At learning rate {lr:g} the calibrated divergence probability is {shown}, inside the estimator's fitted "
            f"range: lower the learning rate (`hf-koopman max-lr` or `hf_koopman.suggest_max_lr` gives the rate for "
            f"a {RISK_BUDGET:.0%} risk), and {_GUARD}.")


#: prefix of a verdict reason whose score's sampling band reaches a decision threshold (`DecisionRule.decide`)
TENTATIVE = "tentative: "

#: up to this many layers near the η_nl gate, `DecisionRule.gate_verdicts` tries every subset (2^12 = 4096 means)
_GATE_SUBSETS_MAX = 12


def _per_dim(num_samples: int | None, hidden_size: int | None) -> float:
    """N/d, or infinity when N or d is unknown."""
    return num_samples / hidden_size if num_samples and hidden_size else math.inf


def tokens_short(meta: Mapping[str, Any], layer: str | None = None) -> int | None:
    """The token states the inputs gave when they were fewer than the `num_samples` asked for, else `None`: then a
    larger `num_samples` cannot help, more text can.

    The count is `layer`'s own (`meta["tokens_seen_per_layer"][layer]`) when `meta` records one for it, else
    `meta["tokens_seen"]` (the fewest any layer saw); it is short when below `meta["num_samples_requested"]`.
    `DecisionRule.verdict_tokens_short` asks this for the layer whose sample the verdict judges.
    """
    seen, asked = meta.get("tokens_seen"), meta.get("num_samples_requested")
    per_layer = meta.get("tokens_seen_per_layer")
    if layer is not None and isinstance(per_layer, Mapping) and _is_number(per_layer.get(layer)):
        seen = per_layer[layer]
    if _is_number(seen) and _is_number(asked) and seen < asked:
        return int(seen)
    return None


@dataclass(frozen=True)
class DecisionRule:
    """Thresholds of the RKSP paper's init-time decision rule (Fig. 7 / App. J) and of when a profile is too unreliable
    to judge.

    The rule reads the *informative* layers of a profile (`is_informative`):

    * score = mean over informative layers of the near-unit mass M≈1 of the full spectrum (the paper's AUROC score;
      the paper does not state which layer aggregate it uses, the mean is our reading);
    * "safe" when score < `safe_below`, "high risk" when score > `high_risk_above`, "moderate" in between (a region
      the paper leaves to context);
    * κ(V) is reported but does not enter the verdict by default (`kappa_large=None`): the paper gives no number for
      "large κ", and on the full spectrum the median κ(V) is in the hundreds for every normalisation at d = 128 and
      in the thousands for GPT-2 small, *lower* for No-Norm, the one family that diverges, than for Pre-LN
      (`results/table1.md` in the repository), so a fixed threshold would call every model high risk;
    * a layer is informative when its update is not ~0 (`degenerate`: ReZero / Fixup-style blocks, App. J) and the
      linear fit explains part of it (η_nl < `max_nonlinearity`). The rule reads η_nl corrected for the fit's degrees
      of freedom (`adjusted_nonlinearity`): in-sample, a least-squares fit with m = min(N - 1, d) regressors absorbs
      about m / N of what X does not explain, so η_nl falls with N/d (planted maps of known η, d = 64: 0.92 reads
      0.65 at N/d = 2 and 0.86 at N/d = 8; corrected, 0.92 at both);
    * a layer whose own sample is too small for its own width (N < `min_samples_per_dim` · d, e.g. a decoder fed a
      few tokens next to a long encoder input, or a later stage of a hierarchical vision model) is not read either:
      the rule reads the layers that are informative *and* adequately sampled (`reads`), and the reason says how many
      were left out for too few token states;
    * "uninformative" when fewer than half the layers are read, or when no layer's sample is large enough for its
      width. At N ≈ d the least-squares operator interpolates the sample and the masses are several-fold off;
      Theorem 4's sampling term sqrt(d / N) + d / N exceeds 1 below N = 2.6 d. Below `warn_samples_per_dim` · d (in
      the least-sampled layer read) the verdict carries a warning in its reason;
    * the share of modes that pass the ResDMD residual test does not gate the verdict. The masses are statistics over
      all modes, as the paper's headline numbers, and they reproduce Table 1 where few modes pass: the depth-4
      Pre-LN and RMSNorm models at d = 128 have 0-1.6 % reliable modes and M≈1 = 0.12-0.15 against the paper's 0.16
      (`results/table1.json` in the repository). The report states the share;
    * a layer's corrected η_nl still moves with N: on real models' token states (correlated within a sequence) it
      reads low at small N/d, by up to `gate_band` · sqrt(d/N) below its value at N/d = 64 in 95 % of the readings,
      while independent probes at one N/d agree far more closely (`results/eta_gate_band.md` in the repository). A
      layer inside that band around `max_nonlinearity` (`near_gate`; the band is symmetric, as decided before the
      measurement, although readings above the gate rarely fall with N) may fall on the other side with more token
      states; when reading such layers or not can change the verdict (`gate_verdicts`), the verdict is tentative and
      its reason names the alternatives.

    `RiskEstimator` turns a profile and a learning rate into a probability instead (`SpectralProfile.risk`).

    Args:
        safe_below (`float`, defaults to 0.3): score under which the verdict is "safe".
        high_risk_above (`float`, defaults to 0.5): score over which the verdict is "high risk".
        kappa_large (`float`, *optional*): median κ(V) over which the verdict is "high risk" as well; `None` (the
            default) leaves κ(V) out of the verdict.
        max_nonlinearity (`float`, defaults to 0.9): layers with η_nl at or above it are not informative.
        min_samples_per_dim (`float`, defaults to 2.0): fewer token states per hidden dimension make the verdict
            "uninformative".
        warn_samples_per_dim (`float`, defaults to 8.0): fewer token states per hidden dimension add a caution on the
            sampling error to the reason.
        gate_band (`float`, defaults to 0.55): c of the band δ = c · sqrt(d/N) around `max_nonlinearity` within which
            a layer's corrected η_nl may fall on the other side with more token states (`near_gate`); 0 turns the
            band off.
        max_spectral_radius (`float`, defaults to 100.0): a layer read whose spectral radius ρ exceeds it adds a
            caution to the reason (`beyond_radius`): the thresholds come from models whose blocks amplify by a mean
            ρ of at most 10.5 at initialisation (`results/table1.json` in the repository), and M≈1 does not weigh
            growth, so a model whose weights have blown up (ρ = 1e29 after a diverged run) can read "safe" by M≈1
            alone; the verdict then does not cover it. `inf` turns the caution off.
    """

    safe_below: float = 0.3
    high_risk_above: float = 0.5
    kappa_large: float | None = None
    max_nonlinearity: float = 0.9
    min_samples_per_dim: float = 2.0
    warn_samples_per_dim: float = 8.0
    gate_band: float = 0.55
    max_spectral_radius: float = 100.0

    def __post_init__(self) -> None:
        # the two thresholds order the verdicts and must be finite; the gates may be switched off with inf (a
        # corrected η_nl can exceed 1) or 0 (min_samples_per_dim, gate_band)
        limits = {name: getattr(self, name) for name in ("safe_below", "high_risk_above", "max_nonlinearity",
                                                          "min_samples_per_dim", "warn_samples_per_dim", "gate_band",
                                                          "max_spectral_radius")}
        if self.kappa_large is not None:
            limits["kappa_large"] = self.kappa_large
        for name, value in limits.items():
            finite = name in ("safe_below", "high_risk_above")
            if not _is_number(value) or math.isnan(value) or (finite and not math.isfinite(value)):
                kind = "a finite number" if finite else "a number (inf switches the check off)"
                raise ValueError(f"DecisionRule: {name} must be {kind}, got {value!r}.")
        checks = [
            (0 <= self.safe_below <= self.high_risk_above <= 1,
             f"need 0 <= safe_below ({self.safe_below}) <= high_risk_above ({self.high_risk_above}) <= 1: both are "
             "thresholds on the near-unit mass M≈1, a fraction (the paper uses 0.3 and 0.5)"),
            (self.max_nonlinearity >= 0, f"max_nonlinearity must be >= 0 (an η_nl gate), got {self.max_nonlinearity}"),
            (self.min_samples_per_dim >= 0, f"min_samples_per_dim must be >= 0, got {self.min_samples_per_dim}"),
            (self.warn_samples_per_dim >= 0, f"warn_samples_per_dim must be >= 0, got {self.warn_samples_per_dim}"),
            (self.gate_band >= 0, f"gate_band must be >= 0, got {self.gate_band}"),
            (self.max_spectral_radius >= 1, f"max_spectral_radius must be >= 1 (a growth factor; inf switches the "
             f"caution off), got {self.max_spectral_radius}"),
            (self.kappa_large is None or self.kappa_large >= 1, f"kappa_large is a condition number (>= 1) or None, "
             f"got {self.kappa_large}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DecisionRule: {message}.")

    @staticmethod
    def adjusted_nonlinearity(
        nonlinearity: float, num_samples: int | None, hidden_size: int | None, rank: int | None = None
    ) -> float:
        r"""η_nl corrected for the degrees of freedom of its fit: $\eta_{nl}\sqrt{(N - 1)/(N - 1 - m)}$ with
        m = min(N - 1, d, `rank`) regressors on N centred token states.

        In-sample, the residual of a least-squares fit misses about m / N of the variance that the regressors do not
        explain, so η_nl (Eq. 5) reads low when N/d is small; the factor undoes that on average (the residual
        variance estimate with N - 1 - m degrees of freedom). `inf` when the fit has no degree of freedom left
        (m = N - 1); `nonlinearity` unchanged when N or d is unknown.
        """
        if not num_samples or not hidden_size:
            return float(nonlinearity)
        m = min(num_samples - 1, hidden_size, rank or hidden_size)
        free = num_samples - 1 - m
        return float(nonlinearity) * math.sqrt((num_samples - 1) / free) if free > 0 else math.inf

    def is_informative(
        self, features: Any, num_samples: int | None = None, hidden_size: int | None = None, rank: int | None = None
    ) -> bool:
        """Whether this layer's fit (`LayerFeatures`) carries stability information: an update not ≈ 0 that a linear
        map explains in part, read on η_nl corrected for the fit's N (`num_samples`), d (`hidden_size`) and `rank`
        (`adjusted_nonlinearity`; uncorrected when they are not given). The rule reads the layer when its sample is
        also large enough for its width (`reads`)."""
        eta = self.adjusted_nonlinearity(float(getattr(features, "nonlinearity", 0.0)), num_samples, hidden_size,
                                         rank)
        measured = math.isfinite(float(getattr(features, "near_unit_mass", 0.0)))  # NaN: no mode was counted
        return measured and not bool(getattr(features, "degenerate", False)) and not eta >= self.max_nonlinearity

    def is_sampled(self, num_samples: int | None, hidden_size: int | None) -> bool:
        """Whether N = `num_samples` token states at width d = `hidden_size` are enough for the verdict to read the
        fit: N > 2 and N/d >= `min_samples_per_dim`. `True` when N or d is unknown."""
        if not num_samples or not hidden_size:
            return True
        return num_samples > 2 and num_samples / hidden_size >= self.min_samples_per_dim

    @staticmethod
    def sample_sizes(profile: Any) -> list[tuple[int | None, int | None]]:
        """`(N, d)` of every layer of `profile`: its `sample_sizes` (`SpectralProfile`: per layer) or, for a profile
        without them, `settings["num_samples"]` and `settings["hidden_size"]` for every layer."""
        count = len(profile.features)
        sizes = getattr(profile, "sample_sizes", None)
        if sizes is not None and len(sizes) == count:
            return [tuple(size) for size in sizes]
        settings = profile.settings
        return [(settings.get("num_samples"), settings.get("hidden_size"))] * count

    def undersampled_sizes(self, sizes: Sequence[tuple[int | None, int | None]]) -> list[bool]:
        """Per `(N, d)` in `sizes`: whether that layer's sample is too small for its width (`is_sampled` is false)
        while other layers' samples are large enough; none is flagged when no layer's is, nor when every layer's
        is. `undersampled` applies this to a profile; `profile_from_snapshots` computes the aggregates without the
        flagged layers."""
        sampled = [self.is_sampled(n, d) for n, d in sizes]
        return [not s for s in sampled] if any(sampled) else [False] * len(sampled)

    def undersampled(self, profile: Any) -> list[bool]:
        """Per layer of `profile`: whether the verdict leaves it out because its own sample is too small for its own
        width (`is_sampled` is false) while other layers' samples are large enough. When no layer's is, none is
        flagged: the verdict is then "uninformative" on the sample size as a whole (`verdict_sample`)."""
        return self.undersampled_sizes(self.sample_sizes(profile))

    def rank_deficient(self, profile: Any) -> list[bool]:
        """Per layer of a full-spectrum `profile`: whether its token states span fewer than `RANK_SHARE_MIN` of the
        min(N - 1, d) directions their number allows (`n_modes`, the numerical rank of the centred inputs), for a
        layer that is not degenerate. Repeated or padded inputs give fewer independent states than N: N/d then
        overstates the sample, and the linear map fits the few distinct states closely (η_nl reads low). A caution the
        reason and the report carry; the verdict is not changed. False for a layer the rank-r approximation
        truncated (its `n_modes` is r) and for the first block of each stack, whose input is the embeddings (their
        rank is bounded by the distinct tokens, a property of the text, not a repetition)."""
        stacks = list(getattr(profile, "stacks", None) or [""] * len(profile.features))
        # the first block of a stack reads the embeddings: without absolute positions (RoPE, T5) their rank is at most
        # the number of distinct tokens, which ordinary text at N/d = 2-8 can keep under 0.9 d
        first = [i == 0 or stacks[i] != stacks[i - 1] for i in range(len(stacks))]
        out = []
        for f, (n, d), cut, head in zip(profile.features, self.sample_sizes(profile), self.truncated(profile), first):
            full = min(n - 1, d) if n and d and not cut and not head else None
            modes = getattr(f, "n_modes", None)
            out.append(bool(full and modes is not None and not getattr(f, "degenerate", False)
                            and modes < RANK_SHARE_MIN * full))
        return out

    def reads(self, profile: Any) -> list[bool]:
        """Per layer of `profile`: whether the verdict reads it, i.e. it is informative (`is_informative`) and not
        left out for too few token states (`undersampled`)."""
        rank = (getattr(profile, "settings", None) or {}).get("rank")
        return [
            self.is_informative(f, n, d, rank) and not few
            for f, (n, d), few in zip(profile.features, self.sample_sizes(profile), self.undersampled(profile))
        ]

    def gate_width(self, num_samples: int | None, hidden_size: int | None) -> float:
        """δ = `gate_band` · sqrt(d/N), the half-width of the band around `max_nonlinearity` at N token states of width
        d; 0 when N or d is unknown."""
        if not num_samples or not hidden_size:
            return 0.0
        return self.gate_band * math.sqrt(hidden_size / num_samples)

    def near_gate(self, profile: Any) -> list[bool]:
        """Per layer of `profile`: whether its corrected η_nl (`adjusted_nonlinearity`) lies within `gate_width` of
        `max_nonlinearity`, so that more token states may put it on the other side of the gate. Only layers the gate
        decides are flagged: not degenerate, adequately sampled (`undersampled`), with a finite η_nl."""
        rank = (getattr(profile, "settings", None) or {}).get("rank")
        flags = []
        for f, (n, d), few in zip(profile.features, self.sample_sizes(profile), self.undersampled(profile)):
            eta = self.adjusted_nonlinearity(float(getattr(f, "nonlinearity", 0.0)), n, d, rank)
            width = self.gate_width(n, d)
            flags.append(not few and not bool(getattr(f, "degenerate", False)) and math.isfinite(eta)
                         and self.is_sampled(n, d) and abs(eta - self.max_nonlinearity) < width)
        return flags

    def gate_verdicts(self, profile: Any) -> tuple[str, ...]:
        """The verdicts the rule gives when any of the layers `near_gate` flags are read or not, the others as they
        are (in `VERDICTS` order); the current verdict's sample-size checks are not repeated. One verdict: the gate's
        band cannot change it.

        Exact (every subset, the score and the κ(V) median of each) for up to `_GATE_SUBSETS_MAX` near-gate layers;
        above that, for k of K near-gate layers read, the score's extremes (the means with the k lowest and the k
        highest of their masses) stand for every subset, which can add "moderate" where the subset means jump over
        it, and "high risk" is added whenever the κ(V) rule is on."""
        if self.truncated_rank(profile) is not None:
            return ("uninformative",)  # a rank-r profile gets no threshold verdict, whichever layers are read
        near = self.near_gate(profile)
        reads = self.reads(profile)
        features, total = profile.features, len(profile.features)
        sure = [f for f, r, g in zip(features, reads, near) if r and not g]
        doubtful = [f for f, g in zip(features, near) if g]
        found: set[str] = set()
        if len(doubtful) <= _GATE_SUBSETS_MAX:
            for mask in range(1 << len(doubtful)):
                chosen = sure + [f for j, f in enumerate(doubtful) if mask >> j & 1]
                masses = [float(f.near_unit_mass) for f in chosen]
                kappas = [float(f.eigvec_condition) for f in chosen]
                found.add(self._score_verdict(float(np.mean(masses)) if masses else None, len(chosen), total,
                                              float(np.median(kappas)) if kappas else None))
            return tuple(v for v in VERDICTS if v in found)
        base = sorted(float(f.near_unit_mass) for f in doubtful)
        sure_mass = [float(f.near_unit_mass) for f in sure]
        for k in range(len(base) + 1):
            count = len(sure) + k
            if not count or count < 0.5 * total:
                found.add("uninformative")
                continue
            low = (sum(sure_mass) + sum(base[:k])) / count
            high = (sum(sure_mass) + sum(base[len(base) - k:])) / count
            if low < self.safe_below:
                found.add("safe")
            if high > self.high_risk_above or self.kappa_large is not None:
                found.add("high risk")
            if low <= self.high_risk_above and high >= self.safe_below:
                found.add("moderate")
        return tuple(v for v in VERDICTS if v in found)

    def _score_verdict(
        self, score: float | None, informative: int, total: int, kappa_median: float | None = None
    ) -> str:
        """The verdict from the score, the count of layers read and the κ(V) median alone (no sample-size checks)."""
        if score is None or not math.isfinite(score) or not informative or informative < 0.5 * total:
            return "uninformative"
        if score > self.high_risk_above or self._kappa_big(kappa_median):
            return "high risk"
        return "safe" if score < self.safe_below else "moderate"

    def _kappa_big(self, kappa_median: float | None) -> bool:
        """Whether the κ(V) rule (`kappa_large`, off by default) makes the verdict high risk at this median."""
        return self.kappa_large is not None and kappa_median is not None and (
            not math.isfinite(kappa_median) or kappa_median > self.kappa_large)

    def gate_band_width(self, profile: Any) -> float | None:
        """The widest band δ (`gate_width`) among the layers `near_gate` flags, `None` when none is."""
        near = self.near_gate(profile)
        return max((self.gate_width(n, d) for (n, d), g in zip(self.sample_sizes(profile), near) if g), default=None)

    def score_band_crossed(self, profile: Any) -> tuple[float, ...]:
        """The thresholds the score's sampling band reaches (`thresholds_within_error`) when they can change the
        verdict: a verdict from the score (not "uninformative", not high risk by the κ(V) rule); else empty."""
        if self.decide_profile(profile)[0] == "uninformative" or self._kappa_big(profile.kappa_median):
            return ()
        return self.thresholds_within_error(profile.score, *self.verdict_sample(profile))

    def verdict_layer(self, profile: Any) -> int | None:
        """Index of the layer whose sample the verdict judges (`verdict_sample`): the least-sampled layer (smallest
        N/d) among the layers it reads, else among the adequately sampled ones; when no layer is adequately sampled,
        the best-sampled layer (the verdict is then "uninformative"). `None` for a profile without layers."""
        sizes = self.sample_sizes(profile)
        if not sizes:
            return None
        sampled = [i for i, size in enumerate(sizes) if self.is_sampled(*size)]
        if not sampled:
            return max(range(len(sizes)), key=lambda i: _per_dim(*sizes[i]))
        read = [i for i, r in enumerate(self.reads(profile)) if r]
        return min(read or sampled, key=lambda i: _per_dim(*sizes[i]))

    def verdict_sample(self, profile: Any) -> tuple[int | None, int | None]:
        """`(N, d)` that the verdict's sample-size checks (the N/d caution, the sampling band) use: those of the
        layer `verdict_layer` picks. For a profile whose layers share one N and d these are `settings["num_samples"]`
        and `settings["hidden_size"]`."""
        index = self.verdict_layer(profile)
        if index is None:
            return profile.settings.get("num_samples"), profile.settings.get("hidden_size")
        return self.sample_sizes(profile)[index]

    def verdict_tokens_short(self, profile: Any) -> int | None:
        """`tokens_short` for the layer whose sample the verdict judges (`verdict_layer`): the token states the inputs
        gave that layer when they were fewer than the `num_samples` asked for, else `None`. A layer left out of the
        verdict (a decoder fed short inputs, say) does not make the layers it reads token-limited."""
        index = self.verdict_layer(profile)
        layers = getattr(profile, "layers", None) or []
        name = layers[index][0] if index is not None and index < len(layers) else None
        return tokens_short(profile.meta, name)

    def decide(
        self,
        score: float | None,
        kappa_median: float | None,
        *,
        num_samples: int | None = None,
        hidden_size: int | None = None,
        informative: int | None = None,
        total: int | None = None,
        rank: int | None = None,
        tokens_seen: int | None = None,
        weights: str | None = None,
        undersampled: int | None = None,
        gate_verdicts: Sequence[str] | None = None,
        near_gate: int = 0,
        gate_width: float | None = None,
        rank_deficient: int = 0,
        constant_input: int = 0,
        beyond_radius: Sequence[tuple[str, float]] = (),
    ) -> tuple[str, str]:
        """`(verdict, plain-words reason)` from the mean M≈1 `score` of the informative layers and the fit's context.

        Args:
            score (`float`, *optional*): mean near-unit mass over the informative layers (`None`: none is).
            kappa_median (`float`, *optional*): median κ(V) over the informative layers.
            num_samples (`int`, *optional*): N, the token states of the fit (of the least-sampled layer read).
            hidden_size (`int`, *optional*): d, the width of the fit (of that layer).
            informative (`int`, *optional*): number of layers the rule reads (informative and adequately sampled).
            total (`int`, *optional*): number of layers of the profile.
            rank (`int`, *optional*): r of a rank-r profile (`None`: the full spectrum). The thresholds read the full
                spectrum, so a rank-r profile is "uninformative" with the reason why; a rank-r fit explains at most r
                of d directions of the update, so its high η_nl is the truncation's, and the reason says so too.
            tokens_seen (`int`, *optional*): the token states the inputs gave the judged layer when they were fewer
                than the `num_samples` asked for (`verdict_tokens_short(profile)`); a larger `num_samples` cannot help
                then, so the advice is to supply more text (or a larger `max_tokens`). `None`: the inputs were not
                short.
            weights (`str`, *optional*): `"pretrained"` when the profiled weights come from a checkpoint
                (`meta["weights"]`); the thresholds come from spectra at initialisation, so the reason then says that
                the verdict is an extrapolation.
            undersampled (`int`, *optional*): layers left out because their own N/d is below `min_samples_per_dim`
                (counted apart from `informative`); the reason names them and how to include them.
            gate_verdicts (`list[str]`, *optional*): the verdicts that reading the layers near the η_nl gate or not
                can give (`gate_verdicts(profile)`); more than one makes the verdict tentative.
            near_gate (`int`, defaults to 0): layers whose corrected η_nl lies within the gate's band (`near_gate`).
            gate_width (`float`, *optional*): the widest band δ of those layers, quoted in the reason.
            rank_deficient (`int`, defaults to 0): layers read whose token states span too few directions
                (`rank_deficient`); the reason adds a caution.
            constant_input (`int`, defaults to 0): layers whose input state is the same for every token
                (`SpectralProfile.constant_input_layers`), not counting those left out for their sample; the reason
                names them as the probe's problem.
            beyond_radius (`list[tuple[str, float]]`, *optional*): `(name, ρ)` of the layers read whose spectral
                radius exceeds `max_spectral_radius`, largest first (`beyond_radius(profile)`); the reason adds a
                caution that the verdict does not cover them.

        Returns:
            `(verdict, reason)`: the verdict is one of `VERDICTS`; the reason is one or two plain sentences. When the
            sampling error of the score (`thresholds_within_error`) spans a threshold, or layers near the η_nl gate
            can change the verdict (`gate_verdicts`), the reason starts with "tentative" and says which.
        """
        verdict, reason = self._decide(score, kappa_median, num_samples=num_samples, hidden_size=hidden_size,
                                       informative=informative, total=total, rank=rank, tokens_seen=tokens_seen,
                                       undersampled=undersampled or 0)
        alternatives = [v for v in dict.fromkeys(gate_verdicts or ()) if v != verdict] if near_gate and rank is None \
            else []  # a rank-r profile gets no threshold verdict, whichever layers are read
        if alternatives:
            band = f" ±{gate_width:.2f} of" if gate_width else " near"
            many = near_gate != 1
            reason = (f"{TENTATIVE}{reason.removeprefix(TENTATIVE)}; {near_gate} "
                      f"layer{'s' if many else ''} {'have' if many else 'has'} a corrected η_nl{band} the "
                      f"{self.max_nonlinearity:g} gate, where it still moves as N grows (it reads low at small N/d), "
                      f"so with more token states {'they' if many else 'it'} may fall on the other side and give "
                      f"{' or '.join(repr(v) for v in alternatives)}")
        if rank_deficient and verdict != "uninformative":
            many = rank_deficient != 1
            reason += (f"; caution: {rank_deficient} layer{'s' if many else ''} read span{'' if many else 's'} fewer "
                       f"than {RANK_SHARE_MIN:.0%} of the directions {'their' if many else 'its'} N token states "
                       "allow (repeated or padded inputs?), so N overstates the independent sample and η_nl reads low")
        if constant_input:
            same = ("the same input state for every token (up to round-off: one token repeated, or padding, without "
                    "position information), which leaves nothing to fit: profile on varied text")
            others = (total or 0) - (informative or 0) - (undersampled or 0)
            if verdict == "uninformative" and total and constant_input >= others > 0:
                # every layer neither read nor left out for its sample has a constant input: that is the reason
                # (whatever else a rank-r profile's reason says about its truncation)
                who = (f"{self._left_out(undersampled or 0, total)}; the other {others}" if undersampled
                       else "the other" if others == 1 else "the others")
                verb = "sees" if others == 1 else "see"
                reason = f"{informative or 0} of {total} layers are informative; {who} {verb} {same}"
            else:
                many = constant_input != 1
                reason += f"; {constant_input} layer{'s' if many else ''} see{'' if many else 's'} {same}"
        if beyond_radius and verdict != "uninformative":
            (name, largest), many = beyond_radius[0], len(beyond_radius) != 1
            verb = "amplify" if many else "amplifies"
            reason += (f"; caution: {len(beyond_radius)} layer{'s' if many else ''} read {verb} some direction more "
                       f"than {self.max_spectral_radius:g}-fold (ρ = {largest:.3g} in {name!r}), far "
                       "beyond the models the thresholds come from (mean ρ at most 10.5 at initialisation); M≈1 does "
                       "not weigh that growth, so the verdict does not cover this model (weights that blew up?)")
        if weights == "pretrained" and rank is None:  # a rank-r profile has no verdict to extrapolate
            reason += ("; extrapolated: these are pretrained weights, not an initialisation, and the rule's thresholds "
                       "come from spectra at random initialisation")
        return verdict, reason

    def thresholds_within_error(
        self, score: float | None, num_samples: int | None, hidden_size: int | None
    ) -> tuple[float, ...]:
        """The decision thresholds inside `score · (1 ± sqrt(d/N))`, the sampling-error interval of the score.

        A threshold in that interval means the verdict may change with more tokens. Empty when `score`, N or d is
        unknown (or the score is not finite).
        """
        if score is None or not math.isfinite(score) or not num_samples or not hidden_size:
            return ()
        relative = math.sqrt(hidden_size / num_samples)
        low, high = score * (1 - relative), min(1.0, score * (1 + relative))
        return tuple(t for t in (self.safe_below, self.high_risk_above) if low <= t <= high)

    def truncated(self, profile: Any) -> list[bool]:
        """Per layer of `profile`: whether the rank-r approximation truncated it (r < min(N, d) of that layer; a layer
        of unknown size counts as truncated). All false for the full spectrum (also a rank-r profile whose rank
        covered every mode, `settings["spectrum"] == "full"`)."""
        settings = profile.settings
        rank = settings.get("rank")
        if rank is None or settings.get("spectrum") == "full":
            return [False] * len(profile.features)
        return [not (n and d) or rank < min(n, d) for n, d in self.sample_sizes(profile)]

    def truncated_rank(self, profile: Any) -> int | None:
        """r when the rank-r approximation truncated a layer the verdict could read (sampled well enough and not
        degenerate; the truncation itself can push its η_nl over the gate), or when the verdict reads no layer and some
        are truncated: the thresholds read the full spectrum, so such a profile gets no threshold verdict. `None` when
        only layers the verdict leaves out for their sample were truncated."""
        cut = self.truncated(profile)
        if not any(cut):
            return None
        # a truncated layer that is sampled and not degenerate counts as read: the truncation itself pushes its η_nl
        # over the gate, so whether it passes says nothing about the full spectrum
        kept = [c and not under and not getattr(f, "degenerate", False)
                for c, under, f in zip(cut, self.undersampled(profile), profile.features)]
        return profile.settings.get("rank") if any(kept) or not any(self.reads(profile)) else None

    def beyond_radius(self, profile: Any) -> list[tuple[str, float]]:
        """`(name, ρ)` of the layers the verdict reads whose spectral radius exceeds `max_spectral_radius`, largest
        first."""
        return self._beyond_radius(profile, self.reads(profile))

    def _beyond_radius(self, profile: Any, reads: Sequence[bool]) -> list[tuple[str, float]]:
        """`beyond_radius` with the layers the verdict reads (`reads(profile)`) already known."""
        found = [(name, float(f.spectral_radius)) for name, f, read in zip(profile.names, profile.features, reads)
                 if read and not float(f.spectral_radius) <= self.max_spectral_radius]  # NaN counts too
        return sorted(found, key=lambda item: -item[1])

    def decide_profile(self, profile: Any) -> tuple[str, str]:
        """`decide` on a `SpectralProfile`: the layers it reads (`reads`), their sample (`verdict_sample`), the layers
        left out for too few token states, the settings, and the context its `meta` carries (the token states the
        judged layer saw, `verdict_tokens_short`; `weights`). A profile whose `rank` covered every mode
        (`settings["spectrum"] == "full"`) is judged as the full spectrum."""
        meta, features = profile.meta, profile.features
        constant = set(getattr(profile, "constant_input_layers", ()))
        num_samples, hidden_size = self.verdict_sample(profile)
        short = self.undersampled(profile)
        undersampled = sum(short)
        near = self.near_gate(profile)
        reads = self.reads(profile)
        return self.decide(
            profile.score, profile.kappa_median, num_samples=num_samples, hidden_size=hidden_size,
            informative=sum(reads), total=len(features),
            rank=self.truncated_rank(profile),
            tokens_seen=self.verdict_tokens_short(profile),
            weights=meta.get("weights"), undersampled=undersampled,
            gate_verdicts=self.gate_verdicts(profile), near_gate=sum(near), gate_width=self.gate_band_width(profile),
            rank_deficient=sum(r and d for r, d in zip(reads, self.rank_deficient(profile))),
            constant_input=sum(name in constant and not under for name, under in zip(profile.names, short)),
            beyond_radius=self._beyond_radius(profile, reads),
        )

    def _decide(
        self,
        score: float | None,
        kappa_median: float | None,
        *,
        num_samples: int | None,
        hidden_size: int | None,
        informative: int | None,
        total: int | None,
        rank: int | None,
        tokens_seen: int | None,
        undersampled: int = 0,
    ) -> tuple[str, str]:
        """`decide` without the note on pretrained weights."""
        ratio = num_samples / hidden_size if num_samples and hidden_size else None
        few = score is None or not math.isfinite(score) or bool(
            informative is not None and total and informative < 0.5 * total)
        if rank is not None:  # no threshold verdict, whatever the sample; the reason says what else to fix
            return "uninformative", self._rank_reason(score, rank, few, informative, total, num_samples, hidden_size,
                                                      tokens_seen)
        if num_samples is not None and num_samples <= 2:
            return "uninformative", f"only N = {num_samples} token states: no covariance can be estimated"
        if ratio is not None and ratio < self.min_samples_per_dim:
            return "uninformative", (
                f"N = {num_samples} token states for width d = {hidden_size} (N/d = {ratio:.2f} < "
                f"{self.min_samples_per_dim:g}): the least-squares operator nearly interpolates the sample, so its "
                f"spectrum is mostly sampling error; {self._more_tokens(num_samples, hidden_size, tokens_seen)}"
            )
        left_out = self._left_out(undersampled, total)
        if few:
            count = "" if informative is None or not total else f"{informative} of {total} layers are informative; "
            others = total - (informative or 0) - undersampled if total else 1
            if undersampled and others <= 0:  # every layer left out was left out for its sample
                return "uninformative", f"{count}{left_out}"
            one = undersampled and others == 1  # "the other 1 ... changes its input ... or is not explained"
            who = "the others either barely change their input" if not undersampled else (
                f"{left_out}; the other {others} either barely change{'s' if one else ''} {'its' if one else 'their'} "
                "input")
            return "uninformative", (
                f"{count}{who} (block output ≈ input, e.g. zero-initialised residual branches) or "
                f"{'is' if one else 'are'} not explained by a linear map (η_nl ≥ {self.max_nonlinearity:g}, "
                "corrected for N/d), so the "
                "spectrum says little about stability at this point; profile again after a few training steps"
            )
        kappa_big = self._kappa_big(kappa_median)
        if score > self.high_risk_above or kappa_big:
            why = []
            if score > self.high_risk_above:
                why.append(f"mean M≈1 = {score:.3f} > {self.high_risk_above}: most modes sit near |λ| = 1, the block "
                           "barely damps perturbations, which the paper ties to divergence at high learning rates")
            if kappa_big:
                why.append(f"median κ(V) = {kappa_median:.2g} > {self.kappa_large:g}")
            verdict, reason = "high risk", " and ".join(why)
        elif score < self.safe_below:
            verdict, reason = "safe", (f"mean M≈1 = {score:.3f} < {self.safe_below}: few modes sit near |λ| = 1, the "
                                       "normalised-model regime of the paper's Table 1")
        else:
            verdict, reason = "moderate", (
                f"mean M≈1 = {score:.3f} lies in [{self.safe_below}, {self.high_risk_above}], a region the paper "
                "leaves to context (architecture, normalisation, learning rate)")
        if undersampled:
            reason += f"; {left_out}"
        if ratio is not None and ratio < self.warn_samples_per_dim:
            reason += (f"; caution: N/d = {ratio:.2f} < {self.warn_samples_per_dim:g}, the masses carry a sampling "
                       f"error of roughly sqrt(d/N) = {math.sqrt(1 / ratio):.2f} relative (N >= "
                       f"{math.ceil(self.warn_samples_per_dim * hidden_size)} token states remove it"
                       + (": more inputs, the inputs gave all they had" if tokens_seen is not None else "") + ")")
        # κ(V) alone makes the verdict high risk whatever the score, so only a score-driven verdict can flip
        crossed = () if kappa_big else self.thresholds_within_error(score, num_samples, hidden_size)
        if crossed:
            names = " and ".join(f"{t:g}" for t in crossed)
            band = score_band(score, math.sqrt(hidden_size / num_samples))
            reason = (f"{TENTATIVE}{reason}; M≈1 = {band} spans the {names} "
                      f"threshold{'s' if len(crossed) > 1 else ''}, so more tokens may change the verdict")
        return verdict, reason

    def _rank_reason(self, score: float | None, rank: int, few: bool, informative: int | None, total: int | None,
                     num_samples: int | None, hidden_size: int | None, tokens_seen: int | None) -> str:
        """Why a profile whose read layers the rank-r approximation truncated gets no threshold verdict; `few`: too
        few layers pass the η_nl gate (or no score)."""
        measured = "" if score is None or not math.isfinite(score) else (
            f" (mean M≈1 of this profile: {score:.3f}, not comparable)")
        reason = (
            f"a rank-{rank} profile: the thresholds read the full spectrum, and the rank-{rank} fit keeps the "
            f"{rank} directions of largest whitened output energy, the ones the block expands, so its masses are "
            "biased (M≈1 toward 0, M>1 toward 1; research GPT Pre-LN at d = 128: M≈1 0.01 at rank 32 against "
            f"0.16 for the full spectrum and in the paper's Table 1){measured}"
        )
        if few:
            reason += (f"; {informative or 0} of {total} layers pass the η_nl gate: with rank={rank} the linear fit "
                       f"covers {rank} of {hidden_size} directions, so a high η_nl comes from the truncation")
        reason += "; profile the full spectrum (rank=None) for a verdict"
        if num_samples and hidden_size and num_samples / hidden_size < self.min_samples_per_dim:
            reason += (f", and N/d = {num_samples / hidden_size:.2f} is below {self.min_samples_per_dim:g}: "
                       f"{self._more_tokens(num_samples, hidden_size, tokens_seen)}")
        return reason

    def _left_out(self, undersampled: int, total: int | None) -> str:
        """The reason's clause on layers left out because their own sample is too small for their width."""
        if not undersampled:
            return ""
        many = undersampled > 1
        count = f"{undersampled} of {total} layers" if total else f"{undersampled} layer{'s' if many else ''}"
        them = "them" if many else "it"
        return (f"{count} {'were' if many else 'was'} left out for too few token states for "
                f"{'their' if many else 'its'} width (N/d < {self.min_samples_per_dim:g}, e.g. a decoder fed short "
                "sequences, or a later stage of a vision model with fewer, wider tokens); to include "
                f"{them}, give {them} more token states: more or longer inputs (more images for a vision model's "
                "later stages; for an encoder-decoder model longer decoder inputs, or more labelled target tokens "
                "where labels != -100 mark the decoder's real positions), with num_samples at least "
                f"{self.min_samples_per_dim:g} d")

    def _more_tokens(self, num_samples: int, hidden_size: int, tokens_seen: int | None) -> str:
        """How to get a larger sample: more `num_samples`, or more text when the inputs ran out of tokens."""
        least, wanted = math.ceil(self.min_samples_per_dim * hidden_size), int(self.warn_samples_per_dim * hidden_size)
        target = f">= {least} for a verdict" + (f" (>= {wanted} for one without the sampling caution)"
                                                  if least < wanted else "")
        if tokens_seen is not None:
            return (f"the inputs gave only {int(tokens_seen)} token states, all of them used, so a larger num_samples "
                    f"cannot help: supply more or longer inputs to reach N {target}: more text or images, a larger "
                    "batch or a larger `max_tokens` (for RKSPCallback a larger `probe_batch_size`)")
        return f"profile with num_samples {target}"
