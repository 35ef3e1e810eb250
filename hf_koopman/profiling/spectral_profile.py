"""`SpectralProfile`: the per-layer RKSP features of one model, their aggregates, the verdict and (de)serialisation.

Verdict (the paper's decision rule, rksp_paper.md §1.8, Fig. 7 / App. J), computed over the *informative* layers:

* score = mean over informative layers of the near-unit mass M≈1 of the full spectrum (the paper's AUROC score;
  which layer aggregate it uses is not stated, the mean is our reading);
* "safe" when score < 0.3, "high risk" when score > 0.5, "moderate" in between (a region the paper leaves to context).
* κ(V) is reported but not used by default (`DecisionRule.kappa_large=None`). The paper gives no number for "large
  κ". On the full spectrum the median κ(V) is in the hundreds for every normalisation at d = 128 and in the
  thousands for GPT-2 small, and it is *lower* for No-Norm, the one family that diverges, than for Pre-LN
  (`results/table1.md`): a fixed threshold would call every model high risk and separate nothing.
* A layer is informative when its update is not ~0 (`degenerate`: ReZero / Fixup-style blocks, App. J) and the
  linear fit explains part of it (`nonlinearity` η_nl < `DecisionRule.max_nonlinearity`, 0.9).
* "uninformative" when fewer than half the layers are informative, or when the sample is too small for the width:
  N < `min_samples_per_dim` · d (2 by default). At N ≈ d the least-squares operator interpolates the sample and
  the masses are several-fold off; Theorem 4's sampling term sqrt(d / N) + d / N exceeds 1 below N = 2.6 d. Between
  2 d and 8 d the verdict is given with a warning in `verdict_reason`.

`hf_koopman.risk.RiskEstimator` turns a profile and a learning rate into a probability (`SpectralProfile.risk`).
"""

from __future__ import annotations

import dataclasses
import json
from hf_koopman.logging_utils import get_logger
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


__all__ = ["DecisionRule", "SpectralProfile"]

logger = get_logger(__name__)

VERDICTS = ("safe", "moderate", "high risk", "uninformative")


@dataclass(frozen=True)
class DecisionRule:
    """Thresholds of the paper's init-time decision rule (App. J) and of when a profile is too unreliable to judge."""

    safe_below: float = 0.3
    high_risk_above: float = 0.5
    kappa_large: float | None = None
    max_nonlinearity: float = 0.9
    min_samples_per_dim: float = 2.0
    warn_samples_per_dim: float = 8.0

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
        """`(verdict, plain-words reason)` from the mean M≈1 `score` of the informative layers and the fit's context."""
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


def _layer_features_cls():
    from hf_koopman.koopman import LayerFeatures

    return LayerFeatures


def _features_to_dict(features: Any) -> dict[str, Any]:
    if hasattr(features, "to_dict"):
        return dict(features.to_dict())
    return dataclasses.asdict(features)


def _json_safe(value: Any) -> Any:
    """NaN / ±Inf -> None-free JSON: encode as the strings "nan", "inf", "-inf" (restored by `_from_json_safe`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return _json_safe(value.item())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _from_json_safe(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(v) for v in value]
    return value


@dataclass
class SpectralProfile:
    """RKSP profile of one model: per-layer `LayerFeatures`, aggregates and the verdict.

    Attributes:
        layers (`list[tuple[str, LayerFeatures]]`): (block name, features) in execution order.
        aggregates (`dict[str, float]`): `f"{feature}_{stat}"` for stat in mean/max/min/std (Algorithm 1, line 11),
            plus `near_unit_mass_x_log10_kappa_mean` (the composite predictor of Table 2).
        stacks (`list[str]`): stack label of each layer (`""`, `"encoder"`, `"decoder"`, ...).
        eigenvalues (`list[np.ndarray]`): complex eigenvalues of each layer's operator (for plots).
        model_name (`str`, *optional*): what was profiled.
        settings (`dict`): analysis settings (rank, num_samples, seed, bands ...).
        meta (`dict`): free-form context (dtype, tokens seen, learning rate for the risk estimator ...).
        rule (`DecisionRule`): thresholds of the verdict.
    """

    layers: list[tuple[str, Any]]
    aggregates: dict[str, float]
    stacks: list[str] = field(default_factory=list)
    eigenvalues: list[np.ndarray] = field(default_factory=list)
    model_name: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    rule: DecisionRule = field(default_factory=DecisionRule)

    def __post_init__(self) -> None:
        if not self.stacks:
            self.stacks = [""] * len(self.layers)
        if len(self.stacks) != len(self.layers):
            raise ValueError(f"stacks has {len(self.stacks)} entries for {len(self.layers)} layers.")

    # ------------------------------------------------------------------ derived quantities
    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layers]

    @property
    def features(self) -> list[Any]:
        return [features for _, features in self.layers]

    @property
    def degenerate_layers(self) -> list[str]:
        """Layers whose block is (nearly) the identity at this point (App. J): RKSP is uninformative there."""
        return [name for name, f in self.layers if bool(getattr(f, "degenerate", False))]

    def _informative(self) -> list[Any]:
        """Layers whose fit the verdict uses: a non-trivial update that a linear map explains in part."""
        limit = self.rule.max_nonlinearity
        return [f for f in self.features if not bool(getattr(f, "degenerate", False))
                and not float(getattr(f, "nonlinearity", 0.0)) >= limit]

    @property
    def score(self) -> float | None:
        """Mean near-unit mass M≈1 over the informative layers (the decision-rule score); `None` if there are none."""
        values = [float(f.near_unit_mass) for f in self._informative()]
        return float(np.mean(values)) if values else None

    @property
    def kappa_median(self) -> float | None:
        """Median eigenvector condition number κ(V) over the informative layers."""
        values = [float(f.eigvec_condition) for f in self._informative()]
        return float(np.median(values)) if values else None

    def _decision(self) -> tuple[str, str]:
        return self.rule.decide(
            self.score, self.kappa_median, num_samples=self.settings.get("num_samples"),
            hidden_size=self.settings.get("hidden_size"), informative=len(self._informative()), total=len(self.layers),
        )

    @property
    def verdict(self) -> str:
        """"safe" / "moderate" / "high risk" by the paper's decision rule, or "uninformative" (see the module doc)."""
        return self._decision()[0]

    @property
    def verdict_reason(self) -> str:
        """One or two plain sentences: why this verdict, and how far to trust it."""
        return self._decision()[1]

    def risk_probability(self, learning_rate: float | None = None) -> float | None:
        """Calibrated P(divergence) from `hf_koopman.risk.RiskEstimator`, or `None` when no estimator is shipped."""
        try:
            from hf_koopman.risk import RiskEstimator
        except ImportError:
            return None
        lr = learning_rate if learning_rate is not None else self.meta.get("learning_rate")
        try:
            return float(RiskEstimator.default().predict_proba(self, learning_rate=lr))
        except (FileNotFoundError, NotImplementedError, TypeError, ValueError) as err:
            # e.g. no shipped estimator yet, or it needs a learning rate this profile does not carry
            logger.info("no calibrated risk for this profile (%s); the decision rule applies", err)
            return None

    def risk_assessment(self, learning_rate: float | None = None) -> Any:
        """`hf_koopman.risk.RiskAssessment` (probability, and whether this model and learning rate lie inside the
        estimator's training ranges), or `None` when no estimator is shipped or it cannot score this profile."""
        try:
            from hf_koopman.risk import RiskEstimator
        except ImportError:
            return None
        lr = learning_rate if learning_rate is not None else self.meta.get("learning_rate")
        try:
            return RiskEstimator.default().assess(self, learning_rate=lr)
        except (FileNotFoundError, NotImplementedError, TypeError, ValueError) as err:
            logger.info("no calibrated risk for this profile (%s); the decision rule applies", err)
            return None

    @property
    def risk(self) -> float | None:
        """Calibrated divergence probability (uses `meta["learning_rate"]` when set), else `None`."""
        return self.risk_probability()

    def by_stack(self) -> dict[str, dict[str, float]]:
        """Mean M≈1, mean κ(V) and layer count per stack (useful for encoder-decoder models)."""
        out: dict[str, dict[str, float]] = {}
        for stack in dict.fromkeys(self.stacks):
            feats = [f for f, s in zip(self.features, self.stacks) if s == stack]
            out[stack] = {
                "num_layers": len(feats),
                "near_unit_mass_mean": float(np.mean([f.near_unit_mass for f in feats])),
                "eigvec_condition_median": float(np.median([f.eigvec_condition for f in feats])),
            }
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become the strings "nan"/"inf"/"-inf")."""
        assessment = self.risk_assessment()
        out = {
            "model_name": self.model_name,
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "score": self.score,
            "kappa_median": self.kappa_median,
            "risk": self.risk,
            "risk_assessment": None if assessment is None else assessment.to_dict(),
            "decision_rule": dataclasses.asdict(self.rule),
            "settings": self.settings,
            "meta": self.meta,
            "aggregates": self.aggregates,
            "degenerate_layers": self.degenerate_layers,
            "layers": [
                {"name": name, "stack": stack, **_features_to_dict(features)}
                for (name, features), stack in zip(self.layers, self.stacks)
            ],
            "eigenvalues": [
                {"real": np.real(ev).tolist(), "imag": np.imag(ev).tolist()} for ev in self.eigenvalues
            ],
        }
        return _json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralProfile:
        data = _from_json_safe(data)
        layer_cls = _layer_features_cls()
        known = {f.name for f in dataclasses.fields(layer_cls)}
        layers, stacks = [], []
        for row in data["layers"]:
            layers.append((row["name"], layer_cls(**{k: v for k, v in row.items() if k in known})))
            stacks.append(row.get("stack", ""))
        eigenvalues = [np.asarray(e["real"]) + 1j * np.asarray(e["imag"]) for e in data.get("eigenvalues", [])]
        return cls(
            layers=layers,
            aggregates=data.get("aggregates", {}),
            stacks=stacks,
            eigenvalues=eigenvalues,
            model_name=data.get("model_name"),
            settings=data.get("settings", {}),
            meta=data.get("meta", {}),
            rule=DecisionRule(**data.get("decision_rule", {})),
        )

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> SpectralProfile:
        """Load from a JSON string or a path to `profile.json`."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    def to_markdown(self, plots: dict[str, str] | None = None) -> str:
        """Markdown report (verdict, aggregates, per-layer table, caveats); `plots` maps captions to image paths."""
        from hf_koopman.profiling.report import render_report

        return render_report(self, plots=plots)

    def plot(self, path: str | Path | None = None):
        """Figure with the eigenvalues of every layer in the complex plane and the per-layer masses vs depth.

        Needs matplotlib (`pip install hf-koopman[plot]`). Saved as PNG when `path` is given. Returns the figure.
        """
        from hf_koopman.profiling.plotting import plot_profile

        return plot_profile(self, path)

    def save(self, directory: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write `profile.json`, `report.md` and (with matplotlib) `eigenvalues.png` / `masses.png` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = {"profile": directory / "profile.json"}
        written["profile"].write_text(self.to_json(), encoding="utf-8")
        images: dict[str, str] = {}
        if plots:
            try:
                from hf_koopman.profiling.plotting import save_plots

                for caption, image in save_plots(self, directory).items():
                    written[caption] = image
                    images[caption] = image.name
            except ImportError as err:
                logger.warning("%s; skipping plots", err)
        written["report"] = directory / "report.md"
        written["report"].write_text(self.to_markdown(plots=images), encoding="utf-8")
        return written

    def __repr__(self) -> str:
        score = "n/a" if self.score is None else f"{self.score:.3f}"
        return (
            f"SpectralProfile(model={self.model_name!r}, layers={len(self.layers)}, mean M≈1={score}, "
            f"verdict={self.verdict!r})"
        )
