"""Conditional neural process (Garnelo et al. 2018): the EquivCNP paper's CNP baseline, as a `PreTrainedModel`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import can_return_tuple

from .configuration_equivcnp import CNPConfig
from .modeling_equivcnp import EquivCNPPreTrainedModel
from .neural_process import NeuralProcessOutput, check_inputs, compute_dtype, gaussian_prediction

__all__ = ["CNPModel"]


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)


class CNPModel(EquivCNPPreTrainedModel):
    """Encoder MLP on `[x_c, y_c]`, masked mean over the context, decoder MLP on `[x_t, r]`;
    σ = min_std + (1 - min_std)·softplus(·) (the baseline's 0.1 + 0.9·softplus).

    Permutation-invariant in the context, but not translation-equivariant: raw coordinates are its input.
    """

    config_class = CNPConfig
    base_model_prefix = "cnp"

    def __init__(self, config: CNPConfig) -> None:
        super().__init__(config)
        h = config.hidden_size
        self.encoder = _mlp(config.x_dim + config.y_dim, h, h, config.encoder_layers)
        self.decoder = _mlp(config.x_dim + h, h, 2 * config.y_dim, config.decoder_layers)
        self.post_init()

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
        r = self.encoder(torch.cat([context_x, context_y], -1))  # (B, Nc, H)
        if context_mask is None:
            m = torch.ones(*r.shape[:2], 1, dtype=r.dtype, device=r.device)
        else:
            m = context_mask[..., None].to(r.dtype)
        rep = (r * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H); no context -> 0
        rep = rep[:, None, :].expand(-1, target_x.shape[1], -1)
        mean, raw = self.decoder(torch.cat([target_x, rep], -1)).split(cfg.y_dim, dim=-1)
        stddev = cfg.min_std + (1 - cfg.min_std) * nn.functional.softplus(raw)
        return gaussian_prediction("CNP", mean, stddev, target_y if return_loss else None, target_mask)
