"""The divergence rule: one definition shared by the training guard, the experiment labels and the docs.

A training step diverges when its loss exceeds `LOSS_THRESHOLD` (50), its gradient norm exceeds
`GRAD_NORM_THRESHOLD` (500), or either is non-finite (RKSP paper, Sec. 3.1). The guard adds a third cause it can see
during training: a non-finite residual-block output, and, when asked (`relative_loss_threshold`), a loss limit set by
the run's own start: a multiple of its first checked loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


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
    """`loss > loss_limit`, `grad_norm > grad_norm_threshold`, or a non-finite value: the step diverged.

    `loss_limit` is `loss_threshold`, or `relative_loss_threshold x reference_loss` when both are set and that is
    lower: a loss limit on the scale of the run's own loss (its first checked loss is the reference), which catches a
    run that gets several times worse than its start without reaching the absolute threshold. `None` means "not
    observed" and never trips the rule.
    """

    loss_threshold: float = LOSS_THRESHOLD
    grad_norm_threshold: float = GRAD_NORM_THRESHOLD
    relative_loss_threshold: float | None = None
    reference_loss: float | None = None

    def __post_init__(self) -> None:
        if not (self.loss_threshold > 0 and self.grad_norm_threshold > 0):
            raise ValueError(
                f"divergence thresholds must be > 0, got loss_threshold={self.loss_threshold!r}, "
                f"grad_norm_threshold={self.grad_norm_threshold!r}"
            )
        if self.relative_loss_threshold is not None and not (1 < self.relative_loss_threshold < math.inf):
            raise ValueError(
                f"relative_loss_threshold must be a finite number > 1 (a multiple of the run's first checked loss) "
                f"or None (off), got {self.relative_loss_threshold!r}"
            )
        if self.reference_loss is not None and not (0 < self.reference_loss < math.inf):
            raise ValueError(f"reference_loss must be a finite loss > 0 or None, got {self.reference_loss!r}")

    @property
    def relative_limit(self) -> float | None:
        """`relative_loss_threshold x reference_loss`, or `None` while either is unset."""
        if self.relative_loss_threshold is None or self.reference_loss is None:
            return None
        return self.relative_loss_threshold * self.reference_loss

    @property
    def loss_limit(self) -> float:
        """The loss above which a step diverges: the lower of `loss_threshold` and the relative limit."""
        relative = self.relative_limit
        return self.loss_threshold if relative is None else min(self.loss_threshold, relative)

    @property
    def limited_by_relative(self) -> bool:
        """Whether the relative limit is the one in force (it is below `loss_threshold`)."""
        relative = self.relative_limit
        return relative is not None and relative < self.loss_threshold

    def with_reference(self, reference_loss: float | None) -> DivergenceRule:
        """This rule with `reference_loss` set (`None` clears it)."""
        return replace(self, reference_loss=None if reference_loss is None else float(reference_loss))

    def loss_diverged(self, loss: float | None) -> bool:
        """Whether a loss trips the rule: non-finite or above `loss_limit` (`None`, no loss, never trips)."""
        return loss is not None and (not math.isfinite(loss) or loss > self.loss_limit)

    def grad_norm_diverged(self, grad_norm: float | None) -> bool:
        """Whether a gradient norm trips the rule: non-finite or above `grad_norm_threshold` (`None` never trips)."""
        return grad_norm is not None and (not math.isfinite(grad_norm) or grad_norm > self.grad_norm_threshold)

    def diverged(self, loss: float | None, grad_norm: float | None = None) -> bool:
        """Whether a step with this loss and gradient norm is labelled diverged (either part trips)."""
        return self.loss_diverged(loss) or self.grad_norm_diverged(grad_norm)

    def describe(self) -> str:
        """The rule in words, for logs and reports."""
        if self.relative_loss_threshold is None:
            loss = f"loss > {self.loss_threshold:g}"
        elif self.reference_loss is None:
            loss = (f"loss > {self.loss_threshold:g} (or > {self.relative_loss_threshold:g} x the run's first checked "
                    "loss, once checked)")
        else:
            loss = (f"loss > {self.loss_limit:g} (the lower of {self.loss_threshold:g} and "
                    f"{self.relative_loss_threshold:g} x the first checked loss {self.reference_loss:g})")
        return (
            f"{loss}, gradient norm > {self.grad_norm_threshold:g}, or a non-finite loss, gradient or block output"
        )


PAPER_RULE = DivergenceRule()


def is_divergent_step(loss: float, grad_norm: float | None = None) -> bool:
    """True if this step diverges under the paper's rule: `loss > 50`, `grad_norm > 500`, or either non-finite."""
    return PAPER_RULE.diverged(float(loss), None if grad_norm is None else float(grad_norm))
