"""Configurations of EquivCNP (Kawano et al., ICLR 2021) and its CNP / ConvCNP baselines."""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["EquivCNPConfig", "CNPConfig", "ConvCNPConfig", "GROUP_X_DIM"]

# space each group acts on
GROUP_X_DIM = {"T1": 1, "T2": 2, "SO2": 2, "RxSO2": 2, "SE2": 2}
_DISCRETISATIONS = ("grid", "context_and_targets", "targets")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


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
        grid_margin (`float`, *optional*, defaults to 0.1): the grid extends this far beyond the data.
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
        if group not in GROUP_X_DIM:
            raise ValueError(f"group must be one of {sorted(GROUP_X_DIM)}, got {group!r}")
        if x_dim is None:
            x_dim = GROUP_X_DIM[group]
        if x_dim != GROUP_X_DIM[group]:
            raise ValueError(f"group {group} acts on R^{GROUP_X_DIM[group]}, so x_dim must be {GROUP_X_DIM[group]}, got {x_dim}")
        if discretisation is None:
            discretisation = "grid" if group == "T1" else "context_and_targets"
        if discretisation not in _DISCRETISATIONS:
            raise ValueError(f"discretisation must be one of {_DISCRETISATIONS}, got {discretisation!r}")
        if discretisation == "grid" and group != "T1":
            raise ValueError("discretisation='grid' is only translation-equivariant in 1-D; use it with group='T1'")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.group = group
        self.x_dim = x_dim
        self.y_dim = _positive_int("y_dim", y_dim)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.kernel_channels = _positive_int("kernel_channels", kernel_channels)
        self.kernel_hidden = _positive_int("kernel_hidden", kernel_hidden)
        self.num_neighbours = _positive_int("num_neighbours", num_neighbours)
        self.radius = _positive_float("radius", radius)
        self.encoder_neighbours = _positive_int("encoder_neighbours", encoder_neighbours)
        self.encoder_length_scale = _positive_float("encoder_length_scale", encoder_length_scale)
        self.discretisation = discretisation
        self.points_per_unit = _positive_float("points_per_unit", points_per_unit)
        self.grid_margin = float(grid_margin)
        self.max_grid_points = _positive_int("max_grid_points", max_grid_points)
        self.pair_scale = _positive_float("pair_scale", pair_scale) if pair_scale is not None else 1.0 / self.radius
        self.alpha = float(alpha)
        self.min_std = _positive_float("min_std", min_std)
        super().__init__(**kwargs)


class CNPConfig(PreTrainedConfig):
    r"""Configuration of [`CNPModel`] (Garnelo et al. 2018; the EquivCNP paper's CNP baseline).

    Args:
        x_dim (`int`, *optional*, defaults to 1), y_dim (`int`, *optional*, defaults to 1): data dimensions.
        hidden_size (`int`, *optional*, defaults to 128): width of encoder and decoder MLPs.
        encoder_layers (`int`, *optional*, defaults to 4), decoder_layers (`int`, *optional*, defaults to 3): depths.
        min_std (`float`, *optional*, defaults to 0.1): σ = min_std + (1 - min_std)·softplus(·) as in the baseline.
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
        self.x_dim = _positive_int("x_dim", x_dim)
        self.y_dim = _positive_int("y_dim", y_dim)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.encoder_layers = _positive_int("encoder_layers", encoder_layers)
        self.decoder_layers = _positive_int("decoder_layers", decoder_layers)
        self.min_std = _positive_float("min_std", min_std)
        if self.min_std >= 1:
            raise ValueError(f"min_std must be < 1, got {min_std}")
        super().__init__(**kwargs)


class ConvCNPConfig(PreTrainedConfig):
    r"""Configuration of [`ConvCNPModel`] (Gordon et al. 2020), the 1-D on-the-grid baseline of the EquivCNP paper:
    RBF ConvDeepSet onto a uniform grid, a Conv1d stack, RBF interpolation back to the targets.
    For 2-D (images) use `EquivCNPConfig(group="T2")`, which is a ConvCNP on point sets.

    Args:
        y_dim (`int`, *optional*, defaults to 1): output dimension.
        channels (`list[int]`, *optional*, defaults to `[16, 32, 16, 8]`): Conv1d widths after an 8-wide embedding.
        kernel_size (`int`, *optional*, defaults to 5): odd Conv1d kernel size.
        points_per_unit (`float`, *optional*, defaults to 32): grid density.
        grid_margin (`float`, *optional*, defaults to 0.1), max_grid_points (`int`, *optional*, defaults to 4096): grid.
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
        if x_dim != 1:
            raise ValueError(
                f"ConvCNPConfig is the 1-D on-the-grid ConvCNP, so x_dim must be 1, got {x_dim!r}; for 2-D inputs use "
                "EquivCNPConfig(group='T2'), a ConvCNP on point sets"
            )
        self.x_dim = 1
        self.y_dim = _positive_int("y_dim", y_dim)
        self.channels = [_positive_int("channels[i]", c) for c in channels]
        if not self.channels:
            raise ValueError("channels must list at least one Conv1d width")
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred kernels keep the grid aligned), got {kernel_size}")
        self.points_per_unit = _positive_float("points_per_unit", points_per_unit)
        self.grid_margin = float(grid_margin)
        self.max_grid_points = _positive_int("max_grid_points", max_grid_points)
        self.min_std = _positive_float("min_std", min_std)
        super().__init__(**kwargs)
