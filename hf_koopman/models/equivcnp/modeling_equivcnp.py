"""EquivCNP (Kawano, Kumagai, Sannai, Iwasawa, Matsuo; ICLR 2021) on our LieConv, as a `PreTrainedModel`.

Φ(Z) = ρ(E(Z)) (the paper's decomposition theorem, the group analogue of ConvDeepSets):

1. **Discretisation** D of the input space: a uniform grid over the data (T(1)), or the context ∪ target points, or the
   targets. Every choice moves with the data under the group, so nothing here breaks equivariance.
2. **E (ConvDeepSet):** `h⁰(u) = Σ_c ψ(d_G(u, x_c))`, `h¹(u) = Σ_c ψ(d_G(u, x_c)) y_c / (h⁰(u) + ε)` with
   ψ(d) = exp(-d²/2ℓ²) and d_G the group distance (invariant). Power features φ(y) = (1, y), i.e. multiplicity K = 1
   as in the EquivCNP code. Using d_G instead of the Euclidean RBF makes E invariant under scaling for R×SO(2).
3. **ρ:** `Linear(1 + y_dim → C)` then `num_layers` LieConv residual blocks on D. On the T(1) grid, the blocks run as
   depthwise 1-D convolutions (`LieConv.forward_grid`): the same sum, with the kernel MLP evaluated once per grid
   offset instead of once per (query, key) pair (3.5-4× faster per training step on CPU). It is used only when the
   k-nearest cut leaves the window whole, where both routes compute the same function.
4. **Read-out:** a LieConv from D to the targets, then an MLP to mean and σ = min_std + softplus(·).

Unlike the released 1-D model, no raw coordinate enters the features (it broke translation equivariance), and there
is no random subsampling or batch norm, so the model is deterministic and equivariant in train and eval mode alike:
exactly (up to floating-point rounding) as long as the k-nearest cuts drop no point that carries weight. Each LieConv
keeps at most `num_neighbours` points of its window and the encoder at most `encoder_neighbours` context points; when
a cut falls inside a window, which of several equidistant points are kept depends on their order (common on pixel
grids) and equivariance is approximate. The model warns when `num_neighbours` truncates a LieConv window.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils import logging as hf_logging

from .configuration_equivcnp import CNPConfig, ConvCNPConfig, EquivCNPConfig
from .groups import get_group
from .lieconv import LieConv, LieConvBlock, Neighbourhood, build_neighbourhood, gather_points, grid_stencil_half_width
from .neural_process import (
    NeuralProcessOutput,
    check_inputs,
    compute_dtype,
    density_normalised,
    gaussian_prediction,
    uniform_grid,
    upcast_dtype,
)

__all__ = ["EquivCNPPreTrainedModel", "EquivCNPModel"]

# stdlib logger (this file is also Hub remote code, so it cannot import hf_koopman); warnings follow the transformers
# verbosity, as hf_koopman's own loggers do
logger = logging.getLogger(__name__)


class EquivCNPPreTrainedModel(PreTrainedModel):
    config_class = EquivCNPConfig
    base_model_prefix = "equivcnp"
    main_input_name = "context_x"
    accepts_loss_kwargs = False  # the loss is a per-point mean; let the Trainer scale for gradient accumulation

    def __init__(self, config: EquivCNPConfig | CNPConfig | ConvCNPConfig, *inputs, **kwargs) -> None:
        # the config checked itself in its __init__, but `from_pretrained(path, **overrides)` sets the overrides
        # afterwards with setattr (and a field may be changed by hand): check again before any layer is built
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with a warning when an override (`group="SE2"`, or a `config=` whose
        group differs) loaded weights trained for another symmetry group: the layers are then equivariant to the new
        group, but the weights compute a different function from the one they were trained for."""
        config = kwargs.get("config")
        asked = kwargs.get("group", getattr(config, "group", None) if config is not None else None)
        saved = None
        # a checkpoint folder or Hub id whose config.json says what the weights were trained for (not weights passed
        # as state_dict= with the path None)
        if (asked is not None and pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None
                and not isinstance(config, str)):
            hub = {key: kwargs[key] for key in ("cache_dir", "force_download", "local_files_only", "token",
                                                 "revision", "subfolder") if key in kwargs}
            try:
                saved = cls.config_class.get_config_dict(pretrained_model_name_or_path, **hub)[0].get("group")
            except (OSError, ValueError):  # no readable config next to the weights: nothing to compare with
                saved = None
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if saved is not None and saved != asked:
            logger.warning(
                "%s.from_pretrained: the weights in %s were trained for group=%r and are loaded into a model for "
                "group=%r; they keep their values but compute a different function, so treat the result as an "
                "initialisation to fine-tune. To train a %r model from scratch, build it from the config instead: "
                "%s(%s.from_pretrained(path, group=%r)).", cls.__name__, pretrained_model_name_or_path, saved,
                asked, asked, cls.__name__, cls.config_class.__name__, asked)
        return model

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default (Kaiming-uniform weights, uniform biases): zero biases leave the kernel MLPs nearly
        # constant at initialisation, and the model then barely reacts to the context. Loaded weights are skipped by
        # transformers' guarded init functions.
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            module.reset_parameters()


class EquivCNPModel(EquivCNPPreTrainedModel):
    """Group-equivariant conditional neural process.

    Set `model.grid_convolution = False` to force the generic pairwise LieConv on the T(1) grid (for checks).

    Example:

    ```python
    >>> import torch
    >>> from hf_koopman import EquivCNPConfig, EquivCNPModel
    >>> model = EquivCNPModel(EquivCNPConfig(group="T1")).eval()
    >>> out = model(torch.rand(2, 10, 1), torch.randn(2, 10, 1), torch.linspace(-1, 1, 50).expand(2, 50)[..., None])
    >>> out.mean.shape, out.stddev.shape
    (torch.Size([2, 50, 1]), torch.Size([2, 50, 1]))
    ```
    """

    grid_convolution: bool = True

    def __init__(self, config: EquivCNPConfig) -> None:
        super().__init__(config)
        self.group = get_group(config.group, config.alpha)
        e = self.group.embed_dim
        c = config.hidden_size
        self.log_length_scale = nn.Parameter(torch.tensor(math.log(config.encoder_length_scale)))
        self.embed = nn.Linear(1 + config.y_dim, c)
        self.blocks = nn.ModuleList(
            LieConvBlock(c, e, config.radius, config.kernel_channels, config.kernel_hidden)
            for _ in range(config.num_layers)
        )
        self.readout = LieConv(c, c, e, config.radius, config.kernel_channels, config.kernel_hidden)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 2 * config.y_dim))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            from transformers import initialization as init

            init.constant_(self.log_length_scale, math.log(self.config.encoder_length_scale))

    def discretise(
        self,
        context_x: torch.Tensor,
        target_x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The points ρ runs on: `(B, Nd, x_dim)` and their mask `(B, Nd)`."""
        cfg = self.config
        b = context_x.shape[0]
        ones = lambda x: torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)  # noqa: E731
        cm = ones(context_x) if context_mask is None else context_mask
        tm = ones(target_x) if target_mask is None else target_mask
        if cfg.discretisation == "grid":
            return uniform_grid(
                [(context_x, cm), (target_x, tm)], cfg.points_per_unit, cfg.grid_margin, cfg.max_grid_points
            )
        if cfg.discretisation == "targets":
            return target_x, tm
        return torch.cat([context_x, target_x], 1), torch.cat([cm, tm], 1)

    def encode(
        self, points: torch.Tensor, context_x: torch.Tensor, context_y: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """ConvDeepSet E(Z) at `points (B, Nd, x_dim)` -> `(B, Nd, 1 + y_dim)` = [density h⁰, normalised signal h¹]."""
        if context_x.shape[1] == 0:
            return points.new_zeros(*points.shape[:2], 1 + self.config.y_dim)
        nb = build_neighbourhood(self.group, points, context_x, self.config.encoder_neighbours, context_mask)
        up = upcast_dtype(points.dtype)  # see ConvCNPModel.forward: the density ratio needs float32 at least
        ell = self.log_length_scale.to(up).exp()
        psi = torch.exp(-0.5 * (nb.distance.to(up).clamp(max=1e4) / ell) ** 2) * nb.valid  # (B, Nd, k)
        h0 = psi.sum(-1, keepdim=True)
        h1 = density_normalised((psi[..., None] * gather_points(context_y.to(up), nb.index)).sum(-2), h0)
        return torch.cat([h0, h1], -1).to(points.dtype)

    def uses_grid_convolution(self) -> bool:
        """Whether ρ runs as 1-D convolutions: T(1) grid, and `num_neighbours` covers every grid offset inside
        `radius` (otherwise the pairwise route truncates the window and the two would differ)."""
        cfg = self.config
        if not self.grid_convolution or cfg.group != "T1" or cfg.discretisation != "grid":
            return False
        return cfg.num_neighbours >= 2 * grid_stencil_half_width(cfg.radius, 1.0 / cfg.points_per_unit) + 1

    def _watching_truncation(self) -> bool:
        """Whether the truncation check still runs: until it warned once, and while warnings are shown."""
        return not getattr(self, "_warned_truncation", False) and hf_logging.get_verbosity() <= logging.WARNING

    def _check_truncation(self, windows: list[tuple[Neighbourhood, torch.Tensor | None]]) -> None:
        """Warn (once per model) when the k-nearest cut drops points inside a LieConv window: a real query then has
        more valid keys within `radius` than `num_neighbours`, which of them are kept depends on the order of
        equidistant points, and equivariance is no longer exact. `windows` pairs each neighbourhood with the mask
        `(B, Nq)` of its real queries (None: all). The message gives the share of truncated queries and the
        `num_neighbours` that keeps every window whole for these inputs."""
        if not self._watching_truncation():
            return
        counts, cut = [], []
        for nb, query_mask in windows:
            if nb.cut is None:
                return
            real = torch.ones_like(nb.cut) if query_mask is None else query_mask
            cut.append(nb.cut[real])
            if nb.in_radius is not None:
                counts.append(nb.in_radius[real])
        cut_all = torch.cat(cut)
        if not bool(cut_all.any()):
            return
        frac = float(cut_all.float().mean())
        needed = int(torch.cat(counts).max())
        self._warned_truncation = True
        logger.warning(
            "EquivCNP: num_neighbours=%d truncates the LieConv window (radius=%.3g) for %.3g%% of the query points, "
            "which have up to %d valid points inside the radius; where points are equidistant at the cut (e.g. on a "
            "pixel grid) the result depends on their order and equivariance may not be exact. Set "
            "config.num_neighbours >= %d or lower config.radius.",
            self.config.num_neighbours, self.config.radius, 100 * frac, needed, needed,
        )

    @can_return_tuple
    def forward(
        self,
        context_x: torch.Tensor,
        context_y: torch.Tensor,
        target_x: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        target_y: torch.Tensor | None = None,
        return_loss: bool = True,
    ) -> NeuralProcessOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            context_x (`torch.FloatTensor` of shape `(B, Nc, x_dim)`): context inputs.
            context_y (`torch.FloatTensor` of shape `(B, Nc, y_dim)`): context outputs.
            target_x (`torch.FloatTensor` of shape `(B, Nt, x_dim)`): where to predict.
            context_mask (`torch.BoolTensor` of shape `(B, Nc)`, *optional*): True for real context points.
            target_mask (`torch.BoolTensor` of shape `(B, Nt)`, *optional*): True for real targets.
            target_y (`torch.FloatTensor` of shape `(B, Nt, y_dim)`, *optional*): if given, `loss` is the Gaussian NLL
                per valid target point.
            return_loss (`bool`, *optional*, defaults to `True`): compute `loss` when `target_y` is given; `False`
                skips it. The `True` default is how `transformers.Trainer` learns that the model computes its own
                loss (`can_return_loss`), so `evaluate()` reports `eval_loss` although the target is not called
                `labels`.

        Returns:
            With `return_dict=False` (a keyword of `transformers.utils.can_return_tuple`; default
            `config.return_dict`) the tuple `(loss, mean, stddev)`, or `(mean, stddev)` without a loss; else
            [`NeuralProcessOutput`] with `mean` and `stddev` of shape `(B, Nt, y_dim)` and `loss`.
        """
        cfg = self.config
        context_mask, target_mask = check_inputs(
            context_x, context_y, target_x, context_mask, target_mask, target_y, cfg.x_dim, cfg.y_dim,
            compute_dtype(self, getattr(context_x, "dtype", None)),
        )
        # coordinates, neighbourhoods and the encoder run in float32 at least: in half precision a coordinate of 4
        # is resolved to 0.03 (bfloat16), the grid's spacing, and the encoder's density ratio underflows
        up = upcast_dtype(context_x.dtype)
        context_x, target_x = context_x.to(up), target_x.to(up)
        points, point_mask = self.discretise(context_x, target_x, context_mask, target_mask)
        h = self.embed(self.encode(points, context_x, context_y, context_mask).to(self.embed.weight.dtype))
        windows = []
        radius = cfg.radius if self._watching_truncation() else None  # counts keys in the window only while needed
        if self.uses_grid_convolution():
            spacing = 1.0 / cfg.points_per_unit
            for block in self.blocks:
                h = block.forward_grid(h, point_mask, self.group, spacing, cfg.pair_scale)
        else:
            nb = build_neighbourhood(
                self.group, points, points, cfg.num_neighbours, point_mask, cfg.pair_scale, radius
            )
            windows.append((nb, point_mask))
            for block in self.blocks:
                h = block(h, nb)
        nb_out = build_neighbourhood(
            self.group, target_x, points, cfg.num_neighbours, point_mask, cfg.pair_scale, radius
        )
        self._check_truncation(windows + [(nb_out, target_mask)])
        raw = self.head(self.readout(h, nb_out))
        mean, raw_std = raw.split(cfg.y_dim, dim=-1)
        stddev = cfg.min_std + nn.functional.softplus(raw_std)
        return gaussian_prediction("EquivCNP", mean, stddev, target_y if return_loss else None, target_mask)
