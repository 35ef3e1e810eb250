"""Pieces shared by the conditional-neural-process models here: output type, Gaussian NLL, input checks, the
translation-equivariant uniform grid, and a padding data collator for `Trainer`.

Conventions (all models): context `(B, Nc, x_dim)` / `(B, Nc, y_dim)`, targets `(B, Nt, x_dim)`, boolean masks
`(B, N)` with True = real point. Padded points never influence real ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

__all__ = [
    "NeuralProcessOutput",
    "gaussian_log_likelihood",
    "masked_gaussian_nll",
    "gaussian_prediction",
    "check_inputs",
    "compute_dtype",
    "upcast_dtype",
    "uniform_grid",
    "NeuralProcessCollator",
]


@dataclass
class NeuralProcessOutput(ModelOutput):
    """Predictive distribution at the targets.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): Gaussian NLL per valid target point and output
            dimension, averaged over the batch; returned when `target_y` is given.
        mean (`torch.FloatTensor` of shape `(B, Nt, y_dim)`): predictive mean.
        stddev (`torch.FloatTensor` of shape `(B, Nt, y_dim)`): predictive standard deviation (> 0).
    """

    loss: torch.FloatTensor | None = None
    mean: torch.FloatTensor | None = None
    stddev: torch.FloatTensor | None = None


def gaussian_log_likelihood(
    mean: torch.Tensor, stddev: torch.Tensor, target_y: torch.Tensor, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-task log-likelihood per target point (summed over `y_dim`, averaged over valid targets): `(B,)`.

    This is the metric of the EquivCNP paper's 1-D table (log p(y_T | x_T, C) / N_T).
    """
    lp = torch.distributions.Normal(mean, stddev).log_prob(target_y).sum(-1)  # (B, Nt)
    if target_mask is None:
        return lp.mean(-1)
    m = target_mask.to(lp.dtype)
    return (lp * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def masked_gaussian_nll(
    mean: torch.Tensor, stddev: torch.Tensor, target_y: torch.Tensor, target_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian NLL averaged over every valid (task, target, output-dim) entry: a scalar.

    The EquivCNP code sums over targets and averages over tasks; a per-point mean keeps the loss scale independent of
    the (random) number of targets and makes it comparable with the per-point log-likelihood reported.
    """
    z = (target_y - mean) / stddev
    nll = 0.5 * z * z + torch.log(stddev) + 0.5 * math.log(2 * math.pi)
    if target_mask is None:
        return nll.mean()
    m = target_mask[..., None].to(nll.dtype).expand_as(nll)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def gaussian_prediction(
    model_name: str, mean: torch.Tensor, stddev: torch.Tensor, target_y: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
) -> NeuralProcessOutput:
    """The predictive Gaussian (`mean`, `stddev` `(B, Nt, y_dim)`) as a `NeuralProcessOutput`, with the
    `masked_gaussian_nll` loss when `target_y` is given.

    Raises:
        FloatingPointError: when the mean or the standard deviation is not finite (named after `model_name`).
    """
    if _can_read_values(mean) and not (torch.isfinite(mean).all() and torch.isfinite(stddev).all()):
        raise FloatingPointError(
            f"{model_name} produced a non-finite prediction; check input scales and the learning rate"
        )
    # target_y never meets the weights: any floating dtype is compared in the prediction's dtype
    loss = (masked_gaussian_nll(mean, stddev, target_y.to(mean.dtype), target_mask) if target_y is not None
            else None)
    return NeuralProcessOutput(loss=loss, mean=mean, stddev=stddev)


def density_normalised(signal: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """The SetConv's normalised channel h¹ = signal / (h⁰ + ε), `signal (B, N, y_dim)`, `density (B, N, 1)`.

    ε is 1e-8, or the smallest normal number of a half-precision dtype where 1e-8 rounds to 0 (float16: 6e-5): a
    point with no context in reach (h⁰ = 0, signal 0) then reads 0, not 0/0.
    """
    eps = max(1e-8, torch.finfo(density.dtype).tiny)
    return signal / (density + eps)


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """`dtype`, or float32 for a half-precision `dtype`: the dtype coordinates, neighbourhoods and the SetConv
    encoder compute in."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _can_read_values(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values on the host: not while `torch.compile` traces (a data-dependent
    branch breaks the graph) and not on the meta device (no values). The twin in `reynet/modeling_reynet.py` keeps
    each Hub code folder self-contained."""
    return tensor.device.type != "meta" and not torch.compiler.is_compiling()


def _check_mask(mask: torch.Tensor | None, name: str, shape: tuple[int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape (B, N) = {shape}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and _can_read_values(mask) and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} marks real points (1 / True) and padding (0 / False); it holds other values (e.g. "
                         f"0.5 or 2): pass a boolean mask, e.g. {name} > 0.5.")
    return mask.bool()


def compute_dtype(model: torch.nn.Module, given: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype the inputs must have: the weights' (`model.dtype`), or `None` (not checked) under FSDP2
    (`fully_shard`), whose parameters keep their sharded storage dtype while a mixed-precision policy runs the forward
    (and casts the inputs) in its own `param_dtype`. Inputs of the weights' dtype (`given`) skip the look-up, which
    walks every module. The twin in `reynet/modeling_reynet.py` keeps each Hub code folder self-contained."""
    dtype = model.dtype
    if given == dtype:
        return dtype
    fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules()):
        return None
    return dtype


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> None:
    # autocast casts float32 / half inputs for its matmuls, never float64
    if dtype is None or t.dtype == dtype or (torch.is_autocast_enabled(t.device.type) and t.dtype != torch.float64):
        return
    raise TypeError(
        f"{name} is {t.dtype} but the model's weights are {dtype}; cast the inputs with .to({dtype}) (for "
        f"NeuralProcessCollator: dtype={dtype}) or the model with model.to({t.dtype})"
    )


def check_inputs(
    context_x: torch.Tensor,
    context_y: torch.Tensor,
    target_x: torch.Tensor,
    context_mask: torch.Tensor | None,
    target_mask: torch.Tensor | None,
    target_y: torch.Tensor | None,
    x_dim: int,
    y_dim: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate shapes/dtypes/finiteness; return the masks as bool tensors (or None).

    `dtype` is the dtype of the model's weights: floating inputs of another dtype are refused with a message naming
    the fix (outside autocast, where they would fail later with an opaque matmul error).
    """
    for name, t in (("context_x", context_x), ("context_y", context_y), ("target_x", target_x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have shape (batch, points, dim), got {tuple(t.shape)}; add a batch axis with [None]"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; call .float()")
        _check_dtype(name, t, dtype)
        if _can_read_values(t) and not torch.isfinite(t).all():  # padding too: a masked point enters the sums
            raise ValueError(f"{name} contains NaN or inf; padded points too must be finite (fill them with 0, as "
                             "NeuralProcessCollator does)")
    b, nc, _ = context_x.shape
    if context_x.shape[-1] != x_dim or target_x.shape[-1] != x_dim:
        raise ValueError(
            f"context_x/target_x last dim must be config.x_dim={x_dim}, got {context_x.shape[-1]} and "
            f"{target_x.shape[-1]}"
        )
    if context_y.shape[:2] != (b, nc):
        raise ValueError(
            f"context_y must have shape (B, Nc, y_dim) = ({b}, {nc}, {y_dim}), got {tuple(context_y.shape)}"
        )
    if context_y.shape[-1] != y_dim:
        raise ValueError(f"context_y last dim must be config.y_dim={y_dim}, got {context_y.shape[-1]}")
    if target_x.shape[0] != b:
        raise ValueError(f"target_x batch size {target_x.shape[0]} differs from context_x batch size {b}")
    nt = target_x.shape[1]
    if nt == 0:
        raise ValueError("target_x has no points; pass at least one target")
    if target_y is not None:
        if not isinstance(target_y, torch.Tensor) or tuple(target_y.shape) != (b, nt, y_dim):
            shape = tuple(target_y.shape) if isinstance(target_y, torch.Tensor) else type(target_y).__name__
            raise ValueError(f"target_y must have shape (B, Nt, y_dim) = ({b}, {nt}, {y_dim}), got {shape}")
        if _can_read_values(target_y) and not torch.isfinite(target_y).all():
            raise ValueError("target_y contains NaN or inf")
    cm = _check_mask(context_mask, "context_mask", (b, nc))
    tm = _check_mask(target_mask, "target_mask", (b, nt))
    if tm is not None and _can_read_values(tm) and not tm.any(-1).all():
        raise ValueError("every task needs at least one valid target (a row of target_mask is all False)")
    return cm, tm


def uniform_grid(
    points: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    points_per_unit: float,
    margin: float,
    max_points: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D grid per task spanning all valid points ± `margin`, `points_per_unit` apart: `(B, G, 1)`, mask `(B, G)`.

    The grid starts at each task's own lower bound, so translating a task's inputs translates its grid: the
    discretisation is translation-equivariant (EquivCNP/ConvCNP 1-D discretisation, with 64 resp. 32 points per unit).
    """
    lows, highs = [], []
    for x, mask in points:
        if x.shape[-2] == 0:  # no context points: the grid spans the targets (the encoder gives zeros there)
            continue
        v = x[..., 0]
        m = torch.ones_like(v, dtype=torch.bool) if mask is None else mask
        lows.append(torch.where(m, v, torch.full_like(v, float("inf"))).amin(-1))
        highs.append(torch.where(m, v, torch.full_like(v, float("-inf"))).amax(-1))
    if not lows:
        raise ValueError("a task has no valid input point to place the grid around")
    lo = torch.stack(lows, -1).amin(-1) - margin  # (B,)
    hi = torch.stack(highs, -1).amax(-1) + margin
    if not torch.isfinite(lo).all():
        raise ValueError("a task has no valid input point to place the grid around")
    n = torch.ceil((hi - lo) * points_per_unit).long() + 1
    g = int(n.max())
    if g > max_points:
        raise ValueError(
            f"the inputs span {float((hi - lo).max()):.3g} units, which needs {g} grid points > max_grid_points="
            f"{max_points}; rescale x or raise config.max_grid_points"
        )
    i = torch.arange(g, device=lo.device, dtype=lo.dtype)
    grid = lo[:, None] + i[None, :] / points_per_unit
    return grid[..., None], i[None, :] < n[:, None]


class NeuralProcessCollator:
    """Pads a list of tasks into a batch for `Trainer`.

    Each feature is a mapping with `context_x (Nc, x_dim)`, `context_y (Nc, y_dim)`, `target_x (Nt, x_dim)` and
    optionally `target_y (Nt, y_dim)` (tensors, arrays or nested lists). Returns the padded tensors plus
    `context_mask (B, Nc_max)` and `target_mask (B, Nt_max)`, ready for `model(**batch)`. Either every task has
    `target_y` (training, evaluation) or none has (prediction); a batch without it also carries `return_loss=False`,
    so that `Trainer.predict` runs the model without asking it for a loss.

    Args:
        dtype (`torch.dtype`, *optional*): floating dtype of the batch, that of the model's weights. Defaults to
            `torch.get_default_dtype()` (float32 unless changed), the dtype the models are built in, so float64
            NumPy arrays become float32; pass `dtype=torch.float64` for a model in float64.
    """

    keys = ("context_x", "context_y", "target_x", "target_y")

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
        self.dtype = dtype

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor | bool]:
        if not features:
            raise ValueError("cannot collate an empty list of tasks")
        keys = self._present_keys(features)
        items = {key: [self._as_tensor(f[key], key) for f in features] for key in keys}
        dtype = self.dtype or torch.get_default_dtype()
        out: dict[str, torch.Tensor | bool] = {}
        for key in keys:
            try:
                batch, mask = _pad([t.to(dtype) for t in items[key]])
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
            out[key] = batch
            if key in ("context_x", "target_x"):
                out[key.replace("_x", "_mask")] = mask
        if "target_y" not in keys:
            out["return_loss"] = False
        return out

    def _present_keys(self, features: Sequence[Mapping[str, Any]]) -> list[str]:
        """The keys to collate; raises when a required key is missing or `target_y` is given for only some tasks."""
        for i, f in enumerate(features):
            for key in self.keys[:3]:
                if key not in f:
                    raise ValueError(f"each task needs {key!r}; task {i} of this batch has keys {sorted(f)}")
        named = sorted({key for f in features for key in ("labels", "label", "y") if key in f and "target_y" not in f})
        if named:  # HF-style target names would be dropped silently, and training would fail on a missing loss
            raise ValueError(f"tasks carry {', '.join(repr(k) for k in named)}: a neural process's targets are "
                             "'target_y' (Nt, y_dim), the values at target_x; rename the key to target_y")
        with_y = [i for i, f in enumerate(features) if "target_y" in f]
        if 0 < len(with_y) < len(features):
            without = [i for i in range(len(features)) if i not in set(with_y)]
            raise ValueError(
                f"target_y is given for tasks {with_y} but missing for tasks {without} of this batch; give it for "
                "every task (training, evaluation) or for none (prediction)"
            )
        return list(self.keys if with_y else self.keys[:3])

    @staticmethod
    def _as_tensor(value: Any, key: str) -> torch.Tensor:
        t = torch.as_tensor(value)
        if t.dim() != 2:
            raise ValueError(f"{key} of one task must have shape (points, dim), got {tuple(t.shape)}")
        return t


def _pad(items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad tasks `(N_i, d)` to `(B, N_max, d)`, with the mask `(B, N_max)` of real points."""
    widths = sorted({t.shape[1] for t in items})
    if len(widths) > 1:
        raise ValueError(f"the tasks of a batch must share the feature dimension, got {widths}")
    n = max(t.shape[0] for t in items)
    batch = items[0].new_zeros(len(items), n, items[0].shape[1])
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, t in enumerate(items):
        batch[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return batch, mask
