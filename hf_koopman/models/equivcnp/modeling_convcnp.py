"""On-the-grid 1-D ConvCNP (Gordon et al. 2020): the EquivCNP paper's ConvCNP baseline, as a `PreTrainedModel`.

RBF ConvDeepSet onto a uniform grid (h⁰, h¹/h⁰), `Linear(2 → 8)` + sigmoid, a Conv1d stack with ReLU, then RBF
interpolation back to the targets and linear heads for mean and σ = min_std + softplus(·). The released baseline also
fed the raw grid coordinate into the features; we do not, so this model is exactly translation-equivariant.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.utils import can_return_tuple

from .configuration_equivcnp import ConvCNPConfig
from .modeling_equivcnp import EquivCNPPreTrainedModel
from .neural_process import (
    NeuralProcessOutput,
    check_inputs,
    compute_dtype,
    density_normalised,
    gaussian_prediction,
    uniform_grid,
    upcast_dtype,
)

__all__ = ["ConvCNPModel"]


class ConvCNPModel(EquivCNPPreTrainedModel):
    """1-D ConvCNP on a translation-equivariant grid. Same `forward` signature as [`EquivCNPModel`]."""

    config_class = ConvCNPConfig
    base_model_prefix = "convcnp"

    def __init__(self, config: ConvCNPConfig) -> None:
        super().__init__(config)
        init_ell = 2.0 / config.points_per_unit  # twice the grid spacing (Gordon et al.)
        self.log_ell_in = nn.Parameter(torch.tensor(math.log(init_ell)))
        self.log_ell_out = nn.Parameter(torch.tensor(math.log(init_ell)))
        self.embed = nn.Linear(1 + config.y_dim, 8)
        convs, c_in = [], 8
        for c in config.channels:
            convs.append(nn.Conv1d(c_in, c, config.kernel_size, padding=config.kernel_size // 2))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.mean_head = nn.Linear(c_in, config.y_dim)
        self.std_head = nn.Linear(c_in, config.y_dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            from transformers import initialization as init

            v = math.log(2.0 / self.config.points_per_unit)
            init.constant_(self.log_ell_in, v)
            init.constant_(self.log_ell_out, v)

    @staticmethod
    def _rbf(xq: torch.Tensor, xk: torch.Tensor, log_ell: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        d2 = (xq[:, :, None, 0] - xk[:, None, :, 0]) ** 2  # (B, Nq, Nk)
        w = torch.exp(-0.5 * d2 / log_ell.exp() ** 2)
        return w if key_mask is None else w * key_mask[:, None, :].to(w.dtype)

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
        """Same signature and outputs as [`EquivCNPModel.forward`] (including `return_loss` and `return_dict`)."""
        cfg = self.config
        context_mask, target_mask = check_inputs(
            context_x, context_y, target_x, context_mask, target_mask, target_y, cfg.x_dim, cfg.y_dim,
            compute_dtype(self, getattr(context_x, "dtype", None)),
        )
        # coordinates and the encoder run in float32 at least, as in EquivCNPModel.forward: in half precision the
        # density channel and the signal underflow away from the context and their ratio h¹ is noise
        dtype = self.embed.weight.dtype
        up = upcast_dtype(context_x.dtype)
        context_x, target_x = context_x.to(up), target_x.to(up)
        grid, grid_mask = uniform_grid(
            [(context_x, context_mask), (target_x, target_mask)],
            cfg.points_per_unit, cfg.grid_margin, cfg.max_grid_points
        )
        w = self._rbf(grid, context_x, self.log_ell_in.to(up), context_mask)  # (B, G, Nc)
        h0 = w.sum(-1, keepdim=True)
        h1 = density_normalised(w @ context_y.to(up), h0)
        h0, h1 = h0.to(dtype), h1.to(dtype)
        gm = grid_mask[..., None].to(dtype)
        h = torch.sigmoid(self.embed(torch.cat([h0, h1], -1))) * gm  # padded grid points act as zero padding
        h = h.transpose(1, 2)
        gmt = gm.transpose(1, 2)
        for conv in self.convs:
            h = torch.relu(conv(h)) * gmt
        h = h.transpose(1, 2)  # (B, G, C)
        wt = self._rbf(target_x, grid, self.log_ell_out.to(up), grid_mask).to(dtype)  # (B, Nt, G)
        h_t = wt @ h
        mean = self.mean_head(h_t)
        stddev = cfg.min_std + nn.functional.softplus(self.std_head(h_t))
        return gaussian_prediction("ConvCNP", mean, stddev, target_y if return_loss else None, target_mask)
