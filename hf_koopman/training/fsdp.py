"""FSDP2 support: CPU (gloo) sharding for `Trainer` runs, and helpers for code that touches sharded parameters.

**Why this exists.** `accelerate launch` with an FSDP config on a host without GPUs silently trains with DDP:
accelerate 1.15 maps a CPU multi-process run to `DistributedType.MULTI_CPU` (`PartialState._prepare_backend`,
`accelerate/state.py` ~L800) and only upgrades the `MULTI_GPU`-like types to `DistributedType.FSDP`
(`AcceleratorState.__init__`, `accelerate/state.py` ~L986-1013: `elif self.distributed_type in [MULTI_GPU, ...]`,
`MULTI_CPU` absent). The FSDP plugin it built from the launch config is dropped, `Trainer.is_fsdp_enabled` is False
and `Accelerator.prepare_model` wraps the model in `DistributedDataParallel`. torch 2.13's FSDP2 (`fully_shard`)
itself works on CPU with gloo (all-gather / reduce-scatter of DTensor shards), so
[`enable_cpu_fsdp`] restores what the user asked for: right after the `Trainer` has created its `Accelerator`, and
only when FSDP was requested (`ACCELERATE_USE_FSDP=true`, i.e. an FSDP launch config, or `TrainingArguments.fsdp`)
and the run is CPU multi-process, it sets the accelerator state to `DistributedType.FSDP` with the FSDP plugin, so
`accelerator.prepare` applies FSDP2 exactly as on GPUs (blocks wrapped by `_no_split_modules`, then the root).
[`KSSTrainer`] calls it automatically; any other `Trainer` subclass can call it from
`create_accelerator_and_postprocess`. `HF_KOOPMAN_CPU_FSDP=0` turns it off.

Only FSDP version 2 is promoted (the version verified here on CPU); an FSDP1
request on CPU raises a `ValueError` naming the fix. [`KSSTrainer`] raises it before creating its `Accelerator`
([`check_cpu_fsdp_version`]): accelerate itself fails there first, with "FSDP parameter initialization with
`sync_module_states=True` is not supported on cpu", for an FSDP1 launch config (`accelerate launch` turns
`sync_module_states` on unless the config says otherwise). CPU offload and mixed precision are left to the plugin.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hf_koopman.logging_utils import get_logger


__all__ = [
    "UnshardedParameters",
    "check_cpu_fsdp_version",
    "enable_cpu_fsdp",
    "fsdp_requested",
    "is_fsdp1_model",
    "is_fsdp_model",
    "local_numel",
    "sharding_summary",
]

logger = get_logger(__name__)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def fsdp_requested(args: Any = None) -> bool:
    """Whether the run asked for FSDP: an FSDP `accelerate launch` config (`ACCELERATE_USE_FSDP`) or `args.fsdp`."""
    if _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        return True
    fsdp = getattr(args, "fsdp", None)
    return bool(fsdp) and fsdp not in ("", [], False)


_FSDP1_ON_CPU = (
    "FSDP on CPU is supported with FSDP2 only; set `fsdp_version: 2` in the "
    "accelerate config (fsdp_config) or fsdp_config={'fsdp_version': 2} in TrainingArguments."
)


def _requested_fsdp_version(args: Any) -> int:
    """The FSDP version the `Accelerator` will build its plugin with: `TrainingArguments.fsdp_config`'s when
    `args.fsdp` is set (transformers passes it explicitly), else the launch config's (`FSDP_VERSION`, accelerate's
    default 1)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args and plugin_args.get("fsdp_version") is not None:
        return int(plugin_args["fsdp_version"])
    version = os.environ.get("FSDP_VERSION", "1").strip()
    return int(version) if version.isdigit() else 1


def _on_cpu(args: Any) -> bool:
    """Whether the run trains on CPU: `use_cpu`, or no accelerator device (as accelerate decides)."""
    if getattr(args, "use_cpu", False):
        return True
    try:
        from accelerate.utils import get_torch_accelerator_backend

        device_type, _ = get_torch_accelerator_backend()
    except (ImportError, RuntimeError):  # an older accelerate
        device_type = "cuda" if torch.cuda.is_available() else None
    return device_type in (None, "cpu")


def check_cpu_fsdp_version(args: Any) -> None:
    """Raise the `ValueError` of [`enable_cpu_fsdp`] for an FSDP version 1 request on a CPU multi-process run, before
    accelerate builds its plugin (which fails first, with its own error, for an FSDP1 launch config on CPU).

    Does nothing unless FSDP was requested ([`fsdp_requested`]), `WORLD_SIZE > 1`, the run is on CPU (`use_cpu`, or
    no accelerator device), `HF_KOOPMAN_CPU_FSDP` is not `0`, and the version is not 2 (`fsdp_config`'s when
    `args.fsdp` is set, else `FSDP_VERSION` from the launch config).

    Raises:
        `ValueError`: FSDP version 1 requested on CPU; use `fsdp_version: 2`.
    """
    if not fsdp_requested(args) or os.environ.get("HF_KOOPMAN_CPU_FSDP", "1").strip() == "0":
        return
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if not (world.isdigit() and int(world) > 1) or not _on_cpu(args):
        return
    if _requested_fsdp_version(args) != 2:
        raise ValueError(_FSDP1_ON_CPU)


def is_fsdp_model(model: torch.nn.Module) -> bool:
    """Whether `model` (or any sub-module) is managed by FSDP2 (`fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_fsdp1_model(model: torch.nn.Module) -> bool:
    """Whether `model` is, or holds, an FSDP version 1 unit (`torch.distributed.fsdp.FullyShardedDataParallel`): its
    parameters are flattened shards (plain tensors, not DTensors), so `is_fsdp_model` and a DTensor check miss it."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def local_numel(model: torch.nn.Module) -> tuple[int, int]:
    """`(elements held by this process, elements of the full model)` over the parameters of `model`.

    For DTensor (FSDP2-sharded) parameters the local shard counts toward the first number; plain tensors count fully
    toward both. With FSDP over `P` processes each rank holds about `1 / P` of the full count.
    """
    held = full = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel()
        full += p.numel()
    return held, full


def sharding_summary(model: torch.nn.Module) -> dict[str, Any]:
    """JSON-ready facts about how `model` is distributed on this process (used by tests and logs)."""
    held, full = local_numel(model)
    params = list(model.parameters())
    return {
        "fsdp": is_fsdp_model(model),
        "fsdp_modules": sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("FSDP")}),
        "dtensor_params": sum(type(p).__name__ == "DTensor" or hasattr(p, "to_local") for p in params),
        "num_params": len(params),
        "local_numel": held,
        "full_numel": full,
        "local_fraction": held / full if full else 0.0,
    }


def enable_cpu_fsdp(trainer: Any) -> bool:
    """Switch a CPU multi-process `Trainer` that asked for FSDP from accelerate's DDP fallback to real FSDP2.

    Call right after `Trainer.create_accelerator_and_postprocess` created `trainer.accelerator` (before
    `train()`). Does nothing (returns False) unless FSDP was requested, the accelerator runs `MULTI_CPU` with more
    than one process, and `HF_KOOPMAN_CPU_FSDP` is not `0`. Returns True when the state was promoted.

    Raises:
        `ValueError`: FSDP version 1 requested on CPU (not supported here); use `fsdp_version: 2`.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or not fsdp_requested(trainer.args):
        return False
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or state.num_processes < 2:
        return False
    if os.environ.get("HF_KOOPMAN_CPU_FSDP", "1").strip() == "0":
        logger.warning("FSDP was requested on CPU but HF_KOOPMAN_CPU_FSDP=0: training runs as DDP (MULTI_CPU).")
        return False
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(_FSDP1_ON_CPU)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # as `AcceleratorState.__init__` does at its end: every later `AcceleratorState()` re-reads the partial state
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info(
        "FSDP2 on CPU (gloo, %d processes): accelerate would have fallen back to DDP; parameters will be sharded.",
        state.num_processes,
    )
    return True


class UnshardedParameters:
    """Context manager that records the unsharded parameters FSDP2 materialises during one forward pass.

    Under FSDP2 the parameters returned by `model.parameters()` are sharded DTensors that autograd never sees: each
    FSDP module all-gathers them into plain unsharded `nn.Parameter`s in its pre-forward hook, and those are the leaves
    of the graph (their gradients are reduce-scattered into the shards after backward). Code that needs per-process
    gradients of a loss, like the KSS gradient cap, must differentiate with respect to these. A forward pre-hook on
    every FSDP module, registered after FSDP's own (which runs first, `prepend=True`), reads the module's parameters
    while they are unsharded. Nested FSDP modules are still sharded at their parent's pre-forward and are recorded at
    their own. `parameters` keeps the first-seen order and drops duplicates (tied weights).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        self._modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self._handles: list[Any] = []
        self._seen: set[int] = set()
        self.parameters: list[torch.nn.Parameter] = []

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        for p in module.parameters():
            if p.requires_grad and not hasattr(p, "to_local") and id(p) not in self._seen:
                self._seen.add(id(p))
                self.parameters.append(p)

    def __enter__(self) -> UnshardedParameters:
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self._modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
