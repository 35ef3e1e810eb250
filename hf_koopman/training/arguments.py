"""Configuration of Koopman Spectral Shaping: `KSSConfig` and the `kss_*` fields of `KSSTrainingArguments`."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import TrainingArguments

from hf_koopman.koopman.features import NEAR_BAND
from hf_koopman.koopman.shaping import DEFAULT_BETA


__all__ = ["KSSConfig", "KSSTrainingArguments"]


def _is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool (`True` is an int to Python, never a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclass
class KSSConfig:
    """Settings of the KSS regulariser (paper Sec. 3.3, Eqs. 14-15; defaults from App. D).

    Args:
        alpha (`float`, *optional*, defaults to `0.15`):
            Weight of the spectral term in `L_task + alpha * mean_l L_KSS^l`. `0` disables KSS entirely (no hooks, the
            loss is bit-for-bit the plain `Trainer` loss).
        beta (`float`, *optional*, defaults to `10.0`):
            Weight of the near-unit target term. The paper gives no value; see `hf_koopman.koopman.shaping`.
        gamma (`float`, *optional*, defaults to `0.4`):
            Target soft near-unit mass (paper: a value in `[0.3, 0.5]`).
        temperature (`float`, *optional*, defaults to `20.0`): sigmoid sharpness `T`.
        tau_u (`float`, *optional*, defaults to `1.05`): upper edge of the near-unit band.
        tau_l (`float`, *optional*, defaults to `0.90`): lower edge of the near-unit band, in `[0, 1]` (moduli are
            `>= 0`; the band lies around `|lambda| = 1`).
        rank (`int`, *optional*): `None` (default) shapes the full spectrum, the one `RKSPCallback` reports; an int
            r shapes the rank-r approximation (the paper's notation table: r = 32).
        every_n_steps (`int`, *optional*, defaults to `10`):
            KSS runs on optimizer steps whose `global_step % every_n_steps == 0` (every micro-batch of such a step);
            other steps carry no hooks and no overhead.
        layer_fraction (`float`, *optional*, defaults to `0.5`): fraction of residual blocks sampled per KSS step.
        num_samples (`int`, *optional*, defaults to `2048`): token states per block per micro-batch (`N`).
        eps (`float`, *optional*, defaults to `1e-5`): whitening ridge (Eq. 9).
        oversample (`int`, *optional*, defaults to `10`): randomized range-finder oversampling.
        power_iters (`int`, *optional*, defaults to `1`): randomized range-finder power iterations (an int `>= 0`).
        max_grad_ratio (`float`, *optional*, defaults to `0.5`):
            Gradient cap of the KSS term relative to the task gradient: on a KSS micro-batch the gradient of
            `alpha * L_KSS` is rescaled by `min(1, max_grad_ratio * ||g_task|| / ||g_KSS||)` (norms where `grad_cap`
            says) while the loss *value* stays `L_task + alpha * L_KSS`. `None` (or `0`) applies the raw
            Eq. 14 gradient as in the paper. See `hf_koopman.koopman.shaping` ("Gradient scale") for the measurement.
            When the cap binds (on No-Norm and MoE models the raw KSS gradient is ~100x the task gradient, so it binds
            on every KSS step) the applied gradient is `max_grad_ratio * ||g_task||` along the KSS direction whatever
            `alpha` is: the ratio, not `alpha`, then sets the strength (two values of `alpha` at which the cap binds on
            every step give the same updates). The divergence guard judges the task loss, not the objective, on KSS
            steps.
        grad_cap (`str`, *optional*, defaults to `"activations"`):
            Where the two gradient norms of the cap are measured. Either way one factor rescales the whole KSS
            gradient, so its direction is Eq. 14's.
            `"activations"` (default): on the residual stream, inside the ordinary backward pass. The gradient of
            `alpha * L_KSS` with respect to the captured token states is a backward through the small DMD graph only;
            tensor hooks add it, times `c = min(1, max_grad_ratio * ||g_task(h)|| / ||g_KSS(states)||)`, where those
            states live as the backward passes through them. `g_task(h)` is the gradient at the first captured
            activation the backward reaches (the highest one, where nothing has been injected yet) and `g_KSS(states)`
            the KSS gradient over all captured states. Costs no extra pass and works with reentrant checkpointing.
            Over the parameters the ratio can differ: at initialisation with `max_grad_ratio=0.5` it is 0.37 on a
            tiny GPT-2 but 3.0 on ViT and 17.5 on Swin (`results/kss_cap_spaces.md`).
            `"parameters"`: over the trainable parameters, exactly, at the price of one extra partial backward pass on
            KSS micro-batches. At the default schedule with the full spectrum (12-layer d = 256 GPT-2, one CPU
            thread, `results/bench_kss.md`) KSS adds +3.0 % (activations) and +7.8 % (parameters) to the average
            step time (one KSS step in 10; single-step estimates); the rounds of the same run measure +3.4 % paired
            for the default cap.
        seed (`int`, *optional*, defaults to `0`): seeds the layer sampling and the token subsampling (per step).
        enabled (`bool`, *optional*, defaults to `True`):
            Master switch (`True` or `False`; a NumPy bool is converted to `bool`), the only one:
            `RKSPCallback(auto_kss=True)` does not switch KSS on or off at a high-risk verdict (no measured benefit,
            `results/kss_v2.md`).
        layers (`str` or `list[str]`, *optional*):
            Override of the residual-block discovery (e.g. `"model.layers"`), as in `find_residual_blocks`.
    """

    alpha: float = 0.15
    beta: float = DEFAULT_BETA
    gamma: float = 0.4
    temperature: float = 20.0
    tau_u: float = NEAR_BAND[1]
    tau_l: float = NEAR_BAND[0]
    rank: int | None = None
    every_n_steps: int = 10
    layer_fraction: float = 0.5
    num_samples: int = 2048
    eps: float = 1e-5
    oversample: int = 10
    power_iters: int = 1
    max_grad_ratio: float | None = 0.5
    grad_cap: str = "activations"
    seed: int = 0
    enabled: bool = True
    layers: Any = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the offending field and the accepted range.

        A NumPy bool for `enabled` (`np.bool_`) is converted to `bool`, NumPy integers for the counts to `int`.
        """
        if isinstance(self.enabled, np.bool_):
            self.enabled = bool(self.enabled)
        for name in ("rank", "every_n_steps", "num_samples", "oversample", "power_iters", "seed"):
            if isinstance(getattr(self, name), np.integer):
                setattr(self, name, int(getattr(self, name)))
        if not _is_int(self.seed):
            raise ValueError(f"KSSConfig: seed must be an int, got {self.seed!r}")
        finite = {
            name: getattr(self, name)
            for name in ("alpha", "beta", "gamma", "temperature", "tau_u", "tau_l", "layer_fraction", "eps")
        }
        if self.max_grad_ratio is not None:
            finite["max_grad_ratio"] = self.max_grad_ratio
        for name, value in finite.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"KSSConfig: {name} must be a finite number, got {value!r}"
                    + (" (use a large finite alpha, or kss_enabled=False to switch KSS off)" if name == "alpha" else "")
                )
        checks = [
            (self.alpha >= 0, f"alpha must be >= 0 (0 disables KSS), got {self.alpha}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (0.0 <= self.gamma <= 1.0, f"gamma is a target mass in [0, 1], got {self.gamma}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.tau_l < self.tau_u, f"need tau_l < tau_u, got tau_l={self.tau_l}, tau_u={self.tau_u}"),
            (
                0.0 <= self.tau_l <= 1.0,
                f"tau_l is the lower edge of the near-unit band of eigenvalue moduli (|lambda| >= 0, band around 1), "
                f"so it must lie in [0, 1], got {self.tau_l}",
            ),
            (self.rank is None or (_is_int(self.rank) and self.rank >= 1),
             f"rank must be None (full spectrum) or an int >= 1, got {self.rank!r}"),
            (
                _is_int(self.every_n_steps) and self.every_n_steps >= 1,
                f"every_n_steps must be an int >= 1, got {self.every_n_steps!r}",
            ),
            (0.0 < self.layer_fraction <= 1.0, f"layer_fraction must lie in (0, 1], got {self.layer_fraction}"),
            (
                _is_int(self.num_samples) and self.num_samples >= 2,
                f"num_samples must be an int >= 2, got {self.num_samples!r}",
            ),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (
                self.layers is None or isinstance(self.layers, (str, list, tuple)),
                f"layers must be None (auto-discovery), the dotted path of the block list (e.g. 'model.layers') or a "
                f"list of paths or modules, got {self.layers!r}",
            ),
            # the types first; the range is compared only between ints (a None or a string never reaches `>=`)
            (_is_int(self.oversample), f"oversample must be an int >= 0, got {self.oversample!r}"),
            (_is_int(self.power_iters), f"power_iters must be an int >= 0, got {self.power_iters!r}"),
            (
                not (_is_int(self.oversample) and _is_int(self.power_iters))
                or (self.oversample >= 0 and self.power_iters >= 0),
                "oversample and power_iters must be >= 0",
            ),
            (isinstance(self.enabled, bool), f"enabled must be True or False, got {self.enabled!r}"),
            (
                self.max_grad_ratio is None or self.max_grad_ratio >= 0,
                f"max_grad_ratio must be >= 0 or None (None / 0 disable the cap), got {self.max_grad_ratio}",
            ),
            (
                self.grad_cap in ("parameters", "activations"),
                f"grad_cap must be 'parameters' or 'activations', got {self.grad_cap!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"KSSConfig: {message}")

    @property
    def active(self) -> bool:
        """Whether KSS adds anything to the loss at all (`enabled` and `alpha > 0`)."""
        return bool(self.enabled) and self.alpha > 0

    def to_dict(self) -> dict[str, Any]:
        """All settings as a plain dict (JSON-ready; logged with the run)."""
        return dataclasses.asdict(self)


_KSS_FIELDS = [f.name for f in dataclasses.fields(KSSConfig)]


@dataclass
class KSSTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the `kss_*` fields of [`KSSConfig`] (same names with a `kss_` prefix).

    Works with `HfArgumentParser`, e.g. `--kss_alpha 0.1 --kss_every_n_steps 20`. `kss_config()` returns the
    [`KSSConfig`] that [`KSSTrainer`] uses.
    """

    kss_alpha: float = field(default=KSSConfig.alpha, metadata={"help": "KSS weight alpha (0 disables KSS)."})
    kss_beta: float = field(default=KSSConfig.beta, metadata={"help": "Weight of the near-unit target term (Eq. 14)."})
    kss_gamma: float = field(default=KSSConfig.gamma, metadata={"help": "Target soft near-unit mass gamma."})
    kss_temperature: float = field(default=KSSConfig.temperature, metadata={"help": "Sigmoid sharpness T."})
    kss_tau_u: float = field(default=KSSConfig.tau_u, metadata={"help": "Upper edge of the near-unit band."})
    kss_tau_l: float = field(default=KSSConfig.tau_l, metadata={"help": "Lower edge of the near-unit band."})
    kss_rank: int | None = field(
        default=KSSConfig.rank,
        metadata={"help": "Rank r of the spectrum KSS shapes; default: the full spectrum (as the profile)."},
    )
    kss_every_n_steps: int = field(
        default=KSSConfig.every_n_steps, metadata={"help": "Apply KSS every k optimizer steps."}
    )
    kss_layer_fraction: float = field(
        default=KSSConfig.layer_fraction, metadata={"help": "Fraction of blocks sampled per KSS step."}
    )
    kss_num_samples: int = field(
        default=KSSConfig.num_samples, metadata={"help": "Token states per block per micro-batch (N)."}
    )
    kss_eps: float = field(default=KSSConfig.eps, metadata={"help": "Whitening ridge epsilon."})
    kss_oversample: int = field(
        default=KSSConfig.oversample, metadata={"help": "Randomized range-finder oversampling."}
    )
    kss_power_iters: int = field(
        default=KSSConfig.power_iters, metadata={"help": "Randomized range-finder power iterations."}
    )
    kss_max_grad_ratio: float | None = field(
        default=KSSConfig.max_grad_ratio,
        metadata={"help": "Cap ||grad of alpha*L_KSS|| at this multiple of ||grad L_task||. 0 disables the cap "
                  "(the paper-literal gradient); from Python, None does too."},
    )
    kss_grad_cap: str = field(
        default=KSSConfig.grad_cap,
        metadata={"help": "Where the cap's gradient norms are measured: 'activations' (residual stream, no extra "
                  "pass; default) or 'parameters' (exact, one extra partial backward)."},
    )
    kss_seed: int = field(default=KSSConfig.seed, metadata={"help": "Seed of the layer and token sampling."})
    kss_enabled: bool = field(default=KSSConfig.enabled, metadata={"help": "Master switch for KSS."})
    kss_layers: str | None = field(
        default=KSSConfig.layers, metadata={"help": "Block-list override, e.g. 'model.layers'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # plain Python values, so that to_json_string() (what the loggers write) can serialise them
        for spec in dataclasses.fields(self):
            if spec.name.startswith("kss_"):
                value = getattr(self, spec.name)
                if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float)):
                    setattr(self, spec.name, value.item())
        try:  # validate early, naming the fields as the user wrote them (`kss_alpha`, not `alpha`)
            self.kss_config()
        except ValueError as err:
            message = str(err).removeprefix("KSSConfig: ")
            # field names, not the same words inside a module path such as 'model.layers'
            message = re.sub(rf"(?<![.\w])({'|'.join(_KSS_FIELDS)})\b", r"kss_\1", message)
            raise ValueError(f"KSSTrainingArguments: {message}") from None

    def kss_config(self) -> KSSConfig:
        """The [`KSSConfig`] described by the `kss_*` fields."""
        return KSSConfig(**{name: getattr(self, f"kss_{name}") for name in _KSS_FIELDS})
