"""Whether a model's weights are still at their initialisation, read from its normalisation layers.

The decision rule and the risk estimator come from spectra at random initialisation, so a profile of a loaded
checkpoint or of trained weights has to say so. `transformers` leaves no record of whether `from_pretrained` loaded
weights (a model built with `from_config` from a Hub config carries the same `name_or_path`), but the normalisation
layers do: every initialisation sets their scale and shift to one constant each (ones and zeros; zeros for the
`1 + weight` form of Gemma-style RMSNorm), and training in float32 moves them apart (`weights_origin` says what
this cannot tell).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


WeightsOrigin = Literal["init", "pretrained"]


def _norm_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The `(d,)` scale and shift vectors of the model's normalisation layers (classes named `*Norm*`, batch and
    instance norms excepted)."""
    found = []
    for module in model.modules():
        kind = type(module).__name__.lower()
        # batch norms are left out: some models' `_init_weights` draws every `weight` at random, theirs too
        if "norm" not in kind or "batchnorm" in kind or isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        for name in ("weight", "bias"):
            value = getattr(module, name, None)
            if isinstance(value, nn.Parameter) and value.dim() == 1 and value.numel() > 1:
                found.append(value)
    return found


@torch.no_grad()
def weights_origin(model: nn.Module) -> WeightsOrigin | None:
    """`"init"` when every normalisation scale and shift is still one constant in float32 or float64, `"pretrained"`
    when one is not (weights loaded from a checkpoint or trained), `None` when there is nothing to tell by.

    Constant scales in float16 / bfloat16 prove nothing: a step smaller than half the spacing of those formats at 1.0
    (about 0.004 in bfloat16) rounds back, so weights trained in pure low precision can keep their norm scales at
    exactly 1. Such models, and models without an affine normalisation layer, read `None`. Training with frozen norms
    in float32 also leaves them constant: a model object cannot show that, which is why the CLI and
    `profile_streaming` record `"pretrained"` for every checkpoint they read.

    Args:
        model (`nn.Module`): the model, as profiled (wrappers are fine: all sub-modules are read).

    Returns:
        `"init"`, `"pretrained"` or `None`. Parameters on the meta device (not materialised) count as unknown.
    """
    params = [p for p in _norm_parameters(model) if p.device.type != "meta"]
    if not params:
        return None
    for value in params:
        local = value.to_local() if hasattr(value, "to_local") else value  # FSDP2 shards: this rank's part
        if local.numel() and not bool(torch.all(local == local.reshape(-1)[0])):
            return "pretrained"
    if any(value.dtype not in (torch.float32, torch.float64) for value in params):
        return None
    return "init"
