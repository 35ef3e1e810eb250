"""`RKSPCallback`: RKSP verdict before step 1, `rksp/*` metrics in the usual logs, and a divergence guard."""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_koopman.training.guard import ActivationWatch, DivergenceEvent, TrainerTaps, reduce_flags


__all__ = ["RKSPCallback"]

logger = logging.getLogger(__name__)

_VERDICT_LEVEL = {"safe": 0.0, "moderate": 1.0, "high risk": 2.0}


def _find_trainer(max_depth: int = 12) -> Trainer | None:
    """The `Trainer` whose training loop is calling us (the `self` of a calling frame), if any."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class RKSPCallback(TrainerCallback, ExportableState):
    """Residual Koopman Spectral Profiling inside `Trainer.train()`.

    * **At train begin** the model is profiled on a probe batch (the first `probe_batch_size` training examples,
      collated like training batches, unless `probe_inputs` is given; reading them does not advance the training
      sampler). `rksp/*` scalars go through `Trainer.log`, so they reach `log_history`, TensorBoard and W&B;
      `rksp_profile.json`, `rksp_report.md` and `rksp_profile.png` are written to `output_dir` (main process); a
      warning with the verdict and the recommended action is emitted when the verdict is "high risk". With
      `auto_kss=True` and a [`KSSTrainer`], a high-risk verdict switches KSS on (logged as `kss/auto_enabled`).
    * **Periodic monitoring** (`every_n_steps`, off by default) re-profiles the probe batch (no-grad forward,
      `monitor_num_samples` tokens) and logs the same `rksp/*` keys.
    * **Divergence guard** (on by default): the paper's label, i.e. raw per-step loss > `loss_threshold` (50),
      pre-clip gradient norm > `grad_norm_threshold` (500), or a non-finite loss / gradient norm / block output. It
      reads raw values (not the NaN-filtered logs), OR-reduces the decision across processes before the optimizer
      step, drops the diverged update (`skip_diverged_update`), vetoes the checkpoint of that step so the last good
      checkpoint is never overwritten, stops via `control.should_training_stop`, and reports the step, the cause,
      the first block with a non-finite output and the last good checkpoint (log, `rksp/diverged*` scalars and
      `rksp_divergence.json`).
    * **Stateful**: verdict, auto-KSS decision, last good checkpoint and divergence record are saved in checkpoints
      and restored with `restore_callback_states_from_checkpoint=True`; a restored run does not re-profile "at init".

    The callback needs the trainer to log and to read raw losses; a [`KSSTrainer`] binds itself, and any other
    `Trainer` (plain, `Seq2SeqTrainer`, TRL subclasses) is found as the caller of `on_train_begin`. `bind(trainer)`
    sets it explicitly.

    Args:
        profile_at_init (`bool`, defaults to `True`): profile at train begin.
        probe_inputs (`dict[str, torch.Tensor]`, *optional*): probe batch; default: from the training data.
        probe_batch_size (`int`, defaults to `8`): examples taken from the training dataset for the probe.
        num_samples (`int`, defaults to `2048`): token states per layer for the init profile (`N`).
        rank (`int`, defaults to `32`): DMD rank of the profile.
        seed (`int`, defaults to `0`): subsampling seed.
        layers (`str` or `list[str]`, *optional*): residual-block override, as in `find_residual_blocks`.
        every_n_steps (`int`, defaults to `0`): periodic monitoring period in optimizer steps (`0` = off).
        monitor_num_samples (`int`, defaults to `512`): token states per layer for periodic monitoring.
        guard (`bool`, defaults to `True`): enable the divergence guard.
        loss_threshold (`float`, defaults to `50.0`) / grad_norm_threshold (`float`, defaults to `500.0`): the label.
        check_activations (`bool`, defaults to `True`): watch block outputs for NaN/Inf (one `isfinite` per block).
        skip_diverged_update (`bool`, defaults to `True`): drop the gradients of the diverged step before
            `optimizer.step()`, so the in-memory model stays at its last finite state.
        auto_kss (`bool`, defaults to `False`): with a [`KSSTrainer`], enable KSS when the init verdict is high risk.
        save_artifacts (`bool`, defaults to `True`): write the profile JSON / report / plot into `output_dir`.
    """

    def __init__(
        self,
        *,
        profile_at_init: bool = True,
        probe_inputs: dict[str, torch.Tensor] | None = None,
        probe_batch_size: int = 8,
        num_samples: int = 2048,
        rank: int = 32,
        seed: int = 0,
        layers: Any = None,
        every_n_steps: int = 0,
        monitor_num_samples: int = 512,
        guard: bool = True,
        loss_threshold: float = 50.0,
        grad_norm_threshold: float = 500.0,
        check_activations: bool = True,
        skip_diverged_update: bool = True,
        auto_kss: bool = False,
        save_artifacts: bool = True,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an int >= 0 (0 turns monitoring off), got {every_n_steps!r}")
        if probe_batch_size < 1:
            raise ValueError(f"probe_batch_size must be >= 1, got {probe_batch_size}")
        if not (loss_threshold > 0 and grad_norm_threshold > 0):
            raise ValueError("loss_threshold and grad_norm_threshold must be > 0")
        if probe_inputs is not None and not isinstance(probe_inputs, (dict, torch.Tensor)):
            raise TypeError(f"probe_inputs must be a dict of tensors (a model batch), got {type(probe_inputs).__name__}")
        self.profile_at_init = profile_at_init
        self.probe_inputs = probe_inputs
        self.probe_batch_size = probe_batch_size
        self.num_samples = num_samples
        self.rank = rank
        self.seed = seed
        self.layers = layers
        self.every_n_steps = every_n_steps
        self.monitor_num_samples = monitor_num_samples
        self.guard = guard
        self.loss_threshold = float(loss_threshold)
        self.grad_norm_threshold = float(grad_norm_threshold)
        self.check_activations = check_activations
        self.skip_diverged_update = skip_diverged_update
        self.auto_kss = auto_kss
        self.save_artifacts = save_artifacts
        # state kept across checkpoints (JSON-ready)
        self.init_verdict: str | None = None
        self.init_score: float | None = None
        self.kss_auto_enabled = False
        self.last_good_checkpoint: str | None = None
        self.divergence: dict[str, Any] | None = None
        # runtime only
        self.profile = None  # the init SpectralProfile
        self._trainer: Trainer | None = None
        self._taps: TrainerTaps | None = None
        self._watch: ActivationWatch | None = None
        self._stop_step: int | None = None
        self._probe_cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ wiring
    def bind(self, trainer: Trainer) -> RKSPCallback:
        """Use `trainer` for logging and raw-value taps (done automatically by `KSSTrainer` and at train begin)."""
        self._trainer = trainer
        return self

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "profile_at_init": self.profile_at_init,
                "probe_batch_size": self.probe_batch_size,
                "num_samples": self.num_samples,
                "rank": self.rank,
                "seed": self.seed,
                "layers": self.layers if (self.layers is None or isinstance(self.layers, (str, list))) else None,
                "every_n_steps": self.every_n_steps,
                "monitor_num_samples": self.monitor_num_samples,
                "guard": self.guard,
                "loss_threshold": self.loss_threshold,
                "grad_norm_threshold": self.grad_norm_threshold,
                "check_activations": self.check_activations,
                "skip_diverged_update": self.skip_diverged_update,
                "auto_kss": self.auto_kss,
                "save_artifacts": self.save_artifacts,
            },
            "attributes": {
                "init_verdict": self.init_verdict,
                "init_score": self.init_score,
                "kss_auto_enabled": self.kss_auto_enabled,
                "last_good_checkpoint": self.last_good_checkpoint,
                "divergence": self.divergence,
            },
        }

    def _log(self, args: Any, state: Any, logs: dict[str, float]) -> None:
        logs = {k: float(v) for k, v in logs.items() if v is not None and math.isfinite(float(v))}
        if self._trainer is not None:
            # Trainer.log -> CallbackHandler.on_log clears control.should_log; keep the Trainer's own pending log
            pending = self._trainer.control.should_log
            self._trainer.log(logs)
            self._trainer.control.should_log = pending
        else:  # no trainer: log_history only (integrations miss it)
            state.log_history.append({**logs, "step": state.global_step})

    # ------------------------------------------------------------------ probe and profile
    def _probe_batch(self, model: torch.nn.Module, train_dataloader: Any) -> dict[str, Any]:
        if self._probe_cache is None:
            self._probe_cache = self._build_probe(model, train_dataloader)
        return self._probe_cache

    def _build_probe(self, model: torch.nn.Module, train_dataloader: Any) -> dict[str, Any]:
        if self.probe_inputs is not None:
            batch = self.probe_inputs
            batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
        else:
            batch = None
            dataset = getattr(train_dataloader, "dataset", None)
            collate = getattr(train_dataloader, "collate_fn", None)
            if dataset is not None and collate is not None:
                try:  # read examples directly: iterating the dataloader would advance the sampler's RNG
                    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
                        items = [dataset[i] for i in range(min(self.probe_batch_size, len(dataset)))]
                    else:
                        items = list(itertools.islice(iter(dataset), self.probe_batch_size))
                    batch = dict(collate(items)) if items else None
                except Exception as err:  # noqa: BLE001 - any dataset quirk: fall back to synthetic probes
                    logger.warning("RKSP: could not build a probe batch from the training data (%s)", err)
            if batch is None:
                from hf_koopman.profiling import default_probe_inputs

                batch = dict(default_probe_inputs(model, num_tokens=self.num_samples, seed=self.seed))
        for key in ("labels", "label", "label_ids", "decoder_labels"):
            batch.pop(key, None)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return _to_device(batch, device)

    def _run_profile(
        self, model: torch.nn.Module, batch: dict[str, Any], num_samples: int, learning_rate: float | None = None
    ) -> Any:
        from hf_koopman.profiling import profile

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return profile(
                    model,
                    batch,
                    num_samples=num_samples,
                    rank=self.rank,
                    seed=self.seed,
                    layers=self.layers,
                    learning_rate=learning_rate,
                )
        finally:
            model.train(was_training)

    @staticmethod
    def _scalars(spectral_profile: Any) -> dict[str, float]:
        out = {f"rksp/{k}": v for k, v in spectral_profile.aggregates.items() if isinstance(v, (int, float))}
        if spectral_profile.score is not None:
            out["rksp/score"] = spectral_profile.score
        if spectral_profile.kappa_median is not None:
            out["rksp/kappa_median"] = spectral_profile.kappa_median
        level = _VERDICT_LEVEL.get(spectral_profile.verdict)
        if level is not None:
            out["rksp/verdict_level"] = level
        risk = spectral_profile.risk
        if risk is not None:
            out["rksp/risk"] = risk
        return out

    def _save(self, args: Any, spectral_profile: Any) -> None:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rksp_profile.json").write_text(spectral_profile.to_json(), encoding="utf-8")
        plots: dict[str, str] = {}
        try:
            spectral_profile.plot(out / "rksp_profile.png")
            plots["RKSP profile"] = "rksp_profile.png"
        except ImportError as err:
            logger.warning("RKSP: %s; skipping the plot", err)
        (out / "rksp_report.md").write_text(spectral_profile.to_markdown(plots=plots), encoding="utf-8")

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self._trainer is None:
            self._trainer = _find_trainer()
            if self._trainer is None:
                logger.warning(
                    "RKSPCallback: no Trainer found; rksp/* scalars go to state.log_history only and the guard sees "
                    "only non-finite activations. Call callback.bind(trainer) to fix this."
                )
        self._stop_step = None
        self._check_fsdp(args, model)
        restored = self.init_verdict is not None
        if self.profile_at_init and not restored and model is not None:
            batch = self._probe_batch(model, train_dataloader)
            spectral_profile = self._run_profile(model, batch, self.num_samples, args.learning_rate)
            self.profile = spectral_profile
            self.init_verdict = spectral_profile.verdict
            self.init_score = spectral_profile.score
            self._log(args, state, self._scalars(spectral_profile))
            if self.save_artifacts and state.is_world_process_zero:
                self._save(args, spectral_profile)
            if self.init_verdict == "high risk":
                logger.warning(
                    "RKSP verdict at initialisation: HIGH RISK of divergence (mean M≈1 = %s, median κ(V) = %s; %s). "
                    "Recommended: train with KSS (KSSTrainer, or RKSPCallback(auto_kss=True) with a KSSTrainer), "
                    "lower the learning rate or add normalisation.",
                    None if spectral_profile.score is None else f"{spectral_profile.score:.3f}",
                    None if spectral_profile.kappa_median is None else f"{spectral_profile.kappa_median:.3g}",
                    spectral_profile.verdict_reason,
                )
            else:
                logger.info("RKSP verdict at initialisation: %s", self.init_verdict)
            if self.auto_kss and self.init_verdict == "high risk":
                self.kss_auto_enabled = True
        if self.auto_kss and self.kss_auto_enabled:  # also re-applied after a resume
            self._enable_kss(args, state)
        if self.guard and self._trainer is not None and self._taps is None:
            self._taps = TrainerTaps(self._trainer)
        if self.guard and self.check_activations and model is not None and self._watch is None:
            from hf_koopman.profiling import find_residual_blocks

            try:
                self._watch = ActivationWatch(find_residual_blocks(model, layers=self.layers))
            except ValueError as err:
                logger.warning("RKSP guard: no residual blocks found (%s); activation check disabled", err)
        return control

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

    def _enable_kss(self, args, state) -> None:
        config = getattr(self._trainer, "kss_config", None)
        if config is None:
            logger.warning("RKSPCallback(auto_kss=True) needs a KSSTrainer; KSS was not enabled.")
            return
        if not config.enabled:
            config.enabled = True
            logger.warning("RKSP: init verdict is high risk, KSS switched on (alpha=%g).", config.alpha)
            self._log(args, state, {"kss/auto_enabled": 1.0})

    def on_step_begin(self, args, state, control, **kwargs):
        if self._taps is not None:
            self._taps.reset()
        if self._watch is not None:
            self._watch.reset()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.guard:
            return
        loss = grad_norm = None
        if self._taps is not None and self._taps.step_loss is not None:
            loss = float(self._taps.step_loss)
        if self._taps is not None and self._taps.grad_norm is not None:
            grad_norm = float(self._taps.grad_norm)
        bad_index = self._watch.first_bad_index() if self._watch is not None else None
        local = [
            float(loss is not None and (not math.isfinite(loss) or loss > self.loss_threshold)),
            float(grad_norm is not None and (not math.isfinite(grad_norm) or grad_norm > self.grad_norm_threshold)),
            float(bad_index is not None),
            -float(bad_index) if bad_index is not None else -1e9,
        ]
        flags = reduce_flags(local, args.device)  # OR across ranks; -max(-i) = min block index
        if not any(flags[:3]):
            return

        def where(i: int) -> str:
            return "" if local[i] else " on another process"

        causes = []
        if flags[0]:
            causes.append(f"loss > {self.loss_threshold:g} or non-finite{where(0)} (raw step loss here: {loss})")
        if flags[1]:
            causes.append(
                f"gradient norm > {self.grad_norm_threshold:g} or non-finite{where(1)} (pre-clip norm: {grad_norm})"
            )
        first_bad = None
        if flags[2]:
            causes.append(f"non-finite block output{where(2)}")
            index = int(-flags[3])
            if self._watch is not None and 0 <= index < len(self._watch.names):
                first_bad = self._watch.names[index]
        event = DivergenceEvent(
            step=state.global_step + 1,
            causes=causes,
            loss=loss,
            grad_norm=grad_norm,
            first_bad_layer=first_bad,
            last_good_checkpoint=self.last_good_checkpoint,
        )
        self.divergence = event.to_dict()
        self._stop_step = event.step
        if self.skip_diverged_update and model is not None:
            for param in model.parameters():
                param.grad = None  # optimizer.step() skips parameters without gradients
        control.should_training_stop = True
        logger.error(
            "RKSP guard: %s. Training stops%s; last good checkpoint: %s.",
            event.describe(),
            " (the diverged update was not applied)" if self.skip_diverged_update else "",
            self.last_good_checkpoint,
        )
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._stop_step is None and control.should_save:
            # recorded before the checkpoint is written, so the saved callback state already names it
            self.last_good_checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self._stop_step is not None and state.global_step >= self._stop_step:
            control.should_save = False  # never let the diverged step replace the last good checkpoint
            control.should_training_stop = True
            if state.global_step == self._stop_step:
                self._log(args, state, {"rksp/diverged": 1.0, "rksp/diverged_step": float(self._stop_step)})
                if state.is_world_process_zero:
                    out = Path(args.output_dir)
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "rksp_divergence.json").write_text(json.dumps(self.divergence, indent=2), encoding="utf-8")
            return control
        if self.every_n_steps and state.global_step % self.every_n_steps == 0 and model is not None:
            batch = self._probe_batch(model, kwargs.get("train_dataloader"))
            try:
                spectral_profile = self._run_profile(model, batch, self.monitor_num_samples, args.learning_rate)
            except ValueError as err:  # e.g. non-finite activations: the guard handles divergence
                logger.warning("RKSP monitoring at step %d failed: %s", state.global_step, err)
                return
            self._log(args, state, self._scalars(spectral_profile))

    def on_save(self, args, state, control, **kwargs):
        if self._stop_step is None:
            self.last_good_checkpoint = str(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
