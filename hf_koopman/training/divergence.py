"""The divergence rule: one definition shared by the training guard, the experiment labels and the docs.

A training step diverges when its loss exceeds `LOSS_THRESHOLD` (50), its gradient norm exceeds
`GRAD_NORM_THRESHOLD` (500), or either is non-finite (RKSP paper, Sec. 3.1). The guard adds a third cause it can see
during training: a non-finite residual-block output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


__all__ = ["GRAD_NORM_THRESHOLD", "LOSS_THRESHOLD", "DivergenceRule", "is_divergent_step"]

# Sec. 3.1: "diverged if, at any step, the loss exceeds 50.0 or the gradient norm exceeds 500.0".
LOSS_THRESHOLD = 50.0
GRAD_NORM_THRESHOLD = 500.0

# bit flags of the causes (also the value logged as `rksp/rollback_cause` / `rksp/diverged_cause`)
CAUSE_LOSS = 1
CAUSE_GRAD_NORM = 2
CAUSE_ACTIVATION = 4


@dataclass(frozen=True)
class DivergenceRule:
    """`loss > loss_threshold`, `grad_norm > grad_norm_threshold`, or a non-finite value: the step diverged.

    `None` means "not observed" and never trips the rule.
    """

    loss_threshold: float = LOSS_THRESHOLD
    grad_norm_threshold: float = GRAD_NORM_THRESHOLD

    def __post_init__(self) -> None:
        if not (self.loss_threshold > 0 and self.grad_norm_threshold > 0):
            raise ValueError(
                f"divergence thresholds must be > 0, got loss_threshold={self.loss_threshold!r}, "
                f"grad_norm_threshold={self.grad_norm_threshold!r}"
            )

    def loss_diverged(self, loss: float | None) -> bool:
        """Whether a loss trips the rule: non-finite or above `loss_threshold` (`None`, no loss, never trips)."""
        return loss is not None and (not math.isfinite(loss) or loss > self.loss_threshold)

    def grad_norm_diverged(self, grad_norm: float | None) -> bool:
        """Whether a gradient norm trips the rule: non-finite or above `grad_norm_threshold` (`None` never trips)."""
        return grad_norm is not None and (not math.isfinite(grad_norm) or grad_norm > self.grad_norm_threshold)

    def diverged(self, loss: float | None, grad_norm: float | None = None) -> bool:
        """Whether a step with this loss and gradient norm is labelled diverged (either part trips)."""
        return self.loss_diverged(loss) or self.grad_norm_diverged(grad_norm)

    def describe(self) -> str:
        """The rule in words, for logs and reports."""
        return (
            f"loss > {self.loss_threshold:g}, gradient norm > {self.grad_norm_threshold:g}, or a non-finite loss, "
            "gradient or block output"
        )


PAPER_RULE = DivergenceRule()


def is_divergent_step(loss: float, grad_norm: float | None = None) -> bool:
    """True if this step diverges under the paper's rule: `loss > 50`, `grad_norm > 500`, or either non-finite."""
    return PAPER_RULE.diverged(float(loss), None if grad_norm is None else float(grad_norm))
