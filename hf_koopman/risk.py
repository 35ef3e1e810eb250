r"""Calibrated divergence risk: $P(\text{diverge} \mid \text{init spectrum}, \log \text{LR}, \dots)$.

The RKSP paper reads the raw near-unit mass $M_{\approx 1}$ as a probability (App. H, ECE 0.283). Here a small
logistic model on standardised features is fitted to a sweep of training runs (`research/scripts/fit_risk.py`) and shipped as
JSON (`hf_koopman/data/risk_estimator.json`; never pickle). Init-time spectra do not depend on the learning rate, so the
learning rate is an input: `predict_proba(profile, learning_rate=...)`.

The shipped estimator is refitted on init features computed with the default recipe (the full spectrum of the
whitened DMD operator, issue #19) on the same sweep runs and labels; it was fitted on rank-32 features before. Its
metadata (`RiskEstimator.default().metadata`: `heldout`, `in_sample_auroc`, `previous_rank32`) and
`results/risk_estimator_eval.json` give its AUROC next to the rank-32 fit's. Profiles made with `rank=32` are not
what it was fitted on. It is an interim estimator: a later issue (#22) replaces it.

Example:

```python
>>> import hf_koopman
>>> prof = hf_koopman.profile(model, inputs)
>>> hf_koopman.RiskEstimator.default().predict_proba(prof, learning_rate=3e-3)
0.07...
```
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FeatureSpec", "RiskEstimator", "DEFAULT_ESTIMATOR_FILE", "ADVICE", "DecisionRule", "VERDICTS", "VERDICT_LEVELS",
]

DEFAULT_ESTIMATOR_FILE = "risk_estimator.json"
_FORMAT = "hf_koopman.risk_estimator"
_TRANSFORMS = ("identity", "log10")


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
        if not self.std > 0:
            raise ValueError(f"std={self.std} of feature {self.key!r} must be > 0.")

    @property
    def name(self) -> str:
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
        x = min(max(self.transformed(raw), self.low), self.high)
        if not math.isfinite(x):  # unbounded spec (hand-built) and an infinite input
            raise ValueError(f"feature {self.key!r} is infinite and the estimator has no clipping range for it.")
        return (x - self.mean) / self.std


def _flatten_inputs(profile: Any, context: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a SpectralProfile (or a mapping of aggregates, or None) with the context into one flat mapping."""
    values: dict[str, Any] = {}
    if profile is not None:
        aggregates = getattr(profile, "aggregates", None)
        if aggregates is None and isinstance(profile, Mapping):
            aggregates = profile.get("aggregates", profile)
        if not isinstance(aggregates, Mapping):
            raise TypeError(
                "profile must be a SpectralProfile, a mapping of aggregate features, or None; got "
                f"{type(profile).__name__}."
            )
        values.update(aggregates)
        meta = getattr(profile, "meta", None)
        if isinstance(meta, Mapping):  # e.g. a learning rate recorded by the training callback
            values.update({k: v for k, v in meta.items() if v is not None and k not in values})
    values.update({k: v for k, v in context.items() if v is not None})
    return values


@dataclass
class RiskEstimator:
    r"""Logistic model $P(D=1) = \sigma(b + \sum_i w_i z_i)$ on standardised features $z_i$ (see `FeatureSpec`).

    Args:
        features (`list[FeatureSpec]`): inputs, in coefficient order.
        coef (`list[float]`): one weight per feature.
        intercept (`float`): bias `b`.
        metadata (`dict`, *optional*): provenance (training runs, held-out AUROC / ECE, ...), stored in the JSON.
    """

    features: list[FeatureSpec]
    coef: list[float]
    intercept: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.coef):
            raise ValueError(f"{len(self.features)} features but {len(self.coef)} coefficients.")
        if not all(math.isfinite(c) for c in [*self.coef, self.intercept]):
            raise ValueError("coefficients and intercept must be finite.")

    # ------------------------------------------------------------------ prediction
    @property
    def required_keys(self) -> list[str]:
        return sorted({f.key for f in self.features})

    def _logit(self, values: Mapping[str, Any]) -> float:
        missing = [f.key for f in self.features if f.key not in values]
        if missing:
            hint = " (pass learning_rate=... )" if "learning_rate" in missing else ""
            raise ValueError(
                f"risk estimator needs {missing}{hint}; available inputs: {sorted(values)[:20]}"
                + (" ..." if len(values) > 20 else "")
            )
        z = [f.standardized(values[f.key]) for f in self.features]
        return self.intercept + float(np.dot(self.coef, z))

    def predict_proba(self, profile: Any = None, learning_rate: float | None = None, **context: Any) -> float:
        """Probability that a training run diverges (paper label: loss > 50 or grad norm > 500 at any step).

        Args:
            profile (`SpectralProfile` or mapping): the init-time profile (its `aggregates`), or a plain mapping of
                aggregate features. May be `None` for estimators that use context only.
            learning_rate (`float`, *optional*): peak learning rate of the run (required by estimators that use it;
                read from `profile.meta["learning_rate"]` when not given).
            **context: other non-spectral inputs the estimator was fitted with (see `required_keys`), e.g. `norm`.

        Returns:
            `float` in (0, 1).
        """
        if learning_rate is not None and (not isinstance(learning_rate, (int, float)) or not learning_rate > 0):
            raise ValueError(f"learning_rate={learning_rate!r} must be a positive number.")
        values = _flatten_inputs(profile, {"learning_rate": learning_rate, **context})
        return 1.0 / (1.0 + math.exp(-self._logit(values)))

    def predict_proba_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Vectorised `predict_proba` over flat rows (aggregates and context in one mapping, e.g. a sweep table).

        Shapes:
            rows: `N` mappings -> `(N,)` probabilities.
        """
        logits = np.array([self._logit(r) for r in rows], dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logits))

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
    ) -> RiskEstimator:
        r"""Fit by L2-penalised maximum likelihood (Newton / IRLS); the intercept is not penalised.

        Args:
            rows: flat mappings holding every feature key; labels: 0/1 per row.
            features: `FeatureSpec`, `(key, transform)` or `key`; standardisation and clip ranges are set from `rows`.
            l2 (`float`, *optional*, defaults to 1.0): ridge strength on the standardised coefficients
                (penalty $\frac{l2}{2}\|w\|^2$ added to the summed negative log-likelihood).
        """
        y = np.asarray(labels, dtype=np.float64)
        if y.ndim != 1 or len(y) != len(rows) or not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be 0/1, one per row.")
        if len(rows) < 2 or y.min() == y.max():
            raise ValueError("need at least one diverged and one stable run to fit a risk estimator.")
        specs = []
        for f in features:
            spec = f if isinstance(f, FeatureSpec) else FeatureSpec(*(f if isinstance(f, tuple) else (f,)))
            raw = np.array([spec.transformed(r[spec.key]) for r in rows], dtype=np.float64)
            finite = raw[np.isfinite(raw)]
            if finite.size == 0:
                raise ValueError(f"feature {spec.key!r} has no finite value in the training rows.")
            low, high = float(finite.min()), float(finite.max())
            clipped = np.clip(raw, low, high)
            std = float(clipped.std())
            specs.append(FeatureSpec(spec.key, spec.transform, float(clipped.mean()), std if std > 1e-12 else 1.0, low, high))
        z = np.array([[s.standardized(r[s.key]) for s in specs] for r in rows], dtype=np.float64)
        x = np.hstack([np.ones((len(rows), 1)), z])
        w = np.zeros(x.shape[1])
        penalty = np.full(x.shape[1], float(l2))
        penalty[0] = 0.0
        for _ in range(max_iter):
            p = 1.0 / (1.0 + np.exp(-(x @ w)))
            grad = x.T @ (p - y) + penalty * w
            hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(len(w))
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.max(np.abs(step)) < 1e-10:
                break
        return cls(specs, [float(v) for v in w[1:]], float(w[0]), dict(metadata or {}))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        def num(v: float) -> float | str:
            return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")

        return {
            "format": _FORMAT,
            "version": 1,
            "features": [
                {"key": f.key, "transform": f.transform, "mean": f.mean, "std": f.std, "low": num(f.low), "high": num(f.high)}
                for f in self.features
            ],
            "coef": list(self.coef),
            "intercept": self.intercept,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiskEstimator:
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a risk-estimator JSON (format={data.get('format')!r}, expected {_FORMAT!r}).")
        if data.get("version") != 1:
            raise ValueError(f"unsupported risk-estimator version {data.get('version')!r} (this library reads 1).")
        feats = [
            FeatureSpec(f["key"], f["transform"], float(f["mean"]), float(f["std"]), float(f["low"]), float(f["high"]))
            for f in data["features"]
        ]
        return cls(feats, [float(c) for c in data["coef"]], float(data["intercept"]), dict(data.get("metadata", {})))

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> RiskEstimator:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def default(cls) -> RiskEstimator:
        """The estimator shipped with the package (fitted by `research/scripts/fit_risk.py` on `results/sweep/`)."""
        return _load_default()

    def __repr__(self) -> str:
        terms = ", ".join(f"{f.name}: {c:+.3f}" for f, c in zip(self.features, self.coef))
        return f"RiskEstimator(intercept={self.intercept:+.3f}, {terms})"


@lru_cache(maxsize=1)
def _load_default() -> RiskEstimator:
    ref = resources.files("hf_koopman") / "data" / DEFAULT_ESTIMATOR_FILE
    if not ref.is_file():
        raise FileNotFoundError(
            f"no shipped risk estimator at hf_koopman/data/{DEFAULT_ESTIMATOR_FILE}; fit one with research/scripts/fit_risk.py"
        )
    return RiskEstimator.from_dict(json.loads(ref.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------------- decision rule
#: The verdicts of `DecisionRule.decide`, from least to most alarming, then the one that withholds judgement.
VERDICTS = ("safe", "moderate", "high risk", "uninformative")

#: Numeric level of each verdict, logged by `RKSPCallback` as `rksp/verdict_level` (a scalar a dashboard can plot).
VERDICT_LEVELS = {"uninformative": -1.0, "safe": 0.0, "moderate": 1.0, "high risk": 2.0}

#: What to do about each verdict: the "Recommendation" of the profile report and the advice the callback logs.
ADVICE = {
    "safe": "Proceed without spectral shaping; optionally monitor with `RKSPCallback` during training.",
    "moderate": (
        "Borderline: the paper leaves 0.3 ≤ M≈1 ≤ 0.5 to context. Consider KSS (`KSSTrainer`) for learning rates above "
        "2× the standard one, no-normalisation or novel architectures, and monitor with `RKSPCallback`."
    ),
    "high risk": (
        "Use KSS (`KSSTrainer`, or `RKSPCallback(auto_kss=True)` with a `KSSTrainer`) for aggressive learning rates "
        "(> 2× standard), no-normalisation settings or novel architectures, with RKSP monitoring; or lower the learning "
        "rate or add normalisation. The paper advises skipping KSS for standard Pre-LN / RMSNorm models at "
        "conservative learning rates."
    ),
    "uninformative": "Profile again after a small amount of training (App. J); the init-time spectrum carries no signal.",
}


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
      linear fit explains part of it (η_nl < `max_nonlinearity`);
    * "uninformative" when fewer than half the layers are informative, or when the sample is too small for the
      width: N < `min_samples_per_dim` · d. At N ≈ d the least-squares operator interpolates the sample and the
      masses are several-fold off; Theorem 4's sampling term sqrt(d / N) + d / N exceeds 1 below N = 2.6 d. Below
      `warn_samples_per_dim` · d the verdict carries a warning in its reason.

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
    """

    safe_below: float = 0.3
    high_risk_above: float = 0.5
    kappa_large: float | None = None
    max_nonlinearity: float = 0.9
    min_samples_per_dim: float = 2.0
    warn_samples_per_dim: float = 8.0

    def is_informative(self, features: Any) -> bool:
        """Whether the rule reads this layer (`LayerFeatures`): an update not ≈ 0 that a linear map explains in part."""
        return not bool(getattr(features, "degenerate", False)) and not (
            float(getattr(features, "nonlinearity", 0.0)) >= self.max_nonlinearity
        )

    def decide(
        self,
        score: float | None,
        kappa_median: float | None,
        *,
        num_samples: int | None = None,
        hidden_size: int | None = None,
        informative: int | None = None,
        total: int | None = None,
    ) -> tuple[str, str]:
        """`(verdict, plain-words reason)` from the mean M≈1 `score` of the informative layers and the fit's context.

        Args:
            score (`float`, *optional*): mean near-unit mass over the informative layers (`None`: none is).
            kappa_median (`float`, *optional*): median κ(V) over the informative layers.
            num_samples (`int`, *optional*): N, the token states of the fit.
            hidden_size (`int`, *optional*): d, the width of the fit.
            informative (`int`, *optional*): number of informative layers of the profile.
            total (`int`, *optional*): number of layers of the profile.

        Returns:
            `(verdict, reason)`: the verdict is one of `VERDICTS`; the reason is one or two plain sentences.
        """
        ratio = num_samples / hidden_size if num_samples and hidden_size else None
        if num_samples is not None and num_samples <= 2:
            return "uninformative", f"only N = {num_samples} token states: no covariance can be estimated"
        if ratio is not None and ratio < self.min_samples_per_dim:
            return "uninformative", (
                f"N = {num_samples} token states for width d = {hidden_size} (N/d = {ratio:.2f} < "
                f"{self.min_samples_per_dim:g}): the least-squares operator nearly interpolates the sample, so its "
                f"spectrum is mostly sampling error; profile with num_samples >= {int(self.warn_samples_per_dim * hidden_size)}"
            )
        if score is None or not math.isfinite(score) or (
                informative is not None and total and informative < 0.5 * total):
            count = "" if informative is None or not total else f"{informative} of {total} layers are informative; "
            return "uninformative", (
                f"{count}the others either barely change their input (block output ≈ input, e.g. zero-initialised "
                f"residual branches) or are not explained by a linear map (η_nl ≥ {self.max_nonlinearity:g}), so the "
                "spectrum says little about stability at this point; profile again after a few training steps"
            )
        kappa_big = self.kappa_large is not None and kappa_median is not None and (
            not math.isfinite(kappa_median) or kappa_median > self.kappa_large)
        if score > self.high_risk_above or kappa_big:
            why = []
            if score > self.high_risk_above:
                why.append(f"mean M≈1 = {score:.3f} > {self.high_risk_above}: most modes sit near |λ| = 1, the block "
                           "barely damps perturbations, which the paper ties to divergence at high learning rates")
            if kappa_big:
                why.append(f"median κ(V) = {kappa_median:.3g} > {self.kappa_large:g}")
            verdict, reason = "high risk", " and ".join(why)
        elif score < self.safe_below:
            verdict, reason = "safe", (f"mean M≈1 = {score:.3f} < {self.safe_below}: few modes sit near |λ| = 1, the "
                                       "normalised-model regime of the paper's Table 1")
        else:
            verdict, reason = "moderate", (
                f"mean M≈1 = {score:.3f} lies in [{self.safe_below}, {self.high_risk_above}], a region the paper "
                "leaves to context (architecture, normalisation, learning rate)")
        if ratio is not None and ratio < self.warn_samples_per_dim:
            reason += (f"; caution: N/d = {ratio:.2f} < {self.warn_samples_per_dim:g}, the masses carry a sampling "
                       f"error of roughly sqrt(d/N) = {math.sqrt(1 / ratio):.2f} relative")
        return verdict, reason
