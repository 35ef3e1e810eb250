"""Building blocks of the divergence guard, all on public torch APIs.

* `LossTap`: a forward hook on the model that reads the task loss of every training micro-batch from the model output
  (`outputs.loss`), so a Trainer subclass that adds terms to its objective (KSS) is still judged on the model's loss,
  and NaN/Inf losses are seen although the Trainer's `logging_nan_inf_filter` hides them from the logs. When the
  Trainer computes the loss outside the model (label smoothing, `compute_loss_func`), the model returns none
  (`LossTap.observed()` is false) and `RKSPCallback` judges the loss the Trainer logs instead.
* `GradNormTap`: the gradient norm of the step. With clipping on (`max_grad_norm > 0`) it is read before clipping, at
  the end of each backward pass (an autograd end-of-backward callback queued by a tensor hook on the model's outputs;
  the paper's rule is about the raw norm); without clipping it is read in `on_pre_optimizer_step` from the gradients the
  optimizer is about to apply. Either way one fused norm over all gradients per read.
* `ActivationWatch`: forward hooks on the residual blocks that flag non-finite outputs on device (one sum each).
* `StateSnapshot`: a CPU copy of the parameters and the optimizer state, restored in place.
* `load_checkpoint_state`: the same state read back from a checkpoint the Trainer wrote, when a CPU copy does not fit.
* `reduce_max`: the one all-reduce per step that makes every process take the same decision.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from hf_koopman.logging_utils import get_logger


__all__ = [
    "ActivationWatch",
    "CheckpointKeyError",
    "DivergedModelError",
    "DivergenceEvent",
    "GradNormTap",
    "LossTap",
    "StateSnapshot",
    "checkpoint_problem",
    "is_distributed",
    "load_checkpoint_state",
    "model_buffers",
    "reduce_max",
]

logger = get_logger(__name__)


class DivergedModelError(RuntimeError):
    """Raised by `save_model()` when the in-memory weights are the ones a divergence was detected on."""


class CheckpointKeyError(KeyError, ValueError):
    """Raised by `load_checkpoint_state` when a checkpoint lacks trainable parameters of the model: a `KeyError` (and a
    `ValueError`) whose message prints as written, without the quotes `KeyError` adds around its argument."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _json_number(x: float | None) -> Any:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/Inf


@dataclass
class DivergenceEvent:
    """One trip of the guard: what it saw and what it did. JSON-ready via `to_dict()`.

    `step` is the optimizer step whose loss / gradient tripped the rule (1-based); with
    `RKSPCallback(check_every_n_steps=n)` the steps `first_checked_step`..`step` were checked together and the
    divergence happened in one of them. `action` is `"rollback"` or
    `"stop"`; `restored_step` the step count of the validated state put back in memory (`None`: none existed, the
    update of `step` was undone only); `new_lr` the learning rate after the back-off (rollback only).

    `loss` and `grad_norm` are this process's values; `loss_max_over_processes` and `grad_norm_max_over_processes` the
    maxima over all processes, the values the rule judged (a trip on another process shows there, not in `loss`;
    equal to the local values in a single process). `suspect_checkpoints` are the checkpoints saved since the last
    passing check, and a resumed run's starting checkpoint before its first check (their weights may hold the
    blow-up): the guard renames each `_suspect-checkpoint-<step>` and lists its new path; a checkpoint it did not
    rename (the rename failed, or rotation had deleted it) keeps its old path here. A checkpoint written at the stopping
    step after the stop (another callback asked for the save) is added to the stopping event's and set aside too.

    When the model returns no loss and the guard judges the Trainer's logged loss, a logged loss that trips the rule
    makes an event at the logging `step` with `first_checked_step` the first step the log covers; its `loss` is the
    logged value (a mean over those steps and over processes) and `loss_max_over_processes` is `None`. The steps after
    the last training log are judged at the end of `train()` from the Trainer's `train_loss`: a trip there is a
    `"stop"` event at the last step (nothing is rolled back, training has ended) whose `loss` is the mean over those
    steps (and over processes) and `loss_max_over_processes` is `None`.
    """

    step: int
    causes: list[str]
    cause_flags: int
    loss: float | None
    grad_norm: float | None
    first_bad_layer: str | None
    action: str = "stop"
    restored_step: int | None = None
    new_lr: float | None = None
    last_good_checkpoint: str | None = None
    suspect_checkpoints: list[str] = field(default_factory=list)
    first_checked_step: int | None = None
    loss_max_over_processes: float | None = None
    grad_norm_max_over_processes: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (what `rksp_guard.json` and the run's logs record)."""
        return {
            "step": self.step,
            "action": self.action,
            "causes": list(self.causes),
            "cause_flags": self.cause_flags,
            "loss": _json_number(self.loss),
            "grad_norm": _json_number(self.grad_norm),
            "loss_max_over_processes": _json_number(self.loss_max_over_processes),
            "grad_norm_max_over_processes": _json_number(self.grad_norm_max_over_processes),
            "first_bad_layer": self.first_bad_layer,
            "restored_step": self.restored_step,
            "new_lr": self.new_lr,
            "last_good_checkpoint": self.last_good_checkpoint,
            "suspect_checkpoints": list(self.suspect_checkpoints),
            "first_checked_step": self.first_checked_step,
        }

    def describe(self) -> str:
        """One line for the log: the step(s) checked, the causes and the first block with a non-finite output."""
        where = f"; first non-finite activation in block {self.first_bad_layer!r}" if self.first_bad_layer else ""
        first = self.first_checked_step
        together = first is not None and first < self.step
        at = f"steps {first}-{self.step} (checked together)" if together else f"step {self.step}"
        return f"divergence at {at}: {', '.join(self.causes)}{where}"


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss a model output carries (`ModelOutput.loss` or a dict's "loss"), `None` when it has none."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() > 0 else None


class LossTap:
    """Forward hook on `model` that sums the training losses of one optimizer step on device (no host sync).

    The Trainer passes `num_items_in_batch` to models that accept it; their micro-batch loss is then a share of the
    step's mean loss (summed here, times `world_size` when `average_tokens_across_devices` divides by the tokens of
    every process). Without it each micro-batch loss is a mean (averaged here). Either way `step_loss()` is this
    process's mean loss over the step. Forwards under `no_grad` or in eval mode (profiling, evaluation) are ignored.
    """

    def __init__(self, model: torch.nn.Module, shared_token_count_factor: float = 1.0) -> None:
        self.factor = shared_token_count_factor
        self._shares: torch.Tensor | None = None  # the step's sums, in buffers allocated once (see `_kept`)
        self._means: torch.Tensor | None = None
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._count = 0
        # the last training forward that returned a loss: (module, positional inputs, keyword inputs), references
        # only (one micro-batch kept alive), for the check of the final update at the end of training
        self.last_call: tuple[torch.nn.Module, tuple, dict] | None = None
        self._model = model
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = model_loss(output)
        if loss is None:
            return
        # a DataParallel replica's call is not kept: its weights are a copy from before the last update
        self.last_call = (module, args, kwargs) if module is self._model else None
        with torch.no_grad():
            value = loss.detach().float().mean()
            if kwargs.get("num_items_in_batch") is not None:
                if self._shares is None:
                    self._shares = self._buffers[0] = _kept(self._buffers[0], value)
                else:
                    self._shares.add_(value)
            else:
                if self._means is None:
                    self._means = self._buffers[1] = _kept(self._buffers[1], value)
                else:
                    self._means.add_(value)
                self._count += 1

    def observed(self) -> bool:
        """Whether a training forward since `reset()` returned a loss (false when the Trainer computes the loss
        outside the model: `label_smoothing_factor`, `compute_loss_func`, a `compute_loss` that keeps the labels)."""
        return self._shares is not None or self._means is not None

    def step_loss(self) -> torch.Tensor | None:
        parts = []
        if self._shares is not None:
            parts.append(self._shares * self.factor)
        if self._means is not None:
            parts.append(self._means / self._count)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def reset(self) -> None:
        self._shares = self._means = None
        self._count = 0

    def remove(self) -> None:
        self._handle.remove()
        self.last_call = self._model = None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_sharded(params: list[torch.nn.Parameter]) -> bool:
    """True when the parameters are DTensor shards (FSDP2)."""
    return any(hasattr(p, "to_local") for p in params)


class GradNormTap:
    """Gradient norm of the step (squared, on device).

    `pre_clip=True` reads the gradients at the end of every backward pass, i.e. before the Trainer clips them. A
    forward hook on `model` puts a tensor hook on the tensors of each training output that require grad (the loss,
    the logits); the first of them that the backward pass reaches queues one autograd end-of-backward callback, which
    sums the squared norms of all gradients in one fused `torch._foreach_norm`. That is two Python calls per
    micro-batch whatever the number of parameters. The callback re-queues itself once so that it runs after the
    callbacks other hooks queue during the same backward (DDP's gradient reduction), so under DDP the norm is of the
    averaged gradient. With gradient accumulation the last backward of the step sees the accumulated, pre-clip
    gradient; the callback belongs to the outermost backward pass, so nested passes (reentrant gradient checkpointing)
    have finished when it runs. A backward pass that does not flow through the model's outputs (a loss computed from
    something else) leaves the value unset: the norm is then read from the gradients the optimizer is about to apply
    (after clipping) and a warning says so once. FSDP2 reduces into sharded gradients outside autograd, so with DTensor
    parameters the norm is read from the shards in `on_pre_optimizer_step` (after clipping) and summed over processes
    by the caller.
    """

    def __init__(self, params: list[torch.nn.Parameter], pre_clip: bool, model: torch.nn.Module | None = None) -> None:
        self.pre_clip = pre_clip and model is not None and not is_sharded(params)
        self._params = params
        self._squared: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._queued = False
        self._warned = False
        self.read_in_backward = False  # whether the last `squared_norm` came from the end of a backward pass
        self.wide = False  # accumulate the norms in float64 (`_squared_norm`): set under a loss scaler
        self._handles = [model.register_forward_hook(self._on_forward)] if self.pre_clip else []

    def _on_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if isinstance(output, dict):  # ModelOutput
            values = output.values()
        elif isinstance(output, (tuple, list)):
            values = output
        else:
            values = [output]
        for value in values:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                value.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        if not self._queued:  # the first hooked output this backward pass reaches
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_other_callbacks)

    def _after_other_callbacks(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._read_norm)

    def _read_norm(self) -> None:
        self._queued = False
        value = _squared_norm(self._params, self.wide)
        if value is not None:
            self._buffer = _kept(self._buffer, value)
        self._squared = None if value is None else self._buffer

    def squared_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """Sum of squared gradient norms (this process's share for FSDP2); `None` when no gradient exists."""
        if self._handles and params is not self._params and is_sharded(params):
            self.remove()  # the model was sharded after the hooks were installed
            self.pre_clip = False
        self.read_in_backward = self.pre_clip and self._squared is not None
        if self.read_in_backward:
            return self._squared
        squared = _squared_norm(params, self.wide)
        if self.pre_clip and squared is not None and not self._warned:
            self._warned = True
            logger.warning(
                "RKSP guard: the backward pass did not flow through the model's outputs (is the loss computed from "
                "something else?), so the gradient norm is read after clipping: only a non-finite gradient can trip "
                "the gradient rule. Compute the loss from the model's outputs to restore the pre-clip check."
            )
        return squared

    def reset(self) -> None:
        self._squared = None
        self._queued = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _kept(buffer: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """`value` copied into `buffer` (allocated on first use or when the device or dtype changes), for a per-step value
    that must outlive the step's backward pass. A new small tensor per step, kept alive until the next step, costs
    0.5-0.8 % of a 0.25 s CPU step in `benchmarks/bench_guard.py` although computing it costs 0.1 %
    (`results/safety_net.md`); one reused buffer does not."""
    if buffer is None or buffer.device != value.device or buffer.dtype != value.dtype:
        buffer = torch.empty_like(value)
    return buffer.copy_(value)


def _squared_norm(params: list[torch.nn.Parameter], wide: bool = False) -> torch.Tensor | None:
    """Sum of the squared norms of the parameters' gradients (local shards for DTensors); `None` if none.

    One fused `_foreach_norm` and one norm of the per-tensor norms (`torch.stack` promotes mixed dtypes), in float32.
    With `wide` (under a loss scaler) the norms accumulate in float64 (not on MPS, which has none), so that a finite
    norm up to ~1e154 stays finite: a loss-scaled norm (x 65536 under fp16) above ~1.8e19 squares to inf in float32
    and would read as the scaler's overflow. Without a scaler a float32 overflow means a norm far above any threshold,
    which trips the rule either way; float64 accumulation costs ~6x the float32 norm on a CPU."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    if hasattr(grads[0], "to_local"):
        grads = [_local(g) for g in grads]
    with torch.no_grad():
        if wide and grads[0].device.type != "mps":
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))).square()
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()).square()


class ActivationWatch:
    """Forward hooks on residual blocks that keep a per-block on-device sum of the outputs (no host sync).

    A block is flagged when that sum is non-finite: one of its outputs was NaN or Inf, or they were so large that their
    float32 sum overflows (|sum| > 3.4e38, far beyond any trained model's activations). One reduction per block costs
    ~30x less than materialising an element-wise `isfinite` mask of the output. Each block's sum accumulates in place
    in a buffer allocated once (`_kept`).
    """

    def __init__(self, blocks: list[Any]) -> None:
        self.names = [b.name for b in blocks]
        self._buffers: list[torch.Tensor | None] = [None] * len(blocks)
        self._sums: list[torch.Tensor | None] = [None] * len(blocks)  # the buffers of the blocks seen since reset()
        self._handles = [b.module.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                total = out.detach().sum(dtype=torch.float64 if out.dtype == torch.float64 else torch.float32)
                seen = self._sums[index]
                if seen is not None and seen.dtype == total.dtype:
                    seen.add_(total.to(seen.device))
                    return
                if seen is not None:  # the output dtype changed within the step (autocast toggled)
                    total = total + seen.to(total.device)
                self._sums[index] = self._buffers[index] = _kept(self._buffers[index], total)

        return hook

    def total(self) -> torch.Tensor | None:
        """On-device sum of every block's output sum since `reset()`: non-finite iff some block was flagged (or the
        float32 total overflows); `None` before any watched forward. Two ops, for the per-step check."""
        seen = [s for s in self._sums if s is not None]
        if not seen:
            return None
        device = seen[0].device
        return torch.stack([s if s.device == device else s.to(device) for s in seen]).sum(dtype=torch.float32)

    def first_bad_index(self) -> torch.Tensor | None:
        """On-device index of the first block with a non-finite output since `reset()` (`len(blocks)` = none)."""
        seen = [s for s in self._sums if s is not None]
        if not seen:
            return None
        device = seen[0].device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        sums = torch.stack([s.to(device=device, dtype=torch.float32) if s is not None else zero for s in self._sums])
        flags = torch.cat([~torch.isfinite(sums), torch.ones(1, dtype=torch.bool, device=device)])
        return flags.to(torch.uint8).argmax()  # first True; the sentinel makes "none" = len(blocks)

    def reset(self) -> None:
        self._sums = [None] * len(self._sums)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def is_distributed() -> bool:
    """Whether more than one process takes part (an initialised process group of size > 1)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise max over all processes (one all-reduce); identity in a single process. NaN must be mapped first."""
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def world_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (FSDP2 squared-norm shards)."""
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


#: parameter-group entries that a scheduler or a callback sets (LambdaLR's `lr`, OneCycleLR's `momentum` / `betas`, a
#: weight-decay schedule): a restore keeps their current values, so the schedule carries on from the tripping step;
#: every other entry (an optimizer's own state kept in its groups: Prodigy's `d` and `k`, schedule-free AdamW's
#: `weight_sum`) goes back
SCHEDULED_GROUP_KEYS = ("lr", "initial_lr", "momentum", "betas", "weight_decay")


def _keep_scheduled(optimizer: Any) -> list[dict[str, Any]]:
    """The current scheduled entries (`SCHEDULED_GROUP_KEYS`) of every parameter group of `optimizer`."""
    return [{k: group[k] for k in SCHEDULED_GROUP_KEYS if k in group} for group in optimizer.param_groups]


class StateSnapshot:
    """Parameters, buffers (`model_buffers`: BatchNorm's running statistics) and the optimizer
    state of one moment, copied to CPU and restored in place.

    In-place restore keeps every tensor object the Trainer, the optimizer and DDP / FSDP2 hold (DTensor shards are
    restored through their local tensor). Optimizer state that did not exist when the snapshot was taken (the first
    step creates Adam's moments) is removed on restore, so the optimizer behaves as it did then. The parameter
    groups come back too, except the entries a scheduler or a callback sets (`SCHEDULED_GROUP_KEYS`: the learning
    rate the schedule has reached), which stay as they are, as in a restore from a checkpoint
    (`load_checkpoint_state`): the schedule carries on from the tripping step.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._params: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []
        self._opt_state: list[dict[str, Any] | None] = []
        self._groups: list[dict[str, Any]] = []

    @property
    def empty(self) -> bool:
        """Whether no state is held (never captured, or cleared)."""
        return self.step is None

    @staticmethod
    def _copy(src: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
        src = _local(src.detach())
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            return src.to("cpu", copy=True)
        buf.copy_(src)
        return buf

    @torch.no_grad()
    def capture(self, params: list[torch.nn.Parameter], optimizer: Any, step: int,
                buffers: Sequence[torch.Tensor] = ()) -> None:
        """Copy `params`, `buffers` and `optimizer`'s state for them as of `step`, reusing the previous copy's CPU
        buffers where the shapes match."""
        old = self._params if len(self._params) == len(params) else [None] * len(params)
        self._params = [self._copy(p, b) for p, b in zip(params, old)]
        old = self._buffers if len(self._buffers) == len(buffers) else [None] * len(buffers)
        self._buffers = [self._copy(b, c) for b, c in zip(buffers, old)]
        if optimizer is not None:
            state = optimizer.state
            old_state = self._opt_state if len(self._opt_state) == len(params) else [None] * len(params)
            new_state: list[dict[str, Any] | None] = []
            for p, prev in zip(params, old_state):
                entry = state.get(p)
                if not entry:
                    new_state.append(None)
                    continue
                prev = prev or {}
                new_state.append(
                    {k: self._copy(v, prev.get(k)) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                )
            self._opt_state = new_state
            self._groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                            for g in optimizer.param_groups]
        self.step = step

    @torch.no_grad()
    def restore(self, params: list[torch.nn.Parameter], optimizer: Any,
                buffers: Sequence[torch.Tensor] = ()) -> None:
        """Copy the held state back into `params`, `buffers` and `optimizer` in place (the same tensor objects)."""
        if self.empty:
            raise RuntimeError("no snapshot to restore")
        for p, saved in zip(params, self._params):
            _local(p.data).copy_(saved)
        for b, saved in zip(buffers, self._buffers):
            _local(b).copy_(saved)
        if optimizer is None:
            return
        state = optimizer.state
        for p, saved in zip(params, self._opt_state):
            if saved is None:
                state.pop(p, None)
                continue
            current = state.get(p)
            if current is None:
                current = state[p] = {}
            for k, v in saved.items():
                target = current.get(k)
                if isinstance(v, torch.Tensor) and isinstance(target, torch.Tensor) and _local(target).shape == v.shape:
                    _local(target).copy_(v)
                elif isinstance(v, torch.Tensor):
                    current[k] = v.clone().to(_local(p).device) if v.dim() else v.clone()
                else:
                    current[k] = v
        scheduled = _keep_scheduled(optimizer)
        for group, saved, kept in zip(optimizer.param_groups, self._groups, scheduled):
            group.update(copy.deepcopy(saved))
            group.update(kept)

    def invalidate(self) -> None:
        """Mark the snapshot `empty` but keep its buffers, which the next `capture` reuses."""
        self.step = None

    def clear(self) -> None:
        """Drop the copies (the snapshot becomes `empty`)."""
        self.step, self._params, self._buffers, self._opt_state, self._groups = None, [], [], [], []

    def nbytes(self) -> int:
        """Bytes the copy holds (parameters, buffers and optimizer tensors)."""
        total = sum(t.numel() * t.element_size() for t in self._params + self._buffers)
        for entry in self._opt_state:
            for v in (entry or {}).values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total


def model_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every buffer of `model`: the state a model changes in training besides its parameters (BatchNorm's running
    statistics and batch counter). Constant ones (rotary tables, masks) come along: they are small next to the
    parameters, and telling them apart needs `state_dict()`, which FSDP2 modules do not allow here."""
    return list(model.buffers())


def _weight_files(path: Path) -> list[Path]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        return [path / name for name in sorted(set(shards))]
    raise FileNotFoundError(
        f"{path} holds no model.safetensors (nor a model.safetensors.index.json): the guard restores only "
        "full-model checkpoints written by Trainer.save_model / save_pretrained; use rollback_source='memory'"
    )


def _saved_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of safetensors files, from their headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _match_parameters(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> list[tuple[Any, str]]:
    """`(parameter, saved name)` for every trainable parameter (tied aliases included); raises `CheckpointKeyError` (a
    `KeyError`) for missing names and `ValueError` for a shape mismatch, naming what does not match and the fix."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    pairs, missing = [], []
    for param in (p for p in model.parameters() if p.requires_grad):
        name = next((n for n in aliases[id(param)] if n in shapes), None)
        if name is None:
            missing.append(aliases[id(param)][0])
        elif shapes[name] != tuple(param.shape):
            raise ValueError(
                f"{path}: {name} has shape {shapes[name]}, this model's has {tuple(param.shape)}: the checkpoint was "
                "written by a model of another configuration. Pass a checkpoint this model's configuration wrote, or "
                "build the model from the checkpoint's config.json"
            )
        else:
            pairs.append((param, name))
    if missing:
        raise CheckpointKeyError(
            f"{path} lacks {len(missing)} trainable parameter(s) under this model's names, e.g. "
            f"{', '.join(missing[:3])}: it was written by another model, or this model saves its parameters under "
            "other names than its modules (transformers' MoE layers, PEFT adapters). Pass a full checkpoint this model "
            "wrote; for a model whose saved names differ, keep the validated state in memory "
            "(RKSPCallback(rollback_source='memory'))"
        )
    return pairs


def checkpoint_problem(model: torch.nn.Module, checkpoint: str | Path) -> str | None:
    """Why `load_checkpoint_state` could not restore `model` from `checkpoint`, or `None` if it can: the weight files,
    every trainable parameter's name and shape (from the safetensors headers) and `optimizer.pt` are checked."""
    path = Path(checkpoint)
    try:
        _match_parameters(model, _saved_shapes(_weight_files(path)), path)
    except Exception as err:  # noqa: BLE001 - any unreadable or mismatched file is a reason not to rely on it
        return f"{type(err).__name__}: {err}"
    if not (path / "optimizer.pt").is_file():
        return f"{path} has no optimizer.pt (save_only_model=True?)"
    return None


@torch.no_grad()
def load_checkpoint_state(model: torch.nn.Module, optimizer: Any, checkpoint: str | Path) -> None:
    """Put a Trainer checkpoint's trainable weights, buffers (those the checkpoint holds, under any of their names)
    and optimizer state back into `model` and `optimizer`, in place.

    Weights come from `model.safetensors` (or the shards its index lists), matched by parameter name (tied aliases
    included); the optimizer state from `optimizer.pt`, read with `weights_only=True`, its parameter groups included
    except the entries a scheduler or a callback sets (`SCHEDULED_GROUP_KEYS`: learning rate, momentum, betas, weight
    decay), which stay as they are: the caller decides the rate. A checkpoint without
    `optimizer.pt` (`save_only_model=True`) restores the weights and clears the optimizer state, with a warning.
    Everything is read and checked before anything changes, and the error names the fix: a missing weight file raises
    `FileNotFoundError`, a missing parameter `CheckpointKeyError` (a `KeyError`), a shape mismatch or an optimizer
    state for other parameter groups `ValueError`; `model` and `optimizer` are left untouched.
    """
    from safetensors.torch import load_file

    path = Path(checkpoint)
    files = _weight_files(path)
    pairs = _match_parameters(model, _saved_shapes(files), path)
    saved: dict[str, torch.Tensor] = {}
    for file in files:
        saved.update(load_file(str(file)))
    optimizer_file = path / "optimizer.pt"
    optimizer_state = None
    if optimizer is not None and optimizer_file.is_file():
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        groups = optimizer_state.get("param_groups", [])
        saved_sizes = [len(g["params"]) for g in groups]
        sizes = [len(g["params"]) for g in optimizer.param_groups]
        if saved_sizes != sizes:
            raise ValueError(
                f"{optimizer_file} holds the state of parameter groups of sizes {saved_sizes}, this optimizer's are "
                f"{sizes}: it was written for another optimizer setup. Build the optimizer with the parameter groups "
                "of the run that wrote the checkpoint (the Trainer's create_optimizer does), or pass optimizer=None "
                "to restore the weights only"
            )
    for param, name in pairs:
        param.copy_(saved[name].to(device=param.device, dtype=param.dtype))
    for name, buf in model.named_buffers(remove_duplicate=False):  # the checkpoint's statistics (aliases included)
        if name in saved and tuple(saved[name].shape) == tuple(buf.shape):
            buf.copy_(saved[name].to(device=buf.device, dtype=buf.dtype))
    if optimizer is None:
        return
    if optimizer_state is None:
        logger.warning("%s has no optimizer.pt (save_only_model=True?): weights restored, optimizer state cleared",
                       path)
        optimizer.state.clear()
        return
    scheduled = _keep_scheduled(optimizer)
    optimizer.load_state_dict(optimizer_state)
    for group, kept in zip(optimizer.param_groups, scheduled):
        group.update(kept)
