"""Forward hooks that collect RKSP snapshot pairs (h_ℓ entering block ℓ, h_{ℓ+1} leaving it) with O(L·N·d) memory.

Snapshot protocol (rksp_paper.md §1.4, App. D.3): token positions are flattened (batch × position) and subsampled to
`N` token states per layer transition; X and Y of a transition use the same token indices. Choices where the paper is
silent, made here:

* Padding is excluded through the attention mask (the paper does not say). Inputs without a mask (vision) use every
  position. 4-D conv feature maps `(B, C, H, W)` are read as `H·W` tokens of width `C`.
* Subsampling is a bottom-N priority sample: every valid token gets a uniform key from a generator seeded with `seed`,
  and the N smallest keys over all batches are kept. This is a uniform sample without replacement over the whole stream
  whatever the number of batches, and only N rows per transition are ever stored. Keys are drawn for the *valid* tokens
  only, in order, so appending pad tokens does not change which tokens are sampled.
* Every transition uses an identically seeded generator, so all layers see the same token positions.
* A block executed several times in one forward (weight sharing, e.g. ALBERT) yields one transition per call, named
  `"<block>@<k>"` for the k-th repeat.
"""

from __future__ import annotations

from hf_koopman.logging_utils import get_logger
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_koopman.profiling.blocks import ResidualBlock, check_token_stream, find_residual_blocks, unwrap_model


__all__ = ["ResidualStreamRecorder"]

logger = get_logger(__name__)

MaskLike = torch.Tensor | dict[str, torch.Tensor | None] | None


@dataclass
class _Transition:
    name: str
    stack: str
    generator: torch.Generator
    keys: torch.Tensor | None = None  # (n,) priority keys of the kept rows
    X: torch.Tensor | None = None  # (n, d)
    Y: torch.Tensor | None = None  # (n, d)
    tokens_seen: int = 0
    positions_seen: int = 0  # token positions before the mask, padding included
    pending: list[Any] = field(default_factory=list)
    # with detach=False: (piece, source, rows) for every recorded row block, piece = source-as-tokens[rows]
    sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput and plain dicts
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _block_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    for item in args:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
    for item in kwargs.values():
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2:
            return item
    return None


def _as_tokens(hidden: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`(..., d)` activations -> `(tokens, d)` rows plus the token-grid shape used to match the mask."""
    if hidden.dim() == 3:  # (B, T, d)
        return hidden.reshape(-1, hidden.shape[-1]), tuple(hidden.shape[:2])
    if hidden.dim() == 2:  # already (tokens, d)
        return hidden, (hidden.shape[0],)
    if hidden.dim() == 4:  # conv feature map (B, C, H, W): tokens are spatial positions, features are channels
        flat = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
        return flat, (hidden.shape[0], hidden.shape[2] * hidden.shape[3])
    raise ValueError(
        f"block {name!r} receives a {hidden.dim()}-D hidden state of shape {tuple(hidden.shape)}; expected (B, T, d), "
        "(tokens, d) or (B, C, H, W). Choose other blocks with layers=..."
    )


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN/Inf check at the cost of one reduction: any NaN or ±Inf makes the float32 sum non-finite; only when it is
    (NaN, Inf, or a genuine float32 overflow of huge values) is the exact element-wise test run."""
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def _container(name: str) -> str:
    """Dotted path of the list holding block `name` (`"model.layers.3"` -> `"model.layers"`)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


class ResidualStreamRecorder:
    """Context manager that records subsampled snapshot pairs `(X, Y)` for every residual block.

    Args:
        model (`nn.Module`):
            The model (PEFT / DDP / FSDP wrappers are unwrapped).
        blocks (`list[ResidualBlock]`, `str` or `list[nn.Module]`, *optional*):
            Blocks to hook; anything else than a list of `ResidualBlock` is passed to
            `find_residual_blocks(model, layers=blocks)`. Defaults to auto-discovery.
        num_samples (`int` or `None`, *optional*, defaults to 2048):
            Token states kept per transition (`N`); `None` keeps every valid token.
        seed (`int`, *optional*, defaults to 0):
            Seed of the subsampling generator.
        attention_mask (`torch.Tensor` or `dict[str, torch.Tensor]`, *optional*):
            `(B, T)` mask of the *next* forward (1 = real token). A dict maps stack labels (`"encoder"`, `"decoder"`,
            `""`, or a list path) to masks; a label it maps to `None` gets no mask (every position), a label it lacks
            the `""` entry's. Set `recorder.attention_mask` before each forward when batches change.
        detach (`bool`, *optional*, defaults to `True`):
            Store detached copies (set `False` to keep the autograd graph, e.g. for a differentiable penalty).
        check_finite (`bool`, *optional*, defaults to `True`):
            Raise `ValueError` naming the first block whose (unpadded) output holds NaN/Inf.
        on_width_change (`str`, *optional*, defaults to `"raise"`):
            What to do when a block's output shape differs from its input (not a residual map): `"raise"` a
            `ValueError`, or `"drop"` every block of the same list (e.g. the strided conv layers that auto-discovery
            also finds in wav2vec2's feature extractor) and record why in `recorder.dropped`.

    Example:
        >>> with ResidualStreamRecorder(model, num_samples=1024) as rec:
        ...     rec.attention_mask = batch["attention_mask"]
        ...     model(**batch)
        >>> for name, X, Y in rec.snapshots():  # X, Y: (N, d)
        ...     ...
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[ResidualBlock] | str | Sequence[nn.Module] | None = None,
        *,
        num_samples: int | None = 2048,
        seed: int = 0,
        attention_mask: MaskLike = None,
        detach: bool = True,
        check_finite: bool = True,
        on_width_change: str = "raise",
    ) -> None:
        if on_width_change not in ("raise", "drop"):
            raise ValueError(f"on_width_change must be 'raise' or 'drop', got {on_width_change!r}.")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 2):
            raise ValueError(f"num_samples must be an int >= 2 (or None for all tokens), got {num_samples!r}.")
        self.model = unwrap_model(model)
        if blocks is None or not all(isinstance(b, ResidualBlock) for b in blocks):
            blocks = find_residual_blocks(self.model, layers=blocks)
        self.blocks: list[ResidualBlock] = list(blocks)
        check_token_stream(self.blocks)
        self.num_samples = num_samples
        self.seed = seed
        self.attention_mask = attention_mask
        self.detach = detach
        self.check_finite = check_finite
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._transitions: dict[tuple[int, int], _Transition] = {}
        self._calls: dict[int, int] = {}
        self._warned_mask: set[str] = set()
        self._unmatched_mask: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # block -> (mask shape, grid)
        self.on_width_change = on_width_change
        self.dropped: dict[str, str] = {}  # block-list path -> reason
        self._last_output: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> ResidualStreamRecorder:
        if self._handles:
            raise RuntimeError("ResidualStreamRecorder is already active; it is not re-entrant.")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._reset_calls))
            for index, block in enumerate(self.blocks):
                self._handles.append(
                    block.module.register_forward_pre_hook(self._make_pre_hook(index), with_kwargs=True)
                )
                self._handles.append(block.module.register_forward_hook(self._make_hook(index)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent); recorded snapshots stay available."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_output = None
        for transition in self._transitions.values():
            transition.pending.clear()

    # ------------------------------------------------------------------ results
    def _kept(self) -> list[_Transition]:
        return [t for t in self._recorded() if t.X is not None]

    def snapshots(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Recorded transitions in execution order: `(name, X (N, d), Y (N, d))`."""
        return [(t.name, t.X, t.Y) for t in self._kept()]

    def pop_snapshots(self, min_rows: int = 2) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
        """Hand over the transitions recorded since the last call, `(name, stack, X (N, d), Y (N, d))` in execution
        order, and forget their rows (`tokens_seen` and `positions_seen` keep their counts; `snapshots()` no longer
        lists them). For a caller that analyses each transition as soon as its block has run (`profile_streaming`),
        so that memory holds a few transitions instead of all of them: only for a recording of one forward pass (a
        later batch would start the popped transitions again). A transition with fewer than `min_rows` rows, or whose
        block is still running, stays."""
        out = []
        for transition in self._kept():
            if transition.pending or transition.X.shape[0] < min_rows:
                continue
            out.append((transition.name, transition.stack, transition.X, transition.Y))
            transition.X = transition.Y = None
            transition.sources.clear()
        return out

    def snapshot_sources(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Where the rows of the kept snapshots come from (only with `detach=False`; empty otherwise).

        Returns `(piece, source, rows)` triples, one per distinct recorded tensor: `source` is a block's input or output
        activation as the model holds it (`(B, T, d)`, `(tokens, d)` or `(B, C, H, W)`), `rows` `(n,)` index its
        token view (see `_as_tokens`) and `piece` `(n, d)` is `token_view(source)[rows]`, the tensor the snapshots
        are built from (`snapshots()` entries are these pieces or row selections / concatenations of them). KSS
        differentiates its penalty with respect to the pieces and injects the result at the sources during the
        ordinary backward pass (`hf_koopman.training.trainer`).
        """
        seen: set[int] = set()
        out = []
        for transition in self._kept():
            for piece, source, rows in transition.sources:
                if id(piece) not in seen:
                    seen.add(id(piece))
                    out.append((piece, source, rows))
        return out

    def snapshot_stacks(self) -> list[str]:
        """Stack label of each entry of `snapshots()`."""
        return [t.stack for t in self._kept()]

    def _recorded(self) -> list[_Transition]:
        """Transitions of the block lists that are not dropped (`dropped`: a list whose blocks change the width)."""
        return [t for (i, _), t in self._transitions.items() if _container(self.blocks[i].name) not in self.dropped]

    @property
    def tokens_seen(self) -> dict[str, int]:
        """Number of valid (unpadded) token states each transition of a kept block list has seen before
        subsampling."""
        return {t.name: t.tokens_seen for t in self._recorded()}

    @property
    def positions_seen(self) -> dict[str, int]:
        """Number of token positions each transition of a kept block list has seen, padding included: `tokens_seen`
        plus what the mask left out."""
        return {t.name: t.positions_seen for t in self._recorded()}

    # ------------------------------------------------------------------ hooks
    def _reset_calls(self, module: nn.Module, args: tuple) -> None:
        self._calls.clear()
        self._last_output = None

    def _frame_mask(self, mask: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor | None:
        """`(B, frames)` validity of the frames a speech model's convolutional feature encoder makes of a `(B,
        samples)` waveform (or feature) mask: wav2vec2, HuBERT, WavLM, Speech2Text ..., by the model's own
        `_get_feat_extract_output_lengths`, when the grid a block sees is those frames (a padded row's frames come
        first); `None` otherwise (a grid of other length, as a convolution's channels or SEW's squeezed frames)."""
        lengths_of = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if lengths_of is None or mask.dim() != 2 or len(grid) != 2 or mask.shape[0] != grid[0]:
            return None

        def frames(lengths: torch.Tensor) -> torch.Tensor:
            try:
                return torch.as_tensor(lengths_of(lengths, add_adapter=False))  # the encoder's, before any adapter
            except TypeError:  # models whose version takes no add_adapter
                return torch.as_tensor(lengths_of(lengths))

        try:
            if int(frames(torch.tensor(mask.shape[1]))) != grid[1]:
                return None
            counts = frames((mask != 0).sum(-1).cpu()).long().clamp(0, grid[1])
        except Exception:  # noqa: BLE001 - a model's private helper: when it does not apply, the mask does not either
            return None
        return torch.arange(grid[1]) < counts[:, None]

    def _mask_for(self, block: ResidualBlock, grid: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        mask = self.attention_mask
        if isinstance(mask, dict):
            mask = mask.get(block.stack, mask.get(""))
        if mask is None:
            return None
        if mask.dim() == 2 and tuple(mask.shape) == grid or mask.numel() == grid[0] and len(grid) == 1:
            return mask.reshape(-1).to(device=device) != 0
        frames = self._frame_mask(mask, grid)
        if frames is not None:
            return frames.reshape(-1).to(device=device)
        # said once the block has shown it is a width-preserving residual block (a list left out is not warned about)
        self._unmatched_mask.setdefault(block.name, (tuple(mask.shape), grid))
        return None

    def _warn_unmatched_mask(self, block: ResidualBlock) -> None:
        if block.name in self._unmatched_mask and block.name not in self._warned_mask:
            self._warned_mask.add(block.name)
            shape, grid = self._unmatched_mask[block.name]
            logger.warning(
                "attention mask of shape %s does not match the token grid %s of block %r; using every position of "
                "that block (padding, if any, is included).", shape, grid, block.name,
            )

    def _make_pre_hook(self, index: int):
        block = self.blocks[index]

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self._calls.get(index, 0)
            self._calls[index] = call + 1
            hidden = _block_input(args, kwargs)
            if hidden is None:
                logger.debug("block %r called without a floating tensor input; skipped", block.name)
                return None
            key = (index, call)
            transition = self._transitions.get(key)
            if transition is None:
                name = block.name if call == 0 else f"{block.name}@{call}"
                generator = torch.Generator().manual_seed(self.seed)
                transition = self._transitions[key] = _Transition(name, block.stack, generator)
            flat, grid = _as_tokens(hidden, block.name)
            mask = self._mask_for(block, grid, flat.device)
            valid = torch.arange(flat.shape[0], device=flat.device) if mask is None else mask.nonzero().squeeze(-1)
            if (
                self.check_finite and index == 0 and call == 0
                and not _all_finite(flat if mask is None else flat[valid])
            ):
                raise ValueError(
                    f"non-finite activation (NaN/Inf) in the input of block {block.name!r}, i.e. the embedding "
                    "output; check the weights and the dtype (fp16 overflow?)."
                )
            new_keys = torch.rand(valid.numel(), generator=transition.generator)
            old_keys = transition.keys if transition.keys is not None else new_keys[:0]
            all_keys = torch.cat([old_keys, new_keys])
            limit = all_keys.numel() if self.num_samples is None else min(self.num_samples, all_keys.numel())
            order = torch.argsort(all_keys)[:limit]
            keep_old = order[order < old_keys.numel()]
            new_rows = valid[(order[order >= old_keys.numel()] - old_keys.numel()).to(valid.device)]
            X = flat[new_rows]
            last, self._last_output = self._last_output, None
            if last is not None and hidden is last[0] and torch.equal(last[1], new_rows) and torch.equal(last[2], X):
                X = last[2]  # the previous block's output enters this block unchanged: keep one copy of the rows
            merged_keys = torch.cat([old_keys[keep_old], all_keys[order[order >= old_keys.numel()]]])
            # committed together with Y in the forward hook, so X and Y never get out of step
            transition.pending.append((keep_old, new_rows, valid, tuple(flat.shape), X, merged_keys, hidden))
            return None

        return pre_hook

    def _make_hook(self, index: int):
        block = self.blocks[index]

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            call = self._calls.get(index, 1) - 1
            transition = self._transitions.get((index, call))
            if transition is None or not transition.pending:
                return None
            keep_old, new_rows, valid, in_shape, X, merged_keys, source_in = transition.pending.pop()
            hidden = _first_tensor(output)
            if hidden is None:
                raise ValueError(f"block {block.name!r} returned {type(output).__name__} with no tensor in it.")
            flat, _ = _as_tokens(hidden, block.name)
            if tuple(flat.shape) != in_shape:
                container = _container(block.name)
                if self.on_width_change == "drop":
                    if container not in self.dropped:
                        self.dropped[container] = f"block {block.name!r} maps {in_shape} to {tuple(flat.shape)}"
                        logger.warning(
                            "ignoring the blocks of %r: %s, so they are not width-preserving residual blocks",
                            container, self.dropped[container],
                        )
                    return None
                raise ValueError(
                    f"block {block.name!r} maps {in_shape} token states to {tuple(flat.shape)}: it is not a "
                    "width-preserving residual block. Select residual blocks with layers=..."
                )
            self._warn_unmatched_mask(block)
            if self.check_finite and not _all_finite(flat if valid.numel() == flat.shape[0] else flat[valid]):
                raise ValueError(
                    f"non-finite activation (NaN/Inf) in the output of block {transition.name!r} (the first bad "
                    "block); check the weights, the learning rate that produced them and the dtype (fp16 overflow?)."
                )
            Y = flat[new_rows]
            if self.detach:
                X, Y = X.detach(), Y.detach()
            else:
                transition.sources += [(X, source_in, new_rows), (Y, hidden, new_rows)]
            self._last_output = (hidden, new_rows, Y)
            keep = keep_old.to(Y.device)
            transition.X = X if transition.X is None else torch.cat([transition.X[keep], X])
            transition.Y = Y if transition.Y is None else torch.cat([transition.Y[keep], Y])
            transition.keys = merged_keys
            transition.tokens_seen += valid.numel()
            transition.positions_seen += in_shape[0]
            return None

        return hook
