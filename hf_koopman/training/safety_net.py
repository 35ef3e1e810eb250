"""The divergence guard of `RKSPCallback` (`guard=True`): the safety net of a 🤗 Trainer run.

At every optimizer step the guard reads the step's loss and gradient norm (and, on request, whether a residual block's
output went non-finite), takes one decision on every process, and on a divergence stops the run or rolls it back to
the last validated state (a CPU copy or the last good checkpoint) at a lower learning rate. Checkpoints saved after
the last validated step are set aside as suspect (renamed, never deleted), `load_best_model_at_end` is kept away from
them, and `rksp_guard.json` records what happened so that a resumed run continues from it. It uses the public callback
API only; its building blocks (loss and gradient taps, the state snapshot, the cross-process reduction) live in
`hf_koopman.training.guard`.

`SafetyNet` holds the guard's half of `RKSPCallback`: the callback's constructor sets its state, and the callback's
`on_train_begin` / `on_step_end` call into it.
"""


from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_koopman.eval_mode import eval_mode
from hf_koopman.files import write_text_whole
from hf_koopman.logging_utils import get_logger
from hf_koopman.out_of_memory import is_out_of_memory
from hf_koopman.training.divergence import CAUSE_ACTIVATION, CAUSE_GRAD_NORM, CAUSE_LOSS
from hf_koopman.training.guard import (
    ActivationWatch,
    DivergenceEvent,
    GradNormTap,
    LossTap,
    StateSnapshot,
    checkpoint_problem,
    is_distributed,
    is_sharded,
    load_checkpoint_state,
    model_buffers,
    model_loss,
    reduce_max,
    world_sum,
)


logger = get_logger(__name__)

#: the key `TrainerState.stateful_callbacks` stores the callback's state under (its class name)
_CALLBACK_NAME = "RKSPCallback"
RECORD_NAME = "rksp_guard.json"
#: prefix of a checkpoint folder the guard found suspect: `checkpoint-7` -> `_suspect-checkpoint-7` (then `-2`, `-3`,
#: ... when that name exists). transformers' newest-checkpoint lookup (`get_last_checkpoint`), `save_total_limit`
#: rotation (`sort_checkpoints`) and its Hub uploads (`ignore_patterns=["_*", "checkpoint-*"]`) all skip that name
SUSPECT_PREFIX = "_suspect-"
_CHECKPOINT_NAME = re.compile(
    rf"^(?:{PREFIX_CHECKPOINT_DIR}-(\d+)|{SUSPECT_PREFIX}{PREFIX_CHECKPOINT_DIR}-(\d+)(?:-\d+)?)$"
)
_MODES = ("stop", "rollback")
_SOURCES = ("auto", "memory", "checkpoint")
#: Share of the step time the "auto" snapshot interval allows the validated-state copy to take.
_SNAPSHOT_BUDGET = 0.0025
#: the refusal of rollback_source="checkpoint" with sharded parameters (at train begin, before anything is written)
_SHARDED_CHECKPOINT_SOURCE = (
    "rollback_source='checkpoint' cannot restore sharded (FSDP) parameters: the guard reads the last good checkpoint's "
    "model.safetensors into full tensors. Use rollback_source='memory' (a CPU copy of each process's shards) or "
    "'auto' (memory under FSDP)"
)
#: why a divergence on step 1 is not a learning-rate problem (its loss and gradient precede every update)
_FIRST_STEP = ("the divergence is on step 1, before any optimizer update was applied: its loss and gradient come from "
               "the weights training started from and the data alone, so a lower learning rate would not change it")
#: what to check after a divergence on step 1
_FIRST_STEP_CHECKS = ("check the initialisation (e.g. the config's initializer_range) or the loaded weights, the "
                      "inputs and labels (token ids within the vocabulary, -100 where no loss is wanted), and the loss "
                      "scale (a summed rather than averaged loss, or a loss_threshold below the untrained model's "
                      "loss)")
#: what an unvalidated stop leaves in the model before `_act` says which step's weights they are
_IN_MEMORY_UNKNOWN = "those the divergence was detected on"

#: model -> [(callback, its run's TrainerState)] (weak references) of the guards whose hooks are on it: a train() that
#: raised never reached on_train_end, so the next run's guard removes those of other runs
_GUARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _count_rollbacks(events: list[dict[str, Any]]) -> int:
    """How many of `events` (run-record entries) are rollbacks."""
    return sum(e["action"] == "rollback" for e in events)


def _max_key(value: float | None) -> float:
    """A value as it enters the max over processes: non-finite -> +inf (it must trip the rule), missing -> -inf."""
    if value is None:
        return float("-inf")
    return value if math.isfinite(value) else float("inf")


def _inf_if_not_finite(x: torch.Tensor) -> torch.Tensor:
    """Non-finite entries (NaN, +-inf) -> +inf: they must win the max and trip the rule."""
    return torch.where(torch.isfinite(x), x, torch.full_like(x, float("inf")))


def _worst(acc: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    """On-device maximum of two rule values, a non-finite value entering as +inf; `None` = no value."""
    if value is None:
        return acc
    value = _inf_if_not_finite(value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64))
    return value if acc is None else torch.maximum(acc, value.to(acc.device))


def scale_learning_rate(optimizer: Any, lr_scheduler: Any, factor: float) -> None:
    """Multiply the learning rate for the rest of the run: the scheduler's `base_lrs` (every transformers schedule is
    a `LambdaLR` computing `base_lr * lambda(step)`, and `base_lrs` is part of its checkpointed state, so a resumed run
    keeps the lowered rate) and the current `lr` of every parameter group (schedulers without `base_lrs`)."""
    if lr_scheduler is not None and getattr(lr_scheduler, "base_lrs", None) is not None:
        lr_scheduler.base_lrs = [b * factor for b in lr_scheduler.base_lrs]
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two checkpoint paths name the same folder (relative, absolute, with or without `./`, through a
    symbolic link)."""
    return os.path.realpath(a) == os.path.realpath(b)


def _saved_trainer_state(folder: str | Path) -> dict[str, Any] | None:
    """The `trainer_state.json` of the checkpoint folder `folder`, or `None` when it is missing or unreadable."""
    from transformers.trainer import TRAINER_STATE_NAME

    try:
        saved = json.loads((Path(folder) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _on_this_path(saved: dict[str, Any] | None, state, step: int) -> bool | str:
    """Whether a saved trainer state (`_saved_trainer_state`) is of this run's path at `step`: `True` for that global
    step and a non-empty log history that begins the one this run resumed with; `"unsure"` for that step with no log
    entries (any folder at that step matches); else `False`."""
    history = saved.get("log_history") if saved is not None else None
    if not isinstance(history, list) or saved.get("global_step") != step:
        return False
    # compared as JSON text: a NaN (a logged grad_norm of an overflowing step) read back never equals itself
    if _as_json(history) != _as_json(list(state.log_history or [])[:len(history)]):
        return False
    return True if history else "unsure"


def _moved_with(path: str | None, folder: Path, state) -> str | None:
    """A checkpoint path read from a run record or a stored guard state, in the run folder as it is now. When the
    recorded checkpoint's folder is gone (the run folder was moved, e.g. from a preempted node's scratch disk to shared
    storage, before this resume), the run folder's checkpoint of that name, if its trainer state is of this run's path
    at the step its name says (`_on_this_path`); else the recorded path (a checkpoint that rotation removed from a
    folder still there stays removed: another run's checkpoint of the same name is never taken for it)."""
    if path is None or Path(path).is_dir() or Path(path).parent.is_dir():
        return path
    here = folder / Path(path).name
    if here.is_dir() and _on_this_path(_saved_trainer_state(here), state, _checkpoint_step(str(here))) is True:
        return str(here)
    return path


def _as_json(value: Any) -> str:
    """`value` as canonical JSON text (NaN and infinities as JSON's NaN / Infinity), for equality tests."""
    return json.dumps(value, sort_keys=True, default=str)


def _too_big_to_read(folder: Path) -> str | None:
    """Why reading `folder`'s weights and `optimizer.pt` into host memory is refused: the node's processes
    (`LOCAL_WORLD_SIZE`, set by torchrun and accelerate) read it at once, and together they would take more than half
    of the free memory (psutil); `None` when it fits or the sizes cannot be read."""
    try:
        import psutil

        size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".pt"))
        free = psutil.virtual_memory().available
        readers = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except (ImportError, OSError, ValueError):
        return None
    if readers * size <= free / 2:
        return None
    each = f"{readers} processes reading it at once" if readers > 1 else "reading it"
    return (f"{each} would take ~{readers * size / 1e9:.1f} GB of host memory, more than half of the "
            f"{free / 1e9:.1f} GB free")


def _checkpoint_step(path: str) -> int:
    """The global step in a `checkpoint-<step>` or `_suspect-checkpoint-<step>[-<k>]` folder name (-1 when the name
    has none)."""
    name = Path(path).name
    match = _CHECKPOINT_NAME.match(name)
    if match is not None:
        return int(match.group(1) or match.group(2))
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _pushed_copies(args: Any) -> str:
    """What a rename cannot undo when the Trainer pushes each save to the Hub (it copies the checkpoint's model files
    into `output_dir` and uploads them; `hub_strategy="end"` pushes only at the end), as a clause of the warning."""
    strategy = str(getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", "")))
    if not getattr(args, "push_to_hub", False) or strategy == "end":
        return ""
    folder = " and last-checkpoint" if strategy == "checkpoint" else ""
    kept = (", and the Hub's copy of its checkpoint folder keeps them (no later save replaces it: delete it there)"
            if strategy == "all_checkpoints" else "")
    return (f"; with push_to_hub, output_dir's own model files and the Hub repository's root{folder} may still hold "
            f"its weights until the next save (after a stop, until validated weights are saved and pushed){kept}")


def _suspect_name(name: str, k: int) -> str:
    """The folder name a suspect checkpoint `name` gets: `_suspect-<name>`, or `_suspect-<name>-<k>` for `k >= 2`."""
    return f"{SUSPECT_PREFIX}{name}" if k == 1 else f"{SUSPECT_PREFIX}{name}-{k}"


class SafetyNet:
    """The divergence guard's events and steps, mixed into `RKSPCallback` (which sets the state they use)."""

    # ------------------------------------------------------------------ guard
    def _start_guard(self, args, state, model, optimizer, lr_scheduler) -> None:
        if model is None:
            return
        self._stop_guard()  # hooks left by a train() of this callback that raised
        keep = []
        for guard_ref, state_ref in _GUARDED.get(model, []):
            other = guard_ref()
            if other is None or other is self:
                continue
            if state_ref() is state:  # a second guard of this same run
                if "rollback" not in (self.on_divergence, other.on_divergence):
                    keep.append((guard_ref, state_ref))  # two stopping guards both watch; the first trip stops
                    continue
                other._stop_guard()  # train() ends here: no hooks are left behind
                raise ValueError(
                    "two RKSPCallbacks with the divergence guard on are attached to this Trainer, one of them rolling "
                    "back: each would handle every trip (restore, skip the batch, back off the learning rate: "
                    "lr_backoff applied twice). Keep the guard on one of them and pass guard=False to the other "
                    "(e.g. a callback added for every_n_steps monitoring)."
                )
            other._stop_guard()  # hooks left on this model by another run's callback
        _GUARDED[model] = [*keep, (weakref.ref(self), weakref.ref(state))]
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._params_first, self._sharded = next(model.parameters(), None), is_sharded(self._params)
        self._buffers = model_buffers(model)
        self._model = model
        self._from_checkpoint = self._resolve_rollback_source(args)
        self._checkpoint_checked = False
        self._snapshot = StateSnapshot()
        self._undo = StateSnapshot()
        self._skipped = False
        self._since_capture = 0
        self._step_started = None
        self._trip = self._to_log = None
        self._pending_checkpoints = []
        self._unconfirmed = set()
        self._window_first = None
        self._worst_loss = self._worst_squared_norm = None
        self._loss_from_logs = self._loss_warned = False
        self._candidate = StateSnapshot()
        self._last_loss_log = state.global_step  # the Trainer's first log covers the steps after the start
        self._call_start = state.global_step
        self._logged_sum, self._logged_finite, self._bound_broken = 0.0, True, False
        self.weights_validated = True
        # the taps are new: _stop_guard above removed any left by an earlier train()
        world = getattr(args, "world_size", 1)
        shared = world if (world > 1 and getattr(args, "average_tokens_across_devices", False)) else 1
        self._loss_tap = LossTap(model, float(shared))
        self._grad_tap = GradNormTap(
            self._params, pre_clip=bool(args.max_grad_norm and args.max_grad_norm > 0), model=model
        )
        self._set_scaler(optimizer)
        if self.check_activations and not self._blocks_missing:  # a missing block list is said once, at train begin
            from hf_koopman.profiling import find_residual_blocks

            try:
                self._watch = ActivationWatch(find_residual_blocks(model, layers=self.layers))
            except ValueError as err:
                logger.warning("RKSP guard: no residual blocks found (%s); activation check disabled", err)
        if state.global_step > 0:
            self._resume_backoff(args, state, optimizer, lr_scheduler)
        else:
            self.reference_loss = None  # a new run: its own first checked loss sets the relative limit
            self.relative_limit_off = False
            if state.is_world_process_zero:
                self._set_aside_old_record(args)

    @staticmethod
    def _set_aside_old_record(args) -> None:
        """A fresh run in an `output_dir` that holds an earlier run's record: rename that record, so that resuming
        this run never applies the back-off of divergences it did not have (nothing is deleted)."""
        record = Path(args.output_dir) / RECORD_NAME
        if not record.is_file():
            return
        k = 1
        while (old := record.with_name(f"{record.stem}.previous-{k}{record.suffix}")).exists():
            k += 1
        record.rename(old)
        logger.info("RKSP guard: a new run starts in %s; the earlier run's record is kept as %s", args.output_dir, old)

    def _resume_backoff(self, args, state, optimizer, lr_scheduler) -> None:
        """Resumed run: take the last good checkpoint from the run record or the resumed checkpoint's stored guard
        state, hold the resumed checkpoint until a step validates it (`_hold_resumed_checkpoint`), and apply the
        back-off of recorded events that happened after the checkpoint's step. A resumed hyperparameter-search trial
        reads its record in its own folder (`_find_trial_folder`)."""
        self._find_trial_folder(args, state, sure_only=True)
        record = self._run_folder(args) / RECORD_NAME
        events: list[dict[str, Any]] = []
        prior = None
        if record.is_file():
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
                events, prior = data.get("events", []), data.get("last_good_checkpoint")
            except (OSError, ValueError) as err:
                logger.warning("RKSP guard: could not read the run record %s (%s)", record, err)
        # kept across the resume: the latest validated checkpoint up to the resumed step, from the restored callback
        # state, the record, or the resumed checkpoint's stored guard state (a run without events writes no record);
        # a later one (this callback's earlier train() call went further) is not on the resumed run's path
        folder = self._run_folder(args)
        recorded = (self.last_good_checkpoint, prior, self._stored_last_good(state))
        known = [_moved_with(path, folder, state) for path in recorded
                 if path is not None and 0 <= _checkpoint_step(path) <= state.global_step]
        self.last_good_checkpoint = max(known, key=_checkpoint_step) if known else None  # the first of equal steps
        # the back-off already in the resumed scheduler's base_lrs (rollbacks up to the checkpoint's step, and the
        # back-off of the resume it continues): the checkpoint's stored guard state holds it whether or not
        # transformers restores this callback from it, and the run record's lr_scale is the run's last value
        stored = self._stored_guard_states(state)
        scale = stored[0].get("lr_scale") if stored else None
        if isinstance(scale, numbers.Real) and not isinstance(scale, bool) and 0 < scale <= 1:
            self.lr_scale = float(scale)
        # the loss the run started from, not the resumed (trained) model's, and whether its relative limit was off:
        # the checkpoint's stored guard state holds them whether or not transformers restores this callback from it
        # (never a value this callback kept from another run)
        self.reference_loss = stored[0].get("reference_loss") if stored else None
        self.relative_limit_off = bool(stored and stored[0].get("relative_limit_off") is True)
        tripped = self._suspect_resume(events, state)
        if tripped is not None:
            event, resumed = tripped
            good = _moved_with(event.get("last_good_checkpoint"), folder, state)
            logger.error("RKSP guard: resuming from %s, which the guard recorded as suspect (the divergence at step %s "
                         "followed it); %s", resumed, event.get("step"),
                         f"the last good checkpoint is {good}: resume from that one instead" if good is not None
                         else "no checkpoint was validated before it: start again with a lower learning rate")
        self._hold_resumed_checkpoint(args, state, recorded_suspect=tripped is not None)
        # the record keeps every event, with the current paths of the checkpoints it renamed: its copy of an event
        # replaces the one restored from the checkpoint (saved before the renames); an event a later run repeated
        # (same step and action) is kept once per occurrence
        recorded: dict[tuple, list[dict[str, Any]]] = {}
        for e in events:
            recorded.setdefault((e.get("step"), e.get("action")), []).append(e)
        merged = [(recorded.get((e.get("step"), e.get("action"))) or [e]).pop(0) for e in self.events]
        self.events = merged + [e for left in recorded.values() for e in left]
        self.events.sort(key=lambda e: int(e.get("step", 0)))
        # the back-off of the events after the resumed step, less those the checkpoint's stored guard state holds: its
        # lr_scale (and scheduler) already has theirs (a checkpoint of a resumed run that applied it at its start)
        accounted = Counter((e.get("step"), e.get("action")) for e in stored[0].get("events") or []) if stored else None
        later = []
        for e in events:
            if int(e.get("step", 0)) <= state.global_step:
                continue
            key = (e.get("step"), e.get("action"))
            if accounted is not None and accounted[key] > 0:
                accounted[key] -= 1
                continue
            later.append(e)
        if not later:
            return
        factor = self.lr_backoff ** len(later)
        scale_learning_rate(optimizer, lr_scheduler, factor)
        self.lr_scale *= factor
        logger.warning(
            "RKSP guard: resuming at step %d before %d recorded divergence(s) (steps %s): learning rate x %g. Where "
            "the cause was not the learning rate (a corrupt batch since removed), move %s aside before resuming to "
            "train at the full rate.",
            state.global_step, len(later), [e.get("step") for e in later], factor, record,
        )

    def _hold_resumed_checkpoint(self, args, state, recorded_suspect: bool) -> None:
        """Hold the checkpoint this run resumed from, `output_dir/checkpoint-<step>`, as one saved since the last
        passing check: no step has checked its weights yet (the run that saved it may have ended, or been preempted,
        right after the save), so the first checked step makes it the last good checkpoint or suspect (renamed),
        rather than every later resume tripping on it again. Not when it is the last good checkpoint already, when
        the record lists the resumed checkpoint as suspect, or when that folder is not the one resumed from (its
        `trainer_state.json` holds another step or log history: a checkpoint resumed from another folder, or saved
        again since). A folder whose history has no log entries (a save before the first log, `logging_strategy="no"`)
        cannot be told apart from another run's folder at the same step: it is held, so that a trip sets it aside,
        but a passing step does not make it the last good checkpoint (it might hold another run's diverged weights).
        Every process takes part in one all-reduce, so that all hold the same checkpoints."""
        path = str(self._run_folder(args) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        match = False if recorded_suspect else self._resumed_from(path, state)
        level = 2 if match is True else 1 if match == "unsure" else 0  # 2 sure, 1 unsure, 0 not this folder
        if is_distributed():  # a node without a copy (save_on_each_node=False) holds it as well
            level = int(reduce_max(torch.tensor([float(level)], device=self._device()))[0])
        good = self.last_good_checkpoint
        if level == 2 and good is not None and not _same_path(good, path) \
                and _checkpoint_step(good) == state.global_step:
            # the recorded last good checkpoint of this step, and this folder holds the same training state (on some
            # process; every process takes the same decision): a copy of it in another place (the run folder was
            # copied), which stays the last good one
            self.last_good_checkpoint = good = path
        if level and not (good is not None and _same_path(good, path)):
            self._pending_checkpoints.append((state.global_step, path))
            if level == 1:
                self._unconfirmed.add(path)

    @staticmethod
    def _resumed_from(path: str, state) -> bool | str:
        """Whether the checkpoint folder `path` holds the trainer state this run resumed from (the Trainer does not
        tell callbacks the folder): `True` for the same global step and the same non-empty log history the run starts
        with; `"unsure"` for the same step with no log entries (any folder at that step matches); else `False`."""
        return _on_this_path(_saved_trainer_state(path), state, state.global_step)

    @staticmethod
    def _stored_guard_states(state) -> list[dict[str, Any]]:
        """The guard attributes the resumed checkpoint's trainer state holds, one entry per `RKSPCallback`."""
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(_CALLBACK_NAME)
        stored = stored if isinstance(stored, list) else [stored] if isinstance(stored, dict) else []
        return [entry.get("attributes") or {} for entry in stored if isinstance(entry, dict)]

    @staticmethod
    def _stored_last_good(state) -> str | None:
        """The last good checkpoint the resumed checkpoint's stored guard state names (the earliest, when several
        guards stored one), or `None`."""
        paths = [a.get("last_good_checkpoint") for a in SafetyNet._stored_guard_states(state)]
        paths = [p for p in paths if isinstance(p, str)]
        return min(paths, key=_checkpoint_step) if paths else None

    @staticmethod
    def _suspect_resume(events: list[dict[str, Any]], state) -> tuple[dict[str, Any], str] | None:
        """The recorded event whose suspect checkpoints include the one this run resumed from, with that checkpoint's
        name; `None` when it is not suspect. The Trainer does not tell callbacks the folder it resumed from, so a
        suspect checkpoint of the resumed step counts, unless the resumed checkpoint's stored guard state already
        holds the event: then it was saved after the divergence (a later run saving that step again), not before."""
        stored = SafetyNet._stored_guard_states(state)
        known: Counter | None = None  # (step, action) of the events the checkpoint holds (a later run may repeat one)
        if stored:
            known = Counter((e.get("step"), e.get("action")) for e in stored[0].get("events") or [])
        for event in events:
            key = (event.get("step"), event.get("action"))
            if known is not None and known[key] > 0:
                known[key] -= 1  # an event before the save: the checkpoint is not one it made suspect
                continue
            names = [Path(p).name for p in event.get("suspect_checkpoints") or []
                     if _checkpoint_step(p) == state.global_step]
            if names:
                return event, names[0]
        return None

    def _note_reference(self, loss: float, first: int, last: int, state) -> None:
        """The run's first checked loss, of steps `first..last` (all processes see the same value: the all-reduced
        maximum over the check's steps, or the logged mean), sets the relative loss limit, `relative_loss_threshold x`
        it; those steps were judged by `loss_threshold` alone. A non-positive first loss gives no limit: the relative
        part stays off for the run (resumed runs included), with a warning."""
        if self.relative_loss_threshold is None or self.reference_loss is not None or self.relative_limit_off:
            return
        steps = f"step {first}" if first == last else f"steps {first}-{last}"
        which = ("the logged mean over " if self._loss_from_logs else "the largest over ") if first < last else "at "
        if not (0 < loss < math.inf):
            self.relative_limit_off = True
            if state.is_world_process_zero:
                logger.warning("RKSP guard: relative_loss_threshold=%g needs a positive first loss, and the first "
                               "checked loss (%s%s) is %g: the relative limit is off for this run; loss_threshold "
                               "(%g) still applies.", self.relative_loss_threshold, which, steps, loss,
                               self.loss_threshold)
            return
        self.reference_loss = loss
        if not state.is_world_process_zero:
            return
        limit = (f"relative_loss_threshold {self.relative_loss_threshold:g} x {loss:g}" if self.rule.limited_by_relative
                 else f"loss_threshold, below {self.relative_loss_threshold:g} x {loss:g}")
        if self._call_start > 0:  # a trained model's loss: a tighter limit than the run's start would give
            logger.warning("RKSP guard: the checkpoint this run resumed from holds no reference loss (it was saved "
                           "without relative_loss_threshold, or before the run's first check): this resumed run's "
                           "first checked loss, %g (%s%s), is the reference, so a loss above %g (%s) counts as "
                           "diverged.", loss, which, steps, self.loss_limit, limit)
        else:
            logger.info("RKSP guard: the first checked loss is %g (%s%s): a loss above %g (%s) counts as diverged "
                        "from now on.", loss, which, steps, self.loss_limit, limit)
        n = last - first + 1
        if self._loss_from_logs and n > 1 and not n * loss <= self.loss_limit:
            logger.warning("RKSP guard: a logged mean of %d steps validates them only when %d x mean <= %g, the limit "
                           "relative_loss_threshold sets (mean <= %.4g; the first logged mean is %g), so unless the "
                           "loss falls below that no logged loss validates a state or checkpoint and a rollback or "
                           "stop finds nothing validated. Set logging_steps=1 to validate every step, or "
                           "logging_steps below relative_loss_threshold.", n, n, self.loss_limit,
                           self.loss_limit / n, loss)

    def _stop_guard(self) -> None:
        for tap in (self._loss_tap, self._grad_tap, self._watch):
            if tap is not None:
                tap.remove()
        self._loss_tap = self._grad_tap = self._watch = None

    def _observe(self) -> tuple[list[float], float | None, float | None, int | None]:
        """Reduced `[loss, grad_norm, -first_bad_block, snapshot_interval]` over processes (one all-reduce: every
        process takes the same decision, and refreshes its snapshot at the same steps) and the local values. NaN maps
        to +inf (it must win the max) and a missing value to -inf."""
        device = self._device()
        loss, squared = self._step_values(device)
        if self._worst_loss is not None or self._worst_squared_norm is not None:  # earlier steps of the window
            loss, squared = _worst(self._worst_loss, loss), _worst(self._worst_squared_norm, squared)
        self._worst_loss = self._worst_squared_norm = None
        interval = float(self._snapshot_interval())
        if not is_distributed():
            # one process: a single host sync, the rest in Python (tensor assembly costs more than the check itself);
            # the first bad block is located only when the total of the block sums is non-finite
            activations = self._watch.total() if self._watch is not None else None
            present = [t for t in (loss, squared, activations) if t is not None]
            if device.type == "cpu" or len(present) < 2:
                values = [float(t) for t in present]
            else:
                values = torch.stack([t.detach().to(device=device, dtype=torch.float64) for t in present]).tolist()
            it = iter(values)
            loss_value = next(it) if loss is not None else None
            squared_value = next(it) if squared is not None else None
            total = next(it) if activations is not None else None
            # a negative squared norm marks a step the loss scaler skipped (`_unscaled`): no value
            norm_value = None if squared_value is None or squared_value < 0 else math.sqrt(squared_value)
            bad_value = None  # len(blocks) when only the float32 total overflowed: "none", as in the reduced path
            if total is not None and not math.isfinite(total):
                bad_value = float(self._watch.first_bad_index())
            reduced = [_max_key(loss_value), _max_key(norm_value),
                       -bad_value if bad_value is not None else float("-inf"), interval]
            local_bad = bad_value
        else:
            bad = self._watch.first_bad_index() if self._watch is not None else None
            minus_inf = torch.tensor(float("-inf"), device=device)

            def finite_or_inf(x: torch.Tensor | None) -> torch.Tensor:
                if x is None:
                    return minus_inf
                return _inf_if_not_finite(x.to(device=device, dtype=torch.float64))

            norm = squared.sqrt() if squared is not None else None
            norm_t = finite_or_inf(norm)
            if squared is not None:  # a step the loss scaler skipped (`_unscaled`, squared -1): no value
                norm_t = torch.where(squared.to(device=device, dtype=torch.float64) < 0, minus_inf, norm_t)
            bad_t = -bad.to(device=device, dtype=torch.float64) if bad is not None else minus_inf
            interval_t = torch.tensor(interval, dtype=torch.float64, device=device)
            local = torch.stack([finite_or_inf(loss), norm_t, bad_t, interval_t])
            reduced = reduce_max(local.clone())
            local_values, reduced = torch.stack([local, reduced]).tolist()  # the one host sync of the step
            loss_value = None if loss is None else float(loss)
            norm_value = None if norm is None or local_values[1] == float("-inf") else float(norm)
            local_bad = -local_values[2] if bad is not None else None
        bad_index = None
        if local_bad is not None and self._watch is not None and local_bad < len(self._watch.names):
            bad_index = int(local_bad)
        return reduced, loss_value, norm_value, bad_index

    def _step_values(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This step's loss and squared gradient norm, on device (no host sync)."""
        loss = self._loss_tap.step_loss() if self._loss_tap is not None else None
        squared = self._grad_tap.squared_norm(self._params) if self._grad_tap is not None else None
        if squared is not None and self._sharded:
            squared = world_sum(squared.to(device))  # FSDP2: each process holds a shard of the gradient
        if squared is not None and self._scaler is not None:
            squared = self._unscaled(squared)
        return loss, squared

    def _set_scaler(self, optimizer: Any) -> None:
        """Keep the optimizer's enabled loss scaler (accelerate's optimizer under fp16 mixed precision), and have the
        gradient-norm tap accumulate in float64 under it (`_squared_norm`)."""
        scaler = getattr(optimizer, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if self._grad_tap is not None:
            self._grad_tap.wide = self._scaler is not None

    def _unscaled(self, squared: torch.Tensor) -> torch.Tensor:
        """The squared gradient norm under a loss scaler (fp16 mixed precision), in the loss's own units, on device.

        The scaler multiplies the loss, hence the gradients, by its scale. The Trainer unscales them before
        `on_pre_optimizer_step` (its `clip_grad_norm_`, called with `max_grad_norm = inf` when clipping is off, to log
        the norm), so only a norm read at the end of the backward pass (the pre-clip read) is divided here. A
        non-finite scaled gradient is the scaler's overflow: it skips that update and lowers its scale, so the step
        has no gradient to judge (-1: "no value", which never trips), not a divergence. Once the scale has fallen to 1
        or below, the gradients are non-finite without any scaling: that stays non-finite and trips the rule, as does
        a non-finite loss. No host sync (the scale is read on device where the scaler has one).
        """
        scaler = self._scaler
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
        if scale is None:  # before the scaler's first step (its initial scale, a Python float) or an older scaler
            scale = torch.tensor(scaler.get_scale())
        scale = scale.to(device=squared.device, dtype=squared.dtype)
        if self._grad_tap.read_in_backward:
            squared = squared / scale.square()
        skipped = ~torch.isfinite(squared) & (scale > 1)
        return torch.where(skipped, torch.full_like(squared, -1.0), squared)

    def _check_checkpoint_settings(self, args, model: torch.nn.Module | None = None) -> None:
        """`rollback_source="checkpoint"` needs checkpoints the guard can validate, keep and read back: refuse, before
        anything is written, settings that save none, rotate the last good one away or shard the parameters (FSDP),
        naming the setting."""
        if self._fsdp_run(args, model):
            raise ValueError(_SHARDED_CHECKPOINT_SOURCE)
        if getattr(args, "deepspeed", None):
            raise ValueError("rollback_source='checkpoint' is not supported with DeepSpeed (its engine owns the "
                             "optimizer step and the checkpoint format); use rollback_source='memory'")
        if getattr(args, "save_strategy", None) != "steps":
            strategy = getattr(args, "save_strategy", None)
            raise ValueError(f"rollback_source='checkpoint' restores the last good checkpoint, but "
                             f"save_strategy={getattr(strategy, 'value', strategy)!r} saves none the guard can "
                             f"validate: set save_strategy='steps' (and save_steps), or use "
                             f"rollback_source='memory' / 'auto'")
        limit = getattr(args, "save_total_limit", None)
        if limit is not None and limit < 3:
            raise ValueError(f"rollback_source='checkpoint' with save_total_limit={limit}: rotation deletes the last "
                             f"good checkpoint before a trip can need it (the newest checkpoint is unvalidated until a "
                             f"later step passes); set save_total_limit to 3 or more, or unset it, or use "
                             f"rollback_source='memory'")

    def _fsdp_run(self, args, model: torch.nn.Module | None) -> bool:
        """Whether this run shards the parameters: FSDP asked for (an FSDP launch config or `args.fsdp`), a bound
        Trainer that runs FSDP, or FSDP2 modules, FSDP1 units or DTensor parameters in `model` (the Trainer prepares
        the model before `on_train_begin`; the FSDP1 root wraps the model a callback sees, the auto-wrapped units sit
        inside it)."""
        from hf_koopman.training.fsdp import fsdp_requested, is_fsdp1_model, is_fsdp_model

        trainer = self._trainer_for(model) or self._trainer
        if getattr(trainer, "is_fsdp_enabled", False) or fsdp_requested(args):
            return True
        if model is None:
            return False
        return (is_fsdp_model(model) or is_fsdp1_model(model)
                or is_sharded([p for p in model.parameters() if p.requires_grad]))

    def _resolve_rollback_source(self, args) -> bool:
        """Whether validated state comes back from the last good checkpoint (`rollback_source`) rather than memory."""
        steps = getattr(args, "save_strategy", None) == "steps"
        only_model = bool(getattr(args, "save_only_model", False))
        limit = getattr(args, "save_total_limit", None)
        if self.rollback_source == "checkpoint":  # FSDP was refused by _check_checkpoint_settings
            if only_model:
                logger.warning("rollback_source='checkpoint' with save_only_model=True: checkpoints hold no optimizer "
                               "state, so a restore clears it")
            return True
        if limit is not None and limit < 3 and getattr(args, "save_strategy", None) != "no":
            logger.warning("RKSP guard: save_total_limit=%d can rotate away the checkpoint the guard names as the last "
                           "good one (the newest is unvalidated until a later step passes); keep it at 3 or more, or "
                           "unset, to be able to resume from it", limit)
        single = getattr(args, "world_size", 1) == 1
        deepspeed = bool(getattr(args, "deepspeed", None)) or getattr(self._trainer, "is_deepspeed_enabled", False)
        suitable = (not deepspeed and steps and not only_model and (limit is None or limit >= 3) and single
                    and not self._sharded)
        if self.rollback_source == "memory" or not suitable or self._fsdp_run(args, self._model):
            return False  # "auto" keeps the state in memory under FSDP
        import psutil

        copy_bytes = 3 * sum(p.numel() * p.element_size() for p in self._params)  # weights + two optimizer moments
        free = psutil.virtual_memory().available
        if copy_bytes <= free / 2:
            return False
        logger.info("RKSP guard: a CPU copy of the training state (~%.1f GB) would take more than half of the free "
                    "memory (%.1f GB): rolling back from the last good checkpoint instead",
                    copy_bytes / 1e9, free / 1e9)
        return True

    def _is_check_step(self, args, state) -> bool:
        """Every `check_every_n_steps`-th step, the last one, and every step whose checkpoint will be saved (a resumed
        run must not start from unchecked steps)."""
        step = state.global_step + 1  # the step about to be applied
        k = self.check_every_n_steps
        if k == 1 or step % k == 0 or (bool(state.max_steps) and step >= state.max_steps):
            return True
        if self._from_checkpoint and self.last_good_checkpoint is None:
            return True  # no copy to undo a window with: each step is checked until a checkpoint is validated
        save_steps = getattr(state, "save_steps", 0) or 0
        return getattr(args, "save_strategy", None) == "steps" and save_steps > 0 and step % save_steps == 0

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      optimizer: torch.optim.Optimizer | None = None, **kwargs) -> TrainerControl | None:
        for tap in (self._loss_tap, self._grad_tap):
            if tap is not None:
                tap.reset()
        if self._window_first is None:  # the block sums accumulate over the window: reset them when it starts
            if self._watch is not None:
                self._watch.reset()
            self._window_first = state.global_step + 1
            nothing_validated = self._snapshot.empty and not self._from_checkpoint
            if self.guard and nothing_validated and optimizer is not None and self._params:
                # nothing validated yet: keep the state before the window, so that a trip undoes all of its updates
                self._undo.capture(self._params, optimizer, state.global_step, self._buffers)
        now = time.perf_counter()
        if self._step_started is not None:
            last = now - self._step_started
            self._step_seconds = last if self._step_seconds is None else 0.9 * self._step_seconds + 0.1 * last
        self._step_started = now

    def _snapshot_interval(self) -> int:
        """Passing steps between snapshot refreshes (`snapshot_every_n_steps`, or its `"auto"` value)."""
        if self.snapshot_every_n_steps != "auto":
            return int(self.snapshot_every_n_steps)
        if not self._capture_seconds or not self._step_seconds:
            return 1
        return max(1, math.ceil(self._capture_seconds / (_SNAPSHOT_BUDGET * self._step_seconds)))

    def _refresh_snapshot(self, optimizer, step: int, interval: int, passed: int = 1) -> None:
        if self._from_checkpoint:  # the last good checkpoint is the validated state: no copy in memory
            return
        self._since_capture += passed
        # judged on logged losses, a passing step validates nothing yet: its state waits as the candidate until a
        # logged loss covering the next step passes (`_judge_logged_loss`)
        target = self._candidate if self._loss_from_logs else self._snapshot
        if not (self._snapshot.empty and target.empty) and self._since_capture < interval:
            return
        start = time.perf_counter()
        target.capture(self._params, optimizer, step, self._buffers)
        self._capture_seconds = time.perf_counter() - start
        self._since_capture = 0
        if target is self._snapshot:
            self._undo.clear()  # a validated state exists: the pre-run copy is no longer the one to go back to

    def _loss_not_observed(self, args, state) -> None:
        """The model returned no loss on a training step: the Trainer computes it outside the model. Judge the loss the
        Trainer logs instead (`_judge_logged_loss`), and say so once, with what that costs; with
        `logging_strategy="no"` nothing is logged, so the loss part of the rule is off."""
        self._loss_warned = True
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        steps = int(getattr(state, "logging_steps", 0) or getattr(args, "logging_steps", 1) or 1)
        why = ("RKSP guard: the model returns no loss on training steps: the Trainer computes the loss outside the "
               "model (label_smoothing_factor > 0, Trainer(compute_loss_func=...), or a compute_loss that does not "
               "pass the labels to the model), or the model's output has no `loss` field (a tuple), so the guard "
               "cannot read each step's loss.")
        if strategy == "no":
            if state.is_world_process_zero:
                logger.warning(
                    "%s With logging_strategy='no' no loss is logged either, so the loss part of the rule is OFF: only "
                    "the gradient norm and block outputs are checked, and a run whose loss exceeds %g keeps training "
                    "with its checkpoints named good. Set logging_strategy='steps' (logging_steps=1 for per-step "
                    "checks) to have the guard judge the logged loss.", why, self.loss_limit)
            return
        self._loss_from_logs = True
        threshold = self.loss_limit
        if strategy == "epoch":
            when = (" With logging_strategy='epoch' that is the mean of an epoch's n steps, checked once an epoch: a "
                    "spike can hide in the mean and is caught late, and since no step's loss exceeds n x the mean, "
                    f"a passing mean validates its steps only when n x mean <= {threshold:g}, so a rollback may "
                    "find nothing validated. Set logging_strategy='steps' and logging_steps=1 to check and validate "
                    "every step.")
        elif steps > 1:
            when = (f" With logging_steps={steps} that is the mean of {steps} steps, checked every {steps} steps: a "
                    f"spike can hide in the mean and is caught late, and since no step's loss exceeds {steps} x the "
                    f"mean, a passing mean validates its steps only when {steps} x mean <= {threshold:g} (mean <= "
                    f"{threshold / steps:g}), so a rollback may find nothing validated. Set logging_steps=1 to check "
                    "and validate every step.")
        else:
            when = ""
        if state.is_world_process_zero:
            logger.warning(
                "%s It judges the loss the Trainer logs instead: a logged loss > %g or non-finite is a divergence at "
                "that logging step (stop or rollback as configured), and a checkpoint or the in-memory copy counts as "
                "validated only once a logged loss after it passes.%s Steps after the last training log are judged "
                "from the Trainer's final train_loss. The gradient norm and block outputs are still checked every "
                "step.", why, threshold, when)
        self._check_rotation_while_pending(args, state, steps)
        if not self._from_checkpoint:
            self._warn_two_copies(state)

    def _check_rotation_while_pending(self, args, state, logging_steps: int) -> None:
        """Judged on logged losses, checkpoints wait for the next passing log before one counts as good: with
        `logging_steps = L` and `save_steps = S`, up to `ceil(L / S)` of them, and rotation must keep the last good one
        behind those (`save_total_limit >= max(3, ceil(L / S) + 1)`). Refuse a limit that cannot with
        `rollback_source="checkpoint"` (its rollbacks read that checkpoint; on the first step, before anything is
        saved); warn otherwise."""
        limit = getattr(args, "save_total_limit", None)
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        save_strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
        if limit is None or strategy != "steps" or save_strategy != "steps":
            return
        save_steps = max(1, int(getattr(state, "save_steps", 0) or getattr(args, "save_steps", 1) or 1))
        waiting = math.ceil(logging_steps / save_steps)
        needed = max(3, waiting + 1)
        if limit >= needed:
            return
        message = (f"RKSP guard: save_total_limit={limit} with logging_steps={logging_steps} and "
                   f"save_steps={save_steps}: judged on logged losses, up to {waiting} checkpoints wait for a passing "
                   f"log before one counts as good (more after a log too high to validate its steps), so rotation can "
                   f"delete the last good checkpoint while they wait. Set save_total_limit to {needed} or more (or "
                   f"unset it), logging_steps={save_steps} or less, or let the model compute its own loss (pass the "
                   f"labels to it, no label_smoothing_factor / compute_loss_func)")
        if self.rollback_source == "checkpoint":
            self._stop_guard()
            raise ValueError(message + "; rollback_source='checkpoint' restores that checkpoint, or use "
                             "rollback_source='memory'")
        if state.is_world_process_zero:
            logger.warning("%s, to be able to resume from it%s.", message,
                           " (a rollback that finds it rotated away stops the run)" if self._from_checkpoint else "")

    def _warn_two_copies(self, state) -> None:
        """Judged on logged losses, the guard keeps two CPU copies of the training state (the validated one and the
        candidate that waits for a log); `rollback_source="auto"` budgets one, at most half of the free memory. Warn
        when two exceed that budget."""
        import psutil

        # weights + two optimizer moments, as `_resolve_rollback_source` estimates one copy (local shards under FSDP)
        copy_bytes = 3 * sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local")
                             else p.numel() * p.element_size() for p in self._params)
        free = psutil.virtual_memory().available
        if 2 * copy_bytes <= free / 2 or not state.is_local_process_zero:
            return
        logger.warning(
            "RKSP guard: judging the logged loss keeps two CPU copies of the training state, the validated one and a "
            "candidate that waits for the next logged loss: ~%.2f GB each, ~%.2f GB in all, more than half of the free "
            "memory (%.2f GB), the budget rollback_source='auto' allows one copy. Use rollback_source='checkpoint' "
            "(no CPU copy: rollbacks read the last good checkpoint; needs save_strategy='steps'), free memory, or let "
            "the model compute its own loss (pass the labels to it, no label_smoothing_factor / compute_loss_func): "
            "the guard then keeps one copy.", copy_bytes / 1e9, 2 * copy_bytes / 1e9, free / 1e9)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                              **kwargs) -> TrainerControl | None:
        if not self.guard or model is None:
            return
        self._set_scaler(optimizer)
        # FSDP2 swaps the registered parameters for DTensor shards after train begin: re-read them when the first
        # parameter object changed (listing them every step costs more than the rest of the guard's step on tiny models)
        first = next(model.parameters(), None)
        if first is not self._params_first:
            self._params = [p for p in model.parameters() if p.requires_grad]
            self._params_first, self._sharded = first, is_sharded(self._params)
            self._buffers = model_buffers(model)
            if self._sharded and self._from_checkpoint:
                if self.rollback_source == "checkpoint":  # sharded after train begin: refused as at train begin
                    raise ValueError(_SHARDED_CHECKPOINT_SOURCE)
                logger.warning("RKSP guard: the parameters are sharded (FSDP) now, which a checkpoint restore does not "
                               "support: rollback_source='auto' keeps the validated state in memory instead")
                self._from_checkpoint = False
        if not self._loss_warned and self._loss_tap is not None and not self._loss_tap.observed():
            self._loss_not_observed(args, state)
        if not self._is_check_step(args, state):  # fold this step into the window's on-device maxima; no sync
            device = self._device()
            loss, squared = self._step_values(device)
            self._worst_loss = _worst(self._worst_loss, loss)
            self._worst_squared_norm = _worst(self._worst_squared_norm, squared)
            return
        first_checked = self._window_first if self._window_first is not None else state.global_step + 1
        self._window_first = None
        reduced, loss, grad_norm, local_bad = self._observe()
        n_blocks = len(self._watch.names) if self._watch is not None else 0
        any_loss = reduced[0] != float("-inf")
        any_norm = reduced[1] != float("-inf")
        flags = 0
        if any_loss and self.rule.loss_diverged(reduced[0]):
            flags |= CAUSE_LOSS
        if any_norm and self.rule.grad_norm_diverged(reduced[1]):
            flags |= CAUSE_GRAD_NORM
        first_bad = int(-reduced[2]) if reduced[2] != float("-inf") else n_blocks
        if first_bad < n_blocks:
            flags |= CAUSE_ACTIVATION
        if not flags:
            if any_loss:
                self._note_reference(reduced[0], first_checked, state.global_step + 1, state)
            # each was followed by a passing step: the latest is the last good one (judged on logged losses, once a
            # logged loss after it passes: `_judge_logged_loss`)
            if self._pending_checkpoints and not self._loss_from_logs:
                self._promote(self._pending_checkpoints[-1][1])
                self._pending_checkpoints = []
            # the weights that produced this sane loss and gradient are validated: keep them
            passed = state.global_step + 2 - first_checked
            self._refresh_snapshot(optimizer, state.global_step, int(reduced[3]), passed)
            return

        def where(local_hit: bool) -> str:
            return "" if local_hit else " on another process"

        def worst(local_hit: bool, value: float) -> str:
            return "" if local_hit else f", max over processes: {value}"

        causes = []
        if flags & CAUSE_LOSS:
            here = self.rule.loss_diverged(loss)
            causes.append(f"loss > {self.loss_limit:g} or non-finite{where(here)} "
                          f"(step loss here: {loss}{worst(here, reduced[0])})")
        if flags & CAUSE_GRAD_NORM:
            here = self.rule.grad_norm_diverged(grad_norm)
            causes.append(f"gradient norm > {self.grad_norm_threshold:g} or non-finite{where(here)} "
                          f"(norm here: {grad_norm}{worst(here, reduced[1])})")
        if flags & CAUSE_ACTIVATION:
            causes.append(f"non-finite block output{where(local_bad is not None)}")
        suspect = [path for _, path in self._pending_checkpoints]
        self._pending_checkpoints = []
        self._trip = DivergenceEvent(
            step=state.global_step + 1,
            causes=causes,
            cause_flags=flags,
            loss=loss,
            grad_norm=grad_norm,
            first_bad_layer=self._watch.names[first_bad] if flags & CAUSE_ACTIVATION else None,
            last_good_checkpoint=self.last_good_checkpoint,
            suspect_checkpoints=suspect,
            first_checked_step=first_checked,
            loss_max_over_processes=reduced[0] if any_loss else None,
            grad_norm_max_over_processes=reduced[1] if any_norm else None,
        )
        if self._undo.empty and not self._restores_validated():
            # no validated state to go back to (or restoring it is switched off): undo this update at least. When
            # nothing is validated yet, a windowed check keeps the state before its window here already; so does a
            # run with no in-memory copy yet (`on_step_begin`), whose last good checkpoint may fail to come back.
            if self._from_checkpoint:  # no CPU copy in this mode: without gradients the optimizer skips the update
                for p in self._params:
                    p.grad = None
                self._skipped = True
            else:  # the weights before the update; the buffers already hold the tripping forward's (not undone)
                self._undo.capture(self._params, optimizer, state.global_step)

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process (one all-reduce; every process must call it)."""
        return float(reduce_max(torch.tensor([float(flag)], device=self._device()))[0]) > 0

    def _may_roll_back(self) -> bool:
        return self.on_divergence == "rollback" and self.rollbacks < self.max_rollbacks

    def _validated_state_exists(self) -> bool:
        """Whether a validated state exists to go back to: the last good checkpoint, or the CPU snapshot (or, kept
        in memory, a last good checkpoint that `_newer_checkpoint_restored` may read back)."""
        if self._from_checkpoint:
            return self.last_good_checkpoint is not None
        return not self._snapshot.empty or (self.last_good_checkpoint is not None and not self._sharded)

    def _restores_validated(self) -> bool:
        """Whether a trip now puts the validated state back (a rollback, or a stop with `restore_on_stop`)."""
        return self._validated_state_exists() and (self._may_roll_back() or self.restore_on_stop)

    def _why_no_rollback(self, validated_exists: bool, step: int | None = None) -> str:
        """Why a trip in rollback mode stops the run, for the stop message (empty with `on_divergence="stop"`); a trip
        at `step` 1 says that no earlier state exists at all."""
        if self.on_divergence != "rollback":
            return ""
        if self.rollbacks >= self.max_rollbacks:
            return f" after {self.rollbacks} rollback(s) (max_rollbacks={self.max_rollbacks})"
        if validated_exists:  # it existed, but putting it back failed
            return (f" after {self.rollbacks} rollback(s): the validated state could not be restored, so this trip "
                    "could not be rolled back")
        first = f" ({_FIRST_STEP})" if step == 1 else ""
        if self._from_checkpoint:
            return (" without a rollback: no checkpoint was validated before the divergence (rollback_source="
                    "'checkpoint' restores only from the last good checkpoint, one followed by a passing step), so "
                    f"there was nothing to roll back to{first}")
        if self._loss_from_logs:  # a passing mean of n steps validates them only when n x mean <= loss_threshold
            return (" without a rollback: no logged loss of this train() call had validated a state before the "
                    f"divergence (a logged mean of n steps validates them only when n x mean <= "
                    f"{self.loss_limit:g}), so there was nothing in memory to roll back to{first}")
        return (" without a rollback: no step of this train() call had passed the rule before the divergence, so no "
                f"state was validated in memory to roll back to{first}")

    def _promote(self, path: str) -> None:
        """`path` is the last good checkpoint now. Restoring from checkpoints, the first one is checked (names, shapes,
        optimizer state; every process, one all-reduce): a layout the guard cannot read back switches it to the CPU
        copy, with a warning, rather than failing at the first trip."""
        if path in self._unconfirmed:
            self._unconfirmed.discard(path)
            logger.info("RKSP guard: %s passed its first check, but with no log entries before the resume the guard "
                        "cannot tell it is the folder this run resumed from: it is not taken as the last good "
                        "checkpoint", path)
            return
        self.last_good_checkpoint = path
        # only folders still on disk can be advised later: rotated ones leave the list, which stays as long as the
        # run's checkpoints on disk rather than growing with every save
        self._validated_paths = [p for p in self._validated_paths if Path(p).is_dir()] + [path]
        if not self._from_checkpoint or self._checkpoint_checked:
            return
        self._checkpoint_checked = True
        problem = checkpoint_problem(self._model, path) if self._model is not None else "no model"
        if self._any_process(problem is not None):
            logger.warning("RKSP guard: the guard cannot restore from %s (%s): it keeps the validated state in memory "
                           "instead", path, problem or "a problem on another process")
            self._from_checkpoint = False

    def _restore_validated(self, optimizer) -> int | None:
        """Put the validated state back (snapshot or last good checkpoint); returns its step, `None` if it failed.
        From a checkpoint, every process reports whether its load worked (one all-reduce) and all fail together."""
        if not self._from_checkpoint:
            newer = self._newer_checkpoint_restored(optimizer)
            if newer is not None or self._snapshot.empty:
                return newer
            self._snapshot.restore(self._params, optimizer, self._buffers)
            return self._snapshot.step
        error = self._load_last_good(optimizer)
        if error is not None:
            logger.error("RKSP guard: could not restore the last good checkpoint %s: %s", self.last_good_checkpoint,
                         error)
            return None
        return _checkpoint_step(self.last_good_checkpoint)

    def _load_last_good(self, optimizer) -> str | None:
        """Load the last good checkpoint into the model and optimizer on every process; `None` when every process
        loaded it, else what failed (this process's error, or that another process failed). A load that fails leaves
        the model as it was, and all processes fail together (one all-reduce). A failure marks the folder as one the
        guard cannot read back (`_unreadable`, for the advice) unless some process ran out of memory, which says
        nothing about the folder (a second all-reduce)."""
        error, memory = None, False
        try:
            load_checkpoint_state(self._model, optimizer, self.last_good_checkpoint)
        except Exception as err:  # noqa: BLE001 - an unreadable checkpoint is a failed restore, not a crash
            error, memory = f"{type(err).__name__}: {err}", is_out_of_memory(err)
        if not self._any_process(error is not None):
            return None
        if not self._any_process(memory):
            self._unreadable = self.last_good_checkpoint
        return error or "the load failed on another process"

    def _newer_checkpoint_restored(self, optimizer) -> int | None:
        """With the CPU snapshot as the validated state: restore the last good checkpoint instead when it is newer
        than the snapshot, or no snapshot exists (the snapshot is refreshed every `snapshot_every_n_steps`, a
        checkpoint is validated at the check after its save, and judged on logged losses a checkpoint can be
        validated before any copy is kept), and every process can read it; returns its step, or `None` to restore
        the snapshot. Refused, so the snapshot is restored: a checkpoint the guard cannot read back (sharded weights,
        PEFT adapters, no `optimizer.pt`), or one whose files would take more than half of the free host memory. A
        load that fails anywhere leaves the model as it was, with a warning. After a restore the snapshot is taken
        again from the restored state, so that a later trip does not depend on the folder."""
        path, copy = self.last_good_checkpoint, self._snapshot
        if (path is None or path == self._unreadable or self._sharded or self._model is None
                or (not copy.empty and _checkpoint_step(path) <= copy.step)):
            return None
        problem = (checkpoint_problem(self._model, path) if Path(path).is_dir() else f"{path} is not on disk") \
            or _too_big_to_read(Path(path))
        held = "(no in-memory copy exists yet)" if copy.empty else f"newer than the in-memory copy of step {copy.step}"
        if self._any_process(problem is not None):
            # with no copy, this is why the trip finds no state to restore: said where the stop message is seen
            (logger.warning if copy.empty else logger.info)(
                "RKSP guard: the last good checkpoint %s %s cannot be read back (%s)", path, held,
                problem or "a problem on another process")
            return None
        error = self._load_last_good(optimizer)
        if error is not None:
            logger.warning("RKSP guard: could not restore the last good checkpoint %s (%s); %s", path, error,
                           "there is no in-memory copy to restore" if copy.empty else
                           f"the in-memory copy of step {copy.step} is restored instead")
            return None
        logger.info("RKSP guard: restored the last good checkpoint %s %s", path, held)
        step = _checkpoint_step(path)
        copy.capture(self._params, optimizer, step, self._buffers)
        self._undo.clear()  # a validated state exists now: the pre-window copy is not the one to go back to
        return step

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                          lr_scheduler: Any = None, **kwargs) -> TrainerControl | None:
        event, self._trip = self._trip, None
        if event is None:
            return
        self._act(event, control, optimizer, lr_scheduler)
        return control

    def _act(self, event: DivergenceEvent, control, optimizer, lr_scheduler) -> None:
        """Roll back (or stop) after a trip; the event is logged at the end of the step (`_log_event`)."""
        rollback = self._may_roll_back()
        validated_exists = self._validated_state_exists()
        self._candidate.invalidate()  # a state of the steps this trip makes suspect, or of a trajectory left behind
        restored = self._restore_validated(optimizer) if self._restores_validated() else None
        if restored is not None:  # this update and the suspect one before it are discarded
            event.restored_step = restored
            self.weights_validated = True
            self._in_memory = f"those of step {restored}, the validated state the guard restored"
        else:
            undone = not self._undo.empty or self._skipped
            if not self._undo.empty:
                self._in_memory = f"those of step {self._undo.step} (the tripping update was discarded), not validated"
                # this update is discarded; the weights stay suspect
                self._undo.restore(self._params, optimizer, self._buffers)
            elif self._skipped:
                self._in_memory = f"those of step {event.step - 1} (the tripping update was skipped), not validated"
            else:
                self._in_memory = f"those after the tripping update of step {event.step}"
            self.weights_validated = False
            rollback = False
        self._skipped = False
        if rollback:
            event.action = "rollback"
            scale_learning_rate(optimizer, lr_scheduler, self.lr_backoff)
            self.lr_scale *= self.lr_backoff
            logger.warning(
                "RKSP guard: %s. Rolled back to the validated state of step %d, batch skipped, learning rate x %g "
                "(rollback %d of %d).%s",
                event.describe(), event.restored_step, self.lr_backoff, self.rollbacks + 1, self.max_rollbacks,
                self._threshold_hint(event),
            )
        else:
            event.action = "stop"
            self._stop_step = event.step
            self.divergence = event.to_dict()
            control.should_training_stop = True
            if self.weights_validated:
                memory = f"the in-memory model is back at the validated state of step {event.restored_step}"
            else:
                kept = "was discarded" if undone else "is still in the weights"
                memory = f"the tripping update {kept}; the in-memory weights are NOT validated, do not save them"
            logger.error(
                "RKSP guard: %s. Training stops%s; %s; last good checkpoint: %s.%s",
                event.describe(), self._why_no_rollback(validated_exists, event.step), memory,
                self._checkpoint_on_disk(), self._threshold_hint(event),
            )
        self.events.append(event.to_dict())
        self._to_log = event

    def _threshold_hint(self, event: DivergenceEvent) -> str:
        """How to raise the threshold a finite value crossed (a loss or gradient scale unlike an LM's), or ""."""
        def crossed(flag: int, local: float | None, reduced: float | None, threshold: float) -> bool:
            value = reduced if reduced is not None else local
            return bool(event.cause_flags & flag) and value is not None and math.isfinite(value) and value > threshold

        names, relative = [], ""
        if crossed(CAUSE_LOSS, event.loss, event.loss_max_over_processes, self.loss_limit):
            above_absolute = crossed(CAUSE_LOSS, event.loss, event.loss_max_over_processes, self.loss_threshold)
            if self.rule.limited_by_relative and not above_absolute:
                relative = (f" The loss limit {self.loss_limit:g} is relative_loss_threshold "
                            f"({self.relative_loss_threshold:g}) x this run's first checked loss "
                            f"({self.reference_loss:g}): if this task's loss normally moves that far from its start, "
                            f"raise relative_loss_threshold or leave it out (loss_threshold, {self.loss_threshold:g}, "
                            "then applies alone).")
            else:
                names.append(f"loss_threshold (now {self.loss_threshold:g})")
                if self.rule.limited_by_relative:  # above both: raising one alone leaves the other in force
                    names[-1] += f" and relative_loss_threshold (now {self.relative_loss_threshold:g})"
        if crossed(CAUSE_GRAD_NORM, event.grad_norm, event.grad_norm_max_over_processes, self.grad_norm_threshold):
            names.append(f"grad_norm_threshold (now {self.grad_norm_threshold:g})")
        if not names:
            return relative
        return (f"{relative} The rule's thresholds are the paper's, for language-model losses: if values this large "
                f"are normal for this task (a regression loss, a summed loss), raise {' and '.join(names)} in "
                f"RKSPCallback(...).")

    def _set_aside_suspects(self, args, state, event: DivergenceEvent,
                            saved_after_stop: bool = False) -> dict[str, str]:
        """Rename the checkpoints this trip made suspect, `checkpoint-N` -> `_suspect-checkpoint-N` (`-2`, `-3`, ...
        when that name exists; nothing is deleted): transformers' newest-checkpoint lookup (`resume_from_checkpoint=
        True`), `save_total_limit` rotation and Hub uploads skip that name, and a later save of `checkpoint-N` does not
        collide. The saving process(es) rename, those with `args.should_save` (the world main process, or each node's
        main process with `save_on_each_node=True`), where the checkpoints were written; every process has finished
        writing them (the trip was decided in an all-reduce after their saves). A checkpoint already gone when its
        rename runs was renamed by another saving process on a shared filesystem. One all-reduce (the max) then gives
        every process the names and holds them until the renames are done. The event, the events and the divergence
        name the new paths; a checkpoint not renamed (rotated away, or the rename failed) keeps its old path there.
        `saved_after_stop`: the checkpoint was written at the stopping step after the stop (`_set_aside_late_save`).
        Returns `{old path: new path}`."""
        paths = list(event.suspect_checkpoints)
        if not paths:
            return {}
        codes = [0] * len(paths)  # 0: not renamed here; k >= 1: renamed to _suspect_name(name, k)
        if getattr(args, "should_save", state.is_world_process_zero):
            for i, path in enumerate(paths):
                source = Path(path)
                if not source.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") or not source.is_dir():
                    continue  # rotated away (or renamed by another saving process) since: nothing to set aside
                k = 1
                while source.with_name(_suspect_name(source.name, k)).exists():
                    k += 1
                try:
                    source.rename(source.with_name(_suspect_name(source.name, k)))
                    codes[i] = k
                except FileNotFoundError:
                    continue  # another saving process renamed it first (shared filesystem): the all-reduce names it
                except OSError as err:
                    logger.warning("RKSP guard: could not rename the suspect checkpoint %s (%s): it keeps its name, so "
                                   "resume_from_checkpoint=True resumes from it (the newest checkpoint of this run) "
                                   "until the run saves another; %s instead", path, err, self._what_to_do())
        if is_distributed():
            shared = reduce_max(torch.tensor(codes, dtype=torch.float64, device=self._device()))
            codes = [int(c) for c in shared.tolist()]
        renamed = {path: str(Path(path).with_name(_suspect_name(Path(path).name, k)))
                   for path, k in zip(paths, codes) if k}
        if not renamed:
            return {}
        event.suspect_checkpoints = [renamed.get(path, path) for path in paths]
        for record in [*self.events, self.divergence]:
            if record is not None and record.get("suspect_checkpoints"):
                record["suspect_checkpoints"] = [renamed.get(path, path) for path in record["suspect_checkpoints"]]
        if state.is_world_process_zero and saved_after_stop:
            logger.warning(
                "RKSP guard: %s was saved at step %d after the guard stopped the run there (a callback asked for the "
                "save the guard had cancelled); its weights are %s, not a validated state of step %d: renamed to %s "
                "(nothing was deleted; transformers' newest-checkpoint lookup, save_total_limit rotation and Hub "
                "uploads skip it)%s. After the stop: %s%s.", ", ".join(renamed), event.step, self._in_memory,
                event.step, ", ".join(renamed.values()), _pushed_copies(args), self._what_to_do(),
                self._newer_checkpoint(args))
        elif state.is_world_process_zero:
            when = "After the stop" if event.action == "stop" else "Should this run end before its next save"
            logger.warning(
                "RKSP guard: the divergence at step %d followed %s, whose weights are suspect: renamed to %s (nothing "
                "was deleted; transformers' newest-checkpoint lookup, save_total_limit rotation and Hub uploads skip "
                "it)%s. %s: %s%s.", event.step, ", ".join(renamed), ", ".join(renamed.values()), _pushed_copies(args),
                when, self._what_to_do(), self._newer_checkpoint(args))
        return renamed

    def _newer_checkpoint(self, args) -> str:
        """For the rename message: a warning against `resume_from_checkpoint=True` when it would take another
        `checkpoint-N` than the last good one (an earlier run's later checkpoint in `output_dir`, or a suspect one not
        renamed), else ''."""
        folder = self._run_folder(args)
        try:
            newest = get_last_checkpoint(str(folder))
        except OSError:
            return ""
        good = self.last_good_checkpoint
        if newest is None or (good is not None and _checkpoint_step(newest) <= _checkpoint_step(good)):
            return ""
        return f" (not resume_from_checkpoint=True: it would take {newest}, a later checkpoint in {folder})"

    def _forget_suspect_best(self, args, state, event: DivergenceEvent, renamed: dict[str, str] | None = None) -> None:
        """A best checkpoint whose weights led to this trip must not come back through `load_best_model_at_end`: the
        best evaluated checkpoint up to the last good one (still on disk) takes its place, else the last good one,
        with its step and metric, which the Trainer uses to name the best checkpoint again at each later save.
        `renamed` maps the suspect checkpoints' paths before `_set_aside_suspects` to their new ones."""
        renamed = renamed or {}
        best = getattr(state, "best_model_checkpoint", None)
        if best is None or not any(_same_path(best, path) for path in [*event.suspect_checkpoints, *renamed]):
            return
        now = next((new for old, new in renamed.items() if _same_path(best, old)), None)
        good = self.last_good_checkpoint
        good = good if good is not None and Path(good).is_dir() else None
        step = None if good is None else _checkpoint_step(good)
        metric = None
        metric_name = getattr(args, "metric_for_best_model", None)
        if step is not None and metric_name:
            # the best evaluated checkpoint up to the last good one that is still on disk, else the last good one
            key = metric_name if metric_name.startswith("eval_") else f"eval_{metric_name}"
            folder = Path(good).parent
            # a suspect checkpoint not renamed keeps its name (a renamed one's name is free for a later, good save)
            suspect = [p for e in [*self.events, event.to_dict()] for p in e.get("suspect_checkpoints") or []]
            scored = [(log[key], log["step"]) for log in state.log_history
                      if key in log and isinstance(log.get("step"), int) and log["step"] <= step
                      and (folder / f"{PREFIX_CHECKPOINT_DIR}-{log['step']}").is_dir()
                      and not any(_same_path(folder / f"{PREFIX_CHECKPOINT_DIR}-{log['step']}", p) for p in suspect)]
            if scored:
                pick = max if getattr(args, "greater_is_better", None) else min
                metric, step = pick(scored, key=lambda pair: pair[0])
                good = str(folder / f"{PREFIX_CHECKPOINT_DIR}-{step}")
        logger.warning("RKSP guard: the best checkpoint so far, %s%s, is suspect (the divergence at step %d followed "
                       "it); the best model is now %s", best, f" (renamed to {now})" if now else "", event.step,
                       good if good is not None else "none (no validated checkpoint is on disk)")
        state.best_model_checkpoint, state.best_global_step, state.best_metric = good, step, metric

    def _run_folder(self, args) -> Path:
        """The folder this run saves its checkpoints and its record in: `output_dir`, or a hyperparameter-search
        trial's own folder once `_find_trial_folder` found it."""
        # absolute: the record's paths stay right when a resumed run starts from another working directory
        return self._trial_folder if self._trial_folder is not None else Path(args.output_dir).absolute()

    def _find_trial_folder(self, args, state, *, sure_only: bool = False) -> None:
        """Under hyperparameter search the Trainer saves a trial's checkpoints in `output_dir/<hp_name(trial)>` or
        `output_dir/run-<trial id>` and does not tell callbacks: the trial's folder is the one holding a
        `checkpoint-<step>` of this step whose `trainer_state.json` is this run's (same trial values, step and log
        history; one or two levels below `output_dir`). When several match (no log entries yet), the newest is taken,
        unless `sure_only` (a resumed trial: another trial's checkpoint of the same step must not be taken for it;
        the folder is then found at the trial's next save)."""
        if self._trial_folder is not None or getattr(state, "trial_params", None) is None:
            return
        out, name = Path(args.output_dir).absolute(), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        try:
            saved = {p: _saved_trainer_state(p) for pattern in (f"*/{name}", f"*/*/{name}") for p in out.glob(pattern)
                     if p.is_dir()}
            match = {p: _on_this_path(s, state, state.global_step) for p, s in saved.items()
                     if s is not None and s.get("trial_params") == state.trial_params}
            sure = [p for p, m in match.items() if m is True]
            if sure_only:  # two trials with the same values and history cannot be told apart: none is taken
                pick = sure if len(sure) == 1 else []
            else:  # just saved: the newest of the matching folders
                pick = sure if len(sure) == 1 else [p for p, m in match.items() if m]
            newest = max(pick, key=lambda path: path.stat().st_mtime_ns, default=None)
        except OSError:
            newest = None
        if newest is not None:
            self._trial_folder = newest.parent

    def _checkpoint_on_disk(self) -> str:
        """The last good checkpoint for a message: its path, said to be missing when rotation (or a user) removed it."""
        path = self.last_good_checkpoint
        if path is None:
            return "None (no checkpoint was validated)"
        return path if Path(path).is_dir() else f"{path} (deleted since, e.g. by save_total_limit rotation)"

    def _write_record(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        out = self._run_folder(args)
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "rule": {"loss_threshold": self.loss_threshold, "grad_norm_threshold": self.grad_norm_threshold,
                     "relative_loss_threshold": self.relative_loss_threshold, "reference_loss": self.reference_loss,
                     "loss_limit": self.loss_limit},
            "on_divergence": self.on_divergence,
            "max_rollbacks": self.max_rollbacks,
            "lr_backoff": self.lr_backoff,
            "diverged": self.divergence is not None,
            "rollbacks": _count_rollbacks(self.events),  # the whole record's
            "lr_scale": self.lr_scale,
            "last_good_checkpoint": self.last_good_checkpoint,
            # rotation (save_total_limit) or a user may have deleted it since
            "last_good_checkpoint_on_disk": (self.last_good_checkpoint is not None
                                             and Path(self.last_good_checkpoint).is_dir()),
            "weights_validated": self.weights_validated,
            "events": self.events,
        }
        # whole or not at all: a full disk or a kill mid-write must not leave a truncated record for the next resume
        write_text_whole(out / RECORD_NAME, json.dumps(record, indent=2), partial_prefix="_")  # "_": not pushed
        earlier, self._record_written = self._record_written, out / RECORD_NAME
        if earlier is not None and not _same_path(str(earlier), str(out / RECORD_NAME)):
            # a trial's record written before its first save found the trial's folder: this one supersedes it
            earlier.unlink(missing_ok=True)

    def _log_event(self, args, state, optimizer) -> None:
        event, self._to_log = self._to_log, None
        if event is not None:
            renamed = self._set_aside_suspects(args, state, event)
            self._forget_suspect_best(args, state, event, renamed)
            if event.action == "rollback":
                lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
                event.new_lr = lr
                self.events[-1]["new_lr"] = lr
                self._log(args, state, {"rksp/rollbacks": self.rollbacks, "rksp/rollback_step": event.step,
                                        "rksp/rollback_cause": event.cause_flags, "rksp/lr": lr})
            else:
                self._log(args, state, {"rksp/diverged": 1.0, "rksp/diverged_step": event.step,
                                        "rksp/diverged_cause": event.cause_flags, "rksp/rollbacks": self.rollbacks})
                newer = self._newer_checkpoint(args) if not renamed and state.is_world_process_zero else ""
                if newer:  # the rename warning says this where there was one
                    logger.warning("RKSP guard: after the stop, %s%s.", self._what_to_do(), newer)
            self._write_record(args, state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs) -> TrainerControl | None:
        self._find_trial_folder(args, state)
        path = str(self._run_folder(args) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._stop_step is None:
            # validated when the next step's loss and gradient pass the rule (see on_pre_optimizer_step)
            self._pending_checkpoints.append((state.global_step, path))
        elif self.guard:
            self._set_aside_late_save(args, state, path)

    def _set_aside_late_save(self, args, state, path: str) -> None:
        """A checkpoint written after the guard stopped the run at this step: the guard cancels the Trainer's save of
        the stopping step, so another callback asked for it. It holds the diverged weights, or an earlier validated
        state under this step's name and without the back-off a resume from an earlier checkpoint applies: it is set
        aside like the suspect checkpoints (`_set_aside_suspects`) and added to the stopping event's, and the record is
        rewritten."""
        for record in (self.events[-1] if self.events else None, self.divergence):
            if record is not None:
                record["suspect_checkpoints"] = [*(record.get("suspect_checkpoints") or []), path]
        event = DivergenceEvent(step=self._stop_step, causes=[], cause_flags=0, loss=None, grad_norm=None,
                                first_bad_layer=None, suspect_checkpoints=[path])
        renamed = self._set_aside_suspects(args, state, event, saved_after_stop=True)
        self._forget_suspect_best(args, state, event, renamed)
        self._write_record(args, state)

    def _judge_logged_loss(self, args, state, control, logs: dict[str, Any], optimizer, lr_scheduler) -> None:
        """The loss part of the rule when the model returns no loss. The loss the Trainer logs at step `s` is the mean
        over the `n` steps since its last log, `a..s`, whose losses come from the weights of steps `a - 1 .. s - 1`;
        the KSS term is left out (`kss/task_loss`). The task losses are non-negative (cross-entropy, label-smoothed or
        not), so no step's loss exceeds `n x mean`: a passing log validates those weights only when `n x mean <=
        loss_threshold`. Then the candidate copy (a passing step's state among them) becomes the validated one, and
        the latest checkpoint saved at steps `a - 1 .. s - 1` the last good one. A passing log above that bound is
        undecided: the candidate is dropped and those checkpoints stay pending (a later trip sets them aside). A
        negative logged loss breaks the bound: from then on no log validates anything, with a warning once. A log that
        trips is a divergence at step `s` covering steps `a..s`, handled as at a check step (stop, or rollback to the
        state validated before `a`; the checkpoints not validated yet are set aside). The Trainer logs before it
        evaluates and saves step `s`, so a stop cancels both: no checkpoint of a diverged log step is written by the
        Trainer's own schedule (one another callback asks for is set aside in `on_save`). A log whose steps include a
        trip the per-step check already handled (the Trainer's mean still holds the rolled-back losses) is neither
        judged nor validating."""
        first, self._last_loss_log = self._last_loss_log + 1, state.global_step
        steps = state.global_step - first + 1
        self._count_logged(logs, steps)
        key = "kss/task_loss" if "kss/task_loss" in logs else "loss"
        try:
            value = float(logs[key])
        except (TypeError, ValueError):
            self._candidate.invalidate()  # its step's loss is in this log, which says nothing
            return
        if value < 0 and not self._bound_broken:
            self._bound_broken = True
            if state.is_world_process_zero:
                logger.warning(
                    "RKSP guard: the logged %s at step %d is negative (%g): the guard validates a logged mean of n "
                    "steps only because no step's loss exceeds n x the mean, which needs non-negative losses. From "
                    "now on no logged loss validates a state or checkpoint (a logged loss > %g still trips the rule).",
                    key, state.global_step, value, self.loss_limit)
        if self._rolled_back_since(first):
            self._candidate.invalidate()  # its loss is in a mean with the losses of rolled-back steps
            self._pending_checkpoints = [(s, p) for s, p in self._pending_checkpoints if s >= state.global_step]
            return
        if not self.rule.loss_diverged(value):
            bound = self.loss_limit  # the steps of the run's first log are judged by loss_threshold alone
            self._note_reference(value, first, state.global_step, state)
            if self._bound_broken or not steps * value <= bound:
                self._candidate.invalidate()  # one of the steps may have been over the threshold: nothing validated
                return
            self._validate_window(first, state.global_step)
            return
        span = f"mean over steps {first}-{state.global_step}" if first < state.global_step else "value"
        if is_distributed():
            span = (f"mean over steps {first}-{state.global_step} and over processes" if first < state.global_step
                    else "mean over processes")
        event = DivergenceEvent(
            step=state.global_step, cause_flags=CAUSE_LOSS, loss=value, grad_norm=None, first_bad_layer=None,
            causes=[f"logged {key} > {self.loss_limit:g} or non-finite ({value}, the Trainer's logged {span}"
                    "; the model returns no loss of its own)"],
            last_good_checkpoint=self.last_good_checkpoint, first_checked_step=first,
            suspect_checkpoints=[path for _, path in self._pending_checkpoints],
        )
        self._pending_checkpoints = []
        self._window_first = self._worst_loss = self._worst_squared_norm = None  # the trip covers the open window
        self._act(event, control, optimizer, lr_scheduler)
        self._log_event(args, state, optimizer)
        if event.action == "stop":
            control.should_save = False  # the Trainer saves after this log: never the diverged step
            control.should_evaluate = False  # save_strategy="best" would save it as a new best after evaluating

    def _count_logged(self, logs: dict[str, Any], steps: int) -> None:
        """Add a training log's loss times the `steps` it covers to `_logged_sum`: the Trainer's final `train_loss` is
        the mean over this call's steps, so the steps after the last log sum to the difference (`_judge_tail`)."""
        try:
            value = float(logs["loss"])
        except (TypeError, ValueError):
            value = float("nan")
        if math.isfinite(value):
            self._logged_sum += value * steps
        else:
            self._logged_finite = False

    def _rolled_back_since(self, first: int) -> bool:
        """Whether this train() call tripped at step `first` or later: a logged mean from `first` on still holds the
        losses of the rolled-back steps, so it is neither judged nor validating."""
        return any(int(e.get("step", 0)) >= first for e in self.events[self._events_before_call:])

    def _validate_window(self, first: int, last: int) -> None:
        """Steps `first..last` passed: the candidate copy (a passing step's state among them) becomes the validated
        one, and the latest checkpoint saved at steps `first - 1 .. last - 1` the last good one; those checkpoints
        leave the pending list (older ones, of undecided logs, stay pending)."""
        if not self._candidate.empty:
            self._snapshot, self._candidate = self._candidate, self._snapshot
            self._undo.clear()  # a validated state exists: the pre-run copy is no longer the one to go back to
        self._candidate.invalidate()
        covered = [(s, p) for s, p in self._pending_checkpoints if first - 1 <= s < last]
        if covered:
            self._promote(covered[-1][1])
        self._pending_checkpoints = [(s, p) for s, p in self._pending_checkpoints if not first - 1 <= s < last]

    def _judge_tail(self, args, state, logs: dict[str, Any]) -> None:
        """Judge the steps after the last training log, `a..S`, at the final log of `train()`: its `train_loss` is the
        mean over this call's steps (`S - start`; a resumed call's since the resume), so the tail's loss sums to
        `train_loss x (S - start)` minus the logged losses times the steps they cover (allowing for logs rounded to 4
        decimals). Under DDP the Trainer adds this process's own tail to `train_loss`: the tail sums are averaged over
        processes (one all-reduce), as the logged losses are. A tail mean > loss_threshold, or non-finite, is a
        divergence at step `S`: training has ended, so nothing is rolled back; the checkpoints not validated yet (that
        of step `S` included) are set aside and the in-memory weights are marked not validated. A tail whose sum is
        <= loss_threshold validates its steps as a passing log does; one in between is undecided. When the tail cannot
        be computed (no `train_loss`, a non-finite logged loss, a sum that does not match), the tail is unjudged: the
        in-memory weights are marked not validated, with a warning. `KSSTrainer` logs `kss/tail_task_loss`, the
        tail's own task-loss mean, which is judged instead, or else `kss/tail_term`, the KSS share of `train_loss` per
        tail step, which is subtracted (the tail is judged on the task loss); a KSS run without them whose tail could
        trip by its KSS term is unjudged as well. A tail holding a step the per-step check rolled back is neither
        judged nor validating, as such a log."""
        first, last = self._last_loss_log + 1, state.global_step
        steps = last - first + 1
        if steps <= 0:
            return
        if self._rolled_back_since(first):
            self._candidate.invalidate()
            return
        total = last - self._call_start
        problem = None
        tail = slack = 0.0
        try:
            train_loss = float(logs["train_loss"])
        except (KeyError, TypeError, ValueError):
            train_loss = None
        if train_loss is None:
            problem = "the final log has no train_loss"
        elif not self._logged_finite:
            problem = "a logged loss was not finite, so train_loss cannot be split"
        else:
            tail = train_loss * total - self._logged_sum  # this process's: the logged part is the same on all
            # logged losses rounded to 4 decimals (older transformers), and float error
            slack = 5e-5 * (first - 1 - self._call_start) + 1e-9 * (abs(train_loss) * total + abs(self._logged_sum) + 1)
        if is_distributed():  # the mean over processes, as the Trainer's logged losses (one all-reduce)
            values = world_sum(torch.tensor([float(problem is not None), tail, slack], dtype=torch.float64,
                                            device=self._device())).tolist()
            world = max(int(getattr(args, "world_size", 1) or 1), 1)
            tail, slack = values[1] / world, values[2] / world
            if problem is None and values[0] > 0:
                problem = "train_loss could not be split on another process"
        if problem is None and math.isfinite(tail) and tail < -slack and not self._bound_broken:
            problem = f"train_loss x {total} steps is below the logged losses by {-tail:g}"
        term = logs.get("kss/tail_term")  # KSSTrainer: the KSS share of train_loss over these steps, per step
        task = logs.get("kss/tail_task_loss")  # KSSTrainer: the task losses' own mean over these steps
        if problem is None and isinstance(task, numbers.Real) and not isinstance(task, bool):
            # exact however large the KSS term (train_loss less the term loses the task loss to rounding then)
            tail, slack = float(task) * steps, 1e-9 * (abs(float(task)) * steps + 1)
        elif isinstance(term, numbers.Real) and math.isfinite(term) and math.isfinite(tail):
            tail -= float(term) * steps  # judged on the task loss, as the logged kss/task_loss
        mean = tail / steps  # non-finite when a tail loss was
        low = (tail - slack) / steps if math.isfinite(tail) else float("inf")
        kss = term is None and any(k in logs for k in ("kss/penalty", "kss/near_unit_mass", "kss/spectral_radius"))
        if problem is None and self.rule.loss_diverged(low) and kss and math.isfinite(tail):
            problem = (f"their mean loss from train_loss, {mean:g}, includes the KSS term, which may account for its "
                       f"exceeding {self.loss_limit:g}")
        if problem is not None:
            self._candidate.invalidate()
            self.weights_validated = False
            self._in_memory = f"those after step {last}, whose steps {first}-{last} after the last log were not judged"
            if state.is_world_process_zero:
                logger.warning(
                    "RKSP guard: the loss of steps %d-%d, after the last training log, could not be judged (%s): the "
                    "in-memory weights are not counted as validated. Make max_steps a multiple of logging_steps so "
                    "that the last step is logged.", first, last, problem)
            return
        if not self.rule.loss_diverged(low):
            if not self._bound_broken and tail + slack <= self.loss_limit:
                self._validate_window(first, last)
            else:
                self._candidate.invalidate()
            return
        over = " and over processes" if is_distributed() else ""
        event = DivergenceEvent(
            step=last, cause_flags=CAUSE_LOSS, loss=mean, grad_norm=None, first_bad_layer=None,
            causes=[f"loss > {self.loss_limit:g} or non-finite ({mean}, the mean over steps {first}-{last}{over} "
                    "after the last training log, from the Trainer's final train_loss; the model returns no loss of "
                    "its own)"],
            action="stop", last_good_checkpoint=self.last_good_checkpoint, first_checked_step=first,
            suspect_checkpoints=[path for _, path in self._pending_checkpoints],
        )
        self._pending_checkpoints = []
        self._candidate.invalidate()
        self._stop_step = last
        self.weights_validated = False
        self._in_memory = f"those after step {last}, trained through the steps whose loss diverged"
        self.divergence = event.to_dict()
        self.events.append(event.to_dict())
        if state.is_world_process_zero:
            logger.error("RKSP guard: %s. Training had ended, so nothing was rolled back; the in-memory weights are "
                         "NOT validated, do not save them; last good checkpoint: %s.", event.describe(),
                         self._checkpoint_on_disk())
        renamed = self._set_aside_suspects(args, state, event)
        self._forget_suspect_best(args, state, event, renamed)
        self._write_record(args, state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
               lr_scheduler: Any = None, **kwargs) -> TrainerControl | None:
        if (self.guard and self._loss_from_logs and logs is not None and "loss" in logs and self._stop_step is None
                and self._params):
            self._judge_logged_loss(args, state, control, logs, optimizer, lr_scheduler)
        # the final metrics of train() (its TrainOutput.metrics is this dict) say whether the run diverged
        if logs is not None and "train_runtime" in logs and self.guard:
            before = self.divergence
            if self._loss_from_logs and self._stop_step is None and self._params:
                self._judge_tail(args, state, logs)  # the steps after the last training log
            if self._window_first is None and self._stop_step is None and self._params:
                self._check_final_update(args, state, optimizer)  # the weights of the last update
            if self.divergence is None and logs.get("rksp/diverged") == 1.0:
                return  # a second guard of this run reported a divergence in these metrics: its keys stand
            extra = {"rksp/diverged": float(self.divergence is not None), "rksp/rollbacks": float(self.rollbacks)}
            if self.divergence is not None:  # which step stopped the run, and why (the bit flags of `cause_flags`)
                extra["rksp/diverged_step"] = float(self.divergence["step"])
                extra["rksp/diverged_cause"] = float(self.divergence["cause_flags"])
            final = next((entry for entry in reversed(state.log_history) if entry is logs
                          or "train_runtime" in entry), None)
            if self.divergence is not None and self.divergence is not before:
                # found while the final metrics are logged: the reporters (TensorBoard, W&B, ...) have logged them
                # already, so the trip gets an entry of its own, as a trip during training does
                self._log(args, state, dict(extra))
            logs.update(extra)
            if final is not None:
                final.update(extra)

    def _check_open_window(self, args, state, control, optimizer, lr_scheduler) -> None:
        """Apply the rule to the steps since the last check when the loop leaves them unchecked (an epoch ends, or
        another callback stopped training), and act as at a check step: every process takes part in the one
        all-reduce, with -inf for a missing value."""
        first, self._window_first = self._window_first, None
        device = self._device()
        total = self._watch.total() if self._watch is not None else None
        minus_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=device)
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
        local = torch.stack([
            minus_inf if self._worst_loss is None else self._worst_loss.to(device=device, dtype=torch.float64),
            minus_inf if self._worst_squared_norm is None
            else self._worst_squared_norm.to(device=device, dtype=torch.float64),
            minus_inf if total is None else torch.where(torch.isfinite(total.to(device)), minus_inf, inf),
        ])  # the window maxima are already +inf where a value was not finite
        self._worst_loss = self._worst_squared_norm = None
        local_values, reduced = torch.stack([local, reduce_max(local.clone())]).tolist()
        loss, squared, activations = reduced
        loss_value = None if loss == float("-inf") else loss
        norm = None if squared == float("-inf") else math.sqrt(squared)
        local_loss = None if local_values[0] == float("-inf") else local_values[0]
        local_norm = None if local_values[1] == float("-inf") else math.sqrt(local_values[1])
        flags = 0
        causes = []
        if loss_value is not None and self.rule.loss_diverged(loss_value):
            flags |= CAUSE_LOSS
            causes.append(f"loss > {self.loss_limit:g} or non-finite (worst step loss over processes: "
                          f"{loss_value})")
        if norm is not None and self.rule.grad_norm_diverged(norm):
            flags |= CAUSE_GRAD_NORM
            causes.append(f"gradient norm > {self.grad_norm_threshold:g} or non-finite (worst norm over processes: "
                          f"{norm})")
        if activations > 0:
            flags |= CAUSE_ACTIVATION
            causes.append("non-finite block output")
        if not flags:
            if self._loss_from_logs:
                return  # judged on logged losses, a passing logged loss after them validates the checkpoints
            validated = [path for step, path in self._pending_checkpoints if step < state.global_step]
            if validated:
                self._promote(validated[-1])
                self._pending_checkpoints = [(s, p) for s, p in self._pending_checkpoints if s >= state.global_step]
            return
        names = self._watch.names if self._watch is not None else []
        index = self._watch.first_bad_index() if flags & CAUSE_ACTIVATION and names else None
        bad = int(index) if index is not None else len(names)
        event = DivergenceEvent(
            step=state.global_step, causes=causes, cause_flags=flags, loss=local_loss, grad_norm=local_norm,
            first_bad_layer=names[bad] if bad < len(names) else None,
            last_good_checkpoint=self.last_good_checkpoint,
            suspect_checkpoints=[path for _, path in self._pending_checkpoints], first_checked_step=first,
            loss_max_over_processes=loss_value, grad_norm_max_over_processes=norm,
        )
        self._pending_checkpoints = []
        self._act(event, control, optimizer, lr_scheduler)
        self._log_event(args, state, optimizer)
        if event.action == "stop":
            control.should_save = False  # the epoch-end checkpoint would hold the unvalidated weights

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                     **kwargs) -> TrainerControl | None:
        # the loop left the epoch (its end, or a stop by another callback) inside a window: check it before the
        # epoch-end save and before train() reports its metrics
        if self.guard and self._window_first is not None and self._stop_step is None and self._params:
            self._check_open_window(args, state, control, optimizer, lr_scheduler)
        if self._stop_step is not None:  # save_strategy="epoch" saves after this hook: never the stopping step
            control.should_save = False
            control.should_evaluate = False
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                     **kwargs) -> TrainerControl | None:
        stopped = self.divergence is not None  # before the checks below: the Trainer loaded the best model after it
        if self.guard and self._window_first is not None and self._stop_step is None and self._params:
            self._check_open_window(args, state, control, optimizer, lr_scheduler)  # not left through an epoch end
        self._stop_guard()
        self._candidate.clear()  # judged on logged losses: its buffers are a second copy of the training state
        best = self._best_loaded(args, state)
        if stopped and best is not None:
            self._note_best_loaded(best)
        if self.events:
            self._write_record(args, state)
        events = self.events[self._events_before_call:]  # this train() call's own: not those of a resumed run's past
        rollbacks = [e for e in events if e["action"] == "rollback"]
        if rollbacks and self.divergence is None and state.is_world_process_zero:
            # the run finished, but its final weights are not what its step count suggests: say what they are
            since = state.global_step - rollbacks[-1]["step"]
            trained = (f"{since} step(s) trained after it" if since > 0
                       else "no step trained after it: the final weights are that state's")
            if best is not None:
                trained += (f"; load_best_model_at_end then loaded {best} (step {_checkpoint_step(best)}): the "
                            "in-memory weights are that checkpoint's")
            total = _count_rollbacks(self.events)
            earlier = f", {total} in the run record" if total != len(rollbacks) else ""
            logger.warning(
                "RKSP guard: %d rollback(s) in this train() call%s (learning rate x %g). The weights continue from the "
                "validated state of step %s, with %s.", len(rollbacks), earlier, self.lr_scale,
                rollbacks[-1]["restored_step"], trained,
            )
        if self.divergence is not None and not self.weights_validated:
            logger.error("RKSP guard: the run diverged at step %s and the in-memory weights are %s; %s instead of "
                         "saving them.", self.divergence["step"], self._in_memory, self._what_to_do())
        # nothing reads the CPU copies after train(): the next train() call takes its own (weights and two optimizer
        # moments, ~3x the trainable parameters' bytes, would otherwise stay in host memory with the callback)
        self._snapshot.clear()
        self._undo.clear()

    def _check_final_update(self, args, state, optimizer) -> None:
        """Judge the weights the last update left, which no later step checks: one forward without gradients, in eval
        mode, of the last training micro-batch (the loss part of the rule; there is no gradient to judge). It runs at
        the final metrics log of `train()`, before `load_best_model_at_end` (the epoch end before that log has closed
        any open window of unchecked steps). A loss above the threshold, or non-finite, on any process is a
        divergence of the last update: the checkpoints saved since the last passing check are set aside as at any
        trip, and the validated state is put back in memory where the guard would restore it
        (a rollback, or a stop with `restore_on_stop`). A passing check validates nothing: the checkpoint saved at
        the last step stays pending (no gradient norm or block output was judged on its weights), so
        `last_good_checkpoint` names the one before it. One micro-batch is noisier than a step's mean loss, which the
        per-step check reads. Skipped, so the last update stays unjudged: when the last step was rolled back (its
        update was discarded), when the model returns no loss (the rule reads logged losses then), under FSDP or
        DeepSpeed (a forward of the bare module there is not the sharded one), when the training forward ran on a
        replica (DataParallel), and when the forward fails (on any process: said in a warning). The forward keeps the
        global random generators and every sub-module's train/eval flag as they were."""
        tap = self._loss_tap
        own = self.events[self._events_before_call:]  # this train() call's: a resumed run's record is not its own
        last = own[-1] if own else None
        rolled_back = last is not None and last.get("action") == "rollback" and last.get("step") == state.global_step
        deepspeed = bool(getattr(args, "deepspeed", None)) or getattr(self._trainer, "is_deepspeed_enabled", False)
        if (tap is None or tap.last_call is None or self._loss_from_logs or rolled_back or deepspeed
                or self._sharded or self._fsdp_run(args, self._model)):
            return
        module, call_args, call_kwargs = tap.last_call
        kwargs = {k: v for k, v in call_kwargs.items() if k != "num_items_in_batch"}  # the micro-batch's mean loss
        error, value = None, None
        device = self._device()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(module), \
                    torch.no_grad():
                loss = model_loss(module(*call_args, **kwargs))
            if loss is not None:
                value = float(loss.detach().float().mean())  # NaN stays NaN in the messages and the record
        except Exception as err:  # noqa: BLE001 - a check that cannot run must not end the run's bookkeeping
            error = f"{type(err).__name__}: {err}"
        reduced = [_max_key(value), float(error is not None)]
        if is_distributed():
            reduced = reduce_max(torch.tensor(reduced, dtype=torch.float64, device=self._device())).tolist()
        if reduced[1] > 0:
            if state.is_world_process_zero:
                logger.warning("RKSP guard: could not judge the weights the last update left (%s): they are not "
                               "checked", error or "the forward failed on another process")
            return
        # a pass leaves the last step's checkpoint pending: this check reads one micro-batch's loss, not the
        # gradient norm and block outputs that validate a checkpoint at the step after it
        if reduced[0] == float("-inf") or not self.rule.loss_diverged(reduced[0]):
            return
        step = state.global_step
        suspect = [path for _, path in self._pending_checkpoints]
        self._pending_checkpoints = []
        here = self.rule.loss_diverged(value)
        event = DivergenceEvent(
            step=step, causes=[f"the weights after its update give loss > {self.loss_limit:g} or non-finite on "
                               f"the last training batch{'' if here else ' on another process'} (checked after "
                               f"training ended; loss here: {value}"
                               f"{'' if here else f', max over processes: {reduced[0]}'})"],
            cause_flags=CAUSE_LOSS, loss=value, grad_norm=None,
            first_bad_layer=None, last_good_checkpoint=self.last_good_checkpoint, suspect_checkpoints=suspect,
            first_checked_step=step, loss_max_over_processes=reduced[0],
        )
        self._candidate.invalidate()
        restored = self._restore_validated(optimizer) if self._restores_validated() else None
        if restored is not None:
            event.restored_step = restored
            self.weights_validated = True
            self._in_memory = f"those of step {restored}, the validated state the guard restored"
            memory = f"the in-memory model is back at the validated state of step {restored}"
        else:
            self.weights_validated = False
            self._in_memory = f"those after the last update (step {step}), which diverged"
            memory = "the in-memory weights are NOT validated, do not save them"
        event.action = "stop"
        self._stop_step = step
        self.divergence = event.to_dict()
        self.events.append(event.to_dict())
        if state.is_world_process_zero:
            logger.error("RKSP guard: %s; %s; last good checkpoint: %s.", event.describe(), memory,
                         self._checkpoint_on_disk())
        renamed = self._set_aside_suspects(args, state, event)  # on_log logs the rksp/diverged* metrics
        self._forget_suspect_best(args, state, event, renamed)
        self._write_record(args, state)

    @staticmethod
    def _best_loaded(args, state) -> str | None:
        """The checkpoint `load_best_model_at_end` loaded into the model before `on_train_end`, or `None`."""
        best = getattr(state, "best_model_checkpoint", None)
        if not getattr(args, "load_best_model_at_end", False) or best is None or not Path(best).is_dir():
            return None
        return best

    def _is_validated_checkpoint(self, path: str) -> bool:
        """Whether `path` is a checkpoint the guard validated: not suspect, and no later than the last good one."""
        if self.last_good_checkpoint is None or _checkpoint_step(path) > _checkpoint_step(self.last_good_checkpoint):
            return False
        return not any(_same_path(path, p) for e in self.events for p in e.get("suspect_checkpoints") or [])

    def _note_best_loaded(self, best: str) -> None:
        """After a stop, `load_best_model_at_end` replaced the in-memory weights with those of `best`: say so, and
        whether they are validated (`weights_validated`, which `KSSTrainer.save_model` reads)."""
        step = _checkpoint_step(best)
        self.weights_validated = self._is_validated_checkpoint(best)
        if self.weights_validated:
            self._in_memory = (f"those of {best} (step {step}), a validated checkpoint that load_best_model_at_end "
                               "loaded")
        else:
            self._in_memory = f"those of {best} (step {step}), which load_best_model_at_end loaded; not validated"
        logger.warning("RKSP guard: after the stop at step %s, the in-memory weights are %s.", self.divergence["step"],
                       self._in_memory)

    def _older_validated_on_disk(self, good: str) -> str | None:
        """The latest checkpoint before the deleted last good one `good` that this guard validated and that is still
        on disk (not set aside since), or `None`."""
        older = [p for p in self._validated_paths if _checkpoint_step(p) < _checkpoint_step(good) and Path(p).is_dir()
                 and self._is_validated_checkpoint(p)]
        return max(older, key=_checkpoint_step, default=None)

    def _what_to_do(self) -> str:
        """What to do instead of saving unvalidated weights, naming only the options that exist."""
        good = self.last_good_checkpoint
        if self._unreadable is not None and self._unreadable == good:
            return f"the last good checkpoint ({good}) could not be read back; resume from an older checkpoint"
        if good is None:
            none = ("no checkpoint was validated (none was saved, or none was followed by a passing step), so there "
                    "is none to resume from")
            if self.divergence is not None and self.divergence.get("step") == 1:
                return f"{none}; {_FIRST_STEP}: {_FIRST_STEP_CHECKS}"
            return f"{none}: train again from the initial weights with a lower learning rate (or a longer warm-up)"
        if not Path(good).is_dir():
            deleted = f"the last good checkpoint {good} was deleted since (e.g. by save_total_limit rotation)"
            older = self._older_validated_on_disk(good)
            if older is None:
                return (f"{deleted}, and no earlier checkpoint of this run is on disk: train again with a lower "
                        "learning rate (or a longer warm-up)")
            return (f"{deleted}: resume from the latest validated checkpoint still on disk with "
                    f"trainer.train(resume_from_checkpoint={older!r})")
        return f"resume from the last good checkpoint with trainer.train(resume_from_checkpoint={good!r})"
