"""Configurations of EquivCNP (Kawano et al., ICLR 2021) and its CNP / ConvCNP baselines.

Each config checks its fields in `validate()`. `__init__` calls it, and so do the models before they build their
layers: transformers applies the keyword overrides of `from_pretrained(path, **kwargs)` with `setattr` after
`__init__`, and a field may be changed by hand, so a check in `__init__` alone would miss both.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

__all__ = ["EquivCNPConfig", "CNPConfig", "ConvCNPConfig", "GROUP_X_DIM"]

# space each group acts on
GROUP_X_DIM = {"T1": 1, "T2": 2, "SO2": 2, "RxSO2": 2, "SE2": 2}
_DISCRETISATIONS = ("grid", "context_and_targets", "targets")


def _is_int(value: object) -> bool:
    """An int that is not a bool (`True` is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float that is not a bool; strings such as `"0.3"` are refused, not converted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _string_hint(value: object) -> str:
    return "; pass the number itself, not a string" if isinstance(value, str) else ""


def _check_positive_int(owner: str, name: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}{_string_hint(value)}")


def _check_positive_number(owner: str, name: str, value: object) -> None:
    if not _is_number(value) or not value > 0:
        raise ValueError(
            f"{owner}: {name} must be a positive finite number (int or float), got {value!r}{_string_hint(value)}"
        )


def _check_grid_margin(owner: str, value: object) -> None:
    # a negative margin shrinks the grid inside the data (targets beyond it read a truncated field) and, past half
    # the data's extent, leaves no grid at all
    if not _is_number(value) or value < 0:
        raise ValueError(
            f"{owner}: grid_margin must be a non-negative finite number (how far the grid extends beyond the data), "
            f"got {value!r}{_string_hint(value)}; the default is 0.1"
        )


def _as_floats(config: PreTrainedConfig, names: tuple[str, ...]) -> None:
    """Store validated numbers as floats, so that an int given for a float field saves and reloads the same."""
    for name in names:
        setattr(config, name, float(getattr(config, name)))


class EquivCNPConfig(PreTrainedConfig):
    r"""Configuration of [`EquivCNPModel`].

    The model is Φ(Z) = ρ(E(Z)) (the EquivCNP decomposition): E is a ConvDeepSet with a G-invariant kernel
    ψ(d_G(u, x_c)) giving a density and a normalised signal channel on a discretisation of the input space, ρ is a
    stack of LieConv residual blocks, and a final LieConv reads out at the targets.

    Args:
        group (`str`, *optional*, defaults to `"T1"`): one of `"T1"`, `"T2"`, `"SO2"`, `"RxSO2"`, `"SE2"`.
        x_dim (`int`, *optional*): input dimension; inferred from `group` (1 for T1, else 2) and checked.
        y_dim (`int`, *optional*, defaults to 1): output dimension (channels of the field).
        hidden_size (`int`, *optional*, defaults to 32): channels of ρ.
        num_layers (`int`, *optional*, defaults to 4): LieConv residual blocks in ρ.
        kernel_channels (`int`, *optional*, defaults to 16): output width M of the kernel MLP (PointConv trick).
        kernel_hidden (`int`, *optional*, defaults to 32): hidden width of the kernel MLP.
        num_neighbours (`int`, *optional*, defaults to 20): neighbourhood size k of each LieConv (cost bound). A
            window holding more points is truncated, which makes equivariance approximate; the model warns then.
        radius (`float`, *optional*, defaults to 0.25): window radius of each LieConv, in group distance.
        encoder_neighbours (`int`, *optional*, defaults to 16): context points seen by each discretisation point (the
            nearest ones; the encoder kernel ψ is not compactly supported, so a larger value is closer to exact).
        encoder_length_scale (`float`, *optional*, defaults to 0.05): initial length scale of the encoder kernel ψ
            (learned).
        discretisation (`str`, *optional*): `"grid"` (uniform 1-D grid over the data, T1 only; default for T1),
            `"context_and_targets"` (default otherwise) or `"targets"` (when the targets cover the context, e.g. all
            pixels of an image).
        points_per_unit (`float`, *optional*, defaults to 32): grid density for `"grid"`.
        grid_margin (`float`, *optional*, defaults to 0.1): the grid extends this far beyond the data (>= 0).
        max_grid_points (`int`, *optional*, defaults to 4096): refuse inputs needing a larger grid.
        pair_scale (`float`, *optional*): multiplies the Lie-algebra part of the kernel input; default `1/radius`
            (kernel inputs in [-1, 1]).
        alpha (`float`, *optional*, defaults to 0.3): weight of the Lie-algebra part in the group distance.
        min_std (`float`, *optional*, defaults to 0.005): floor of the predictive standard deviation.
    """

    model_type = "equivcnp"

    def __init__(
        self,
        group: str = "T1",
        x_dim: int | None = None,
        y_dim: int = 1,
        hidden_size: int = 32,
        num_layers: int = 4,
        kernel_channels: int = 16,
        kernel_hidden: int = 32,
        num_neighbours: int = 20,
        radius: float = 0.25,
        encoder_neighbours: int = 16,
        encoder_length_scale: float = 0.05,
        discretisation: str | None = None,
        points_per_unit: float = 32.0,
        grid_margin: float = 0.1,
        max_grid_points: int = 4096,
        pair_scale: float | None = None,
        alpha: float = 0.3,
        min_std: float = 0.005,
        **kwargs,
    ) -> None:
        self.group = group
        # defaults that depend on other fields; an invalid group or radius leaves them unset for validate() to name
        self.x_dim = GROUP_X_DIM.get(group) if x_dim is None and isinstance(group, str) else x_dim
        self.y_dim = y_dim
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.kernel_channels = kernel_channels
        self.kernel_hidden = kernel_hidden
        self.num_neighbours = num_neighbours
        self.radius = radius
        self.encoder_neighbours = encoder_neighbours
        self.encoder_length_scale = encoder_length_scale
        if discretisation is None:
            discretisation = "grid" if group == "T1" else "context_and_targets"
        self.discretisation = discretisation
        self.points_per_unit = points_per_unit
        self.grid_margin = grid_margin
        self.max_grid_points = max_grid_points
        if pair_scale is None and _is_number(radius) and radius > 0:
            pair_scale = 1.0 / radius
        self.pair_scale = pair_scale
        self.alpha = alpha
        self.min_std = min_std
        super().__init__(**kwargs)
        self.validate()
        _as_floats(
            self, ("radius", "encoder_length_scale", "points_per_unit", "grid_margin", "pair_scale", "alpha", "min_std")
        )

    def validate(self) -> None:
        """Check every field (type and range) and raise a `ValueError` naming the field, the value and the fix.

        Runs in `__init__`, in the models' `__init__` (which catches overrides applied after construction, such as
        `from_pretrained(path, num_neighbours=64)`) and in `save_pretrained`.
        """
        super().validate()
        owner = type(self).__name__
        if not isinstance(self.group, str) or self.group not in GROUP_X_DIM:
            raise ValueError(f"{owner}: group must be one of {sorted(GROUP_X_DIM)}, got {self.group!r}")
        d = GROUP_X_DIM[self.group]
        if not _is_int(self.x_dim) or self.x_dim != d:
            raise ValueError(
                f"{owner}: group {self.group!r} acts on R^{d}, so x_dim must be {d}, got {self.x_dim!r}; leave x_dim "
                "unset to infer it from the group"
            )
        for name in ("y_dim", "hidden_size", "num_layers", "kernel_channels", "kernel_hidden", "num_neighbours",
                     "encoder_neighbours", "max_grid_points"):
            _check_positive_int(owner, name, getattr(self, name))
        for name in ("radius", "encoder_length_scale", "points_per_unit", "pair_scale", "min_std"):
            _check_positive_number(owner, name, getattr(self, name))
        _check_grid_margin(owner, self.grid_margin)
        if not _is_number(self.alpha) or not 0 < self.alpha <= 1:
            raise ValueError(
                f"{owner}: alpha must be a number in (0, 1] (the weight of the Lie-algebra part of the group "
                f"distance), got {self.alpha!r}{_string_hint(self.alpha)}; the default is 0.3"
            )
        if not isinstance(self.discretisation, str) or self.discretisation not in _DISCRETISATIONS:
            raise ValueError(f"{owner}: discretisation must be one of {_DISCRETISATIONS}, got {self.discretisation!r}")
        if self.discretisation == "grid" and self.group != "T1":
            raise ValueError(
                f"{owner}: discretisation='grid' is only translation-equivariant in 1-D; use it with group='T1' (got "
                f"group={self.group!r}), or discretisation='context_and_targets'"
            )


class CNPConfig(PreTrainedConfig):
    r"""Configuration of [`CNPModel`] (Garnelo et al. 2018; the EquivCNP paper's CNP baseline).

    Args:
        x_dim (`int`, *optional*, defaults to 1): input dimension.
        y_dim (`int`, *optional*, defaults to 1): output dimension.
        hidden_size (`int`, *optional*, defaults to 128): width of encoder and decoder MLPs.
        encoder_layers (`int`, *optional*, defaults to 4): depth of the encoder MLP.
        decoder_layers (`int`, *optional*, defaults to 3): depth of the decoder MLP.
        min_std (`float`, *optional*, defaults to 0.1): σ = min_std + (1 - min_std)·softplus(·) as in the baseline;
            in (0, 1).
    """

    model_type = "cnp"

    def __init__(
        self,
        x_dim: int = 1,
        y_dim: int = 1,
        hidden_size: int = 128,
        encoder_layers: int = 4,
        decoder_layers: int = 3,
        min_std: float = 0.1,
        **kwargs,
    ) -> None:
        self.x_dim = x_dim
        self.y_dim = y_dim
        self.hidden_size = hidden_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.min_std = min_std
        super().__init__(**kwargs)
        self.validate()
        _as_floats(self, ("min_std",))

    def validate(self) -> None:
        """Check every field (type and range) and raise a `ValueError` naming the field, the value and the fix.

        Runs in `__init__`, in the model's `__init__` (which catches overrides applied after construction) and in
        `save_pretrained`.
        """
        super().validate()
        owner = type(self).__name__
        for name in ("x_dim", "y_dim", "hidden_size", "encoder_layers", "decoder_layers"):
            _check_positive_int(owner, name, getattr(self, name))
        _check_positive_number(owner, "min_std", self.min_std)
        if self.min_std >= 1:
            raise ValueError(
                f"{owner}: min_std must be < 1 (σ = min_std + (1 - min_std)·softplus), got {self.min_std!r}; the "
                "default is 0.1"
            )


class ConvCNPConfig(PreTrainedConfig):
    r"""Configuration of [`ConvCNPModel`] (Gordon et al. 2020), the 1-D on-the-grid baseline of the EquivCNP paper:
    RBF ConvDeepSet onto a uniform grid, a Conv1d stack, RBF interpolation back to the targets.
    For 2-D (images) use `EquivCNPConfig(group="T2")`, which is a ConvCNP on point sets.

    Args:
        y_dim (`int`, *optional*, defaults to 1): output dimension.
        channels (`list[int]`, *optional*, defaults to `[16, 32, 16, 8]`): Conv1d widths after an 8-wide embedding.
        kernel_size (`int`, *optional*, defaults to 5): odd Conv1d kernel size.
        points_per_unit (`float`, *optional*, defaults to 32): grid density.
        grid_margin (`float`, *optional*, defaults to 0.1): margin of the grid around the data (>= 0).
        max_grid_points (`int`, *optional*, defaults to 4096): refuse inputs needing a larger grid.
        min_std (`float`, *optional*, defaults to 0.005): floor of the predictive standard deviation.
        x_dim (`int`, *optional*, defaults to 1): input dimension; accepted for symmetry with the other configs and
            must be 1.
    """

    model_type = "convcnp"

    def __init__(
        self,
        y_dim: int = 1,
        channels: list[int] | tuple[int, ...] = (16, 32, 16, 8),
        kernel_size: int = 5,
        points_per_unit: float = 32.0,
        grid_margin: float = 0.1,
        max_grid_points: int = 4096,
        min_std: float = 0.005,
        x_dim: int = 1,
        **kwargs,
    ) -> None:
        self.x_dim = x_dim
        self.y_dim = y_dim
        # a list copy: JSON reloads a list, so a saved and reloaded config compares equal
        self.channels = list(channels) if isinstance(channels, (list, tuple)) else channels
        self.kernel_size = kernel_size
        self.points_per_unit = points_per_unit
        self.grid_margin = grid_margin
        self.max_grid_points = max_grid_points
        self.min_std = min_std
        super().__init__(**kwargs)
        self.validate()
        _as_floats(self, ("points_per_unit", "grid_margin", "min_std"))

    def validate(self) -> None:
        """Check every field (type and range) and raise a `ValueError` naming the field, the value and the fix.

        Runs in `__init__`, in the model's `__init__` (which catches overrides applied after construction) and in
        `save_pretrained`.
        """
        super().validate()
        owner = type(self).__name__
        if not _is_int(self.x_dim) or self.x_dim != 1:
            raise ValueError(
                f"{owner} is the 1-D on-the-grid ConvCNP, so x_dim must be 1, got {self.x_dim!r}; for 2-D inputs use "
                "EquivCNPConfig(group='T2'), a ConvCNP on point sets"
            )
        _check_positive_int(owner, "y_dim", self.y_dim)
        channels = self.channels
        if not isinstance(channels, (list, tuple)) or not all(_is_int(c) and c >= 1 for c in channels):
            fix = f"channels=[{channels}] for one layer" if _is_int(channels) and channels >= 1 else "[16, 32, 16, 8]"
            raise ValueError(
                f"{owner}: channels must be a list of positive ints (the Conv1d widths), got {channels!r}; pass e.g. "
                f"{fix}"
            )
        if not channels:
            raise ValueError(f"{owner}: channels must list at least one Conv1d width, e.g. channels=[16, 32, 16, 8]")
        _check_positive_int(owner, "kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"{owner}: kernel_size must be odd (centred kernels keep the grid aligned), got {self.kernel_size!r}; "
                f"use e.g. {self.kernel_size + 1}"
            )
        _check_positive_number(owner, "points_per_unit", self.points_per_unit)
        _check_grid_margin(owner, self.grid_margin)
        _check_positive_int(owner, "max_grid_points", self.max_grid_points)
        _check_positive_number(owner, "min_std", self.min_std)
