"""Streaming RKSP: profile models larger than memory by building one residual block at a time.

The residual stream h_l of N probe tokens is small (N x d) even when the model is not: a LLaMA-2-7B block holds ~200M
parameters but h_l for N = 2048 tokens is 2048 x 4096 floats. So the model skeleton is instantiated on the meta device
(no storage), only the non-block modules the forward needs (embeddings, rotary buffers, final norm) are made real, and
each residual block is materialised by a forward pre-hook -- initialised by the model's own `_init_weights` under
a per-block seed (a hash of `seed` and the block index), or loaded from the safetensors folder -- run by the model's own
forward (which computes masks, rotary embeddings and any other per-block inputs generically), recorded by the shared
`ResidualStreamRecorder` and freed again by a forward hook. The forward is stopped when it reaches an untied output
embedding (the LM head), which is never built; a model without one runs to its end. Blocks the forward calls more than
once (ALBERT's shared layer) are recorded at each call, as `profile` records them. Each layer's snapshots go through
the same analysis as `profile`'s as soon as its block has run (in batched chunks of layers), and are then freed.

Peak memory is roughly: non-block modules + one block + the larger of one block's activations and the analysis of
one chunk + the snapshots of one chunk (chunk + 1 states of N x d floats), whatever the depth.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import convert_file_size_to_int, dtype_byte_size
from torch import nn
from tqdm.auto import tqdm

from hf_koopman.files import write_text_whole
from hf_koopman.logging_utils import get_logger, show_progress
from hf_koopman.profiling.probes import default_num_samples, hidden_width
from hf_koopman.profiling.profiler import _analysis_bytes_per_layer, _analysis_chunk_size
from hf_koopman.profiling._streaming_weights import (
    InitWeights,
    SafetensorsWeights,
    free_parameters,
    module_bytes,
    release_freed_memory,
    tied_parameters,
)


if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

    from hf_koopman.profiling import SpectralProfile

logger = get_logger(__name__)

__all__ = ["InsufficientMemoryError", "estimate_streaming_memory", "profile_streaming"]

# Working memory of one block's forward, in units of (tokens x hidden) floats: the block input and output, the residual
# branch, q/k/v/attention output and a few MLP intermediates (~3 x intermediate/hidden). A rough, deliberately generous
# bound used only for the "cannot fit one block" check; the measured numbers are in results/streaming.md.
_WORK_FACTOR = 12


class InsufficientMemoryError(MemoryError):
    """Raised before any block is built when the memory available cannot hold even one residual block."""


class _StopStream(Exception):
    """Raised by a forward pre-hook on the untied output embedding: the LM head and what follows are not needed."""


def _parse_bytes(value: int | float | str | None) -> int | None:
    """Bytes from an int or a size string in accelerate's convention (`"6GB"` = 6e9, `"512MiB"` = 512 * 2**20)."""
    if value is None:
        return None
    if isinstance(value, float) or (isinstance(value, str) and value.strip().isdigit()):
        value = int(value)  # plain byte counts
    try:
        return convert_file_size_to_int(value)
    except (ValueError, AttributeError) as err:
        raise ValueError(
            f"memory_limit={value!r} is not a size; use bytes or a string such as '6GB' or '512MiB'."
        ) from err


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'float32', 'bfloat16' or 'float16'.")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point dtype; use torch.float32 or torch.bfloat16.")
    return dtype


def needs_remote_code(err: BaseException) -> bool:
    """Whether transformers refused a load because the checkpoint needs `trust_remote_code=True`."""
    return "trust_remote_code" in str(err)


def remote_code_message(source: Any) -> str:
    """The error for a checkpoint whose config needs its own code (an `auto_map` for a model type transformers does
    not know): hf_koopman never runs a checkpoint's code."""
    return (f"{source} needs its own modelling code (its config.json has an auto_map for a model type transformers "
            "does not know), and hf_koopman never runs a checkpoint's code. Profile it from Python after reading that "
            "code: model = AutoModel.from_pretrained(path, trust_remote_code=True); hf_koopman.profile(model).")


def missing_config_message(folder: Path) -> str:
    """The error for a folder without `config.json`; a PEFT adapter folder (`adapter_config.json`) is named as one,
    with the merge that makes a profilable folder of it."""
    if (folder / "adapter_config.json").is_file():
        return (f"{folder} holds a PEFT adapter (adapter_config.json), not a model: merge it into its base model and "
                "save that (PeftModel.from_pretrained(base, folder).merge_and_unload().save_pretrained(out)), or "
                "profile the PeftModel in memory with hf_koopman.profile(peft_model).")
    step = lambda p: (int(p.name[11:]) if p.name[11:].isdigit() else -1, p.name)  # noqa: E731 -- after "checkpoint-"
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if (p / "config.json").is_file()), key=step)
    if checkpoints:  # a Trainer's output_dir: its checkpoints are the model folders
        names = ("... " if len(checkpoints) > 3 else "") + ", ".join(p.name for p in checkpoints[-3:])
        return (f"{folder} has no config.json but holds Trainer checkpoints ({names}); pass one of them, e.g. "
                f"{checkpoints[-1]}, or the folder written by `trainer.save_model()` / `save_pretrained`.")
    return f"{folder} has no config.json; pass the folder written by `save_pretrained`."


def _resolve_source(model: Any, init: bool | None) -> tuple[PretrainedConfig, Path | None, bool, str]:
    """-> (config, weights folder or None, init?, name)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, nn.Module):
        raise TypeError(
            "profile_streaming takes a config or a local save_pretrained folder, not an instantiated model (which "
            "is already in memory): use `hf_koopman.profile(model)` for that."
        )
    if isinstance(model, PretrainedConfig):
        if init is False:
            raise ValueError("A config has no weights to load: pass a save_pretrained folder, or init=True (`--init`).")
        return model, None, True, getattr(model, "name_or_path", "") or model.model_type
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not folder.is_dir():
            raise ValueError(
                f"{str(model)!r} is not a local folder. profile_streaming takes a PretrainedConfig (e.g. an embedded "
                "architecture config such as llama-2-7b) or a local save_pretrained folder; nothing is downloaded."
            )
        if not (folder / "config.json").is_file():
            raise ValueError(missing_config_message(folder))
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # never the folder's own code
        except ValueError as err:
            if not needs_remote_code(err):
                raise
            raise ValueError(remote_code_message(folder)) from None
        return config, (None if init else folder), bool(init), folder.name
    raise TypeError(f"model must be a PretrainedConfig or a path to a local folder, got {type(model).__name__}.")


def _build_skeleton(config: PretrainedConfig) -> nn.Module:
    """The model on the meta device (parameters only; buffers such as rotary `inv_freq` are real), in eval mode.

    The class is the checkpoint's own (`config.architectures`) when transformers has it, so parameter names match the
    saved keys; else the causal-LM head class, else the base model. An untied head is never built (the forward
    stops before it: `_output_head`). Tied parameters are tied as in `from_config` (`init_empty_weights` skips the
    tying), so that a streamed init shares T5's `shared` embedding with its encoder and decoder as the ordinary model
    does."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    candidates = [getattr(transformers, name, None) for name in (getattr(config, "architectures", None) or [])]
    with init_empty_weights(include_buffers=False):
        model = None
        for cls in candidates:
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                model = cls._from_config(config)
                break
        if model is None:
            try:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            except ValueError:
                model = AutoModel.from_config(config, trust_remote_code=False)
    if tied_parameters(model):
        model.tie_weights()
    return model.eval()


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (the LM head) when it is a module of its own, else `None`: the streamed forward
    stops before it, so it is never built."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return out if isinstance(out, nn.Module) and out is not inp else None


def _non_block_modules(model: nn.Module, block_modules: list[nn.Module]) -> list[nn.Module]:
    """Modules outside the blocks that own meta parameters, minus an untied output embedding
    (the LM head is not run)."""
    inside: set[int] = set()
    for block in block_modules:
        inside.update(id(m) for m in block.modules())
    skip: set[int] = set()
    out = _output_head(model)
    if out is not None:
        skip.update(id(m) for m in out.modules())
    return [
        m
        for m in model.modules()
        if id(m) not in inside
        and id(m) not in skip
        and any(p is not None and p.device.type == "meta" for p in m._parameters.values())
    ]


def _hidden_size(config: PretrainedConfig) -> tuple[int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = hidden_width(config) or 1
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    return int(hidden), int(inter)


def estimate_streaming_memory(
    config: PretrainedConfig, *, num_tokens: int | None = None, num_samples: int | None = None,
    dtype: torch.dtype | str | None = None, layers: str | list | None = None,
) -> dict[str, int]:
    """Bytes a streaming profile of `config` needs: `block` (largest residual block), `non_block` (embeddings etc.,
    without an untied LM head), `working` (one block's activations, rough upper bound), `snapshots` (the layers awaiting
    their analysis, at most a chunk: 2 x chunk x N x d float32), `analysis` (the batched whitened DMD's working memory:
    layers are analysed as their blocks finish, batched within the larger of ~1 GiB and `block` + `working`, so that
    the analysis does not raise the peak -- `profile_streaming` falls back to ~1 GiB where that plan exceeds the
    memory available; one layer at a time where a single layer exceeds it) and `total` =
    `non_block` + `snapshots` + the larger of `block` + `working` (a block running) and `analysis` (a chunk analysed,
    its blocks freed). Builds only the meta skeleton, so it is cheap even for 70B configs. `num_samples` defaults to
    `default_num_samples(config)`, as `profile_streaming`'s, and `num_tokens` (the probe's token count) to
    `num_samples`."""
    from hf_koopman.profiling import find_residual_blocks

    dtype = _resolve_dtype(dtype)
    num_samples = default_num_samples(config) if num_samples is None else num_samples
    num_tokens = num_samples if num_tokens is None else num_tokens
    model = _build_skeleton(config)
    blocks = find_residual_blocks(model, layers)
    return _memory_plan(model, config, [b.module for b in blocks], num_tokens, num_samples, dtype)[0]


def _memory_plan(model, config, block_modules, num_tokens, num_samples, dtype, available: int | None = None,
                 chunk_size: int | None = None) -> tuple[dict[str, int], int]:
    """The memory plan (see `estimate_streaming_memory`) and the bytes a chunk's analysis may take (its budget); with
    `chunk_size` (the caller's own), the plan counts chunks of that many layers."""
    hidden, inter = _hidden_size(config)
    plan = {
        "block": max(module_bytes(b, dtype) for b in block_modules),
        "non_block": int(sum(  # tied parameters (T5's shared embedding) once
            p.numel() * dtype_byte_size(dtype if p.is_floating_point() else p.dtype)
            for p in {
                id(p): p for m in _non_block_modules(model, block_modules) for p in m._parameters.values()
                if p is not None
            }.values()
        )),
        "working": int(num_tokens * (_WORK_FACTOR * hidden + 3 * inter) * 4),
    }
    n = min(num_samples, num_tokens)
    stream = plan["block"] + plan["working"]
    # a chunk of layers is analysed within the memory one block's forward needs anyway (at least ~1 GiB), so the
    # analysis does not raise the run's peak; where even that would not fit what is available, within ~1 GiB
    for budget in (max(_STREAM_ANALYSIS_FLOOR, stream), _STREAM_ANALYSIS_FLOOR):
        layers = min(len(block_modules), chunk_size or _analysis_chunk_size(n, hidden, budget))  # held until analysed
        plan["snapshots"] = int(2 * layers * n * hidden * 4)
        plan["analysis"] = int(layers * _analysis_bytes_per_layer(n, hidden))
        plan["total"] = plan["non_block"] + plan["snapshots"] + max(stream, plan["analysis"])
        if available is None or chunk_size is not None or plan["total"] <= available:
            break
    return plan, budget


def _num_tokens(inputs: Mapping[str, Any]) -> int:
    """Token states the forward holds at once, for the memory plan only: the encoder side (text, pixels or audio
    frames) plus the decoder's `decoder_input_ids` of an encoder-decoder model."""
    decoder = inputs.get("decoder_input_ids")
    extra = int(decoder.numel()) if isinstance(decoder, torch.Tensor) else 0
    for key in ("attention_mask", "input_ids", "pixel_values", "input_features", "inputs_embeds"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            if key == "attention_mask":
                return int(value.sum()) + extra
            if key == "pixel_values":
                return int(value.shape[0]) * 256 + extra  # unknown patching: a generous guess
            if key == "input_features":  # (batch, mel bins, frames): Whisper's convolutions halve the frames
                return int(value.shape[0]) * -(-int(value.shape[-1]) // 2) + extra
            return int(value.shape[0] * (value.shape[1] if value.dim() > 1 else 1)) + extra
    return 2048 + extra


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def profile_streaming(
    model: str | os.PathLike | PretrainedConfig,
    inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    *,
    init: bool | None = None,
    num_samples: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    layers: str | None = None,
    dtype: torch.dtype | str | None = None,
    memory_limit: int | str | None = None,
    partial_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    model_name: str | None = None,
    learning_rate: float | None = None,
    risk_estimator: Any = None,
    **analysis_kwargs: Any,
) -> SpectralProfile:
    """Spectral profile of a model that need not fit in memory, built one residual block at a time.

    Gives the same per-layer features as `profile(model, ...)` for a saved model (same probe, same seed), and, at
    initialisation, spectra from the same distribution as `profile(AutoModelForCausalLM.from_config(config))` (the
    weights differ only in how the random stream is split: block `i` is initialised under its own seed,
    `block_seed(seed, i)`).

    Args:
        model (`PretrainedConfig`, `str` or `os.PathLike`):
            A config (profiled at initialisation) or a local `save_pretrained` folder with `config.json` and
            safetensors weights (`model.safetensors` or sharded with `model.safetensors.index.json`).
        inputs (`dict[str, torch.Tensor]` or `torch.Tensor`, *optional*):
            Probe batch (`input_ids` `(B, T)`, optional `attention_mask`, ...); default: `default_probe_inputs(config,
            num_tokens=num_samples, seed=seed)` as in `profile`.
        init (`bool`, *optional*):
            For a folder: ignore its weights and profile the architecture at initialisation.
        num_samples (`int`, *optional*): token states N per layer; defaults to `default_num_samples(config)` as in
            `profile` (2048, or ≈ 2.62 × the hidden size for models wider than 782: 10724 at d = 4096).
        rank (`int`, *optional*): `None` (default) analyses the full spectrum; an int r the rank-r approximation.
        seed (`int`, defaults to 0): seeds the probe, the subsampling, the analysis and (at init) the blocks.
        layers (`str`, *optional*): dotted path of the block list when discovery fails (see `find_residual_blocks`).
        dtype (`torch.dtype` or `str`, *optional*, defaults to `float32`):
            Storage and compute dtype of the blocks; `bfloat16` halves block memory and is faster on CPUs with
            AVX512-BF16/AMX, at bf16 precision. Snapshots are analysed in float64 by the spectral core either way.
        memory_limit (`int` or `str`, *optional*):
            Memory budget (bytes, or a size string as accelerate parses it: `"6GB"`, `"512MiB"`; a lowercase `b`
            means bits) used instead of the currently available memory for the fit check.
        partial_path (`str` or `os.PathLike`, *optional*):
            Where to write a `{"complete": false, ...}` JSON marker when the run is interrupted (no features are
            written for an incomplete run).
        progress (`bool`, *optional*): tqdm bar over blocks; `None` (default) follows transformers' progress-bar
            switch (`transformers.utils.logging.disable_progress_bar()` hides it).
        model_name (`str`, *optional*): name stored in the profile.
        learning_rate (`float`, *optional*): the planned peak learning rate, > 0 and finite; stored in `meta` for the
            calibrated risk estimator, as `profile` does.
        risk_estimator (`RiskEstimator` or path, *optional*): the estimator behind `risk`, as in `profile`.
        **analysis_kwargs: the analysis options of `profile_from_snapshots` (feature thresholds, `chunk_size`
            etc.); layers are analysed as their blocks finish, `chunk_size` at a time (default: 8, fewer where a
            chunk's analysis would need more memory than one block's forward, or ~1 GiB if that is more; ~1 GiB
            where that plan exceeds the memory available).

    Returns:
        `SpectralProfile` with `meta["streaming"]` = {"complete": True, "weights": "init"|"safetensors", "dtype",
        "num_blocks", "block_bytes", "wall_time_s", "peak_rss_bytes", ...}.

    Raises:
        InsufficientMemoryError: not even one block (plus its activations) fits in the available memory / budget.
        ValueError: a bad `num_samples`, `rank` (or `randomized=True` without one), `seed`, `learning_rate` or
            `eig_dtype` (all before any block is built), no safetensors weights, blocks not found, non-finite
            activations, ...

    An interrupted run (exception or Ctrl-C) never returns a profile: the exception propagates, all hooks are removed,
    and `partial_path`, when given, receives a marker with `"complete": false` and how many blocks had run.
    """
    from hf_koopman.profiling import (
        ResidualBlock,
        ResidualStreamRecorder,
        default_probe_inputs,
        find_residual_blocks,
    )

    from hf_koopman.koopman.dmd import check_eig_dtype
    from hf_koopman.risk import check_learning_rate, load_estimator
    from hf_koopman.profiling.profiler import (
        _SnapshotAnalysis,
        _as_count,
        _check_analysis_keywords,
        _check_rank,
        _check_seed,
        _check_token_count,
        _warn_blocks_not_run,
        autocast_dtype,
    )
    from hf_koopman.profiling.inputs import labels_feed_decoder, mask_routes, snapshot_masks

    # bad arguments fail before any block is built or streamed, with profile()'s checks; these options are set here on
    # profile_from_snapshots
    _check_analysis_keywords(analysis_kwargs, profile_streaming, ("rank", "seed", "stacks", "model_name", "meta",
                                                                  "progress"))
    if num_samples is not None:
        num_samples = _as_count(num_samples, "num_samples", 2)
    chunk_size = analysis_kwargs.pop("chunk_size", None)
    if chunk_size is not None:
        chunk_size = _as_count(chunk_size, "chunk_size", 1, "it is the number of layers analysed per batched call")
    rank = _check_rank(rank, analysis_kwargs.get("randomized"))
    seed = _check_seed(seed)
    check_eig_dtype(analysis_kwargs.get("eig_dtype"))
    learning_rate = check_learning_rate(learning_rate)
    estimator = None if risk_estimator is None else load_estimator(risk_estimator)  # a bad one before any work
    start, cpu_start = time.perf_counter(), time.process_time()
    dtype = _resolve_dtype(dtype)
    budget = _parse_bytes(memory_limit)
    config, folder, at_init, default_name = _resolve_source(model, init)
    name = model_name or default_name
    num_samples = default_num_samples(config) if num_samples is None else num_samples

    skeleton = _build_skeleton(config)
    blocks = find_residual_blocks(skeleton, layers)
    if not blocks:
        raise ValueError("No residual blocks found; pass `layers=` with the dotted path of the block list.")
    block_modules = [b.module for b in blocks]
    rest = _non_block_modules(skeleton, block_modules)

    # the batch as given, with its labels: the decoder's padding is read from them as `profile` reads it
    given = dict(inputs) if isinstance(inputs, Mapping) else {}
    probe = "default" if inputs is None else "given"
    # the skeleton (not the config) decides the probe, exactly as `profile` does with the real model
    inputs = _prepare_inputs(
        default_probe_inputs(skeleton, num_tokens=num_samples, seed=seed) if inputs is None else inputs, skeleton, dtype
    )

    available = budget if budget is not None else _available_memory()
    plan, analysis_budget = _memory_plan(skeleton, config, block_modules, _num_tokens(inputs), num_samples, dtype,
                                         available=available, chunk_size=chunk_size)
    if plan["block"] + plan["working"] > available:
        raise InsufficientMemoryError(
            f"Not enough memory to stream even one residual block: a block of {type(block_modules[0]).__name__} "
            f"takes {_fmt(plan['block'])} in {str(dtype).removeprefix('torch.')} plus ~{_fmt(plan['working'])} of "
            f"activations, but only {_fmt(available)} is "
            f"{'allowed (memory_limit)' if budget is not None else 'available'}. "
            "Use dtype='bfloat16' (halves the block), fewer probe tokens (num_samples), or free memory."
        )
    if plan["total"] > available:
        logger.warning(
            "Streaming needs ~%s in all (non-block %s, block %s, activations %s, snapshots %s; the analysis of a "
            "chunk of layers %s) but only %s is %s; the run may swap or be killed.", _fmt(plan["total"]),
            _fmt(plan["non_block"]), _fmt(plan["block"]), _fmt(plan["working"]), _fmt(plan["snapshots"]),
            _fmt(plan["analysis"]), _fmt(available),
            "allowed" if budget is not None else "available",
        )

    if at_init:
        weights: InitWeights | SafetensorsWeights = InitWeights(
            skeleton, seed=seed, num_blocks=len(blocks), dtype=dtype, blocks=block_modules
        )
    else:
        weights = SafetensorsWeights(folder, skeleton, [b.name for b in blocks], dtype=dtype)
    weights.materialise_rest(rest)

    # each layer is analysed as soon as its block has run (in chunks of `chunk_size` layers), so memory holds the
    # snapshots of a chunk, not of every layer: 33 x N x d floats at N = 10724, d = 4096 (7B) would be 5.8 GB
    # (by default as many as fit the plan's analysis budget at the chunk's first layer's N and d, per stack); the bar
    # over blocks says which layers are being analysed
    progress = show_progress(progress)
    bar = tqdm(total=len(blocks), desc=f"streaming {name}", unit="block", disable=not progress)
    chunks = chunk_size or functools.partial(_analysis_chunk_size, budget=analysis_budget)
    analysis = _SnapshotAnalysis(rank=rank, seed=seed, progress=False, chunk_size=chunks,
                                 status=bar.set_postfix_str, **analysis_kwargs)
    analysed: list[tuple[str, str]] = []  # (name, stack) of the layers handed to the analysis, in order
    state = {"block_time": 0.0}
    ran: set[int] = set()  # the blocks whose forward finished; towers may run in any order (CLIP: vision first)

    def make_pre_hook(index: int, block: ResidualBlock):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            needed = module_bytes(module, dtype)
            if budget is None and needed > _available_memory():
                raise InsufficientMemoryError(
                    f"Block {block.name} needs {_fmt(needed)} but only {_fmt(_available_memory())} is available now."
                )
            state["t0"] = time.perf_counter()
            if isinstance(weights, SafetensorsWeights):
                weights.materialise(module, index, block.name)
            else:
                weights.materialise(module, index)

        return pre_hook

    def make_post_hook(index: int):
        def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
            free_parameters(module)
            release_freed_memory()
            state["block_time"] += time.perf_counter() - state.pop("t0", time.perf_counter())
            if index not in ran:
                ran.add(index)
                bar.update(1)
            for layer, stack, X, Y in recorder.pop_snapshots():  # the transition this block's call completed
                analysed.append((layer, stack))
                analysis.add(layer, X, Y)

        return post_hook

    def stop_hook(module: nn.Module, args: tuple) -> None:
        raise _StopStream

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.module.register_forward_pre_hook(make_pre_hook(i, block), prepend=True))
        # each mask reaches only the stacks it belongs to, with the routes and masks `profile` records with
        recorder = ResidualStreamRecorder(
            skeleton, blocks, num_samples=num_samples, seed=seed,
            attention_mask=snapshot_masks(mask_routes(skeleton, blocks, inputs), given, inputs,
                                          decoder_from_labels=labels_feed_decoder(given, skeleton)),
        )
        with recorder, torch.no_grad():
            # registered after the recorder's hooks so that the recorder sees each output before the block is freed
            for i, block in enumerate(blocks):
                handles.append(block.module.register_forward_hook(make_post_hook(i)))
            head = _output_head(skeleton)
            if head is not None:  # every block that runs has run by then, in any order and as often as it runs
                handles.append(head.register_forward_pre_hook(stop_hook))
            try:
                skeleton(**inputs, use_cache=False)
            except _StopStream:
                pass
            analysis.finish()  # the last chunk, under the bar over blocks
            left = recorder.snapshots()  # transitions too short to analyse (refused below) and none else
            widths = [(layer, d) for (layer, _), (_, d) in zip(analysed, analysis.sizes)]
            widths += [(layer, int(X.shape[1])) for layer, X, _ in left]
            stacks = [stack for _, stack in analysed]
            tokens_seen = min(recorder.tokens_seen.values(), default=0)
            per_layer = {layer: recorder.tokens_seen[layer] for layer, _ in widths}
        if not ran:
            raise RuntimeError(
                f"The model's forward ran none of its {len(blocks)} residual blocks (first: {blocks[0].name!r}); "
                "cannot build a profile. Pass inputs that reach them."
            )
    except BaseException as exc:
        _write_partial(partial_path, name, len(ran), len(blocks), exc)
        if hasattr(exc, "add_note"):
            exc.add_note(
                f"hf_koopman streaming stopped after {len(ran)}/{len(blocks)} blocks; no profile was produced."
            )
        raise
    finally:
        for handle in handles:
            handle.remove()
        for module in block_modules:
            free_parameters(module)
        bar.close()
        analysis.close()

    _check_token_count(recorder, widths, num_samples)  # fewer than 2 real token states: refused as by `profile`
    not_run = [block.name for i, block in enumerate(blocks) if i not in ran]  # a tower the inputs do not reach
    _warn_blocks_not_run(not_run, len(blocks))
    for module in rest:  # the embedding matrix alone is 0.5 GB for a 7B model: free it once the stream is done
        free_parameters(module)
    release_freed_memory()
    # the stream's time without the analysis of the layers done during it
    stream_time = time.perf_counter() - start - analysis.wall_time
    stream_cpu = time.process_time() - cpu_start - analysis.cpu_time
    meta = {
        "model_class": type(skeleton).__name__,
        "model_type": getattr(config, "model_type", None),
        "probe": probe,
        "dtype": str(dtype).removeprefix("torch."),
        "num_blocks": len(blocks),
        "batches": 1,
        "tokens_seen": tokens_seen,  # the fewest any block saw; the verdict judges its own layer's count
        "tokens_seen_per_layer": per_layer,
        "num_samples_requested": num_samples,
        "streaming": {
            "complete": True,
            "weights": weights.kind,
            "dtype": str(dtype).removeprefix("torch."),
            "num_blocks": len(blocks),
            "block_bytes": plan["block"],
            "non_block_bytes": plan["non_block"],
            "stream_time_s": round(stream_time, 3),
            "stream_cpu_s": round(stream_cpu, 3),  # process CPU time (all threads), robust to other load
            "block_time_s": round(state["block_time"], 3),
            "seed": seed,
        }
    }
    meta["weights"] = "init" if weights.kind == "init" else "pretrained"  # what the risk estimator's range reads
    if (autocast := autocast_dtype("cpu")) is not None:  # the blocks ran in half precision: ρ and κ(V) carry it
        meta["activation_dtype"] = autocast
    if learning_rate is not None:
        meta["learning_rate"] = learning_rate
    if not_run:  # as `profile` records it
        meta["blocks_not_run"] = not_run
    if tokens_seen < num_samples:
        logger.warning(
            "only %d valid token states reached the blocks (asked for num_samples=%d); pass more inputs for stable "
            "estimates", tokens_seen, num_samples,
        )
    result = analysis.to_profile(stacks=stacks, model_name=name, meta=meta)
    info = result.meta.setdefault("streaming", {})
    info["wall_time_s"] = round(time.perf_counter() - start, 3)
    info["analysis_cpu_s"] = round(analysis.cpu_time, 3)
    info["analysis_chunk_size"] = max(analysis.chunk_sizes, default=None)
    info["peak_rss_bytes"] = _peak_rss_bytes()  # whole process, including anything it did before this call
    logger.info("Streamed %d blocks of %s in %.1fs (process peak RSS %s)", len(ran), name, info["wall_time_s"],
                _fmt(info["peak_rss_bytes"]))
    if estimator is not None:
        result.set_risk_estimator(estimator)
    return result


#: The least working memory a chunk's analysis may take in `profile_streaming` (it may take as much as one block's
#: forward, where that is more; see `_memory_plan`).
_STREAM_ANALYSIS_FLOOR = 1 << 30


_LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")


def _prepare_inputs(inputs: Any, model: nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """Batch dict for the skeleton: tensors stay on CPU (the skeleton's parameters are on meta), floating inputs take
    the block dtype, labels are dropped (no loss: the head never runs), encoder-decoder models get decoder inputs."""
    if isinstance(inputs, torch.Tensor):
        key = getattr(model, "main_input_name", "pixel_values") if inputs.is_floating_point() else "input_ids"
        inputs = {key: inputs}
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"profile_streaming takes one batch (a dict of tensors such as input_ids (B, T) or a tensor), got "
            f"{type(inputs).__name__}; tokenise text first, or omit inputs for the default probe."
        )
    out = {
        key: (value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value)
        for key, value in inputs.items()
        if key not in _LABEL_KEYS
    }
    from hf_koopman.profiling.inputs import add_decoder_inputs

    return add_decoder_inputs(out, inputs, model)


def _write_partial(path: str | os.PathLike | None, name: str, done: int, total: int, exc: BaseException) -> None:
    if path is None:
        return
    marker = {
        "complete": False,
        "model_name": name,
        "blocks_done": done,
        "num_blocks": total,
        "error": f"{type(exc).__name__}: {exc}",
        "note": "Interrupted streaming run: no spectral features were computed. Re-run to get a profile.",
    }
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_whole(path, json.dumps(marker, indent=2))
    except OSError:  # never mask the original error
        logger.exception("Could not write the partial-run marker to %s", path)
