"""`SpectralProfile`: the per-layer RKSP features of one model, their aggregates, the verdict and (de)serialisation.

A profile is data. The verdict comes from its `DecisionRule` (`hf_koopman.risk`, with the verdict names, levels and
advice), the calibrated probability from `hf_koopman.risk.RiskEstimator`. The Markdown report
(`hf_koopman.profiling.report`) and the plots (`hf_koopman.profiling.plotting`) read a profile; `to_markdown`, `plot`
and `save` are shortcuts to them, imported on first use.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_koopman.logging_utils import get_logger
from hf_koopman.risk import DecisionRule, RiskEstimator, check_learning_rate, load_estimator


__all__ = ["DecisionRule", "SpectralProfile"]

logger = get_logger(__name__)


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


def _decision_rule(fields: dict[str, Any]) -> DecisionRule:
    """The `DecisionRule` a profile.json records; a field this version does not know (written by a newer one) is left
    out, and a rule it refuses is replaced by the default one, each with a warning, so that the profile still
    loads."""
    known = {f.name for f in dataclasses.fields(DecisionRule)}
    unknown = sorted(set(fields) - known)
    if unknown:
        logger.warning("profile.json's decision_rule has fields this version of hf_koopman does not know (%s); they "
                       "are left out (upgrade hf_koopman to use them)", ", ".join(unknown))
    chosen = {k: v for k, v in fields.items() if k in known}
    try:
        return DecisionRule(**chosen)
    except ValueError as err:  # a rule this version refuses: the profile still loads, under the default rule
        logger.warning("profile.json's decision_rule %s is refused (%s); the profile is read with the default rule",
                       chosen, err)
        return DecisionRule()


@dataclass(eq=False)
class SpectralProfile:
    """RKSP profile of one model: per-layer `LayerFeatures`, aggregates and the verdict.

    Attributes:
        layers (`list[tuple[str, LayerFeatures]]`): (block name, features) in execution order.
        aggregates (`dict[str, float]`): `f"{feature}_{stat}"` for stat in mean/max/min/std (Algorithm 1, line 11),
            plus `near_unit_mass_x_log10_kappa_mean` (the composite predictor of Table 2), over every layer except
            those with too few token states for their width (`settings["aggregates_left_out"]` names them when
            there are any; see `profile_from_snapshots`). `RiskEstimator` reads them.
        stacks (`list[str]`): stack label of each layer (`""`, `"encoder"`, `"decoder"`, ...).
        eigenvalues (`list[np.ndarray]`): complex eigenvalues of each layer's operator (for plots).
        model_name (`str`, *optional*): what was profiled.
        settings (`dict`): analysis settings (rank, the spectrum computed, seed, bands, the `spectral_features`
            options ...); `num_samples` and `hidden_size` there are the first layer's N and d, `samples_per_dim_min`
            the smallest N/d over the layers.
        meta (`dict`): free-form context (dtype, learning rate for the risk estimator ...); from `profile()`,
            `tokens_seen` (the fewest valid token states any block saw), `tokens_seen_per_layer` (each layer's),
            `num_samples_requested` and `probe` (`"default"`: the synthetic `default_probe_inputs`; `"given"`; from
            `RKSPCallback`: `"training data"`, `"probe_inputs"` or `"default"`); `hf_koopman_version`, the version
            that computed the profile (kept through `save` / `from_json`).
        rule (`DecisionRule`): thresholds of the verdict.
        risk_estimator (`RiskEstimator`, *optional*): the estimator `risk` and `risk_assessment` use; `None` for the
            one the profile was made with: `meta["risk_estimator"]` names it and `meta["risk_estimator_file"]` is the
            JSON it was read from, which a profile loaded with `from_json` reads again (without that file, or for an
            estimator built in memory, `risk` is `None`, never the shipped estimator's number); the shipped one when
            `meta` names none. Not saved itself.
        layer_sizes (`list[tuple[int, int]]`): `(N, d)` of each layer's snapshots, the token states and the width of
            its fit (empty: every layer has `settings["num_samples"]` and `settings["hidden_size"]`).
    """

    layers: list[tuple[str, Any]]
    aggregates: dict[str, float]
    stacks: list[str] = field(default_factory=list)
    eigenvalues: list[np.ndarray] = field(default_factory=list)
    model_name: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    rule: DecisionRule = field(default_factory=DecisionRule)
    risk_estimator: Any = field(default=None, repr=False, compare=False)
    layer_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stacks:
            self.stacks = [""] * len(self.layers)
        if len(self.stacks) != len(self.layers):
            raise ValueError(f"stacks has {len(self.stacks)} entries for {len(self.layers)} layers.")
        self.layer_sizes = [(int(n), int(d)) for n, d in self.layer_sizes]
        if self.layer_sizes and len(self.layer_sizes) != len(self.layers):
            raise ValueError(f"layer_sizes has {len(self.layer_sizes)} entries for {len(self.layers)} layers.")

    def __eq__(self, other: object) -> bool:
        """Equal when everything `to_json` saves is equal: layers and their features, eigenvalues, names, settings,
        meta, rule and what follows from them, the risk included (so two profiles of equal features under different
        risk estimators differ). A profile and the one `from_json` reads back from its file are equal where its risk
        estimator is available there too."""
        if not isinstance(other, SpectralProfile):
            return NotImplemented
        return self is other or self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------ derived quantities
    @property
    def names(self) -> list[str]:
        """The layers' names, in depth order."""
        return [name for name, _ in self.layers]

    @property
    def features(self) -> list[Any]:
        """The layers' `LayerFeatures` (the features of each block's spectrum), in depth order."""
        return [features for _, features in self.layers]

    @property
    def degenerate_layers(self) -> list[str]:
        """Layers whose block is (nearly) the identity at this point (App. J): RKSP is uninformative there."""
        return [name for name, f in self.layers if bool(getattr(f, "degenerate", False))]

    @property
    def constant_input_layers(self) -> list[str]:
        """Degenerate layers with no identified mode: their input state is the same for every token (up to round-off),
        so the fit has no direction (one token repeated, or padding, without position information)."""
        return [name for name, f in self.layers if bool(getattr(f, "degenerate", False)) and not f.n_modes]

    @property
    def sample_sizes(self) -> list[tuple[int | None, int | None]]:
        """`(N, d)` of every layer: `layer_sizes`, or `settings["num_samples"]` and `settings["hidden_size"]` for
        every layer of a profile without them (e.g. read from an older `profile.json`)."""
        if self.layer_sizes:
            return list(self.layer_sizes)
        return [(self.settings.get("num_samples"), self.settings.get("hidden_size"))] * len(self.layers)

    @property
    def informative_layers(self) -> list[str]:
        """Layers the verdict reads (`DecisionRule.reads`): an update not ≈ 0 that a linear map explains, fitted on
        enough token states for the layer's width."""
        return [name for name, read in zip(self.names, self.rule.reads(self)) if read]

    @property
    def undersampled_layers(self) -> list[str]:
        """Layers the verdict leaves out because their own N/d is below `DecisionRule.min_samples_per_dim` while
        other layers have enough (e.g. a decoder fed a few tokens next to a long encoder input); see
        `DecisionRule.undersampled`."""
        return [name for name, few in zip(self.names, self.rule.undersampled(self)) if few]

    @property
    def near_gate_layers(self) -> list[str]:
        """Layers whose corrected η_nl lies within the sampling band of the informative gate
        (`DecisionRule.near_gate`): with more token states they may fall on the other side of it."""
        return [name for name, near in zip(self.names, self.rule.near_gate(self)) if near]

    def _informative(self) -> list[Any]:
        return [f for f, read in zip(self.features, self.rule.reads(self)) if read]

    @property
    def score(self) -> float | None:
        """Mean near-unit mass M≈1 over the layers the verdict reads (the decision-rule score); `None` if none."""
        values = [float(f.near_unit_mass) for f in self._informative()]
        return float(np.mean(values)) if values else None

    @property
    def kappa_median(self) -> float | None:
        """Median eigenvector condition number κ(V) over the informative layers."""
        values = [float(f.eigvec_condition) for f in self._informative()]
        return float(np.median(values)) if values else None

    def _decision(self) -> tuple[str, str]:
        return self.rule.decide_profile(self)  # also reads meta: tokens seen, pretrained weights

    @property
    def verdict(self) -> str:
        """"safe" / "moderate" / "high risk" by the paper's decision rule, or "uninformative" (see `DecisionRule`)."""
        return self._decision()[0]

    @property
    def verdict_reason(self) -> str:
        """One or two plain sentences: why this verdict, and how far to trust it."""
        return self._decision()[1]

    def set_risk_estimator(self, estimator: Any) -> None:
        """Use `estimator` (a `RiskEstimator`, the path of its JSON, or `None` for the shipped one) for `risk` and
        `risk_assessment`, and record which in `meta` (`"risk_estimator"`, and `"risk_estimator_file"` for one read
        from a JSON) so that a saved profile reads the same one back."""
        self.meta.pop("risk_estimator", None)
        self.meta.pop("risk_estimator_file", None)
        self.risk_estimator = None if estimator is None else load_estimator(estimator)
        self.meta.update(self._estimator_meta())

    def _saved_meta(self) -> dict[str, Any]:
        """`meta` as saved: with an estimator attached (by `set_risk_estimator` or the attribute), its own entries in
        place of any earlier ones, so a reload reads the same estimator."""
        if self.risk_estimator is None:
            return self.meta
        kept = {k: v for k, v in self.meta.items() if k not in ("risk_estimator", "risk_estimator_file")}
        return {**kept, **self._estimator_meta()}

    def _estimator_meta(self) -> dict[str, Any]:
        """`meta` entries naming the attached estimator (none for the shipped one or none attached)."""
        est = self.risk_estimator
        if est is None or est.is_shipped:
            return {}
        return {"risk_estimator": est.name, **({"risk_estimator_file": est.file} if est.file is not None else {})}

    def _estimator(self) -> Any:
        """The risk estimator of this profile (see `risk_estimator`); raises `FileNotFoundError` when the one
        `meta["risk_estimator"]` names is not available here (its probability is not replaced by the shipped one's)."""
        if self.risk_estimator is not None:
            return self.risk_estimator
        named, file = self.meta.get("risk_estimator"), self.meta.get("risk_estimator_file")
        if named in (None, "shipped") and file is None:
            return RiskEstimator.default()
        if file is not None and Path(str(file)).is_file():
            self.risk_estimator = RiskEstimator.from_json(file)
            return self.risk_estimator
        where = f" (its file {file} is missing)" if file is not None else " (it was not read from a file)"
        raise FileNotFoundError(f"this profile's risk estimator, {named}, is not available here{where}; set "
                                "profile.risk_estimator = RiskEstimator.from_json(path)")

    def risk_probability(self, learning_rate: float | None = None) -> float | None:
        """Calibrated P(divergence) from `hf_koopman.risk.RiskEstimator`, or `None` when it cannot be computed. A
        `learning_rate` that is not a positive finite number raises (`ValueError` / `TypeError`)."""
        check_learning_rate(learning_rate)
        lr = learning_rate if learning_rate is not None else self.meta.get("learning_rate")
        try:
            return float(self._estimator().predict_proba(self, learning_rate=lr))
        except (OSError, NotImplementedError, TypeError, ValueError) as err:
            # e.g. no shipped estimator, or it needs a learning rate this profile does not carry
            self._say_no_risk(err)
            return None

    def _say_no_risk(self, err: BaseException) -> None:
        """Log why no calibrated risk could be computed, once per reason for this profile (the report, the
        serialisation and the callback each ask for it)."""
        said = self.__dict__.setdefault("_no_risk_said", set())
        if str(err) not in said:
            said.add(str(err))
            logger.info("no calibrated risk for this profile (%s); the decision rule applies", err)

    def risk_assessment(self, learning_rate: float | None = None) -> Any:
        """`hf_koopman.risk.RiskAssessment` (probability, and whether this model and learning rate lie inside the
        estimator's training ranges), or `None` when no estimator is shipped or it cannot score this profile, e.g.
        when no learning rate is known: pass `learning_rate=` here or to `profile()` (the INFO log says why). A
        `learning_rate` that is not a positive finite number raises (`ValueError` / `TypeError`)."""
        check_learning_rate(learning_rate)
        lr = learning_rate if learning_rate is not None else self.meta.get("learning_rate")
        try:
            return self._estimator().assess(self, learning_rate=lr)
        except (OSError, NotImplementedError, TypeError, ValueError) as err:
            self._say_no_risk(err)
            return None

    @property
    def risk(self) -> float | None:
        """Calibrated divergence probability (uses `meta["learning_rate"]` when set), else `None`; `None` too when the
        verdict is "uninformative": the spectrum is then no reading of the model, so no number stands for it here
        (`risk_probability()` and `risk_assessment()` still compute the estimator's value, which the report shows with
        that caveat)."""
        return None if self.verdict == "uninformative" else self.risk_probability()

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
            "meta": self._saved_meta(),
            "aggregates": self.aggregates,
            "degenerate_layers": self.degenerate_layers,
            "undersampled_layers": self.undersampled_layers,
            "near_gate_layers": self.near_gate_layers,
            "layers": [
                {"name": name, "stack": stack, **_features_to_dict(features),
                 **({"num_samples": size[0], "hidden_size": size[1]} if self.layer_sizes else {})}
                for (name, features), stack, size in zip(self.layers, self.stacks, self.sample_sizes)
            ],
            "eigenvalues": [
                {"real": np.real(ev).tolist(), "imag": np.imag(ev).tolist()} for ev in self.eigenvalues
            ],
        }
        return _json_safe(out)

    def to_json(self, **kwargs: Any) -> str:
        """The profile as JSON text (`to_dict`); `kwargs` go to `json.dumps` (`indent` defaults to 2). To write a
        file, `to_json_file(path)`; `from_json` reads either back."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def to_json_file(self, path: str | Path) -> Path:
        """Write `to_json()` to the file `path`, whole or not at all (as `PretrainedConfig.to_json_file`; `save()`
        writes a folder with the report and plots too), creating missing parent folders as `save()` does. Returns the
        path; `from_json(path)` reads it back."""
        from hf_koopman.files import write_text_whole

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: pass a file name (e.g. {path / 'profile.json'}), or use "
                                    f"save({str(path)!r}) to write the profile, report and plots into it")
        text = self.to_json()  # before any folder is made: a profile that cannot be written leaves none behind
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, text)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralProfile:
        """The profile a `to_dict()` dict (or a parsed `profile.json`) describes; the strings "nan" / "inf" / "-inf"
        are read back as numbers."""
        data = _from_json_safe(data)
        layer_cls = _layer_features_cls()
        known = {f.name for f in dataclasses.fields(layer_cls)}
        layers, stacks = [], []
        for row in data["layers"]:
            layers.append((row["name"], layer_cls(**{k: v for k, v in row.items() if k in known})))
            stacks.append(row.get("stack", ""))
        # per-layer N and d (profiles written before they were recorded have neither: the settings' apply)
        rows = data["layers"]
        sizes = [(row["num_samples"], row["hidden_size"]) for row in rows
                 if row.get("num_samples") is not None and row.get("hidden_size") is not None]
        eigenvalues = [np.asarray(e["real"]) + 1j * np.asarray(e["imag"]) for e in data.get("eigenvalues", [])]
        loaded = cls(
            layers=layers,
            aggregates=data.get("aggregates", {}),
            stacks=stacks,
            eigenvalues=eigenvalues,
            model_name=data.get("model_name"),
            settings=data.get("settings", {}),
            meta=data.get("meta", {}),
            rule=_decision_rule(data.get("decision_rule") or {}),
            layer_sizes=sizes if len(sizes) == len(rows) else [],
        )
        saved = data.get("verdict")
        if isinstance(saved, str) and saved != loaded.verdict:  # the verdict is recomputed, never copied
            version = loaded.meta.get("hf_koopman_version")
            logger.warning(
                "this profile was saved with the verdict %r (%s); reloaded, it reads %r from the same features under "
                "the decision rule restored from the file: a newer rule, or a custom rule that the file does not "
                "hold (a DecisionRule subclass). The features themselves are as saved.",
                saved, f"computed by hf_koopman {version}" if version else "by an earlier hf_koopman", loaded.verdict,
            )
        return loaded

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> SpectralProfile:
        """Load a profile: the counterpart of `to_json()` and of `save()`.

        Args:
            text_or_path (`str` or `Path`): JSON text, the path of a `profile.json`, or the folder `save()` wrote.

        Returns:
            `SpectralProfile`: the saved profile (features, verdict, meta).

        Raises:
            FileNotFoundError: the path does not exist, or the folder holds no `profile.json`.
        """
        text = str(text_or_path)
        source = "the JSON text"
        if not text.lstrip().startswith("{"):
            source, path = repr(text), Path(text_or_path)
            if path.is_dir():  # the folder of `save()`: read the profile.json inside it
                if not (path / "profile.json").is_file():
                    raise FileNotFoundError(
                        f"{str(path)!r} is a folder without a profile.json; pass the folder that "
                        "SpectralProfile.save() wrote, or the path of a profile.json file."
                    )
                path = path / "profile.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{text[:80]!r} is neither a JSON object nor an existing file; pass the folder that "
                    "SpectralProfile.save() wrote, the path of a profile.json file, or its JSON text."
                )
            text = path.read_text(encoding="utf-8")
        fix = "pass a profile.json written by SpectralProfile.save() or to_json(), or the folder save() wrote"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not JSON ({err}); {fix}.") from None
        rows = data.get("layers") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
            raise ValueError(f"{source} is not a spectral profile (no 'layers' list of named layers); {fix}.")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source} is not a readable spectral profile ({type(err).__name__}: {err}); {fix}.") \
                from err

    # ------------------------------------------------------------------ presentation (shortcuts)
    def to_markdown(self, plots: dict[str, str] | None = None) -> str:
        """Markdown report (`hf_koopman.profiling.report.render_report`); `plots` maps captions to image paths."""
        from hf_koopman.profiling.report import render_report

        return render_report(self, plots=plots)

    def plot(self, path: str | Path | None = None) -> Any:
        """Eigenvalues of every layer and the masses vs depth in one figure (`plotting.plot_profile`).

        Needs matplotlib (`pip install hf-koopman[plot]`). Saved as PNG when `path` is given. Returns the figure.
        """
        from hf_koopman.profiling.plotting import plot_profile

        return plot_profile(self, path)

    def save(self, directory: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write `profile.json`, `report.md` and (with matplotlib) the plots into `directory`
        (`report.save_profile`); `SpectralProfile.from_json(directory)` reads the profile back.

        Args:
            directory (`str` or `Path`): the folder to write into (created if missing; not a file name).
            plots (`bool`, defaults to `True`): also write `eigenvalues.png` and `masses.png` (needs matplotlib).

        Returns:
            `dict[str, Path]`: the written files: `"profile"` (the JSON), `"report"`, and each plot under its title.

        Raises:
            FileExistsError: `directory` holds files under these names but no `profile.json` (not an earlier
                profile's: a user's own `report.md`).
        """
        from hf_koopman.profiling.report import save_profile

        path = Path(directory)
        if not path.exists() and path.suffix.lower() == ".json":  # a file name: save() would make a folder of it
            raise ValueError(
                f"save() writes profile.json, report.md and the plots into a folder, and {str(path)!r} names a JSON "
                f"file; pass its folder, e.g. save({str(path.parent)!r}), or write the JSON alone with "
                f"to_json_file({str(path)!r})."
            )
        if path.exists() and not path.is_dir():
            folder = path.with_suffix("") if path.suffix else path.with_name(path.name + "_profile")
            raise NotADirectoryError(
                f"save() writes profile.json, report.md and the plots into a folder, but {str(path)!r} is an existing "
                f"file; pass a folder path, e.g. save({str(folder)!r}), or write to_json() to a file yourself."
            )
        return save_profile(self, directory, plots=plots)

    def __repr__(self) -> str:
        score = "n/a" if self.score is None else f"{self.score:.3f}"
        return (
            f"SpectralProfile(model={self.model_name!r}, layers={len(self.layers)}, mean M≈1={score}, "
            f"verdict={self.verdict!r})"
        )
