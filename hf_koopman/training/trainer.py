"""`KSSTrainer`: a `transformers.Trainer` that adds Koopman Spectral Shaping (paper Sec. 3.3) to the task loss."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from transformers import Trainer
from hf_koopman.logging_utils import get_logger

from hf_koopman.koopman.shaping import (
    SpectralShapingError,
    differentiable_dmd_eigenvalues,
    eigenvalue_modulus,
    kss_penalty,
)
from hf_koopman.training.arguments import KSSConfig, KSSTrainingArguments
from hf_koopman.training.fsdp import UnshardedParameters, enable_cpu_fsdp, is_fsdp_model


__all__ = ["KSSTrainer"]

logger = get_logger(__name__)

# order of the running sums kept on device between logging steps
_STAT_KEYS = ("kss/penalty", "kss/near_unit_mass", "kss/spectral_radius")


class _InjectGradients(torch.autograd.Function):
    """Zero-valued scalar of `params` whose backward returns precomputed gradients (times the incoming gradient).

    `loss + _InjectGradients.apply(grads, *params)` has the value of `loss` and, w.r.t. `params`, the gradient
    `grads` scaled by whatever later multiplies the loss (GA division, an AMP loss scale), i.e. it behaves exactly like
    a loss whose gradient is `grads`, without keeping or re-traversing the graph that produced them.
    """

    @staticmethod
    def forward(ctx, grads: list, *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return torch.zeros((), dtype=torch.float32, device=params[0].device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        scale = float(grad_output)  # one host sync per KSS micro-batch
        if scale == 1.0:  # the common case (no GA division, no loss scaling): hand the tensors over, no copies
            return (None, *grads)
        return (None, *[None if g is None else g * scale for g in grads])


class _SeedProbe(torch.autograd.Function):
    """Identity on the task loss whose backward records the incoming gradient in `cell.seed`.

    The activation cap injects KSS gradients mid-backward; they must carry the same factor as the task gradient that
    reaches them (the GA division, an AMP loss scale, DDP's loss scaling), and this node, the only way into the task
    graph, sees that factor before any activation hook runs.
    """

    @staticmethod
    def forward(ctx, loss: torch.Tensor, cell: Any) -> torch.Tensor:
        ctx.cell = cell
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ctx.cell.seed = grad_output.detach().sum()  # sum: a per-replica loss vector is averaged later
        return grad_output, None


def _token_view(tensor: torch.Tensor) -> torch.Tensor:
    """`(..., d)` activation -> `(tokens, d)` rows, as `ResidualStreamRecorder` indexes them."""
    if tensor.dim() == 4:
        return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])
    return tensor.reshape(-1, tensor.shape[-1])


def _from_token_view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        b, c, h, w = like.shape
        return flat.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return flat.reshape(like.shape)


class _ActivationCap:
    """State of one KSS micro-batch under `grad_cap="activations"` (see `KSSTrainer._activation_capped_loss`)."""

    def __init__(self, trainer: "KSSTrainer", kss_norm: torch.Tensor) -> None:
        self.trainer = trainer
        self.kss_norm = kss_norm  # ||dL_KSS/d(states)|| over every captured state, float64
        self.seed: torch.Tensor | None = None  # set by _SeedProbe
        self.scale: torch.Tensor | None = None  # fixed by the first hook that runs

    def hook(self, items: list[tuple[torch.Tensor, torch.Tensor]]):
        def inject(grad: torch.Tensor) -> torch.Tensor:
            seed = self.seed if self.seed is not None else grad.new_ones((), dtype=torch.float64)
            if self.scale is None:
                # the first captured activation the backward reaches: its gradient is the task's alone
                n_task = grad.detach().double().norm()
                n_kss = self.kss_norm * seed.double().abs()
                ratio = self.trainer.kss_config.max_grad_ratio
                binds = torch.isfinite(n_task) & (n_kss > ratio * n_task)
                self.scale = torch.where(binds, ratio * n_task / n_kss.clamp_min(1e-300), torch.ones_like(n_task))
                self.trainer._kss_grad_scale = self.trainer._kss_grad_scale + self.scale.to(
                    self.trainer._kss_grad_scale.device
                )
                self.trainer._kss_grad_scale_count += 1
            factor = (self.scale * seed.double()).to(grad.dtype)
            flat = _token_view(grad)
            for rows, g in items:
                flat = flat.index_add(0, rows.to(flat.device), g.to(flat.dtype) * factor)
            return _from_token_view(flat, grad)

        return inject


class KSSTrainer(Trainer):
    """`Trainer` whose training loss is `L_task + alpha * mean_{l in S} L_KSS^l` (paper Eqs. 14-15).

    **When it is worth turning on: never, at the scales measured, to prevent divergence.** In the paper's own regime
    (No-Norm GPT, d = 128, AdamW, LR 0.005-0.01, full spectrum, every 10 steps on half the blocks) KSS with the default
    gradient cap and with the paper-literal gradient both diverged in 24 of 24 trials, like the control and gradient
    clipping (`results/kss_v2.md`); at d = 32 the capped default matched the control and the paper-literal gradient
    diverged more often (`results/RESULTS.md` §3). Lower the learning rate or add normalisation instead; use KSS to
    shape the spectrum, not as a safety net.

    On every micro-batch of an optimizer step with `global_step % every_n_steps == 0` (and only in training mode), hooks
    on a seeded random `layer_fraction` of the residual blocks capture the token states entering and leaving each block
    during the **same** forward pass that computes the task loss (no second forward). The eigenvalues of their
    whitened DMD operator ([`~hf_koopman.koopman.shaping.differentiable_dmd_eigenvalues`]) enter the penalty: by
    default the full spectrum, the operator `RKSPCallback` reports; with `KSSConfig.rank = r` the rank-r randomized
    approximation. The gradient flows back through the `(m, m)` operator to the token states. Other steps run exactly
    the parent `compute_loss`.

    * Gradient accumulation: the term is divided by `current_gradient_accumulation_steps` exactly when the `Trainer`
      does not divide the loss itself (the loss already counts as GA-scaled), so the KSS gradient of an optimizer step
      is the mean over its micro-batches for every GA setting. Under DDP it is added after the task loss is rescaled
      by the number of processes, so DDP's gradient averaging yields the mean over ranks.
    * Gradient cap (`KSSConfig.max_grad_ratio`, default 0.5): on a KSS micro-batch the gradient of
      `alpha * L_KSS` is rescaled by one factor `c <= 1` so that it is at most `max_grad_ratio` times the task
      gradient; its direction and the loss value are unchanged. Eq. 14's raw gradient is ~100x the task gradient on
      a No-Norm model at init and causes gradient spikes (`results/kss_gradient_scale.md`). Each rank
      caps its own contribution. `max_grad_ratio=None` gives the paper-literal gradient. `KSSConfig.grad_cap` says
      where the two norms are measured:

      - `"activations"`: on the residual stream, inside the ordinary backward pass. `L_KSS` is differentiated with
        respect to the captured token states only (a backward through the small DMD graph), and tensor hooks add
        that gradient, times `c`, where those states live while the Trainer's backward passes through them
        (`_activation_capped_loss`). No extra pass through the network; works with reentrant and non-reentrant
        gradient checkpointing, DDP and FSDP alike.
      - `"parameters"`: over the trainable parameters, exactly, at the cost of one extra backward pass through the
        layers below the highest sampled block (`_capped_loss`); under FSDP and other wrappers two extra passes.
        Needs non-reentrant gradient checkpointing (the transformers default); reentrant raises a `ValueError`.
    * A layer whose eigendecomposition fails (non-finite or near-defective operator) is skipped with a logged
      warning; if every sampled layer fails, the step has no KSS term. The loss never turns NaN because of KSS.
    * FSDP: a CPU multi-process run launched with an FSDP config is sharded with FSDP2 (accelerate alone would run it
      as DDP; see `hf_koopman.training.fsdp`); hooks sit on the FSDP-wrapped blocks, and the parameter-space cap
      differentiates with respect to the unsharded parameters of the forward.
    * Logged through `log()` (so `log_history`, TensorBoard and W&B see them): `kss/penalty` (mean unweighted
      `L_KSS` over the sampled layers, before `alpha`), `kss/near_unit_mass` (fraction of the eigenvalues in
      `[tau_l, tau_u]`, layer mean) and `kss/spectral_radius` (largest `|lambda|`, layer mean), averaged over the KSS
      micro-batches since the last log and across processes; `kss/grad_scale` (mean cap factor, 1 = uncapped, this
      process only). The Trainer's own `loss` is the optimised objective,
      i.e. it includes `alpha * penalty` on KSS steps.
    * `task_loss`: the detached task loss of the last training micro-batch, without the KSS term, as `compute_loss`
      of the parent `Trainer` returns it. The divergence rule is about this loss, never the objective (`L_KSS` is
      unbounded); [`RKSPCallback`] reads the same value from the model output with a forward hook, so it works with
      any `Trainer`.
    * `save_model()` refuses weights the divergence guard has not validated (see [`RKSPCallback`]) with a
      [`~hf_koopman.training.guard.DivergedModelError`] naming the last good checkpoint; `allow_unvalidated=True`
      writes them anyway.

    Args:
        kss_config ([`KSSConfig`], *optional*):
            Settings. Defaults to `args.kss_config()` when `args` is a [`KSSTrainingArguments`], else `KSSConfig()`.
        *args, **kwargs: everything `transformers.Trainer` accepts.

    Example:
        >>> trainer = KSSTrainer(model=model, args=KSSTrainingArguments("out", kss_alpha=0.15),
        ...                      train_dataset=ds, callbacks=[RKSPCallback(auto_kss=True)])
        >>> trainer.train()
    """

    def __init__(self, *args: Any, kss_config: KSSConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kss_config is None:
            kss_config = self.args.kss_config() if isinstance(self.args, KSSTrainingArguments) else KSSConfig()
        if not isinstance(kss_config, KSSConfig):
            raise TypeError(f"kss_config must be a KSSConfig, got {type(kss_config).__name__}")
        kss_config.validate()
        self.kss_config = kss_config
        self.kss_steps: list[int] = []  # optimizer steps on which KSS ran (one entry per step, for inspection)
        self.task_loss: torch.Tensor | None = None  # last training micro-batch's task loss, without the KSS term
        self._kss_blocks: list[Any] | None = None
        self._kss_stats: torch.Tensor | None = None  # (len(_STAT_KEYS) + 1,) sums and count, on device
        self._kss_skipped = 0
        self._kss_grad_scale = torch.zeros((), dtype=torch.float64)  # running sum of the gradient-cap factors
        self._kss_grad_scale_count = 0
        self._kss_fast_cap = True  # False: always the three-pass cap (kept for the benchmark's comparison)

        from hf_koopman.training.callback import RKSPCallback, register_trainer  # local: callback imports nothing here

        register_trainer(self)  # also reaches callbacks restored from a checkpoint (new instances)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RKSPCallback):
                callback.bind(self)

    def create_accelerator_and_postprocess(self) -> None:
        """Parent behaviour, then FSDP2 on CPU when an FSDP run was requested (accelerate alone falls back to DDP)."""
        super().create_accelerator_and_postprocess()
        enable_cpu_fsdp(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, *,
                   allow_unvalidated: bool = False) -> None:
        """`Trainer.save_model`, refusing weights the divergence guard saw diverge (unless `allow_unvalidated`)."""
        from hf_koopman.training.callback import RKSPCallback
        from hf_koopman.training.guard import DivergedModelError

        guards = [c for c in self.callback_handler.callbacks if isinstance(c, RKSPCallback)]
        for guard in guards:
            if guard.divergence is None or _internal_call:
                continue
            if not guard.weights_validated and not allow_unvalidated:
                raise DivergedModelError(
                    f"refusing to save: the run diverged at step {guard.divergence['step']} "
                    f"({'; '.join(guard.divergence['causes'])}) and the in-memory weights are {guard._in_memory}. "
                    f"Last good checkpoint: {guard._checkpoint_on_disk()}; resume from it with "
                    "trainer.train(resume_from_checkpoint=...), or pass save_model(..., allow_unvalidated=True) to "
                    "write these weights anyway."
                )
            if guard.weights_validated:
                logger.warning(
                    "save_model after a divergence at step %s: writing the validated weights of step %s that the guard "
                    "restored.", guard.divergence["step"], guard.divergence.get("restored_step"),
                )
        super().save_model(output_dir, _internal_call)

    # ------------------------------------------------------------------ switches
    def kss_active_for_step(self, step: int | None = None) -> bool:
        """Whether the optimizer step `step` (default: the current one) carries a KSS term."""
        step = self.state.global_step if step is None else step
        return self.kss_config.active and step % self.kss_config.every_n_steps == 0

    def _kss_select_blocks(self, model: torch.nn.Module, step: int) -> list[Any]:
        from hf_koopman.profiling import find_residual_blocks

        if self._kss_blocks is None:
            self._kss_blocks = find_residual_blocks(model, layers=self.kss_config.layers)
            if not self._kss_blocks:
                raise ValueError("KSS found no residual blocks; pass KSSConfig(layers='model.layers') (or kss_layers).")
        blocks = self._kss_blocks
        count = max(1, math.ceil(self.kss_config.layer_fraction * len(blocks) - 1e-9))
        # same subset on every rank and every micro-batch of the step: seeded by (seed, step)
        generator = torch.Generator().manual_seed(self.kss_config.seed * 1_000_003 + step)
        chosen = torch.randperm(len(blocks), generator=generator)[:count].sort().values.tolist()
        return [blocks[i] for i in chosen]

    def _loss_counts_as_ga_scaled(self, num_items_in_batch: Any) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # absent before transformers 5.23
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not (model.training and self.kss_active_for_step()):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                self.task_loss = (result[0] if return_outputs else result).detach()
            return result
        from hf_koopman.profiling import ResidualStreamRecorder

        cfg = self.kss_config
        step = self.state.global_step
        if not self.kss_steps or self.kss_steps[-1] != step:
            self.kss_steps.append(step)
        unwrapped = self.accelerator.unwrap_model(model)
        blocks = self._kss_select_blocks(unwrapped, step)
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if isinstance(inputs, dict) and inputs.get("decoder_attention_mask") is not None:
            mask = {"": mask, "encoder": mask, "decoder": inputs["decoder_attention_mask"]}
        recorder = ResidualStreamRecorder(
            unwrapped,
            blocks,
            num_samples=cfg.num_samples,
            seed=cfg.seed + step,
            attention_mask=mask,
            detach=False,
            check_finite=False,  # non-finite activations: the divergence guard reports them; KSS just skips
        )
        # FSDP2: the graph's leaves are the unsharded parameters materialised during this forward (see fsdp.py)
        activation_cap = bool(cfg.max_grad_ratio) and cfg.grad_cap == "activations"
        sharded = bool(cfg.max_grad_ratio) and not activation_cap and is_fsdp_model(unwrapped)
        unsharded = UnshardedParameters(unwrapped) if sharded else contextlib.nullcontext()
        with recorder, unsharded:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        self.task_loss = loss.detach()
        penalty = self._kss_term(recorder.snapshots(), step, device=loss.device)
        if penalty is not None:
            if self._loss_counts_as_ga_scaled(num_items_in_batch):
                # the Trainer will not divide by GA, so the per-micro-batch term must be (mean over micro-batches)
                penalty = penalty / self.current_gradient_accumulation_steps
            term = cfg.alpha * penalty.to(loss.dtype)
            if activation_cap:
                loss = self._activation_capped_loss(loss, term, recorder.snapshot_sources(), step)
            elif cfg.max_grad_ratio:
                params = unsharded.parameters if sharded else None
                loss = self._capped_loss(model, loss, term, step, params)
            else:
                loss = loss + term
        return (loss, outputs) if return_outputs else loss

    def _kss_term(self, snapshots: list[tuple[str, torch.Tensor, torch.Tensor]], step: int, device) -> Any:
        """Mean `L_KSS` over the captured layers (skipping failed ones), and running stats for `log()`."""
        cfg = self.kss_config
        groups: dict[tuple[int, ...], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for name, X, Y in snapshots:
            groups.setdefault(tuple(X.shape), []).append((name, X, Y))
        eigs: list[torch.Tensor] = []
        for shape, members in groups.items():
            if shape[0] < 2:
                continue
            for eig in self._group_eigenvalues(members, step):
                eigs.append(eig)
        if not eigs:
            if snapshots:
                logger.warning("KSS: every sampled layer failed at step %d; no spectral term on this micro-batch.", step)
            return None
        ev = torch.stack(eigs) if len({e.shape for e in eigs}) == 1 else None
        penalties = (
            kss_penalty(ev, **self._penalty_kwargs())
            if ev is not None
            else torch.stack([kss_penalty(e, **self._penalty_kwargs()) for e in eigs])
        )
        penalty = penalties.mean()
        if not torch.isfinite(penalty.detach()):
            logger.warning("KSS: non-finite penalty at step %d; the term is skipped for this micro-batch.", step)
            return None
        with torch.no_grad():
            mods = [eigenvalue_modulus(e.detach()) for e in eigs]
            near = torch.stack([((m >= cfg.tau_l) & (m <= cfg.tau_u)).double().mean() for m in mods]).mean()
            radius = torch.stack([m.max() for m in mods]).mean()
            row = torch.stack([penalty.detach().double(), near.double(), radius.double(), penalty.new_ones(()).double()])
            row = row.to(device)
            self._kss_stats = row if self._kss_stats is None else self._kss_stats + row
        return penalty

    def _gradient_injection_ok(self, model: torch.nn.Module) -> bool:
        """Whether the step's gradient may be handed to `backward` through [`_InjectGradients`] (see `_capped_loss`).

        True for a bare module and for `DistributedDataParallel` (its reducer hooks fire on every parameter's gradient
        accumulation, whatever graph produced it). False for FSDP (its reduce-scatter is driven by hooks on the block
        forward graph), DeepSpeed and any other wrapper, which keep the three-pass path.
        """
        if not self._kss_fast_cap:
            return False
        unwrapped = self.accelerator.unwrap_model(model)
        if is_fsdp_model(unwrapped) or getattr(self, "is_deepspeed_enabled", False):
            return False
        return model is unwrapped or isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def _capped_loss(
        self,
        model: torch.nn.Module,
        task_loss: torch.Tensor,
        term: torch.Tensor,
        step: int,
        params: list[torch.nn.Parameter] | None = None,
    ) -> torch.Tensor:
        """`task_loss + term` in value, with the gradient of `term` rescaled to at most `max_grad_ratio * ||g_task||`.

        Both gradients are needed separately for their norms, so this costs backward passes on KSS micro-batches only.
        The scale is a detached scalar: the gradient of the returned loss is `g_task + scale * g_kss`, so the
        objective stays Eqs. 14-15 and only the size of its step is bounded relative to the task (see
        `hf_koopman.koopman.shaping`, "Gradient scale").

        * Bare model and DDP (default): `g_task` and `g_kss` come from two `torch.autograd.grad` passes, and their
          combination is handed to the Trainer's `backward` through a zero-valued node whose backward returns it
          (`_InjectGradients`), so the forward graph is not traversed a third time. DDP's reducer all-reduces the
          injected gradients like any others; gradient accumulation, the GA / loss-scaler factors applied to the loss
          afterwards and `no_sync` all act on it as on an ordinary loss.
        * FSDP and other wrappers: the returned loss is `task + term.detach() + scale * (term - term.detach())` and
          the Trainer's ordinary backward (a third pass) produces the gradient, so the wrapper's own hooks run.
          `params` are then the unsharded parameters recorded during the forward.

        The two paths give the same gradient up to float summation order (tested).
        """
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        if not params or not term.requires_grad:
            return task_loss + term
        inject = self._gradient_injection_ok(model)
        try:
            # the injection path never needs the forward graph again: the full task pass goes last and frees the
            # saved activations as it runs (same gradients, bit for bit, in either order)
            g_kss = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            g_task = torch.autograd.grad(task_loss, params, retain_graph=not inject, allow_unused=True)
        except RuntimeError as err:
            if "reentrant" not in str(err):
                raise
            raise ValueError(
                "KSS gradient cap: reentrant gradient checkpointing cannot compute the separate task / KSS gradient "
                "norms. Pass gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default) or "
                "disable the cap with kss_max_grad_ratio=None."
            ) from err

        def norm(grads) -> torch.Tensor:
            sq = [g.detach().double().square().sum() for g in grads if g is not None]
            return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64, device=term.device)

        n_task, n_kss = norm(g_task), norm(g_kss)
        if not torch.isfinite(n_kss):
            logger.warning("KSS: non-finite penalty gradient at step %d; the term's gradient is dropped.", step)
            scale = torch.zeros((), dtype=torch.float64, device=term.device)
        elif not torch.isfinite(n_task) or n_kss <= self.kss_config.max_grad_ratio * n_task:
            # a non-finite task gradient is the divergence guard's business; KSS leaves it alone
            scale = torch.ones((), dtype=torch.float64, device=term.device)
        else:
            scale = self.kss_config.max_grad_ratio * n_task / n_kss
        self._kss_grad_scale = scale.to(self._kss_grad_scale.device) + self._kss_grad_scale
        self._kss_grad_scale_count += 1
        if not inject:
            del g_task, g_kss
            scale = scale.to(term.dtype)
            return task_loss + term.detach() + scale * (term - term.detach())
        factor = float(scale)
        grads: list[torch.Tensor | None] = []
        for g_t, g_k in zip(g_task, g_kss):
            if g_k is None or factor == 0.0:
                grads.append(g_t)
            elif g_t is None:
                grads.append(g_k * factor)
            else:
                grads.append(torch.add(g_t, g_k, alpha=factor))
        del g_task, g_kss
        value = (task_loss.detach() + term.detach()).to(task_loss.dtype)
        return value + _InjectGradients.apply(grads, *params).to(task_loss.dtype)

    def _activation_capped_loss(
        self,
        task_loss: torch.Tensor,
        term: torch.Tensor,
        sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        step: int,
    ) -> torch.Tensor:
        """`task_loss + term` in value; the gradient of `term`, capped on the residual stream, rides the ordinary backward.

        `term` depends on the parameters only through the captured token states (`pieces`, rows of block inputs and
        outputs). Its gradient with respect to them is a backward through the small DMD graph alone. Hooks on the
        activations those rows come from add it, times one factor `c`, to the gradient the Trainer's backward pass
        carries there, so the parameters receive `g_task + c * g_KSS` from a single pass through the network.
        `c = min(1, max_grad_ratio * ||g_task(h)|| / ||g_KSS(pieces)||)` is fixed at the first hooked activation the
        backward reaches, whose gradient is still the task's alone (`KSSConfig.grad_cap`). Sources that do not require
        grad (nothing trainable below them) are skipped: their share of the gradient could not reach a parameter.
        """
        usable = [(piece, source, rows) for piece, source, rows in sources if piece.requires_grad and source.requires_grad]
        if not usable or not term.requires_grad:
            if not getattr(self, "_kss_warned_no_sources", False):
                self._kss_warned_no_sources = True
                logger.warning(
                    "KSS (grad_cap='activations'): no captured activation requires grad (frozen model, or reentrant "
                    "gradient checkpointing?), so the KSS term has no gradient; its value is still logged."
                )
            return task_loss + term.detach()
        grads = torch.autograd.grad(term, [u[0] for u in usable], allow_unused=True, retain_graph=True)
        groups: dict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        squares = []
        for (_, source, rows), g in zip(usable, grads):
            if g is None:
                continue
            groups.setdefault(id(source), (source, []))[1].append((rows, g.detach()))
            squares.append(g.detach().double().square().sum())
        if not squares:
            return task_loss + term.detach()
        kss_norm = torch.stack(squares).sum().sqrt()
        if not torch.isfinite(kss_norm):  # one host sync per KSS micro-batch
            logger.warning("KSS: non-finite penalty gradient at step %d; the term's gradient is dropped.", step)
            return task_loss + term.detach()
        cap = _ActivationCap(self, kss_norm)
        for source, items in groups.values():
            source.register_hook(cap.hook(items))
        return _SeedProbe.apply(task_loss, cap) + term.detach().to(task_loss.dtype)

    def _penalty_kwargs(self) -> dict[str, float]:
        cfg = self.kss_config
        return {
            "temperature": cfg.temperature,
            "tau_u": cfg.tau_u,
            "tau_l": cfg.tau_l,
            "gamma": cfg.gamma,
            "beta": cfg.beta,
        }

    def _group_eigenvalues(self, members: list[tuple[str, torch.Tensor, torch.Tensor]], step: int) -> list[Any]:
        cfg = self.kss_config
        X = torch.stack([m[1] for m in members])
        Y = torch.stack([m[2] for m in members])
        kwargs = dict(rank=cfg.rank, eps=cfg.eps, oversample=cfg.oversample, power_iters=cfg.power_iters)

        def generator() -> torch.Generator:  # a CPU generator: the same sketch whatever device the model is on
            return torch.Generator().manual_seed(cfg.seed * 7919 + step)

        try:
            return list(differentiable_dmd_eigenvalues(X, Y, generator=generator(), **kwargs).unbind(0))
        except (SpectralShapingError, ValueError, torch.linalg.LinAlgError) as err:
            batch_error = err
        out = []  # retry layer by layer, skipping the failing ones
        for name, x, y in members:
            try:
                out.append(differentiable_dmd_eigenvalues(x, y, generator=generator(), **kwargs))
            except (SpectralShapingError, ValueError, torch.linalg.LinAlgError) as err:
                self._kss_skipped += 1
                logger.warning("KSS: skipping layer %r at step %d: %s", name, step, err)
        if len(out) == len(members):  # the batched call failed for another reason; the per-layer path worked
            logger.debug("KSS batched eigendecomposition failed (%s); per-layer path used", batch_error)
        return out

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `kss/*` running means to training-step logs (reduced across processes), then logs as usual."""
        if "loss" in logs and self.kss_config.active:
            stats = self._kss_stats
            if stats is None:
                stats = torch.zeros(len(_STAT_KEYS) + 1, dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:  # every rank reaches a training-step log at the same step
                stats = self.accelerator.reduce(stats.to(self.args.device), reduction="sum")
            count = float(stats[-1])
            if count > 0:
                for key, value in zip(_STAT_KEYS, (stats[:-1] / count).tolist()):
                    logs[key] = float(value)
            if self._kss_grad_scale_count:
                logs["kss/grad_scale"] = float(self._kss_grad_scale) / self._kss_grad_scale_count
                self._kss_grad_scale = torch.zeros((), dtype=torch.float64)
                self._kss_grad_scale_count = 0
            if self._kss_skipped:
                logs["kss/skipped_layers"] = float(self._kss_skipped)
            self._kss_stats = None
            self._kss_skipped = 0
        super().log(logs, start_time)
