"""`eval_mode`: run a block of code with a model in eval mode and give every sub-module its own flag back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` for the block, then every sub-module's own train/eval flag as the caller had it.

    The flags come back through each module's own `train()`, called in pre-order only where the flag differs: a
    module's `train()` also resets its children, which are visited after it, and overrides of `train()` see every
    switch they would see after the caller's own `model.train()` (LeViT clears its attention-bias cache there; setting
    `module.training` directly would leave the cache of the eval forward stale).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            if module.training != training:
                module.train(training)
        for module, training in modes:  # a `train()` override that does not set the flag itself
            module.training = training
