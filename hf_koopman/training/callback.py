"""`RKSPCallback`: RKSP verdict before step 1, `rksp/*` metrics in the usual logs, and a divergence guard that stops
or rolls back to the last validated state. This module holds the callback, its settings and the profiling; the guard's
steps are `hf_koopman.training.safety_net.SafetyNet`, which the callback mixes in."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import itertools
import json
import logging
import math
import numbers
import re
import random
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from hf_koopman.files import move_into_place, staging_folder
from hf_koopman.logging_utils import errors_only, get_logger
from hf_koopman.risk import (
    DecisionRule,
    TENTATIVE,
    VERDICT_LEVELS,
    _below_fitted_learning_rates,
    below_risk_budget,
    in_fitted_range,
    load_estimator,
    recommendation,
)
from hf_koopman.training.arguments import _is_int
from hf_koopman.training.divergence import GRAD_NORM_THRESHOLD, LOSS_THRESHOLD, DivergenceRule
from hf_koopman.training.guard import ActivationWatch, DivergenceEvent, GradNormTap, LossTap, StateSnapshot
from hf_koopman.training.safety_net import (
    _IN_MEMORY_UNKNOWN,
    _MODES,
    _SOURCES,
    SafetyNet,
    _count_rollbacks,
    _same_path,
    scale_learning_rate,
)


__all__ = ["RKSPCallback", "register_trainer", "scale_learning_rate"]

#: name prefix of the hidden folder `_save` writes the profile files into before moving them ("_": Hub pushes skip it)
_STAGING_PREFIX = "_rksp-staging-"

logger = get_logger(__name__)

#: `rksp/risk_out_of_range` as logged: 1 outside the risk estimator's training ranges, 0 inside, -1 ranges unknown.
_OUT_OF_RANGE_LEVEL = {True: 1.0, False: 0.0, None: -1.0}


# model -> its Trainer, for Trainer subclasses that register themselves (KSSTrainer): a callback restored from a
# checkpoint is a new instance, and the model is what every callback event receives
_TRAINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_trainer(trainer: Any) -> None:
    """Let `RKSPCallback` instances that see `trainer.model` log through `trainer.log` (weak references only)."""
    if getattr(trainer, "model", None) is not None:
        _TRAINERS[trainer.model] = weakref.ref(trainer)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


#: inputs of a tower other than the text's: with them, the text's token count says nothing of every layer
_OTHER_MODALITIES = ("pixel_values", "pixel_values_videos", "pixel_values_images", "input_values", "input_features",
                     "image_embeds", "visual_embeds", "visual_feats", "image", "audio_values", "flattened_patches",
                     "image_patches")


#: Training examples in a probe whose token count cannot be read (images, audio), and the fewest in a text probe.
_PROBE_ROWS = 8
#: The most training examples a default text probe takes (short sentences: ~25 tokens each).
_MAX_PROBE_ROWS = 512
#: A default text probe's positions, padding included, at most this multiple of its token states asked for.
_PROBE_POSITIONS = 2
#: Token states of a monitoring profile at least, by default.
_MONITOR_SAMPLES = 512


def _token_count(batch: dict[str, Any]) -> int | None:
    """Token states a text probe batch carries: the ones of a `(B, T)` 0/1 attention mask, or the size of `input_ids`;
    None when neither says (no ids, or a 4-D / additive mask) and for batches that also feed another tower (images,
    audio: CLIP, LLaVA, Qwen2-VL ...), whose layers see other counts."""
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or any(batch.get(key) is not None for key in _OTHER_MODALITIES):
        return None
    if isinstance(mask, torch.Tensor):
        return int((mask != 0).sum()) if mask.shape == ids.shape and mask.dim() == 2 else None
    return ids.numel()


def _trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` without its trailing columns that are padding in every row (`attention_mask` 0): a tokenizer called
    with padding="max_length" pads 30-token texts to 512 positions, which would cost the probe's forward 17 times its
    tokens. Every `(B, T)`-leading tensor is cut alike; right padding only (left padding shifts positions)."""
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if _token_count(batch) is None or not (isinstance(mask, torch.Tensor) and mask.shape == ids.shape):
        return batch  # not text alone (an image beside it has channels that could be mistaken for columns)
    used = (mask != 0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if used.numel() else mask.shape[1]
    if width == mask.shape[1]:
        return batch
    rows, columns = mask.shape
    return {key: (value[:, :width] if isinstance(value, torch.Tensor) and value.dim() >= 2
                  and tuple(value.shape[:2]) == (rows, columns) else value) for key, value in batch.items()}


def _grown_probe(first: Any, collate: Any, rows: int) -> tuple[list[Any], dict[str, Any]] | None:
    """`(items, batch)` of the first `rows` examples, or None when the collator cannot batch them (images of other
    sizes further on, a row it refuses): the probe then keeps the rows it has."""
    items = first(rows)
    try:
        return items, dict(collate(items))
    except Exception as err:  # noqa: BLE001 - any collator's error: the smaller probe still stands
        logger.info("RKSP: the probe keeps its first rows; %d training examples could not be collated together "
                    "(%s: %s)", rows, type(err).__name__, err)
        return None


def _image_rows(batch: dict[str, Any], model: Any, wanted: int) -> int | None:
    """Images of this batch's size that give `wanted` token states at the last stage of `model`'s vision encoder (its
    patch grid, as the default image probe reads it, scaled to the batch's height x width), at most 64; None for a
    batch that is not images alone (`(B, C, H, W)` pixel_values without token ids) or a model without a patch size."""
    from hf_koopman.profiling.probes import _image_batch, _image_geometry

    pixels = batch.get("pixel_values")
    config = getattr(getattr(model, "config", None), "vision_config", None) or getattr(model, "config", None)
    if (not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or batch.get("input_ids") is not None
            or getattr(config, "patch_size", None) is None):
        return None
    size, _, per_image = _image_geometry(config)
    return _image_batch(wanted, max(1, per_image * pixels.shape[-2] * pixels.shape[-1] // max(size * size, 1)))


def _decoder_token_count(batch: dict[str, Any], model: Any) -> int | None:
    """Decoder token states of an encoder-decoder probe batch whose decoder reads the labels (the non -100 labels),
    as `profile()` counts them: decoder inputs built from the labels (`profiling.inputs.labels_feed_decoder`), or
    given beside them at their shape (`DataCollatorForSeq2Seq(model=...)` shifts them in); a
    `decoder_attention_mask` of the labels' shape decides when the batch has one; else None."""
    from hf_koopman.profiling.blocks import unwrap_model
    from hf_koopman.profiling.inputs import labels_feed_decoder

    inner, labels, decoder = unwrap_model(model), batch.get("labels"), batch.get("decoder_input_ids")
    given = (isinstance(labels, torch.Tensor) and isinstance(decoder, torch.Tensor) and labels.shape == decoder.shape
             and getattr(getattr(inner, "config", None), "is_encoder_decoder", False))
    if not given and not labels_feed_decoder(batch, inner):
        return None
    mask = batch.get("decoder_attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:  # profile() counts by this mask then
        return int(mask.sum())
    return int((labels != -100).sum())


class _ShortSampleNote(logging.Filter):
    """Drops profile()'s note that some layers got fewer token states than asked for (`SHORT_SAMPLE_NOTE`) and the
    analysis's note that N < d limits the estimate (`sample_size_note`): the callback has said it with its own knobs."""

    def __init__(self) -> None:
        super().__init__()
        from hf_koopman.profiling.profiler import SHORT_SAMPLE_NOTE

        self.prefix = SHORT_SAMPLE_NOTE

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(self.prefix) or _RANK_LIMITED.match(record.getMessage()))


#: the start of `hf_koopman.koopman.dmd.sample_size_note`
_RANK_LIMITED = re.compile(r"N=\d+ snapshots for d=\d+ features")


def _replica_quiet(state: Any) -> Any:
    """Every process profiles the same probe; the local main process says what it found. A replica keeps to errors
    there unless the run asked replicas for more than warnings (`TrainingArguments(log_level_replica="info")`)."""
    from transformers.utils import logging as hf_logging

    return errors_only(not state.is_local_process_zero and hf_logging.get_verbosity() >= logging.WARNING)


class RKSPCallback(SafetyNet, TrainerCallback, ExportableState):
    """Residual Koopman Spectral Profiling inside `Trainer.train()`, and a divergence guard that saves the run.

    * **At train begin** the model is profiled on a probe batch (the first training examples, as many as give
      `num_samples` token states or `probe_batch_size`, collated like training batches, unless `probe_inputs` is
      given; reading them does not advance the training sampler, and the random states a collator draws from are put
      back). `rksp/*` scalars go through
      `Trainer.log`; `rksp_profile.json`, `rksp_report.md` and `rksp_profile.png` are written to `output_dir` (main
      process; a hyperparameter-search trial's go beside its checkpoints, `on_save`); the verdict is logged with the
      recommended action (`hf_koopman.risk.recommendation`), as a warning when a calibrated probability inside the
      estimator's fitted range exceeds `RISK_BUDGET` at the run's learning rate (not for an "uninformative" verdict,
      whose probability is no reading of the model) or, without one, when the verdict is "high risk". With
      a calibrated `RiskEstimator`, the divergence probability at `args.learning_rate` is logged as `rksp/risk` with
      `rksp/risk_out_of_range` (1 when the model, the learning rate or the optimizer (`args.optim`, or the class of
      one passed as `Trainer(optimizers=...)`) lies outside the estimator's training runs, 0 inside, -1 ranges
      unknown), and a warning says "outside the fitted range: ..." naming what lies outside. The shipped
      estimator's runs trained with AdamW, a 20-step warmup to a constant learning rate and no gradient clipping,
      for 150 steps: its probability is for that regime at the run's peak learning rate (clipping and a longer
      warmup make a run safer than it says).
      `auto_kss=True` follows the measurements rather than the paper's rule ("turn KSS on
      when RKSP flags high risk"): in the paper's own No-Norm regime KSS did not lower divergence
      (`results/kss_v2.md`), so a high-risk verdict never switches KSS on. A warning says whether KSS is on (because
      `kss_enabled=True`) or off and staying off, and why, and `kss/auto_enabled = 0` is logged.
    * **Periodic monitoring** (`every_n_steps`, off by default) re-profiles the probe batch and logs the same keys.
    * **Divergence guard** (`guard=True`): the rule of [`~hf_koopman.training.divergence.DivergenceRule`] (loss > 50,
      gradient norm > 500, or a non-finite loss, gradient or block output) on the raw values of every step: the model's
      loss from a forward hook, the gradient norm before clipping at the end of each backward pass, block outputs from
      forward hooks. All processes decide together (one all-reduce of four numbers per step; none in one process).
      `relative_loss_threshold` adds a loss limit on the run's own scale, that multiple of its first checked loss
      (kept in the checkpointed state, so a resumed run keeps its start's); the lower limit applies.
      When the model returns no loss (the Trainer computes it outside the model: `label_smoothing_factor`,
      `compute_loss_func`), a warning says so once and the loss part judges the loss the Trainer logs: a logged loss
      that trips the rule is a divergence at that logging step (the mean of the `logging_steps` steps it covers, so
      `logging_steps=1` checks every step), and a state or checkpoint counts as validated only once a logged loss
      after it passes with `n x mean <= loss_threshold` for a mean of `n` steps (the losses are non-negative, so no
      step's exceeds that; a negative logged loss ends validation by logged loss, with a warning). The steps after
      the last log are judged at the end of `train()` from the Trainer's `train_loss`: a trip there is a stop at the
      last step, with the weights marked not validated. This mode keeps a second CPU copy of the training state (the
      candidate awaiting a log; a warning says when two copies exceed the `"auto"` budget) until `train()` ends
      (`logging_strategy="no"`: the loss part is off, and the warning says so).

      *What counts as good.* The loss and gradient of step `t` are computed with the weights left by step `t - 1`, so a
      passing step `t` validates those weights: the guard then keeps them, with the optimizer state, as a CPU snapshot
      (one copy, refreshed every `snapshot_every_n_steps` passing steps), and a checkpoint saved after step `t - 1`
      becomes the *last good checkpoint*. The copy costs a memory pass over the weights and optimizer state; with
      `"auto"` the refresh interval is chosen from the measured copy and step times so that the copy costs at most
      0.25 % of training time, so a rollback may go back a few more steps than the last passing one.
      When step `t` trips, the weights of step `t - 1` are suspect and the last validated state is that of step
      `t - 2`. The update of the tripping step is never kept. The checkpoints saved since the last passing check are
      suspect too, and so is the checkpoint a resumed run started from until its first check passes: the saving
      process(es) (`args.should_save`) rename each `checkpoint-N` to `_suspect-checkpoint-N` (`-2`, `-3`, ... when
      that name exists; nothing is deleted), which transformers' newest-checkpoint lookup, `save_total_limit`
      rotation and Hub uploads skip, and which a later save of step `N` does not collide with.
      `resume_from_checkpoint=True` then resumes from the last good checkpoint unless a later `checkpoint-N` (an
      earlier run's, say) is in `output_dir`; the rename warning gives the `resume_from_checkpoint=<path>` to pass.
      The weights the run's last update leaves, which no later step reads, are judged at the end of `train()` by one
      forward of the last training batch without gradients (the loss part of the rule): a trip there is a stop at the
      last step, as above. A trial of `hyperparameter_search` keeps its checkpoints and record in its own folder
      (`output_dir/run-<trial>`, or `hp_name`'s), which the guard finds at the trial's first save or on resume.

      *`on_divergence="stop"`* (default): the in-memory model and optimizer go back to the last validated snapshot
      (`restore_on_stop=True`; otherwise only the tripping update is undone), no checkpoint is written for the step
      (one another callback asks for after the stop is set aside as suspect), training stops, and `rksp/diverged`,
      `rksp/diverged_step`, `rksp/diverged_cause` reach `Trainer.log`, `trainer.state.log_history` and the metrics
      `train()` returns. [`KSSTrainer.save_model`] and `KSSTrainer.push_to_hub` refuse weights that were not
      validated. With `load_best_model_at_end` the Trainer then loads the best checkpoint (a suspect best checkpoint is
      replaced by a validated one first): its weights count as validated when that checkpoint is one the guard
      validated.

      *`on_divergence="rollback"`*: the last validated weights and optimizer state are restored, the tripping batch is
      skipped (it counts as a step but its update is discarded, as is the update of the step before it), the learning
      rate is multiplied by `lr_backoff` for the rest of the run ([`scale_learning_rate`]; it is part of the
      scheduler's checkpointed state, so resumed runs keep it), and training continues. After `max_rollbacks`
      rollbacks in one `train()` call the next trip stops as above (a resumed run has a budget of its own). Each
      rollback logs `rksp/rollbacks` (this call's count), `rksp/rollback_step`, `rksp/rollback_cause` (bit flags:
      1 loss, 2 gradient norm, 4 block output) and `rksp/lr` (the new rate).

      Every event is written to `output_dir/rksp_guard.json` (the run record), with this process's loss and gradient
      norm and their maxima over processes, which the rule judged (`loss_max_over_processes`,
      `grad_norm_max_over_processes`). Resuming from a checkpoint older than recorded events applies their back-off to
      the restored scheduler, so the run does not replay the same blow-up (the `learning_rate` the Trainer logs for
      the first resumed step still shows the checkpoint's rate; the optimizer already uses the lowered one), and
      `lr_scale` starts from the back-off the checkpoint's scheduler already holds (its stored guard state); resuming
      explicitly from a `_suspect-checkpoint-N` logs an error naming the last good checkpoint. A resumed run's last
      good checkpoint is the latest, up to the resumed step, that the record or the resumed checkpoint's stored guard
      state names (a run without events writes no record). `save_total_limit` rotates checkpoints by age and may
      delete the last good one; keep a limit of at least 3 (`max(3, ceil(logging_steps / save_steps) + 1)` when the
      guard judges logged losses), or none, when you rely on it.

      Under DDP the rule is applied to each process's own loss and to the averaged gradient (the norm is read after
      DDP's reduction; one tripping process trips all); under FSDP2 to the reduce-scattered gradient, after clipping.
    * **Stateful**: verdict, auto-KSS decision, last good checkpoint, events and the lr scale are saved in checkpoints
      and restored with `restore_callback_states_from_checkpoint=True`.

    Logging through `Trainer.log` (so TensorBoard / W&B see the metrics) needs the trainer: a [`KSSTrainer`] binds
    itself; with any other `Trainer` call `callback.bind(trainer)`, or `register_trainer(trainer)`, which also reaches
    a callback restored from a checkpoint. Unbound, the metrics go to `state.log_history` and the run record only
    (with integrations in `report_to`, a warning says so once).

    Args:
        profile_at_init (`bool`, defaults to `True`): profile at train begin.
        probe_inputs (`dict[str, torch.Tensor]`, *optional*): probe batch; default: from the training data.
        probe_batch_size (`int`, *optional*): examples taken from the training dataset for the probe. By default,
            text examples until they hold `num_samples` token states (at least 8, at most 512 examples: a probe of
            short sentences needs many; no more than 2 x `num_samples` positions, padding included, after trailing
            all-padding columns are dropped), as many images
            as the vision config's patch grid needs for them (8 to 64), and 8 of any other kind (audio).
        num_samples (`int`, *optional*): token states per layer for the init profile (`N`); defaults to
            `default_num_samples(model)`, as `profile`'s (2048, or ≈ 2.62 × the hidden size for models wider than
            782, so that the verdict can read the spectrum).
        rank (`int`, *optional*): `None` (default) profiles the full spectrum; an int r the rank-r approximation,
            which gets no threshold verdict ("uninformative"), so `auto_kss` does not act on it.
        seed (`int`, defaults to `0`): subsampling seed.
        layers (`str` or `list[str]`, *optional*): residual-block override, as in `find_residual_blocks`. Without
            it, a model whose blocks auto-discovery cannot find trains on with the guard and no profile (a warning
            names the override); a wrong override raises before step 1.
        every_n_steps (`int`, defaults to `0`): periodic monitoring period in optimizer steps (`0` = off).
        monitor_num_samples (`int`, *optional*): token states per layer for periodic monitoring; defaults to 512, or
            2 × the hidden size for models wider than 256 (the fewest the verdict reads: at N/d < 2 every monitoring
            profile would be "uninformative"), at most the init profile's `num_samples`.
        guard (`bool`, defaults to `True`): enable the divergence guard.
        loss_threshold (`float`, defaults to `50.0`): the rule's loss threshold.
        grad_norm_threshold (`float`, defaults to `500.0`): the rule's gradient-norm threshold.
        relative_loss_threshold (`float`, *optional*): also count a step as diverged when its loss exceeds this
            multiple of the run's first checked loss (`3.0` is the value `results/relative_loss_rule.md` supports for
            cross-entropy losses); the lower of the two limits applies. Off (`None`) by default: a multiple of the
            first loss is no scale for a loss near 0 or a negative one.
        check_activations (`bool`, defaults to `True`): watch block outputs for NaN/Inf (one on-device sum per block,
            read with the step's one sync).
        on_divergence (`str`, defaults to `"stop"`): `"stop"` or `"rollback"`.
        max_rollbacks (`int`, defaults to `3`): rollbacks allowed before the guard stops.
        lr_backoff (`float`, defaults to `0.5`): learning-rate factor applied at each rollback, in `(0, 1]`.
        restore_on_stop (`bool`, defaults to `True`): on a stop, put the last validated state back in memory.
            Otherwise only the tripping update is undone (with a check window: the check step's update, or every
            update of the window while nothing is validated yet), and the weights are marked unvalidated.
        snapshot_every_n_steps (`int` or `"auto"`, defaults to `"auto"`): refresh the validated CPU snapshot every that
            many passing steps; `"auto"` picks the interval that keeps the copy at <= 0.25 % of the step time.
        rollback_source (`str`, defaults to `"auto"`): where the validated state comes back from. `"memory"`: the CPU
            snapshot above, or the last good checkpoint when it is newer (or no snapshot exists yet) and every process
            can read it back (the newest validated state). `"checkpoint"`: the last good checkpoint (its
            `model.safetensors` and `optimizer.pt`; no CPU copy is kept, so with nothing validated yet, or
            `restore_on_stop=False`, a trip drops the step's gradients and the optimizer skips its update; every step is
            checked until a checkpoint is validated, and the weights are then marked unvalidated). Needs
            `save_strategy="steps"` and `save_total_limit` unset or >= 3 (training refuses to start otherwise); refused
            as well, before anything is written, under FSDP (FSDP1 or FSDP2 modules, DTensor parameters, or FSDP
            requested). The first validated checkpoint is checked (parameter names and shapes, `optimizer.pt`); one the
            guard cannot read back (MoE layers whose saved names differ from their module names, PEFT adapters) switches
            it to `"memory"` with a warning. `"auto"`: `"memory"` unless a copy of the trainable weights and two
            optimizer moments would take more than half of the free host memory (psutil), in a single process without
            FSDP that saves full checkpoints every `save_steps` (`save_strategy="steps"`, not `save_only_model`,
            `save_total_limit` unset or >= 3).
        check_every_n_steps (`int`, defaults to `1`): read the rule's values on the host every that many steps, and at
            the last step, every step whose checkpoint is saved and every epoch end. In between, each step's loss,
            gradient norm and block sums are folded into on-device maxima without a host sync or all-reduce (FSDP2
            still sums the shards' squared norms every step), so no step escapes the rule; a trip is detected up to
            `n - 1` steps late and discards every update since the last passing check. The one host sync per step
            stalls a GPU's queue: on an H200 the guard cost +3-9 % per step at `n = 1` (`results/safety_net.md`); on
            a CPU the sync is free and `1` keeps the exact per-step semantics.
        auto_kss (`bool`, defaults to `False`): report on KSS at a high-risk init verdict. The verdict never switches
            KSS on or off (no measured benefit, `results/kss_v2.md`): `kss_enabled` alone decides (on by default in
            [`KSSTrainingArguments`]). A warning says which state KSS is in, names the evidence, and
            `kss/auto_enabled = 0` is logged.
        save_artifacts (`bool`, defaults to `True`): write the profile JSON / report / plot into `output_dir` (whole
            files; a folder that cannot take them is a warning, and an earlier run's files there are replaced).
        risk_estimator (`RiskEstimator` or path, *optional*): the calibrated estimator behind `rksp/risk` (one fitted
            on your own runs with `RiskEstimator.fit`, or the path of its JSON); `None` for the shipped one.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> RKSPCallback:
        # a mistyped keyword names the closest argument, as profile() does (Python's TypeError names none)
        accepted = inspect.signature(cls.__init__).parameters
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())  # a subclass's **kwargs
        unknown = [] if open_ended else [key for key in kwargs if key not in accepted]
        if unknown:
            close = difflib.get_close_matches(unknown[0], [name for name in accepted if name != "self"], n=1)
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {unknown[0]!r}"
                            + (f"; did you mean {close[0]!r}?" if close else "."))
        return super().__new__(cls)

    def __init__(
        self,
        *,
        profile_at_init: bool = True,
        probe_inputs: dict[str, torch.Tensor] | None = None,
        probe_batch_size: int | None = None,
        num_samples: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        layers: Any = None,
        every_n_steps: int = 0,
        monitor_num_samples: int | None = None,
        guard: bool = True,
        loss_threshold: float = LOSS_THRESHOLD,
        grad_norm_threshold: float = GRAD_NORM_THRESHOLD,
        relative_loss_threshold: float | None = None,
        check_activations: bool = True,
        on_divergence: Literal["stop", "rollback"] = "stop",
        max_rollbacks: int = 3,
        lr_backoff: float = 0.5,
        restore_on_stop: bool = True,
        snapshot_every_n_steps: int | str = "auto",
        rollback_source: str = "auto",
        check_every_n_steps: int = 1,
        auto_kss: bool = False,
        save_artifacts: bool = True,
        risk_estimator: Any = None,
    ) -> None:
        if not _is_int(every_n_steps) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an int >= 0 (0 turns monitoring off), got {every_n_steps!r}")
        for name, value, low in (("probe_batch_size", probe_batch_size, 1), ("num_samples", num_samples, 2),
                                 ("monitor_num_samples", monitor_num_samples, 2)):
            if value is None:  # sized to the data and the model
                continue
            if not _is_int(value) or value < low:
                raise ValueError(f"RKSPCallback: {name} must be an int >= {low}, got {value!r}")
        if rank is not None and (not _is_int(rank) or rank < 1):
            raise ValueError(f"RKSPCallback: rank must be None (the full spectrum) or an int >= 1, got {rank!r}")
        if not _is_int(seed):
            raise ValueError(f"RKSPCallback: seed must be an int, got {seed!r}")
        if layers is not None and not isinstance(layers, (str, list, tuple)):
            raise TypeError(f"RKSPCallback: layers must be None (auto-discovery), the dotted path of the block list "
                            f"(e.g. 'model.layers') or a list of paths or modules, got {type(layers).__name__}")
        if probe_inputs is not None and not isinstance(probe_inputs, (Mapping, torch.Tensor)):
            raise TypeError(
                f"probe_inputs must be a mapping of tensors (a model batch: a dict, or the BatchEncoding a tokenizer "
                f"returns with return_tensors='pt') or a tensor of token ids, got {type(probe_inputs).__name__}"
            )
        if on_divergence not in _MODES:
            raise ValueError(f"on_divergence must be one of {_MODES}, got {on_divergence!r}")
        if not _is_int(max_rollbacks) or max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be an int >= 0, got {max_rollbacks!r}")
        flags = {"profile_at_init": profile_at_init, "guard": guard, "check_activations": check_activations,
                 "restore_on_stop": restore_on_stop, "auto_kss": auto_kss, "save_artifacts": save_artifacts}
        for name, value in flags.items():
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"RKSPCallback: {name} must be True or False, got {value!r}")
        if isinstance(lr_backoff, (bool, np.bool_)) or not isinstance(lr_backoff, numbers.Real):
            raise TypeError(f"lr_backoff must be a number in (0, 1] (the learning rate is multiplied by it), got "
                            f"{type(lr_backoff).__name__} {lr_backoff!r}")
        if not (0 < lr_backoff <= 1):
            raise ValueError(
                f"lr_backoff must be in (0, 1] (the learning rate is multiplied by it), got {lr_backoff!r}"
            )
        if not (isinstance(snapshot_every_n_steps, str) and snapshot_every_n_steps == "auto") and (
            not _is_int(snapshot_every_n_steps) or snapshot_every_n_steps < 1
        ):
            raise ValueError(
                f"snapshot_every_n_steps must be an int >= 1 or 'auto', got {snapshot_every_n_steps!r}"
            )
        if rollback_source not in _SOURCES:
            raise ValueError(f"rollback_source must be one of {_SOURCES}, got {rollback_source!r}")
        if not _is_int(check_every_n_steps) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an int >= 1, got {check_every_n_steps!r}")
        for name, value in (("loss_threshold", loss_threshold), ("grad_norm_threshold", grad_norm_threshold)):
            if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
                continue  # a scalar tensor is a number here
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"RKSPCallback: {name} must be a number > 0 (a step above it counts as diverged), "
                                f"got {type(value).__name__} {value!r}")
        relative = relative_loss_threshold
        if relative is not None and (isinstance(relative, (bool, np.bool_)) or not isinstance(relative, numbers.Real)):
            raise TypeError(f"RKSPCallback: relative_loss_threshold must be None (off) or a number > 1 (a multiple of "
                            f"the run's first checked loss), got {type(relative_loss_threshold).__name__} "
                            f"{relative_loss_threshold!r}")
        self.rule = DivergenceRule(float(loss_threshold), float(grad_norm_threshold),
                                   None if relative_loss_threshold is None else float(relative_loss_threshold))
        self.snapshot_every_n_steps = snapshot_every_n_steps if isinstance(snapshot_every_n_steps, str) else int(
            snapshot_every_n_steps)
        self.rollback_source = rollback_source
        self.check_every_n_steps = int(check_every_n_steps)
        self.profile_at_init = profile_at_init
        try:
            self.risk_estimator = None if risk_estimator is None else load_estimator(risk_estimator)
        except FileNotFoundError as err:  # also a callback restored from a checkpoint whose estimator file moved
            raise FileNotFoundError(
                f"RKSPCallback(risk_estimator=...): {err} If this callback is restored from a checkpoint "
                "(restore_callback_states_from_checkpoint=True), the estimator's JSON was moved or deleted since the "
                "checkpoint was saved: put it back, or resume with restore_callback_states_from_checkpoint=False."
            ) from None
        self.probe_inputs = probe_inputs
        self.probe_batch_size = None if probe_batch_size is None else int(probe_batch_size)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.rank = None if rank is None else int(rank)
        if self.rank is not None:
            logger.warning("RKSPCallback(rank=%d): a rank-%d profile gets no threshold verdict ('uninformative', at "
                           "initialisation and when monitoring), so auto_kss and the verdict-based advice cannot act "
                           "on it; leave rank out for the full spectrum", self.rank, self.rank)
        self.seed = int(seed)
        self.layers = layers
        self.every_n_steps = int(every_n_steps)
        self.monitor_num_samples = None if monitor_num_samples is None else int(monitor_num_samples)
        self.guard = guard
        self.check_activations = check_activations
        self.on_divergence = on_divergence
        self.max_rollbacks = int(max_rollbacks)
        self.lr_backoff = float(lr_backoff)
        self.restore_on_stop = restore_on_stop
        self.auto_kss = auto_kss
        self.save_artifacts = save_artifacts
        # state kept across checkpoints (JSON-ready)
        self.init_verdict: str | None = None
        self.init_score: float | None = None
        self.last_good_checkpoint: str | None = None
        self.divergence: dict[str, Any] | None = None  # the event that stopped the run
        self.events: list[dict[str, Any]] = []  # every trip (rollbacks and the stop), in order
        self.lr_scale = 1.0
        self.relative_limit_off = False  # the run's first checked loss was not positive: no relative limit
        # runtime only
        self.profile = None  # the init SpectralProfile
        self.weights_validated = True  # False once the in-memory weights are ones a divergence was detected on
        self._trainer: Any = None
        self._blocks_missing = False  # auto-discovery found no blocks this run: no profile, the guard runs on
        self._warned_unbound = False
        self._warned_short_probe: set[str] = set()  # the settings a too-short probe was reported for, this run
        self._loss_tap: LossTap | None = None
        self._grad_tap: GradNormTap | None = None
        self._watch: ActivationWatch | None = None
        self._params: list[torch.nn.Parameter] = []
        self._buffers: list[torch.Tensor] = []  # the model's buffers (BatchNorm statistics), restored with them
        self._scaler = None  # the optimizer's enabled loss scaler (fp16 mixed precision), else None
        self._params_first: torch.nn.Parameter | None = None
        self._sharded = False
        self._snapshot = StateSnapshot()  # last validated state
        self._from_checkpoint = False  # rollback_source resolved at train begin: restore from the last good checkpoint
        self._checkpoint_checked = False  # whether the first last good checkpoint's layout was checked
        self._unreadable: str | None = None  # a last good checkpoint whose restore failed
        self._model: torch.nn.Module | None = None
        self._undo = StateSnapshot()  # pre-step state of a tripping step when nothing is validated yet
        self._skipped = False  # a tripping step's gradients were dropped, so the optimizer skipped its update
        self._in_memory = _IN_MEMORY_UNKNOWN  # what an unvalidated stop leaves in the model
        self._step_started: float | None = None  # perf_counter at the last on_step_begin
        self._step_seconds: float | None = None  # running estimate of one optimizer step
        self._optimizer: str | None = None  # the run's optimizer for the risk range check (`_optimizer_name`)
        # set by transformers on a callback restored from a checkpoint's state: the settings it could not restore
        self.settings_not_restored: list[str] = []
        self._unsaved_artifacts: Any = None  # a search trial's init profile until its folder is known (`on_save`)
        self._provisional: Path | None = None  # where that trial's files wait (`_provisional_folder`)
        self._capture_seconds: float | None = None  # cost of the last snapshot refresh
        self._since_capture = 0  # passing steps since the last refresh
        self._trip: DivergenceEvent | None = None
        self._to_log: DivergenceEvent | None = None
        self._pending_checkpoints: list[tuple[int, str]] = []  # saved since the last passing check
        self._unconfirmed: set[str] = set()  # held resumed folders that may be another run's: never made last good
        self._window_first: int | None = None  # first step of the unchecked window (None: a new window starts)
        self._worst_loss: torch.Tensor | None = None  # on-device maxima of the window's unchecked steps
        self._worst_squared_norm: torch.Tensor | None = None
        self._stop_step: int | None = None
        self._trial_folder: Path | None = None  # hyperparameter search: the trial's checkpoint folder, once found
        self._record_written: Path | None = None  # where this run last wrote its record
        self._validated_paths: list[str] = []  # the checkpoints this guard made the last good one, in order
        self._probe_cache: dict[str, Any] | None = None
        self._probe_source = "default"  # what the probe was built from (`_build_probe`), for meta["probe"]
        self._probe_whole_dataset: int | None = None  # the training set's size when the probe holds all of it
        self._probe_tokens: int | None = None  # token states per layer the probe gave, when its batch does not say
        self._profiled_model: weakref.ref | None = None  # the model the init profile was taken of
        self._events_before_call = 0  # len(events) when this train() call started: its own events come after
        self._loss_from_logs = False  # the model returns no loss: the loss part judges the Trainer's logged loss
        self._loss_warned = False  # the "model returns no loss" warning was given in this train() call
        self._candidate = StateSnapshot()  # judged on logged losses: a passing step's state until a log validates it
        self._last_loss_log = 0  # global step of the last training log: the next one covers the steps after it
        self._call_start = 0  # global step when this train() call started: its final train_loss covers the steps after
        self._logged_sum = 0.0  # sum over this call's training logs of the logged loss times the steps it covers
        self._logged_finite = True  # whether every training log of this call had a finite loss (`_logged_sum` holds)
        self._bound_broken = False  # a logged loss was negative: "no step's loss exceeds n x the mean" does not hold

    @property
    def loss_threshold(self) -> float:
        """Loss above which a step counts as diverged (`DivergenceRule.loss_threshold`)."""
        return self.rule.loss_threshold

    @property
    def relative_loss_threshold(self) -> float | None:
        """Multiple of the run's first checked loss above which a step counts as diverged, or `None` (off)."""
        return self.rule.relative_loss_threshold

    @property
    def reference_loss(self) -> float | None:
        """The run's first checked loss, which `relative_loss_threshold` multiplies (`None` until checked)."""
        return self.rule.reference_loss

    @reference_loss.setter
    def reference_loss(self, value: float | None) -> None:
        ok = value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                               and 0 < float(value) < math.inf)
        self.rule = self.rule.with_reference(float(value) if ok and value is not None else None)

    @property
    def loss_limit(self) -> float:
        """The loss above which a step counts as diverged now (`DivergenceRule.loss_limit`)."""
        return self.rule.loss_limit

    @property
    def grad_norm_threshold(self) -> float:
        """Gradient norm above which a step counts as diverged (`DivergenceRule.grad_norm_threshold`)."""
        return self.rule.grad_norm_threshold

    @property
    def rollbacks(self) -> int:
        """How many rollbacks this `train()` call has made so far, the count `max_rollbacks` bounds: a resumed run
        starts a new count (the rollbacks of the run it resumes stay in `events` and the run record)."""
        return _count_rollbacks(self.events[self._events_before_call:])

    # ------------------------------------------------------------------ wiring
    def bind(self, trainer: Any) -> RKSPCallback:
        """Log through `trainer.log` (done automatically by `KSSTrainer`; call it for any other `Trainer`)."""
        if not (callable(getattr(trainer, "log", None)) and hasattr(trainer, "control")):
            raise TypeError(f"RKSPCallback.bind expects the transformers.Trainer that runs this callback (it logs "
                            f"through trainer.log), got {type(trainer).__name__}")
        self._trainer = trainer
        return self

    def _saved_estimator(self) -> str | None:
        """The risk estimator as the callback's checkpointed state holds it: its JSON's path, else `None` (the shipped
        one, or one built in memory, which a callback restored from a checkpoint cannot have: `on_train_begin` warns
        when the run restores callback states)."""
        est = self.risk_estimator
        return None if est is None else est.file

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "profile_at_init": self.profile_at_init,
                "probe_batch_size": self.probe_batch_size,
                "num_samples": self.num_samples,
                "rank": self.rank,
                "seed": self.seed,
                "layers": self.layers if _json_layers(self.layers) else None,
                "every_n_steps": self.every_n_steps,
                "monitor_num_samples": self.monitor_num_samples,
                "guard": self.guard,
                "loss_threshold": self.loss_threshold,
                "grad_norm_threshold": self.grad_norm_threshold,
                "relative_loss_threshold": self.relative_loss_threshold,
                "check_activations": self.check_activations,
                "on_divergence": self.on_divergence,
                "max_rollbacks": self.max_rollbacks,
                "lr_backoff": self.lr_backoff,
                "restore_on_stop": self.restore_on_stop,
                "snapshot_every_n_steps": self.snapshot_every_n_steps,
                "rollback_source": self.rollback_source,
                "check_every_n_steps": self.check_every_n_steps,
                "auto_kss": self.auto_kss,
                "save_artifacts": self.save_artifacts,
                # a file-backed estimator is restored from its path; one built in memory cannot be (`_saved_estimator`)
                "risk_estimator": self._saved_estimator(),
            },
            "attributes": {
                "init_verdict": self.init_verdict,
                "init_score": self.init_score,
                "last_good_checkpoint": self.last_good_checkpoint,
                "divergence": self.divergence,
                "events": self.events,
                "lr_scale": self.lr_scale,
                "reference_loss": self.reference_loss,
                "relative_limit_off": self.relative_limit_off,
                # what the arguments above cannot hold: a callback restored from them runs without it (it says so)
                "settings_not_restored": self._settings_not_saved(),
            },
        }

    def _settings_not_saved(self) -> list[str]:
        """The settings `state()` cannot write into `trainer_state.json`: `probe_inputs` (tensors), `layers` given as
        modules; with those of a callback this one was restored from."""
        lost = [name for name, dropped in (("probe_inputs", self.probe_inputs is not None),
                                            ("layers", self.layers is not None and not _json_layers(self.layers)))
                if dropped]
        return sorted(set(lost) | set(self.settings_not_restored))

    def _log(self, args: Any, state: Any, logs: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in logs.items() if v is not None and math.isfinite(float(v))}
        # a `_std` whose `_mean` is infinite (every Kreiss constant inf) is the spread of equal infinities: leave it out
        # with them, so that no lone 0.0 reads as a finite, constant series
        logs = {k: v for k, v in finite.items()
                if not (k.endswith("_std") and k.removesuffix("_std") + "_mean" in logs
                        and k.removesuffix("_std") + "_mean" not in finite)}
        if self._trainer is not None:
            # Trainer.log -> CallbackHandler.on_log clears control.should_log; keep the Trainer's own pending log
            pending = self._trainer.control.should_log
            self._trainer.log(logs)
            self._trainer.control.should_log = pending
        else:  # not bound: log_history only (integrations miss it)
            if not self._warned_unbound and getattr(args, "report_to", None) and state.is_world_process_zero:
                self._warned_unbound = True
                logger.warning(
                    "RKSPCallback is not bound to its Trainer: the rksp/* metrics go to state.log_history and the run "
                    "record only, not to TensorBoard / W&B. Call `callback.bind(trainer)` or "
                    "`hf_koopman.training.callback.register_trainer(trainer)` after creating the Trainer "
                    "(a KSSTrainer binds it itself)."
                )
            state.log_history.append({**logs, "step": state.global_step})

    # ------------------------------------------------------------------ probe and profile
    def _probe_batch(self, model: torch.nn.Module, train_dataloader: Any) -> dict[str, Any]:
        if self._probe_cache is None:
            with _random_states_kept():  # a collator that masks at random (MLM) must not shift the training's draws
                self._probe_cache = self._build_probe(model, train_dataloader)
            self._probe_tokens = None  # learnt from the first profile when the batch does not say (images, audio)
        return self._probe_cache

    def _build_probe(self, model: torch.nn.Module, train_dataloader: Any) -> dict[str, Any]:
        self._probe_source = "probe_inputs"  # the profiles' meta["probe"]
        self._probe_whole_dataset = None
        if self.probe_inputs is not None:
            batch = self.probe_inputs
            batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
        else:
            batch = None
            dataset = getattr(train_dataloader, "dataset", None)
            collate = getattr(train_dataloader, "collate_fn", None)
            if dataset is not None and collate is not None:
                try:  # read examples directly: iterating the dataloader would advance the sampler's RNG
                    batch = self._collate_probe(dataset, collate, self._num_samples(model), model)
                    self._probe_source = "training data"
                    rows = next((int(v.shape[0]) for v in (batch or {}).values()
                                 if isinstance(v, torch.Tensor) and v.dim()), None)
                    size = len(dataset) if hasattr(dataset, "__len__") else None
                    self._probe_whole_dataset = size if rows is not None and size and rows >= size else None
                except Exception as err:  # noqa: BLE001 - any dataset quirk: fall back to synthetic probes
                    logger.warning("RKSP: could not build a probe batch from the training data (%s: %s): profiling "
                                   "on synthetic inputs instead. Pass RKSPCallback(probe_inputs=...) with a batch "
                                   "this model takes (a mapping of tensors) to profile on your data.",
                                   type(err).__name__, err)
            if batch is None:
                from hf_koopman.profiling import default_probe_inputs
                from hf_koopman.profiling.probes import prompt_probe_length

                batch = dict(default_probe_inputs(model, num_tokens=self._num_samples(model), seed=self.seed,
                                                  seq_len=prompt_probe_length(model)))
                self._probe_source = "default"
        # `labels` stay: profile() leaves them out of the forward and reads the decoder's padding from them
        for key in ("label", "label_ids", "decoder_labels"):
            batch.pop(key, None)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return _to_device(batch, device)

    def _num_samples(self, model: torch.nn.Module) -> int:
        """N of the init profile: `num_samples`, or `default_num_samples` of the model's width."""
        from hf_koopman.profiling.blocks import unwrap_model
        from hf_koopman.profiling.probes import default_num_samples

        return self.num_samples if self.num_samples is not None else default_num_samples(unwrap_model(model))

    def _monitor_num_samples(self, model: torch.nn.Module) -> int:
        """N of the monitoring profiles: `monitor_num_samples`, or 512 raised to `DecisionRule.min_samples_per_dim` x
        the model's width (so that a monitoring profile can be read) and capped at the init profile's N."""
        if self.monitor_num_samples is not None:
            return self.monitor_num_samples
        from hf_koopman.profiling.blocks import unwrap_model
        from hf_koopman.profiling.probes import hidden_width

        readable = math.ceil(DecisionRule().min_samples_per_dim * (hidden_width(unwrap_model(model)) or 0))
        return min(self._num_samples(model), max(_MONITOR_SAMPLES, readable))

    def _collate_probe(self, dataset: Any, collate: Any, wanted: int, model: Any = None) -> dict[str, Any] | None:
        """The first examples of `dataset`, collated: `probe_batch_size` of them, or by default as many text examples
        as hold `wanted` token states (at least `_PROBE_ROWS`, at most `_MAX_PROBE_ROWS`), as many images as the
        vision config's patch grid says give `wanted` tokens at its last stage (at most 64, as the default image
        probe), else `_PROBE_ROWS` (audio, or a count that cannot be read). A text probe grows while its positions,
        padding included, stay within `_PROBE_POSITIONS` x `wanted` (or the first rows' positions, if more): the
        probe is one forward pass, repeated at every monitoring step, and examples padded far beyond their text would
        make it many times longer than its tokens. `None` for an empty dataset."""
        sized = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")

        def first(rows: int) -> list[Any]:
            if sized:
                return [dataset[i] for i in range(min(rows, len(dataset)))]
            return list(itertools.islice(iter(dataset), rows))

        decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

        def collated(items: list[Any]) -> dict[str, Any]:  # trailing all-padding columns cost a forward, hold no token
            batch = dict(collate(items))
            return batch if decoder else _trim_padding(batch)

        rows = self.probe_batch_size or _PROBE_ROWS
        items = first(rows)
        batch = collated(items) if items else None
        if self.probe_batch_size is not None or batch is None or len(items) < rows:
            return batch
        count = _token_count(batch)
        if count is None:  # images: as many as the patch grid needs; other kinds keep the first rows
            images = _image_rows(batch, model, wanted)
            grown = _grown_probe(first, collated, images) if images is not None and images > rows else None
            return batch if grown is None else grown[1]
        ids = batch["input_ids"]
        positions = max(_PROBE_POSITIONS * wanted, ids.numel())
        while count < wanted and len(items) == rows < _MAX_PROBE_ROWS:
            # the rows the mean length says are needed, and at least twice as many as now for short examples, as far as
            # the positions (padding included) allow
            per_row = batch["input_ids"].numel() / len(items)
            rows = min(_MAX_PROBE_ROWS, max(2 * rows, math.ceil(wanted * len(items) / max(count, 1))),
                       int(positions // per_row))
            grown = _grown_probe(first, collated, rows) if rows > len(items) else None
            if grown is None:
                break
            if grown[1]["input_ids"].numel() > positions:
                # a collator that pads to the longest row met a longer one: the most rows within the positions (a
                # collator pads k rows no longer than k + 1), found by bisection
                low, high = len(items), len(grown[0])
                while high - low > 1:
                    middle = (low + high) // 2
                    trial = _grown_probe(first, collated, middle)
                    if trial is not None and trial[1]["input_ids"].numel() <= positions:
                        low, (items, batch) = middle, trial
                    else:
                        high = middle
                break
            items, batch = grown
            count = _token_count(batch)
            if count is None:
                break
        return batch

    def _warn_short_probe(self, key: str, message: str, *args: Any) -> None:
        """Log `message % args` the first time in this run that a probe falls short for `key` (a setting, and for the
        decoder's labels separately): monitoring reads the same probe every `every_n_steps`."""
        if key not in self._warned_short_probe:
            self._warned_short_probe.add(key)
            logger.warning(message, *args)

    def _run_profile(
        self, model: torch.nn.Module, batch: dict[str, Any], num_samples: int, learning_rate: float | None = None,
        progress: bool = False, setting: str = "num_samples",
    ) -> Any:
        from hf_koopman.profiling import profile

        requested, counted = num_samples, _token_count(batch)
        available = counted if counted is not None else (self._probe_tokens if batch is self._probe_cache else None)
        # more rows cannot help a probe that already holds the whole training set
        whole = self._probe_whole_dataset if batch is self._probe_cache else None
        more = (f"the probe already holds all {whole} training examples: pass a longer probe with probe_inputs"
                if whole else "raise probe_batch_size (or pass longer probe_inputs)")
        if available is not None and available < num_samples:
            # said here with the callback's own knobs; profile() would only say "pass more inputs"
            self._warn_short_probe(
                setting, "RKSPCallback: the probe batch holds %d token states, fewer than %s=%d; %s for a stable "
                "estimate, or lower %s (said once per run)", available, setting, num_samples, more, setting)
            num_samples = max(available, 2)
        decoder = _decoder_token_count(batch, model)
        if decoder is not None and decoder < num_samples:  # the decoder reads the labels (`add_decoder_inputs`)
            self._warn_short_probe(
                "decoder " + setting, "RKSPCallback: the probe batch's labels hold %d decoder token states, fewer "
                "than %s=%d: the decoder layers are profiled on those; %s for a stable decoder estimate (said once "
                "per run)", decoder, setting, requested, more)
        was_training = model.training
        model.eval()
        # profile()'s own short-sample note is the callback's to give once per run, with its knobs
        quiet = _ShortSampleNote() if {setting, "decoder " + setting} & self._warned_short_probe else None
        profiler_logger = logging.getLogger("hf_koopman.profiling.profiler")
        if quiet is not None:
            profiler_logger.addFilter(quiet)
        try:
            with torch.no_grad():
                result = profile(
                    model,
                    batch,
                    num_samples=num_samples,
                    rank=self.rank,
                    seed=self.seed,
                    layers=self.layers,
                    # a zero (or non-finite) rate plans no update: no calibrated risk, the verdict alone
                    learning_rate=(learning_rate if learning_rate is not None and math.isfinite(learning_rate)
                                   and learning_rate > 0 else None),
                    progress=progress,
                    risk_estimator=self.risk_estimator,
                )
            result.meta["num_samples_requested"] = requested  # the advice then names the short probe, not N
            if batch is self._probe_cache:  # "training data", "probe_inputs" or "default" (the synthetic fallback)
                result.meta["probe"] = self._probe_source
            seen = result.meta.get("tokens_seen_per_layer") or {}
            if counted is None and available is None and seen and batch is self._probe_cache:
                # an image or audio probe: its token count is known now, and later profiles of it are sized to it
                # where every layer sees the same count (a hierarchical model's stages differ: sized per layer)
                fewest = min(seen.values())
                self._probe_tokens = fewest if len(set(seen.values())) == 1 else None
                if fewest < num_samples:
                    self._warn_short_probe(
                        setting, "RKSPCallback: the probe batch gives %d token states to some layers, fewer than "
                        "%s=%d; raise probe_batch_size (or pass more probe_inputs) for a stable estimate, or lower %s "
                        "(said once per run)", fewest, setting, num_samples, setting)
            return result
        finally:
            if quiet is not None:
                profiler_logger.removeFilter(quiet)
            model.train(was_training)

    @staticmethod
    def _scalars(spectral_profile: Any) -> dict[str, float]:
        out = {f"rksp/{k}": v for k, v in spectral_profile.aggregates.items() if isinstance(v, (int, float))}
        # the aggregates leave out layers with too few token states for their width; a change of this count between
        # the init profile and monitoring (fewer token states) changes which layers the series cover
        out["rksp/layers_left_out"] = float(len(getattr(spectral_profile, "undersampled_layers", ())))
        # rksp/score averages fewer layers still: those the verdict reads (the η_nl gate leaves out poorly fitted ones)
        out["rksp/score_layers"] = float(len(spectral_profile.informative_layers))
        if spectral_profile.score is not None:
            out["rksp/score"] = spectral_profile.score
        if spectral_profile.kappa_median is not None:
            out["rksp/kappa_median"] = spectral_profile.kappa_median
        level = VERDICT_LEVELS.get(spectral_profile.verdict)
        if level is not None:
            out["rksp/verdict_level"] = level
            # 1 when more token states may change the verdict (the score's or the η_nl gate's band reaches a threshold)
            out["rksp/verdict_tentative"] = float(spectral_profile.verdict_reason.startswith(TENTATIVE))
        risk = spectral_profile.risk
        if risk is not None:
            out["rksp/risk"] = risk
            assessment = spectral_profile.risk_assessment()
            if assessment is not None:  # 1 outside the estimator's training ranges, 0 inside, -1 ranges unknown
                out["rksp/risk_out_of_range"] = _OUT_OF_RANGE_LEVEL[assessment.out_of_range]
        return out

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs) -> TrainerControl | None:
        control = super().on_save(args, state, control, **kwargs)  # the guard's bookkeeping finds a trial's folder
        if self._unsaved_artifacts is None or self._trial_folder is None or not state.is_world_process_zero:
            return control
        provisional, self._provisional = self._provisional, None
        if provisional is not None and _same_path(provisional, self._trial_folder):  # hp_name: already beside them
            self._unsaved_artifacts = None
            return control
        if self._save(args, self._unsaved_artifacts, self._trial_folder):
            self._unsaved_artifacts = None
            if provisional is not None:  # moved: the trial's files now sit beside its checkpoints
                for name in _ARTIFACT_NAMES:
                    (provisional / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    provisional.rmdir()
        else:  # not moved: the provisional copy stays, and a later save tries again
            self._provisional = provisional
        return control

    @staticmethod
    def _provisional_folder(args: Any, state: Any) -> Path:
        """Where a search trial's files go until its first checkpoint shows its folder (and stay when it saves none,
        or is pruned first): `output_dir/<hp_name(trial)>`, else `output_dir/rksp-trial-<hash of its parameters>`,
        with `-2`, `-3` ... when an earlier trial with the same parameters holds that name."""
        name = getattr(state, "trial_name", None) or "rksp-trial-" + hashlib.sha1(
            json.dumps(state.trial_params, sort_keys=True, default=str).encode()).hexdigest()[:8]
        out = Path(args.output_dir).absolute()
        folder, count = out / name, 1
        while (folder / _ARTIFACT_NAMES[0]).exists():
            count += 1
            folder = out / f"{name}-{count}"
        return folder

    def _save(self, args: Any, spectral_profile: Any, folder: Path | None = None) -> bool:
        """Write `rksp_profile.json`, `rksp_profile.png` (with matplotlib) and `rksp_report.md` into `folder`
        (default `output_dir`; a hyperparameter-search trial's own folder, `on_save`), all or nothing: they are
        written beside it first and moved into place together (`hf_koopman.files`), so a failure leaves the folder as
        it was; one that cannot be written (a read-only folder, a full disk) is a warning, not the end of training. The
        files of an earlier run there are replaced (an earlier plot is removed when this run writes none), and the
        warning says so. Returns whether they were written."""
        out = Path(args.output_dir) if folder is None else Path(folder)
        names = _ARTIFACT_NAMES
        earlier = [name for name in names if (out / name).is_file()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            with staging_folder(out, _STAGING_PREFIX) as staging:
                (staging / "rksp_profile.json").write_text(spectral_profile.to_json(), encoding="utf-8")
                plots: dict[str, str] = {}
                try:
                    spectral_profile.plot(staging / "rksp_profile.png")
                    plots["RKSP profile"] = "rksp_profile.png"
                except ImportError as err:
                    logger.warning("RKSP: %s; skipping the plot", err)
                (staging / "rksp_report.md").write_text(spectral_profile.to_markdown(plots=plots), encoding="utf-8")
                written = [name for name in names if (staging / name).is_file()]
                # an earlier run's plot must not sit next to this run's report
                move_into_place(staging, out, written, stale=[name for name in names if name not in written])
        except OSError as err:
            logger.warning("RKSP: could not write the profile files into %s (%s: %s); training goes on without them. "
                           "Pass a writable output_dir, or RKSPCallback(save_artifacts=False) to skip them.", out,
                           type(err).__name__, err)
            return False
        if earlier:
            logger.warning("RKSP: %s held an earlier run's %s: replaced by this run's", out, ", ".join(earlier))
        return True

    # ------------------------------------------------------------------ events
    def remove_hooks(self) -> None:
        """Take the guard's hooks off the model (its loss and gradient-norm taps and the block-output watch).

        `on_train_end` does it, and `KSSTrainer.train` when training raises; a plain `Trainer.train()` that raised
        (Ctrl-C, an error in another callback) never reaches it, and the hooks stay until the next guarded `train()` on
        that model removes them. Call this to use the model in a loop of your own before then: outside training they
        do nothing but cost a few reductions per forward."""
        self._stop_guard()

    @staticmethod
    def _trainer_for(model: Any) -> Any:
        """The Trainer that registered `model` (`register_trainer`), or `None`."""
        return _TRAINERS[model]() if model is not None and model in _TRAINERS else None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       lr_scheduler: Any = None, train_dataloader: Any = None, **kwargs) -> TrainerControl | None:
        if self.guard and self.rollback_source == "checkpoint":
            self._check_checkpoint_settings(args, model)  # before the init profile writes anything
        est = self.risk_estimator
        if (est is not None and est.file is None and not est.is_shipped and state.is_world_process_zero
                and getattr(args, "restore_callback_states_from_checkpoint", False)):
            logger.warning("RKSPCallback: its risk estimator (%s) was built in memory, and this run restores callback "
                           "states from checkpoints, so a restored callback uses the shipped one; save the estimator "
                           "with save_json and pass its path to keep it across a resume.", est.name)
        self._warn_unsaved_settings(args, state)
        self._unsaved_artifacts = self._provisional = None
        self._stop_step = None
        self._trial_folder = self._record_written = None
        self._warned_short_probe = set()
        self.divergence = None
        if state.global_step == 0:  # a fresh run, also when this callback object already ran one
            self.events, self.lr_scale, self.last_good_checkpoint = [], 1.0, None
            self._validated_paths = []
            self._unreadable, self._in_memory = None, _IN_MEMORY_UNKNOWN
            profiled = self._profiled_model() if self._profiled_model is not None else None
            if model is not None and profiled is not model:  # another model: its own profile, probe and Trainer
                # (train() again on the same model continues from trained weights: their init profile stays)
                self.init_verdict = self.init_score = self.profile = None
                self._probe_cache = None
                if model in _TRAINERS:
                    self._trainer = _TRAINERS[model]()
        if self._trainer is not None and getattr(self._trainer, "state", None) is not state:
            self._trainer = None  # bound to another Trainer than the one running: its log is not this run's
        if self._trainer is None and model is not None and model in _TRAINERS:
            self._trainer = _TRAINERS[model]()
        self._check_fsdp(args, model)
        restored = self.init_verdict is not None
        if self.profile_at_init and not restored and state.global_step > 0:
            # a resume without the callback's state: the weights are trained, so profiling them now would report a
            # trained model as the initialisation and overwrite the first run's artefacts. The initialisation's
            # verdict and score are read from the checkpoint's trainer_state.json, so this run's checkpoints keep them
            self.init_verdict, self.init_score = self._saved_init_verdict(state)
            logger.info("RKSP: resumed at step %d; the initialisation profile is not recomputed on trained weights "
                        "(the first run's rksp_profile.json / rksp_report.md stay as they are)", state.global_step)
            restored = True
        profiles = (self.profile_at_init and not restored) or self.every_n_steps
        # an explicit layers= is checked whatever uses it (profile, monitoring, the guard's block-output check)
        self._blocks_missing = bool((profiles or self.layers is not None) and model is not None
                                    and not self._blocks_found(model, state))
        self._optimizer = _optimizer_name(args, optimizer)  # a range the risk estimator checks
        if self.profile_at_init and not restored and model is not None and not self._blocks_missing:
            with _replica_quiet(state):
                self._profile_at_init(args, state, model, train_dataloader)
        if self.guard:
            self._start_guard(args, state, model, optimizer, lr_scheduler)
        # this train() call's own events follow these (the ones before come from a restored state or the run record)
        self._events_before_call = len(self.events)
        return control

    def _warn_unsaved_settings(self, args: TrainingArguments, state: TrainerState) -> None:
        """Say when settings a checkpoint's callback state cannot hold (`_settings_not_saved`) are, or will be, lost
        to `restore_callback_states_from_checkpoint=True`: transformers rebuilds the callback from that state."""
        if not state.is_world_process_zero:
            return
        fix = ("pass restore_callback_states_from_checkpoint=False to keep the callback you pass (the "
               "initialisation's verdict is read from the checkpoint either way)")
        restored = [name for name in self.settings_not_restored if getattr(self, name, None) is None]
        if restored:
            logger.warning("RKSPCallback was rebuilt from the checkpoint's callback state, which cannot hold the "
                           "run's %s: this run profiles with %s instead, so its rksp/* series may not continue the "
                           "first run's; %s.", " and ".join(restored), " and ".join(
                               {"probe_inputs": "the training data's first examples",
                                "layers": "auto-discovered blocks"}[name] for name in restored), fix)
        elif (state.global_step == 0 and getattr(args, "restore_callback_states_from_checkpoint", False)
              and (own := self._settings_not_saved())):
            logger.warning("RKSPCallback: a resume of this run restores callback states from its checkpoints, which "
                           "cannot hold %s: the restored callback would run without; %s.", " and ".join(own), fix)

    def _saved_init_verdict(self, state: TrainerState) -> tuple[str | None, float | None]:
        """The initialisation's verdict and score that the resumed checkpoint's `trainer_state.json` holds for a
        callback of this class (`stateful_callbacks`, loaded by the Trainer whether or not it restores callback
        states); `(None, None)` when it holds none."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        for entry in saved if isinstance(saved, list) else [saved]:
            attributes = entry.get("attributes", {}) if isinstance(entry, dict) else {}
            if attributes.get("init_verdict") is not None:
                return attributes["init_verdict"], attributes.get("init_score")
        return None, None

    def _blocks_found(self, model: torch.nn.Module, state: TrainerState) -> bool:
        """Whether auto-discovery finds the model's blocks; when it does not, the profile is left out with a warning
        (the message names `layers=`) and training goes on with the guard: adding the callback to a run that trains
        never stops it. A `layers=` the user gave that does not name blocks raises here, before step 1."""
        from hf_koopman.profiling.blocks import find_residual_blocks

        if self.layers is not None:
            find_residual_blocks(model, layers=self.layers)
            return True

        try:
            find_residual_blocks(model)
        except ValueError as err:
            if state.is_world_process_zero:
                guard = "Training runs on with the divergence guard" + (
                    " (without its block-output check, which needs the blocks too)." if self.check_activations else ".")
                logger.warning("RKSPCallback: no spectral profile (at initialisation or monitoring) in this run: "
                               "%s %s", err, guard if self.guard else "Training runs on.")
            return False
        return True

    def _profile_at_init(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module,
                         train_dataloader: Any) -> None:
        """The initialisation profile: logged, saved (main process), and its verdict and advice said."""
        batch = self._probe_batch(model, train_dataloader)
        # a bar for the profile before step 1 where the Trainer draws its own (main process, tqdm not disabled)
        spectral_profile = self._run_profile(model, batch, self._num_samples(model), args.learning_rate,
                                             progress=state.is_local_process_zero and not args.disable_tqdm)
        spectral_profile.meta["optimizer"] = self._optimizer
        self.profile = spectral_profile
        self._profiled_model = weakref.ref(model)
        self.init_verdict = spectral_profile.verdict
        self.init_score = spectral_profile.score
        self._log(args, state, self._scalars(spectral_profile))
        if self.save_artifacts and state.is_world_process_zero:
            if getattr(state, "trial_params", None) is None:
                self._save(args, spectral_profile)
            else:  # a search trial: a folder of its own now, moved beside its checkpoints at its first save
                spectral_profile.meta["trial_params"] = state.trial_params
                self._unsaved_artifacts = spectral_profile
                self._provisional = self._provisional_folder(args, state)
                self._save(args, spectral_profile, self._provisional)
        # a fine-tune starts from loaded weights: its first profile is not of an initialisation
        pretrained = spectral_profile.meta.get("weights") == "pretrained"
        when = "at the start of training (pretrained weights)" if pretrained else "at initialisation"
        assessment = spectral_profile.risk_assessment()
        # an in-range calibrated probability at this learning rate decides the advice and the alarm; the
        # verdict, which reads the spectrum alone, does otherwise (`recommendation`)
        truncated = spectral_profile.rule.truncated_rank(spectral_profile)
        advice = recommendation(self.init_verdict, assessment, rank=truncated, pretrained=pretrained)
        if not args.learning_rate:  # a run that plans no update: nothing about its learning rate to advise
            advice = ("none for this run: learning_rate=0 plans no update, so it cannot diverge; the verdict describes "
                      "the weights only (profile again with the learning rate you will train at)")
        informative = self.init_verdict != "uninformative"
        calibrated = truncated is None and informative and in_fitted_range(assessment)
        alarm = not below_risk_budget(assessment.probability) if calibrated else self.init_verdict == "high risk"
        (logger.warning if alarm else logger.info)(
            "RKSP verdict %s: %s (mean M≈1 = %s, median κ(V) = %s)\n  Why: %s\n  Recommended: %s",
            when,
            self.init_verdict.upper(),
            None if spectral_profile.score is None else f"{spectral_profile.score:.3f}",
            None if spectral_profile.kappa_median is None else f"{spectral_profile.kappa_median:.2g}",
            spectral_profile.verdict_reason,
            advice,
        )
        if assessment is not None:  # the calibrated probability, with its range caveat in the same line
            # outside the fitted range only below its learning rates, with the lowest fitted rate's probability
            # within the budget (a bound on the safe side), as a fine-tune's 5e-5 is: information, not an alarm
            below = _below_fitted_learning_rates(assessment) is not None
            log = logger.warning if assessment.out_of_range and not below and informative else logger.info
            # the verdict reads the spectrum alone; this number is for the run's learning rate
            log("RKSP calibrated risk at this learning rate (the verdict, %s, reads the spectrum alone): %s%s",
                self.init_verdict.upper(), assessment.describe(),
                "" if informative else " (computed from an uninformative spectrum, so it is not a reading of this "
                "model; rksp/risk is not logged)")
        if self.auto_kss and self.init_verdict == "high risk":
            # the paper's rule would switch KSS on here; measured in the paper's own regime it did not lower
            # divergence, so auto_kss never switches it and says what state KSS is in
            (logger.warning if alarm else logger.info)(
                "RKSPCallback(auto_kss=True): %s", self._auto_kss_message(advice if calibrated else None))
            self._log(args, state, {"kss/auto_enabled": 0.0})

    def _check_fsdp(self, args, model) -> None:
        """Warn when FSDP was asked for but the model is not sharded (accelerate's silent CPU fallback to DDP)."""
        from hf_koopman.training.fsdp import fsdp_requested, is_fsdp_model

        if model is None or getattr(args, "world_size", 1) < 2 or not fsdp_requested(args) or is_fsdp_model(model):
            return
        if getattr(self._trainer, "is_deepspeed_enabled", False):
            return
        logger.warning(
            "FSDP was requested but the model is not sharded: on CPU, accelerate runs FSDP configs as DDP. KSSTrainer "
            "shards it with FSDP2; for another Trainer subclass call hf_koopman.training.fsdp.enable_cpu_fsdp(self) "
            "at the end of its create_accelerator_and_postprocess()."
        )

    def _auto_kss_message(self, calibrated_advice: str | None = None) -> str:
        """What `auto_kss` says at a high-risk verdict: the state KSS is actually in, and the evidence; with an
        in-range calibrated probability, its advice (`recommendation`) stands in for "lower the learning rate"."""
        evidence = ("In the paper's No-Norm regime KSS did not lower divergence (results/kss_v2.md in the hf_koopman "
                    "repository)")
        config = getattr(self._trainer, "kss_config", None)
        if config is not None and config.active:
            instead = ("lower the learning rate rather than rely on it" if calibrated_advice is None else
                       f"do not rely on it ({calibrated_advice.rstrip('.')})")
            return (f"the verdict is high risk and KSS is on because kss_enabled=True (alpha={config.alpha:g}); "
                    f"auto_kss never switches KSS on or off. {evidence}: {instead}, or pass kss_enabled=False to "
                    "train without it.")
        if config is None:
            return (f"KSS stays off despite the high-risk verdict (this Trainer is not a KSSTrainer). {evidence}; "
                    "use KSSTrainer with kss_enabled=True to try it anyway.")
        why = "kss_enabled=False" if not config.enabled else f"kss_alpha={config.alpha:g}"
        return (f"KSS is off ({why}) and stays off despite the high-risk verdict. {evidence}; pass kss_enabled=True "
                "(and kss_alpha > 0) to use it anyway.")


    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    **kwargs) -> TrainerControl | None:
        self._log_event(args, state, optimizer)
        if self._stop_step is not None and state.global_step >= self._stop_step:
            control.should_save = False  # never write the step that diverged as a checkpoint
            control.should_evaluate = False  # save_strategy="best" would save it as a new best after evaluating
            control.should_training_stop = True
            return control
        if (self.every_n_steps and state.global_step % self.every_n_steps == 0 and model is not None
                and not self._blocks_missing):
            try:
                with _replica_quiet(state):
                    batch = self._probe_batch(model, kwargs.get("train_dataloader"))
                    # the run's peak learning rate after any back-off (the estimator's input is the peak of a run
                    # with warmup, not the scheduled rate of this step)
                    spectral_profile = self._run_profile(model, batch, self._monitor_num_samples(model),
                                                         args.learning_rate * self.lr_scale,
                                                         setting="monitor_num_samples")
                    spectral_profile.meta["optimizer"] = self._optimizer
            except ValueError as err:  # e.g. non-finite activations: the guard handles divergence
                logger.warning("RKSP monitoring at step %d failed: %s", state.global_step, err)
                return
            # trained weights: the estimator was fitted on initialisations, so rksp/risk_out_of_range says 1
            spectral_profile.meta["weights"] = "trained"
            self._log(args, state, self._scalars(spectral_profile))




#: the files of a profile the callback writes (`RKSPCallback._save`)
_ARTIFACT_NAMES = ("rksp_profile.json", "rksp_profile.png", "rksp_report.md")


@contextlib.contextmanager
def _random_states_kept():
    """Python's, NumPy's and torch's (CPU and CUDA) random states as they were before the block: the callback's
    reads of the training data do not change the run it watches."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def _json_layers(layers: Any) -> bool:
    """Whether a `layers=` setting can be written to JSON (None, a dotted path, a list of paths), not modules."""
    return layers is None or isinstance(layers, str) or (
        isinstance(layers, (list, tuple)) and all(isinstance(item, str) for item in layers))


def _optimizer_name(args: Any, optimizer: Any = None) -> str | None:
    """The optimizer the run uses, for the risk estimator's range check: `TrainingArguments.optim` as a string
    (`"adamw_torch"`, `"sgd"`, ...) when the Trainer built `optimizer` from it (or none is known yet), else the class
    name of the optimizer passed to the Trainer as an object (`optimizers=(torch.optim.SGD(...), None)`: `"SGD"`);
    `None` (not checked) when neither is known."""
    optim = getattr(args, "optim", None)
    name = None if optim is None else str(getattr(optim, "value", optim))
    # wrappers hold the optimizer they wrap as `.optimizer`: accelerate's AcceleratedOptimizer and
    # DeepSpeedOptimizerWrapper, DeepSpeed's ZeRO / BF16 optimizers (plain objects)
    seen: set[int] = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    if optimizer is None or name is None:
        return name if optimizer is None else type(optimizer).__name__
    from transformers import Trainer

    try:  # the class the Trainer builds for args.optim; without the model, which the layer-wise optimizers (GaLore,
        # APOLLO) would use to build and hook a second set of optimizers
        built = Trainer.get_optimizer_cls_and_kwargs(args)[0]
    except Exception:  # noqa: BLE001 - it needs the model or a package: the Trainer built it from args.optim
        return name
    return name if not isinstance(built, type) or isinstance(optimizer, built) else type(optimizer).__name__


# `__new__` checks the keywords: introspection (help(), docs, IDEs) still reads the arguments of `__init__`
RKSPCallback.__signature__ = inspect.signature(RKSPCallback.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(RKSPCallback.__init__).parameters.values())[1:])
