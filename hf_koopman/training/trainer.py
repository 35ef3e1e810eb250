"""`KSSTrainer`: a `transformers.Trainer` that adds Koopman Spectral Shaping (paper Sec. 3.3) to the task loss."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import TrainOutput
from transformers.utils import is_torch_xla_available

from hf_koopman.logging_utils import get_logger

from hf_koopman.koopman.shaping import (
    SpectralShapingError,
    differentiable_dmd_eigenvalues,
    eigenvalue_modulus,
    kss_penalty,
)
from hf_koopman.training.arguments import KSSConfig, KSSTrainingArguments
from hf_koopman.training.fsdp import UnshardedParameters, check_cpu_fsdp_version, enable_cpu_fsdp, is_fsdp_model


__all__ = ["KSSTrainer"]

logger = get_logger(__name__)

# order of the running sums kept on device between logging steps
_STAT_KEYS = ("kss/penalty", "kss/near_unit_mass", "kss/spectral_radius")


_REENTRANT_CAP_MESSAGE = (
    "KSS gradient cap: reentrant gradient checkpointing cannot compute the separate task / KSS gradient norms. Pass "
    "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default), kss_grad_cap='activations', "
    "or disable the cap with kss_max_grad_ratio=None."
)


def _has_reentrant_checkpoint(loss: torch.Tensor) -> bool:
    """Whether the autograd graph of `loss` holds a reentrant `torch.utils.checkpoint` node (`CheckpointFunction`)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


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


def _reaches_parameter(tensor: torch.Tensor, memo: dict[Any, bool]) -> bool:
    """Whether a gradient arriving at `tensor` can reach a trainable parameter through its autograd graph.

    A walk down `grad_fn`: an `AccumulateGrad` node of an `nn.Parameter` is a trainable parameter; one of any other
    leaf (the embedding output that `enable_input_require_grads` or gradient checkpointing marks as requiring grad,
    with frozen embeddings below it) is not. A custom `autograd.Function` node (reentrant checkpointing, FSDP,
    DeepSpeed) may hold parameters the graph does not show, so it counts as reaching one. `memo` is shared by the
    tensors of one forward pass, so the graph is walked at most once.
    """
    if tensor.grad_fn is None:
        return isinstance(tensor, torch.nn.Parameter)
    stack = [tensor.grad_fn]
    while stack:
        node = stack[-1]
        if node in memo:
            stack.pop()
            continue
        if type(node).__name__ == "AccumulateGrad":
            memo[node] = isinstance(node.variable, torch.nn.Parameter)
        elif isinstance(node, torch.autograd.function.BackwardCFunction):
            memo[node] = True
        else:
            children = [child for child, _ in node.next_functions if child is not None]
            if any(memo.get(child, False) for child in children):
                memo[node] = True
            else:
                pending = [child for child in children if child not in memo]
                if pending:
                    stack.append(pending[-1])
                    continue
                memo[node] = False
        stack.pop()
    return memo[tensor.grad_fn]


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


def _snapshot_masks(model: torch.nn.Module, blocks: list[Any], inputs: Any) -> Any:
    """The recorder's `attention_mask` for a training batch: one mask (or `None`) per stack label.

    Single-stack models use `attention_mask`. In an encoder-decoder model the encoder's blocks use `attention_mask`;
    the decoder's use `decoder_attention_mask`, else `labels != -100` (the decoder positions that carry a loss) when
    the labels are integer token labels on the decoder's token grid (`profiling.inputs.label_mask`), else, without
    `decoder_input_ids`, `attention_mask`: a sequence classifier such as `BartForSequenceClassification` feeds its
    decoder the shifted `input_ids`. Given `decoder_input_ids` and none of these, the decoder gets no mask (every
    position): the encoder's padding says nothing about the decoder's. In a model that is not encoder-decoder a
    decoder stack takes the decoder's mask (`decoder_attention_mask`, else the labels') only when the batch carries
    decoder inputs (`decoder_input_ids`: BLIP's question answering fed them); other stacks take the mask of their
    tower (`profiling.inputs.mask_routes`), routed on the unwrapped model (PEFT, DDP). PEFT prompt tuning's virtual
    tokens, which the blocks see in front of the text, are counted in as `profile()` counts them. The recorder applies
    a mask only to blocks whose token grid it matches.
    """
    if not isinstance(inputs, Mapping):  # any Mapping: collators return `BatchEncoding`, a UserDict
        return None
    from hf_koopman.profiling import unwrap_model
    from hf_koopman.profiling.inputs import label_mask, mask_routes, virtual_tokens, with_virtual_tokens

    prompt_tokens = virtual_tokens(model)  # read on the PEFT wrapper, before it is stripped
    # a PEFT / DDP wrapper: the block names, and the token embedding's path the routes compare them with, are those
    # of the unwrapped model
    model = unwrap_model(model)
    mask = inputs.get("attention_mask")
    config = getattr(model, "config", None)
    decoder = inputs.get("decoder_attention_mask")
    if decoder is None:  # the labels' padding, as `profile()` reads it
        decoder = label_mask(inputs, decoder_from_labels=True)
    if decoder is None and getattr(config, "is_encoder_decoder", False) and isinstance(mask, torch.Tensor) and (
            not isinstance(inputs.get("decoder_input_ids"), torch.Tensor)):
        decoder = mask  # the decoder reads the shifted input_ids (a sequence classifier)
    # other labels (list paths: a CLIP text and vision tower, ...) take the mask of the tower they belong to, as in
    # `profile()`: the text mask reaches only the stacks of the tower that embeds `input_ids`
    by_route = {"attention_mask": mask, "decoder": decoder, None: None}
    routes = mask_routes(model, blocks, inputs)
    return with_virtual_tokens({label: by_route[route] for label, route in routes.items()}, routes, prompt_tokens)


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module` runs compiled: an `OptimizedModule` from `torch.compile`, or `nn.Module.compile()` in place."""
    return type(module).__name__ == "OptimizedModule" or getattr(module, "_compiled_call_impl", None) is not None


def _compiled_hook_paths(model: torch.nn.Module | None, layers: Any = None) -> list[str]:
    """Dotted paths (`""`: the model itself) of the compiled modules that can skip KSS's hooks on the residual blocks.

    These are the blocks KSS may sample (`find_residual_blocks(model, layers)`) and their ancestors up to and including
    `model`: a compiled graph that contains a block's call does not call hooks added to it later. A compiled module
    strictly inside a block (its MLP) or outside the chain of blocks (an `lm_head`) runs inside or beside the hooked
    call and is not listed.
    """
    if model is None:
        return []
    if _is_compiled(model):
        return [""]
    from hf_koopman.profiling import find_residual_blocks
    from hf_koopman.profiling.blocks import eager_module

    # Automatic discovery runs on the model with the `torch.compile` wrappers in its module lists replaced by the
    # modules they wrap (put back afterwards): a list with a wrapped block (regional compilation) is then found as the
    # list of blocks it is, and the wrapper is listed at that block's path. `kss_layers` resolves on the model as it
    # is, as KSS resolves it. Compiled modules inside a block or outside the blocks stay allowed.
    wrapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = [] if layers is not None else [
        (parent, key, child)
        for parent in model.modules() if isinstance(parent, (torch.nn.ModuleList, torch.nn.Sequential))
        for key, child in parent._modules.items()
        if child is not None and eager_module(child) is not child
    ]
    try:
        for parent, key, child in wrapped:
            parent._modules[key] = eager_module(child)
        blocks = find_residual_blocks(model, layers=layers)
    except (ValueError, TypeError):  # no blocks: `_check_kss_model` refuses the run, naming kss_layers
        blocks = []
    finally:
        for parent, key, child in wrapped:
            parent._modules[key] = child
    originals = {id(eager_module(child)): child for _, _, child in wrapped}
    names = {id(module): name for name, module in model.named_modules()}
    found: list[str] = []
    for block in blocks:
        module = originals.get(id(block.module), block.module)  # the wrapper where the block is wrapped
        path = names.get(id(module))
        if path is None:
            continue
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix not in found and _is_compiled(model.get_submodule(prefix)):
                found.append(prefix)
    return found


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
    * Padding is left out of the snapshots through `attention_mask`. In encoder-decoder models the decoder's blocks
      use `decoder_attention_mask`, else the positions whose `labels` are not -100 (the positions that carry a loss)
      when the labels are token labels on the decoder's grid, else, without `decoder_input_ids`, `attention_mask` (a
      sequence classifier such as `BartForSequenceClassification` feeds its decoder the shifted `input_ids`); with
      `decoder_input_ids` and neither, every decoder position.
    * KSS sees the blocks through forward hooks set inside `KSSTrainer.compute_loss`. A subclass that overrides
      `compute_loss` must compute its loss through `super().compute_loss(...)`. A KSS step on which no penalty entered
      the loss (an override that does not call `super()`, blocks the forward did not run) logs a warning once per
      run (each `auto_find_batch_size` retry is a new run) and is left out of `kss_steps`.
    * `torch.compile`: while KSS is on, a `ValueError` refuses `torch_compile=True`, accelerate's dynamo backend
      (`ACCELERATE_DYNAMO_BACKEND`) and a compiled residual block or compiled ancestor of one, the model included
      (`torch.compile(module)` or `module.compile()`), when the trainer is built and when a run starts.
      torch.compile does not re-check forward hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`): a graph
      traced without KSS's hooks, on a first compiled step that is not a KSS step (a run resumed at a step that
      `every_n_steps` does not select) or in an earlier run or hyperparameter-search trial of the same model class in
      the process, is reused on KSS steps, and KSS silently records nothing. Compiled sub-modules inside a block
      (its MLP) or outside the blocks (the `lm_head`) are allowed: the hooked block calls stay eager.
    * Logged through `log()` (so `log_history`, TensorBoard and W&B see them) with the training `loss`: `kss/penalty`
      (mean unweighted `L_KSS` over the sampled layers, before `alpha`), `kss/near_unit_mass` (fraction of the
      eigenvalues in `[tau_l, tau_u]`, layer mean) and `kss/spectral_radius` (largest `|lambda|`, layer mean),
      averaged over the KSS micro-batches since the last log and across processes; `kss/grad_scale` (mean cap factor,
      1 = uncapped, this process only); `kss/task_loss`, the mean of the task losses `compute_loss` computed without
      the KSS term, reduced like `loss` (over the optimizer steps since the last log and over processes, gradient
      accumulation included; float64, exact however large the term), which is comparable with `eval_loss` and with a
      plain `Trainer`'s loss; it is in every training log; `kss/skipped_layers` (layers whose eigendecomposition
      failed and were left out since the last log, when any). The Trainer's own `loss` and `train_loss` are the
      optimised objective, i.e. they include `alpha * penalty` on KSS steps. The statistics of KSS steps after the
      last training log reach the final log of `train()` (the one with `train_loss`; also in the metrics `train()`
      returns), without `kss/task_loss`. `kss_steps`, the statistics and the warnings start afresh with each run
      (each `train()`, and each retry at a smaller batch size under `auto_find_batch_size`).
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
            A default taken from `args` is read again at the start of each run, so `kss_*` values that a
            `hyperparameter_search` trial sets on `args` take effect; an explicit `kss_config` is kept as given.
        *args, **kwargs: everything `transformers.Trainer` accepts.

    Example:
        >>> import torch
        >>> from datasets import Dataset
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                               num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> ids = torch.randint(0, 256, (32, 32), generator=torch.Generator().manual_seed(0)).tolist()
        >>> ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
        >>> args = KSSTrainingArguments("out/kss", max_steps=2, per_device_train_batch_size=8, report_to="none",
        ...                             kss_alpha=0.15, kss_every_n_steps=1)
        >>> trainer = KSSTrainer(model=model, args=args, train_dataset=ds)
        >>> _ = trainer.train()  # logs kss/* next to the loss
    """

    def __init__(self, *args: Any, kss_config: KSSConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        explicit = kss_config
        if kss_config is None:
            kss_config = self.args.kss_config() if isinstance(self.args, KSSTrainingArguments) else KSSConfig()
        if not isinstance(kss_config, KSSConfig):
            raise TypeError(f"kss_config must be a KSSConfig, got {type(kss_config).__name__}")
        kss_config.validate()
        self.kss_config = kss_config
        # `args.kss_*` can change after __init__ (a hyperparameter-search trial sets them on `args`): a config derived
        # from `args` follows them at the start of each run; an explicit `kss_config` is kept, with a warning
        self._kss_config_from_args = explicit is None and isinstance(self.args, KSSTrainingArguments)
        self._kss_args_seen = self.args.kss_config() if isinstance(self.args, KSSTrainingArguments) else None
        self.task_loss: torch.Tensor | None = None  # last training micro-batch's task loss, without the KSS term
        self._kss_blocks: list[Any] | None = None
        self._kss_blocks_model: Any = None  # weakref to the model `_kss_blocks` belong to
        # block lists a KSS step found not width-preserving (-> reason), left out from the next optimizer step on (the
        # micro-batches of one step sample the same blocks), and the step that found them
        self._kss_not_residual: dict[str, str] = {}
        self._kss_not_residual_step: int | None = None
        self._kss_fast_cap = True  # False: always the three-pass cap (kept for the benchmark's comparison)
        self._kss_reset_run_state()
        self._check_not_compiled(self.model)  # the blocks are checked when a run starts: evaluate() needs none

        from hf_koopman.training.callback import RKSPCallback, register_trainer  # local: callback imports nothing here

        register_trainer(self)  # also reaches callbacks restored from a checkpoint (new instances)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RKSPCallback):
                callback.bind(self)

    def create_accelerator_and_postprocess(self) -> None:
        """Parent behaviour, then FSDP2 on CPU when an FSDP run was requested (accelerate alone falls back to DDP).

        An FSDP version 1 request on a CPU multi-process run is refused first, with a `ValueError` naming
        `fsdp_version: 2` (`check_cpu_fsdp_version`): accelerate's `Accelerator()` would otherwise fail with its own
        error, which does not say that FSDP2 works on CPU."""
        check_cpu_fsdp_version(self.args)
        super().create_accelerator_and_postprocess()
        enable_cpu_fsdp(self)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, *,
                   allow_unvalidated: bool = False) -> None:
        """`Trainer.save_model`, refusing weights the divergence guard saw diverge.

        Args:
            output_dir (`str`, *optional*): where to save (default: `args.output_dir`), as in `Trainer.save_model`.
            allow_unvalidated (`bool`, defaults to `False`): save weights the guard saw diverge all the same.

        Raises:
            DivergedModelError: the in-memory weights diverged and were not rolled back, and `allow_unvalidated` is
                `False`.
        """
        if _internal_call:  # the Trainer's own checkpoint saves: the guard keeps diverged steps out of them
            super().save_model(output_dir, _internal_call)
            return
        self._refuse_unvalidated_weights("save", "save_model", allow_unvalidated)
        # with args.push_to_hub, Trainer.save_model pushes what it wrote: this call's check covers that push too
        self._kss_push_checked = True
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._kss_push_checked = False

    def push_to_hub(self, *args: Any, allow_unvalidated: bool = False, **kwargs: Any) -> Any:
        """`Trainer.push_to_hub` (same arguments), refusing weights the divergence guard saw diverge (unless
        `allow_unvalidated`): it saves the in-memory model through an internal `save_model` call, then uploads it."""
        if not getattr(self, "_kss_push_checked", False):
            self._refuse_unvalidated_weights("push", "push_to_hub", allow_unvalidated)
        return super().push_to_hub(*args, **kwargs)

    def _refuse_unvalidated_weights(self, verb: str, method: str, allow_unvalidated: bool) -> None:
        """Raise `DivergedModelError` when an `RKSPCallback` saw this run diverge and the in-memory weights are not a
        validated state; warn which validated state is written when they are, and that the weights are unchecked
        when the guard could not judge the last steps' loss (no divergence seen)."""
        from hf_koopman.training.callback import RKSPCallback
        from hf_koopman.training.guard import DivergedModelError

        for guard in (c for c in self.callback_handler.callbacks if isinstance(c, RKSPCallback)):
            if guard.divergence is None:
                if not guard.weights_validated:  # no divergence seen, but the last steps' loss was not judged
                    logger.warning("%s: writing in-memory weights the divergence guard could not check, %s (see its "
                                   "warning at the end of train()).", method, guard._in_memory)
                continue
            if not guard.weights_validated and not allow_unvalidated:
                raise DivergedModelError(
                    f"refusing to {verb}: the run diverged at step {guard.divergence['step']} "
                    f"({'; '.join(guard.divergence['causes'])}) and the in-memory weights are {guard._in_memory}. "
                    f"Instead: {guard._what_to_do()}; or pass {method}(..., allow_unvalidated=True) to write these "
                    "weights anyway."
                )
            if guard.weights_validated:
                logger.warning("%s after a divergence at step %s: writing the in-memory weights, %s.",
                               method, guard.divergence["step"], guard._in_memory)

    # ------------------------------------------------------------------ run set-up
    def _kss_reset_run_state(self) -> None:
        """Per-run state: `kss_steps`, the running statistics since the last log and the once-per-run warnings."""
        # optimizer steps of this run on which a KSS term entered the loss (once each), as `state.global_step` while
        # the step runs: 0-based, one less than the step number the Trainer logs for it
        self.kss_steps: list[int] = []
        self._kss_stats: torch.Tensor | None = None  # (len(_STAT_KEYS) + 1,) sums and count, on device
        self._kss_skipped = 0
        self._kss_grad_scale = torch.zeros((), dtype=torch.float64)  # running sum of the gradient-cap factors
        self._kss_grad_scale_count = 0
        self._kss_term_sum: torch.Tensor | None = None  # KSS share of the Trainer's running `loss` sum, on device
        # the task losses' share of that sum, float64, on device: the logged `loss` less the term would lose the task
        # loss in float32 rounding once the term is large; `None` once a micro-batch had no task loss to add
        self._kss_task_sum: torch.Tensor | None = torch.zeros((), dtype=torch.float64)
        self._kss_window_start: int | None = None  # global_step of the last training log (the `loss` window start)
        # this micro-batch: snapshots, sampled block names, block lists left out as not width-preserving (-> reason),
        # the sampled blocks in those lists
        self._kss_captured: tuple[int, list[str], dict[str, str], list[str]] | None = None
        self._kss_micro_term: torch.Tensor | None = None  # this micro-batch: the KSS term added to the loss
        self._kss_warned_no_term = False
        self._kss_warned_small_sample = False
        self._kss_said_full_rank = False

    def _check_not_compiled(self, model: torch.nn.Module | None) -> None:
        """Raise a `ValueError` when KSS is on and `torch.compile` can skip its hooks on the residual blocks.

        That is when `args.torch_compile=True`, when accelerate's dynamo plugin compiles the model in `prepare`
        (`ACCELERATE_DYNAMO_BACKEND`, `accelerate launch --dynamo_backend`), or when a block KSS may sample or one of
        its ancestors up to `model` is compiled (`_compiled_hook_paths`). Compiled sub-modules inside a block or outside
        the chain of blocks are allowed: the block's own call, which carries the hooks, stays eager.
        """
        if not self.kss_config.active:
            return
        backend = self._dynamo_backend()
        if self.args.torch_compile:
            what = "torch_compile=True"
        elif backend is not None:
            what = (f"accelerate's dynamo backend {backend!r} (accelerate's process-wide AcceleratorState: "
                    "ACCELERATE_DYNAMO_BACKEND, `accelerate launch --dynamo_backend`, or another Trainer or "
                    "Accelerator in this process with torch_compile / dynamo_config)")
        else:
            compiled = _compiled_hook_paths(model, self.kss_config.layers)
            if not compiled:
                return
            where = "the model itself" if "" in compiled else f"module {compiled[0]!r}, a residual block or around one"
            what = f"a model compiled with torch.compile ({where})"
        raise ValueError(
            f"KSSTrainer: KSS cannot run with {what}. KSS reads the residual blocks through forward hooks that it "
            "adds on KSS steps only, and torch.compile does not re-check forward hooks "
            "(torch._dynamo.config.skip_nnmodule_hook_guards): a graph traced without them, on a first compiled step "
            "that is not a KSS step (a run resumed at a step that kss_every_n_steps does not select) or in an earlier "
            "run or hyperparameter-search trial of the same model class in this process, is reused on KSS steps, and "
            "KSS then records nothing and trains without its penalty, silently. Train the blocks eagerly: "
            "torch_compile=False, no accelerate dynamo backend and an uncompiled model (e.g. `compiled._orig_mod`, "
            "or a model on which module.compile() was not called); or compile only sub-modules inside the blocks "
            "(e.g. each block's MLP); or set kss_enabled=False to train compiled without KSS."
        )

    def _check_kss_model(self, model: torch.nn.Module | None) -> None:
        """Raise a `ValueError` before training when KSS is on and cannot run on `model`: a compiled model
        (`_check_not_compiled`), or no residual blocks to penalise (the error names `kss_layers`)."""
        self._check_not_compiled(model)
        if model is None or not self.kss_config.active:
            return
        from hf_koopman.profiling import find_residual_blocks

        try:
            find_residual_blocks(model, layers=self.kss_config.layers)
        except ValueError as err:
            raise ValueError(
                f"KSSTrainer: KSS cannot find the residual blocks it penalises. {err} With KSSTrainer, name them with "
                "kss_layers (KSSTrainingArguments(kss_layers='model.layers') or KSSConfig(layers=...)), or set "
                "kss_enabled=False to train without KSS."
            ) from None

    def _dynamo_backend(self) -> str | None:
        """The backend accelerate's dynamo plugin compiles the model with in `prepare`, or `None` when it does not."""
        plugin = getattr(getattr(getattr(self, "accelerator", None), "state", None), "dynamo_plugin", None)
        backend = getattr(plugin, "backend", None)
        if backend is None:
            return None
        from accelerate.utils import DynamoBackend

        if backend == DynamoBackend.NO:
            return None
        return str(getattr(backend, "value", backend)).lower()

    def call_model_init(self, trial: Any = None) -> torch.nn.Module:
        """`Trainer.call_model_init`, refusing a compiled model while KSS is on (see `torch.compile` above)."""
        model = super().call_model_init(trial)
        if hasattr(self, "kss_config"):  # the parent __init__ calls this before kss_config exists; __init__ checks
            self._check_kss_model(model)
        return model

    def train(self, *args: Any, **kwargs: Any) -> TrainOutput:
        """`Trainer.train` (same arguments), refusing while KSS is on a compiled model or one whose residual blocks
        cannot be found (`_check_kss_model`) before any set-up (NEFTune hooks, a checkpoint loaded into the model)
        runs; a model that `model_init` builds is checked when it is built. When
        training raises (an error, a KeyboardInterrupt), the divergence guards of its `RKSPCallback`s take their hooks
        off the model, as `on_train_end` does after a run that finishes."""
        self._kss_follow_args()  # args changed since the last run: checked here, before any set-up
        if self.model_init is None:
            self._check_kss_model(self.model)
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            from hf_koopman.training.callback import RKSPCallback

            for callback in self.callback_handler.callbacks:
                if isinstance(callback, RKSPCallback):
                    callback.remove_hooks()
            raise

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> TrainOutput:
        """`Trainer._inner_training_loop` (same arguments) with fresh KSS state.

        `train()` runs it once per attempt, so each run, and each retry at a smaller batch size under
        `auto_find_batch_size`, starts with fresh KSS state: statistics, the task-loss window, `kss_steps` and the
        once-per-run warnings. The model it trains was checked for compilation before: by `train()`, or by
        `call_model_init` for a model that `model_init` builds.
        """
        self._kss_follow_args()
        self._kss_reset_run_state()
        return super()._inner_training_loop(*args, **kwargs)

    def _kss_follow_args(self) -> None:
        """Take `args.kss_*` values changed since they were last read (a hyperparameter-search trial, or
        `trainer.args.kss_alpha = ...`) into `kss_config` when it was derived from `args`; warn when an explicit
        `kss_config` hides them. Unchanged `args` leave `kss_config` as it is, with any edit made to it directly."""
        if not isinstance(self.args, KSSTrainingArguments):
            return
        current = self.args.kss_config()
        if current == self._kss_args_seen:
            return
        self._kss_args_seen = current  # once per change
        if not self._kss_config_from_args:
            logger.warning(
                "KSSTrainer: the kss_* fields of args changed after __init__ (e.g. in a hyperparameter-search "
                "trial), but this trainer was given an explicit kss_config, which it keeps: %s. To search over "
                "kss_* values, build the trainer without kss_config so that it follows args.", self.kss_config,
            )
            return
        current = dataclasses.replace(current)  # kss_config is the trainer's own copy, not the snapshot
        current.validate()
        if current.layers != self.kss_config.layers:
            self._kss_blocks = None
        self.kss_config = current
        if self.model is not None:
            self._check_kss_model(self.model)  # a trial may switch KSS on for a model compiled before

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """`Trainer.training_step`, then the KSS bookkeeping of the micro-batch.

        On a KSS step it warns (once per run) when no penalty entered the loss, and it keeps the share of the
        KSS term in the loss the Trainer accumulates for `loss`, so that `log()` can report `kss/task_loss`.
        """
        step = self.state.global_step
        kss_step = self.kss_active_for_step(step)
        if self._kss_window_start is None:  # first micro-batch of this train(): the Trainer's `loss` window starts
            self._kss_window_start = step
        self._kss_captured = self._kss_micro_term = self.task_loss = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if kss_step and self._kss_micro_term is None:
            self._warn_no_term(step)
        self._track_task_loss(loss, num_items_in_batch)
        self._track_term(loss, num_items_in_batch)
        return loss

    def _warn_no_term(self, step: int) -> None:
        if self._kss_warned_no_term:
            return
        captured = self._kss_captured
        if captured is None:
            cause = (
                "KSSTrainer.compute_loss did not run on it. A subclass that overrides compute_loss must compute its "
                "loss through super().compute_loss(model, inputs, return_outputs=..., num_items_in_batch=...): KSS "
                "hooks the blocks inside that call"
            )
        elif captured[0] == 0 and captured[2]:  # not a misuse: said when it happens, not once per run
            logger.warning(
                "KSS: optimizer step %d is a KSS step, but of its sampled blocks %s are not width-preserving residual "
                "blocks (%s) and the others recorded nothing, so no spectral penalty entered this micro-batch's loss; "
                "from the next optimizer step on KSS samples the other discovered blocks (kss_layers names the block "
                "list explicitly).", step, ", ".join(captured[3]), "; ".join(captured[2].values()),
            )
            return
        elif captured[0] == 0:
            layerdrop = getattr(getattr(self.model, "config", None), "layerdrop", 0)
            skipped = (f"the model skipped them on this forward (LayerDrop: config.layerdrop = {layerdrop}), or " if
                       isinstance(layerdrop, (int, float)) and layerdrop > 0 else "")
            cause = (
                f"the hooks on the sampled blocks ({', '.join(captured[1])}) captured no token states: {skipped}the "
                "forward did not run these blocks (does kss_layers name modules the forward skips?) or ran them "
                "inside a torch.compile graph traced without KSS's hooks (torch.compile does not re-check forward "
                "hooks). Pass "
                "kss_layers naming the residual blocks the forward runs, and keep the blocks and their ancestors "
                "uncompiled"
            )
        else:
            return  # failed decompositions and non-finite penalties have their own warnings
        self._kss_warned_no_term = True
        logger.warning(
            "KSS: optimizer step %d is a KSS step, but no spectral penalty entered the loss: %s; or set "
            "kss_enabled=False. Such steps are not listed in trainer.kss_steps (this warning is given once per "
            "run; each auto_find_batch_size retry is a new run).", step, cause,
        )

    def _track_term(self, loss: torch.Tensor, num_items_in_batch: Any) -> None:
        """Add this micro-batch's KSS share of the returned `loss` to `_kss_term_sum`, as the Trainer adds the loss.

        The Trainer divides the loss by the GA steps unless it counts as GA-scaled, in which case `compute_loss`
        divided the term already: either way the term's share is `alpha * penalty / GA`. A non-finite loss is
        replaced by the running mean of the window under `logging_nan_inf_filter`; the term's share follows it.
        """
        term = self._kss_micro_term
        if term is None and self._kss_term_sum is None:
            return
        total = self._kss_term_sum
        if total is None:
            total = torch.zeros((), dtype=torch.float64, device=loss.device)
        share = torch.zeros_like(total) if term is None else term.to(device=total.device, dtype=torch.float64)
        self._kss_term_sum = self._add_as_trainer_does(total, share, loss, num_items_in_batch)

    def _add_as_trainer_does(self, total: torch.Tensor, share: torch.Tensor, loss: torch.Tensor,
                             num_items_in_batch: Any) -> torch.Tensor:
        """`total` plus this micro-batch's `share` of the returned `loss`, as the Trainer adds the loss to its running
        sum: divided by the GA steps unless the loss counts as GA-scaled, and under `logging_nan_inf_filter` replaced
        by the window's running mean when the loss is not finite."""
        if not self._loss_counts_as_ga_scaled(num_items_in_batch):
            share = share / self.current_gradient_accumulation_steps
        if self.args.logging_nan_inf_filter and not is_torch_xla_available():
            window = 1 + self.state.global_step - self._kss_window_start
            share = torch.where(torch.isfinite(loss.detach().to(total.device)), share, total / window)
        return total + share

    def _track_task_loss(self, loss: torch.Tensor, num_items_in_batch: Any) -> None:
        """Add this micro-batch's task loss (`task_loss`, without the KSS term) to `_kss_task_sum` as the Trainer adds
        the returned `loss` (`_add_as_trainer_does`)."""
        total, task = self._kss_task_sum, self.task_loss
        if total is None or not self.kss_config.active:  # no KSS term to tell apart: kss/task_loss is not logged
            return
        if task is None:  # a compute_loss override that bypassed ours: the sum cannot be kept for this window
            self._kss_task_sum = None
            return
        task = task.detach().mean()  # DataParallel returns one loss per device; training_step takes their mean
        wide = torch.float32 if task.device.type == "mps" else torch.float64  # MPS has no float64
        self._kss_task_sum = self._add_as_trainer_does(total.to(task.device, wide), task.to(wide), loss,
                                                       num_items_in_batch)

    # ------------------------------------------------------------------ switches
    def kss_active_for_step(self, step: int | None = None) -> bool:
        """Whether the optimizer step `step` (default: the current one) carries a KSS term."""
        step = self.state.global_step if step is None else step
        return self.kss_config.active and step % self.kss_config.every_n_steps == 0

    def _kss_select_blocks(self, model: torch.nn.Module, step: int) -> list[Any]:
        from hf_koopman.profiling import find_residual_blocks

        owner = self._kss_blocks_model() if self._kss_blocks_model is not None else None
        if self._kss_blocks is None or owner is not model:  # first KSS step, or a model rebuilt by model_init
            self._kss_blocks = find_residual_blocks(model, layers=self.kss_config.layers)
            self._kss_blocks_model = weakref.ref(model)
            self._kss_not_residual, self._kss_not_residual_step = {}, None
            if not self._kss_blocks:
                raise ValueError("KSS found no residual blocks; pass KSSConfig(layers='model.layers') (or kss_layers).")
        if self._kss_not_residual and step != self._kss_not_residual_step:
            from hf_koopman.profiling.recorder import _container

            self._kss_blocks = [b for b in self._kss_blocks if _container(b.name) not in self._kss_not_residual]
            if not self._kss_blocks:
                raise ValueError("KSS found no width-preserving residual blocks ("
                                 + "; ".join(self._kss_not_residual.values())
                                 + "); name the block list with kss_layers (KSSConfig(layers=...)).")
            self._kss_not_residual = {}  # applied; lists found later are added again
        blocks = self._kss_blocks
        count = max(1, math.ceil(self.kss_config.layer_fraction * len(blocks) - 1e-9))
        # same subset on every rank and every micro-batch of the step: seeded by (seed, step)
        generator = torch.Generator().manual_seed(self.kss_config.seed * 1_000_003 + step)
        chosen = torch.randperm(len(blocks), generator=generator)[:count].sort().values.tolist()
        return [blocks[i] for i in chosen]

    def _loss_counts_as_ga_scaled(self, num_items_in_batch: Any) -> bool:
        scaled = self.loss_is_scaled_for_ga  # None (the default): the Trainer infers it by the rule below
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
        unwrapped = self.accelerator.unwrap_model(model)
        blocks = self._kss_select_blocks(unwrapped, step)
        recorder = ResidualStreamRecorder(
            unwrapped,
            blocks,
            num_samples=cfg.num_samples,
            seed=cfg.seed + step,
            attention_mask=_snapshot_masks(unwrapped, blocks, inputs),
            detach=False,
            check_finite=False,  # non-finite activations: the divergence guard reports them; KSS just skips
            # as profile(): discovered lists whose blocks change the width (wav2vec2's feature extractor) are left out
            on_width_change="raise" if cfg.layers is not None else "drop",
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
        if recorder.dropped:  # from the next optimizer step on, KSS samples from the residual blocks only
            self._kss_not_residual.update(recorder.dropped)
            self._kss_not_residual_step = step
        snapshots = recorder.snapshots()
        from hf_koopman.profiling.recorder import _container

        dropped = [block.name for block in blocks if _container(block.name) in recorder.dropped]
        self._kss_captured = (len(snapshots), [block.name for block in blocks], dict(recorder.dropped), dropped)
        penalty = self._kss_term(snapshots, step, device=loss.device)
        if penalty is not None:
            if not self.kss_steps or self.kss_steps[-1] != step:
                self.kss_steps.append(step)
            if self._loss_counts_as_ga_scaled(num_items_in_batch):
                # the Trainer will not divide by GA, so the per-micro-batch term must be (mean over micro-batches)
                penalty = penalty / self.current_gradient_accumulation_steps
            term = cfg.alpha * penalty.to(loss.dtype)
            self._kss_micro_term = term.detach()
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
            self._warn_small_sample(shape, members, step)
            for eig in self._group_eigenvalues(members, step):
                eigs.append(eig)
        if not eigs:
            if snapshots:
                logger.warning(
                    "KSS: every sampled layer failed at step %d; no spectral term on this micro-batch.", step
                )
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
            row = torch.stack(
                [penalty.detach().double(), near.double(), radius.double(), penalty.new_ones(()).double()]
            )
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
            raise ValueError(_REENTRANT_CAP_MESSAGE) from err
        if any(g is None for g in g_task) and _has_reentrant_checkpoint(task_loss):
            # with every trainable parameter inside reentrant-checkpointed blocks (LoRA with frozen embeddings),
            # `autograd.grad` never enters the checkpointed blocks: their gradients come back as None, not as an error
            raise ValueError(_REENTRANT_CAP_MESSAGE)

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
        """`task_loss + term` in value; the gradient of `term`, capped on the residual stream,
        rides the ordinary backward.

        `term` depends on the parameters only through the captured token states (`pieces`, rows of block inputs and
        outputs). Its gradient with respect to them is a backward through the small DMD graph alone. Hooks on the
        activations those rows come from add it, times one factor `c`, to the gradient the Trainer's backward pass
        carries there, so the parameters receive `g_task + c * g_KSS` from a single pass through the network.
        `c = min(1, max_grad_ratio * ||g_task(h)|| / ||g_KSS(pieces)||)` is fixed at the first hooked activation the
        backward reaches, whose gradient is still the task's alone (`KSSConfig.grad_cap`). Sources with no trainable
        parameter below them are skipped, in the injection and in `||g_KSS||` alike: their share of the gradient could
        not reach a parameter. These are the sources that do not require grad, and those whose autograd graph reaches
        only leaves that are not parameters (`_reaches_parameter`): the block-0 input of a model with frozen
        embeddings that `enable_input_require_grads` or gradient checkpointing marks as requiring grad (PEFT). So the
        factor `c` is the same with and without gradient checkpointing.
        """
        memo: dict[Any, bool] = {}
        usable = [(piece, source, rows) for piece, source, rows in sources
                  if piece.requires_grad and source.requires_grad and _reaches_parameter(source, memo)]
        if not usable or not term.requires_grad:
            if not getattr(self, "_kss_warned_no_sources", False):
                self._kss_warned_no_sources = True
                logger.warning(
                    "KSS (grad_cap='activations'): no captured activation has a trainable parameter below it (no "
                    "captured activation requires grad, or the autograd graph below it reaches only frozen weights and "
                    "inputs marked as requiring grad), so the KSS term has no gradient; its value is still logged. "
                    "Train parameters at or below the sampled blocks (kss_layers chooses the blocks), or set "
                    "kss_enabled=False."
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

    def _warn_small_sample(self, shape: tuple[int, ...], members: list, step: int) -> None:
        """Warn once per run when layers get fewer token states than `DecisionRule.min_samples_per_dim` times their
        width: the least-squares operator then nearly interpolates the sample (the profile calls that uninformative),
        and the penalty shapes that spectrum."""
        from hf_koopman.risk import DecisionRule

        if self._kss_warned_small_sample:
            return
        n, d = shape[-2], shape[-1]
        least = DecisionRule.min_samples_per_dim  # the default rule's, as the profile reads it
        if n >= least * d:
            return
        self._kss_warned_small_sample = True
        logger.warning(
            "KSS: layers %s get N = %d token states for width d = %d at step %d (N < %g d): their spectrum nearly "
            "interpolates the sample, which the profile calls uninformative, and the penalty shapes that spectrum. "
            "Train on more tokens per micro-batch (per_device_train_batch_size, sequence length; kss_num_samples=%d "
            "caps N) or switch KSS off (kss_enabled=False). Given once per run.",
            [m[0] for m in members][:4], n, d, step, least, self.kss_config.num_samples)

    def _group_eigenvalues(self, members: list[tuple[str, torch.Tensor, torch.Tensor]], step: int) -> list[Any]:
        cfg = self.kss_config
        X = torch.stack([m[1] for m in members])
        Y = torch.stack([m[2] for m in members])
        kwargs = dict(rank=cfg.rank, eps=cfg.eps, oversample=cfg.oversample, power_iters=cfg.power_iters)
        if cfg.rank is not None and cfg.rank >= min(X.shape[-2], X.shape[-1]) and not self._kss_said_full_rank:
            self._kss_said_full_rank = True
            logger.info("KSS: kss_rank=%d >= min(N, d) = %d: every mode is computed, i.e. the full spectrum, as with "
                        "the default kss_rank=None. Said once per run.", cfg.rank, min(X.shape[-2], X.shape[-1]))

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
        """Adds the `kss/*` statistics since the last training log, then logs as usual.

        They go with the training `loss` (reduced across processes; `kss/task_loss`, in every training log while KSS
        is on, is the mean of the task losses `compute_loss` computed without the KSS term, averaged as `loss`) and,
        for KSS steps after the last training log, with the final `train_loss` summary of `train()`, which also gets
        `kss/tail_task_loss` (those steps' task-loss mean) and `kss/tail_term`: the KSS term's mean per step over the
        steps after the last training log (0 when none entered), reduced like the loss.
        """
        training_log = "loss" in logs
        if (training_log or "train_loss" in logs) and self.kss_config.active:
            self._add_kss_logs(logs, training_log)
        super().log(logs, start_time)

    def _add_kss_logs(self, logs: dict[str, float], training_log: bool) -> None:
        stats = self._kss_stats
        if stats is None:
            stats = torch.zeros(len(_STAT_KEYS) + 1, dtype=torch.float64, device=self.args.device)
        term = self._kss_term_sum if self._kss_term_sum is not None else stats.new_zeros(())
        tracked = self._kss_task_sum is not None
        task = self._kss_task_sum if tracked else stats.new_zeros(())
        row = torch.cat([stats.to(self.args.device), task.reshape(1).to(self.args.device, torch.float64),
                         term.reshape(1).to(self.args.device, torch.float64)])
        if self.args.world_size > 1:  # every rank reaches a training-step log and the summary at the same step
            row = self.accelerator.reduce(row, reduction="sum")
        values = row.tolist()
        count = values[len(_STAT_KEYS)]
        if count > 0:
            for key, value in zip(_STAT_KEYS, values[: len(_STAT_KEYS)]):
                logs[key] = float(value) / count
        # the Trainer logs mean over processes of (sum of micro-batch losses) / steps; the term's share alike. A
        # window without a KSS term has no share: its task loss is the logged loss.
        steps = self.state.global_step - (self._kss_window_start or 0)
        share = values[-1] / self.args.world_size / steps if steps > 0 and values[-1] else 0.0
        task_mean = values[-2] / self.args.world_size / steps if tracked and steps > 0 else None
        if training_log:
            # the mean of the task losses compute_loss computed (exact however large the term), in every window; the
            # logged loss less the term's share where a compute_loss override kept them from being tracked
            logs["kss/task_loss"] = task_mean if task_mean is not None else float(logs["loss"]) - share
        elif steps > 0:
            # the final summary: `train_loss` holds the KSS term of the steps after the last training log too; its
            # mean per step there, and the task losses' own mean, let RKSPCallback judge those steps on the task loss
            logs["kss/tail_term"] = share
            if task_mean is not None:
                logs["kss/tail_task_loss"] = task_mean
        if self._kss_grad_scale_count:
            logs["kss/grad_scale"] = float(self._kss_grad_scale) / self._kss_grad_scale_count
            self._kss_grad_scale = torch.zeros((), dtype=torch.float64)
            self._kss_grad_scale_count = 0
        if self._kss_skipped:
            logs["kss/skipped_layers"] = float(self._kss_skipped)
        self._kss_stats = self._kss_term_sum = None
        self._kss_task_sum = torch.zeros((), dtype=torch.float64)
        self._kss_skipped = 0
        self._kss_window_start = self.state.global_step
