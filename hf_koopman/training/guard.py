"""Divergence guard: the paper's divergence label (loss > 50 or gradient norm > 500, Sec. 3.1) read from raw values.

`logging_nan_inf_filter=True` (the default) hides NaN/Inf step losses from the Trainer's logs, and the logged
`grad_norm` is only published on logging steps, so the guard taps the raw per-micro-batch loss returned by
`Trainer.training_step` and the pre-clip norm returned by `Trainer._get_grad_norm`, and watches the block outputs for
non-finite activations with on-device flags (no host sync until the step's single check).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


__all__ = ["ActivationWatch", "DivergenceEvent", "TrainerTaps", "reduce_flags"]

logger = logging.getLogger(__name__)


@dataclass
class DivergenceEvent:
    """What the guard saw on the step it stopped: JSON-ready via `to_dict()`."""

    step: int
    causes: list[str]
    loss: float | None
    grad_norm: float | None
    first_bad_layer: str | None
    last_good_checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        def num(x: float | None) -> Any:
            if x is None:
                return None
            return x if x == x and abs(x) != float("inf") else str(x)  # JSON has no NaN/Inf

        return {
            "step": self.step,
            "causes": list(self.causes),
            "loss": num(self.loss),
            "grad_norm": num(self.grad_norm),
            "first_bad_layer": self.first_bad_layer,
            "last_good_checkpoint": self.last_good_checkpoint,
        }

    def describe(self) -> str:
        where = f"; first non-finite activation in block {self.first_bad_layer!r}" if self.first_bad_layer else ""
        return f"divergence at step {self.step}: {', '.join(self.causes)}{where}"


class TrainerTaps:
    """Instance-level wrappers on a trainer's `training_step` and `_get_grad_norm` that record raw values.

    `step_loss` is the sum of the losses `training_step` returned since `reset()` (the Trainer's own per-step loss
    before its NaN filter); `grad_norm` the last pre-clip gradient norm. `remove()` restores the methods.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.step_loss: torch.Tensor | None = None
        self.grad_norm: Any = None
        self.has_grad_norm = hasattr(trainer, "_get_grad_norm")
        original_step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = original_step(*args, **kwargs)
            # KSSTrainer: on KSS steps the returned loss includes alpha * L_KSS; the label is about the model's loss
            task = getattr(trainer, "_guard_task_loss", None)
            if isinstance(task, torch.Tensor):
                self.step_loss = task if self.step_loss is None else self.step_loss + task
            elif isinstance(loss, torch.Tensor):
                value = loss.detach().float().sum()
                self.step_loss = value if self.step_loss is None else self.step_loss + value
            return loss

        trainer.training_step = training_step
        if self.has_grad_norm:
            original_norm = trainer._get_grad_norm

            def get_grad_norm(*args: Any, **kwargs: Any) -> Any:
                norm = original_norm(*args, **kwargs)
                self.grad_norm = norm
                return norm

            trainer._get_grad_norm = get_grad_norm

    def reset(self) -> None:
        self.step_loss = None
        self.grad_norm = None

    def remove(self) -> None:
        for name in ("training_step", "_get_grad_norm"):
            self.trainer.__dict__.pop(name, None)


class ActivationWatch:
    """Forward hooks on residual blocks that OR a per-block on-device "non-finite output" flag (no host sync)."""

    def __init__(self, blocks: list[Any]) -> None:
        self.names = [b.name for b in blocks]
        self._flags: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = [b.module.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                bad = ~torch.isfinite(out.detach()).all()
                prev = self._flags[index]
                self._flags[index] = bad if prev is None else (prev | bad)

        return hook

    def first_bad_index(self) -> int | None:
        """Index of the first block whose output was non-finite since `reset()`; syncs once."""
        seen = [f for f in self._flags if f is not None]
        if not seen:
            return None
        device = seen[0].device
        flags = [f.to(device) if f is not None else torch.zeros((), dtype=torch.bool, device=device) for f in self._flags]
        hits = torch.stack(flags).nonzero().flatten().tolist()  # the single host sync
        return hits[0] if hits else None

    def reset(self) -> None:
        self._flags = [None] * len(self._flags)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def reduce_flags(values: list[float], device: torch.device | str) -> list[float]:
    """Element-wise max over all processes (OR for 0/1 flags); identity in a single process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
