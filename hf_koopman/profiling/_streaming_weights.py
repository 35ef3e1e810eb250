"""Weight sources for streaming profiles: build one residual block at a time, then free it.

Two sources share one small interface (`materialise(module, index)` / `materialise_rest(model, modules)`):

* `InitWeights` -- the model's own `_init_weights`, seeded per block (`block_seed(seed, index)`) so that a block's
  weights do not depend on how many blocks were built before it and runs are reproducible;
* `SafetensorsWeights` -- exactly the tensors a block needs, read from the (possibly sharded) safetensors files of a
  local `save_pretrained` folder and loaded through transformers' own v5 loading pipeline, so checkpoint key renames and
  fused-expert conversions (`get_model_conversion_mapping`) apply as in `from_pretrained`.

Parameters live on the meta device until materialised; freeing moves them back to meta. Buffers are never touched
(the skeleton is built with real buffers, e.g. rotary `inv_freq`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from accelerate.utils import dtype_byte_size
from torch import nn

from hf_koopman.files import safetensors_error, unreadable_safetensors
from hf_koopman.logging_utils import get_logger


logger = get_logger(__name__)

__all__ = [
    "InitWeights",
    "block_seed",
    "SafetensorsWeights",
    "free_parameters",
    "materialise_empty",
    "module_bytes",
    "owner_map",
    "release_freed_memory",
    "tie_loaded",
    "tied_parameters",
]

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes the parameters of `module` take once materialised (floating-point ones in `dtype` when given; tied
    parameters once).

    accelerate's `dtype_byte_size` sizes each dtype. Its `compute_module_sizes` is not used: it also counts buffers,
    which are already real in the streaming skeleton, and never counts a cast to a wider dtype (a float64 run of a
    float32 skeleton), so it would underestimate what a block needs.
    """
    return int(sum(
        p.numel() * dtype_byte_size(dtype if dtype is not None and p.is_floating_point() else p.dtype)
        for p in module.parameters()  # deduplicated: tied parameters count once
    ))


def _meta_parameters(modules: Iterable[nn.Module], skip: frozenset[int] = frozenset()
                     ) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    for module in modules:
        for sub in _post_order(module, skip):
            for name, p in sub._parameters.items():
                if p is not None and p.device.type == "meta":
                    yield sub, name, p


def materialise_empty(modules: Iterable[nn.Module], dtype: torch.dtype | None = None,
                      skip: frozenset[int] = frozenset()) -> None:
    """Give every meta parameter under `modules` real, uninitialised CPU storage (parameters shared within `modules`
    stay shared), not descending into the modules whose ids are in `skip`. Buffers are left as they are."""
    replaced: dict[int, nn.Parameter] = {}
    for sub, name, p in list(_meta_parameters(modules, skip)):
        new = replaced.get(id(p))
        if new is None:
            target = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
            new = nn.Parameter(torch.empty(p.shape, dtype=target), requires_grad=False)
            replaced[id(p)] = new
        sub._parameters[name] = new


def free_parameters(module: nn.Module) -> None:
    """Move every parameter of `module` back to the meta device, releasing its memory (buffers are kept)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False
                )


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`).

    Why: blocks are built and freed over and over while small snapshot tensors accumulate in between; with glibc's
    dynamic mmap threshold many of a block's tensors land on the heap, and the freed holes are not returned, so the
    resident size grows by a block's worth every few blocks. Measured at d=2048: +120 MB per block without trimming,
    +35 MB (the snapshots) with it. A no-op on other C libraries / platforms.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def owner_map(model: nn.Module) -> dict[int, nn.Module]:
    """`id(module) -> nearest enclosing PreTrainedModel`, the one whose `_init_weights` transformers applies to it
    (same dispatch as `PreTrainedModel.initialize_weights`, which handles composite models)."""
    from transformers import PreTrainedModel

    owners: dict[int, nn.Module] = {}

    def visit(module: nn.Module, owner: nn.Module) -> None:
        owners[id(module)] = owner
        for child in module.children():
            visit(child, child if isinstance(child, PreTrainedModel) else owner)

    visit(model, model)
    return owners


class InitWeights:
    """Initialise blocks with the model's own `_init_weights`, block `i` under `torch.manual_seed(block_seed(seed, i))`.

    The non-block modules (embeddings, final norm ...) use index `num_blocks`, so no two parts share a random stream.
    The global RNG state is restored afterwards.

    Args:
        model (`PreTrainedModel`): the meta skeleton.
        seed (`int`): base seed.
        num_blocks (`int`): number of residual blocks (for the non-block seed).
        dtype (`torch.dtype`, *optional*): storage dtype of floating-point parameters (default: the skeleton's).
        blocks (`list[nn.Module]`, *optional*): the block modules, which the non-block modules' initialisation leaves
            alone (a model that holds a parameter of its own, like CLIP's `logit_scale`, is a non-block module).
    """

    kind = "init"

    def __init__(self, model: nn.Module, *, seed: int, num_blocks: int, dtype: torch.dtype | None = None,
                 blocks: Sequence[nn.Module] = ()) -> None:
        self.model = model
        self.seed = int(seed)
        self.num_blocks = int(num_blocks)
        self.dtype = dtype
        self._owners = owner_map(model)
        self._blocks = frozenset(id(block) for block in blocks)

    def _initialise(self, modules: list[nn.Module], seed: int, skip: frozenset[int] = frozenset()) -> None:
        from transformers import initialization as hf_init

        materialise_empty(modules, self.dtype, skip)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), hf_init.guard_torch_init_functions():
            torch.manual_seed(seed)
            for module in modules:
                # post-order like `initialize_weights`: children first, so a parent's rule (e.g. GPT-2's scaled
                # `c_proj` init) overrides its children's generic one
                for sub in _post_order(module, skip):
                    self._owners.get(id(sub), self.model)._init_weights(sub)

    def materialise(self, block: nn.Module, index: int) -> None:
        """Build block `index` in place: real storage, then `_init_weights` under `block_seed(seed, index)`."""
        self._initialise([block], block_seed(self.seed, index))

    def materialise_rest(self, modules: list[nn.Module]) -> None:
        """Build the non-block modules that hold meta parameters (embeddings, final norm, ...), not the blocks inside
        them."""
        self._initialise(modules, block_seed(self.seed, self.num_blocks), self._blocks)


def block_seed(seed: int, index: int) -> int:
    """Seed of block `index` (index `num_blocks`: the non-block modules) for run seed `seed`: a 63-bit hash of both.

    Why not `seed + index`: block 1 of run `s` and block 0 of run `s + 1` would get identical weights (profiles over
    consecutive seeds correlated), and block 0 would share the random stream of the probe tokens, which are drawn from
    a generator seeded with `seed` (weights and probe then correlate: on a d=128 LLaMA, mean M~1 shifts by about one
    seed-to-seed standard deviation when weights and probe share a seed).
    """
    digest = hashlib.blake2b(f"hf_koopman.streaming.init:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _post_order(module: nn.Module, skip: frozenset[int] = frozenset()) -> Iterator[nn.Module]:
    """`module` and its descendants, children first, without the subtrees rooted at the modules in `skip`."""
    for child in module.children():
        if id(child) not in skip:
            yield from _post_order(child, skip)
    yield module


class SafetensorsWeights:
    """Read exactly one block's tensors from a local safetensors folder and load them with transformers' v5 pipeline.

    Checkpoint keys are mapped to model parameter names once, with the same renaming / conversion rules and
    `base_model_prefix` handling as `from_pretrained` (`get_model_conversion_mapping`, `rename_source_key`); a block
    then gets every checkpoint tensor whose target lies under its dotted name (several source tensors may fuse into one
    parameter, e.g. Mixtral experts).

    Args:
        folder (`str` or `Path`): a `save_pretrained` folder with `model.safetensors` or a sharded
            `model.safetensors.index.json`.
        model (`PreTrainedModel`): the meta skeleton (same architecture as the checkpoint).
        block_names (`list[str]`): dotted names of the residual blocks in `model`.
        dtype (`torch.dtype`, *optional*): storage dtype of floating-point parameters (default: the skeleton's).
    """

    kind = "safetensors"

    def __init__(
        self, folder: str | Path, model: nn.Module, block_names: list[str], *, dtype: torch.dtype | None = None
    ) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.folder = Path(folder)
        self.model = model
        self.dtype = dtype
        self.key_to_file = find_safetensors_keys(self.folder)
        self.weight_mapping = get_model_conversion_mapping(model)
        renamings = [w for w in self.weight_mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in self.weight_mapping if isinstance(w, WeightConverter)]
        meta_state = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None) or None

        self.block_keys: dict[str, list[str]] = defaultdict(list)
        self.rest_keys: list[str] = []
        self.targets: dict[str, str] = {}  # checkpoint key -> model parameter it loads into
        self.unused_keys: list[str] = []
        prefixes = [(name, name + ".") for name in block_names]
        for key in self.key_to_file:
            target, _ = rename_source_key(key, renamings, converters, prefix, meta_state)
            if target not in meta_state and key in meta_state:  # same fallback as the v5 loader
                target, _ = rename_source_key(key, [], [], prefix, meta_state)
            if target not in meta_state:
                self.unused_keys.append(key)
                continue
            self.targets[key] = target
            owner = next((name for name, p in prefixes if target.startswith(p)), None)
            (self.block_keys[owner] if owner is not None else self.rest_keys).append(key)
        if self.unused_keys:
            logger.info("%d checkpoint tensors do not belong to the model and are ignored, e.g. %s",
                        len(self.unused_keys), self.unused_keys[:3])
        empty = [name for name in block_names if not self.block_keys.get(name)]
        if empty:
            raise ValueError(
                f"The safetensors files in {self.folder} hold no tensors for block(s) {empty[:3]}"
                f"{' ...' if len(empty) > 3 else ''}. Check that the folder was saved from the same architecture as "
                f"its config.json ({type(model).__name__})."
            )
        self._block_names = set(block_names)
        self.tied = tied_parameters(model)
        self._paths = {id(module): path for path, module in model.named_modules()}

    def _load(self, keys: list[str], modules: list[nn.Module], what: str) -> None:
        from safetensors import SafetensorError, safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.key_to_file[key]].append(key)
        state: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for key in file_keys:
                        state[key] = handle.get_tensor(key)
            except (SafetensorError, OSError) as err:  # a shard found through the index only now, or cut short
                raise ValueError(unreadable_safetensors(file, err)) from None  # (out of memory is not caught here)
        config = LoadStateDictConfig(device_map={"": "cpu"}, dtype=self.dtype, weight_mapping=self.weight_mapping)
        with _quiet_transformers():
            convert_and_load_state_dict_in_model(self.model, state, config)
        del state
        # the loader fills one name of a tied pair (T5 saves `shared.weight`, not the encoder / decoder `embed_tokens`)
        names = list(dict.fromkeys(
            self._name(module, name)
            for module in modules
            for name, _ in module.named_parameters(remove_duplicate=False)
        ))
        if what == "non-block":  # a model holding a parameter of its own (CLIP's `logit_scale`) contains the blocks
            names = [name for name in names if not any(name.startswith(f"{block}.") for block in self._block_names)]
        tie_loaded(self.model, self.tied, set(names))
        missing = [name for name in names if self.model.get_parameter(name).device.type == "meta"]
        if missing:
            raise ValueError(
                f"The checkpoint in {self.folder} lacks tensors for {what} parameters {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, and the model ties none of them to a loaded one; streaming "
                "needs them in the safetensors files. Re-save the folder with `save_pretrained` from this "
                "architecture, or pass `init=True` (`--init`) to profile the architecture at initialisation."
            )
        if self.dtype is not None:  # the loader keeps the skeleton's dtype; cast where asked, tied parameters once
            cast: dict[int, nn.Parameter] = {}
            for module in modules:
                for sub in module.modules():
                    for name, p in sub._parameters.items():
                        if p is not None and p.is_floating_point() and p.dtype != self.dtype:
                            if id(p) not in cast:
                                cast[id(p)] = nn.Parameter(p.detach().to(self.dtype), requires_grad=False)
                            sub._parameters[name] = cast[id(p)]

    def _name(self, module: nn.Module, name: str) -> str:
        """Dotted path of parameter `name` of `module` in the model, e.g. `encoder.embed_tokens.weight`."""
        prefix = self._paths.get(id(module), "")
        return f"{prefix}.{name}" if prefix else name

    def materialise(self, block: nn.Module, index: int, name: str | None = None) -> None:
        """Load the block called `name` (its dotted path) from the checkpoint."""
        if name is None:
            raise ValueError("SafetensorsWeights.materialise needs the block's dotted name")
        self._load(self.block_keys[name], [block], f"block {name}")

    def materialise_rest(self, modules: list[nn.Module]) -> None:
        """Load the non-block tensors of `modules` (embeddings, final norm, ...); others (an untied LM head: 0.5 GB
        for a 7B model) stay on meta.

        A parameter of `modules` without a checkpoint tensor of its own takes the tensor stored for a parameter tied to
        it, as `from_pretrained` ties either side of a pair (a tied LLaMA saved with `lm_head.weight` only); that
        partner goes back to meta once the tie is made, so the embedding is freed with `modules`. A partner is read
        only then: with `model.embed_tokens.weight` in the checkpoint, the LM head is never loaded."""
        wanted = {id(m) for m in modules}
        names = {
            f"{prefix}.{name}" if prefix else name
            for prefix, module in self.model.named_modules()
            if id(module) in wanted
            for name, p in module._parameters.items()
            if p is not None
        }
        stored = {self.targets[key] for key in self.rest_keys}
        partners = {  # none where a tied member being loaded anyway is stored (T5: `shared.weight`)
            next((other for other in sorted(group) if other in stored), None)
            for group in (self._tie_group(name) for name in names - stored)
            if not group & names & stored
        } - {None} - names
        self._load([key for key in self.rest_keys if self.targets[key] in names | partners], modules, "non-block")
        for name in partners:  # loaded only to be tied to: not kept alive after `modules` are freed
            parent, _, leaf = name.rpartition(".")
            holder = self.model.get_submodule(parent)
            p = holder._parameters[leaf]
            holder._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                    requires_grad=False)

    def _tie_group(self, name: str) -> set[str]:
        """Every parameter name tied to `name`, directly or through others (T5's `shared.weight`, the encoder and
        decoder `embed_tokens` and a tied `lm_head`), without `name` itself."""
        group, todo = {name}, [name]
        while todo:
            current = todo.pop()
            for target, source in self.tied.items():
                other = source if target == current else target if source == current else None
                if other is not None and other not in group:
                    group.add(other)
                    todo.append(other)
        return group - {name}


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """`{target: source}` dotted names of the parameters `model` ties (as `from_pretrained` ties them), from
    transformers' `get_expanded_tied_weights_keys`, which reads each sub-model's `_tied_weights_keys` and its config's
    `tie_word_embeddings`; empty for a model that declares no ties."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return {}
    try:
        return dict(expand(all_submodels=True))
    except (ValueError, AttributeError, TypeError) as err:  # a tie pattern that matches no parameter
        logger.info("could not read the tied weights of %s (%s); tied parameters must be in the checkpoint",
                    type(model).__name__, err)
        return {}


def tie_loaded(model: nn.Module, tied: dict[str, str], names: set[str]) -> None:
    """Point every still-meta parameter in `names` at its loaded tie partner (either side of a `tied` pair, as
    `from_pretrained` does when a checkpoint holds only one of them). Partners outside `names` stay as they are, so a
    tied LM head that is never run does not keep the embedding alive after the embedding is freed."""
    tied_any = True
    while tied_any:  # until no pair changes: a tie through a third name (T5's `shared`) takes a second pass
        tied_any = False
        for target, source in tied.items():
            for want, have in ((target, source), (source, target)):
                if want not in names:
                    continue
                try:
                    wanted, held = model.get_parameter(want), model.get_parameter(have)
                except AttributeError:  # a tied buffer, or a name this model variant lacks
                    continue
                if wanted.device.type == "meta" and held.device.type != "meta":
                    parent, _, leaf = want.rpartition(".")
                    model.get_submodule(parent)._parameters[leaf] = held
                    tied_any = True


def find_safetensors_keys(folder: Path) -> dict[str, Path]:
    """`checkpoint key -> shard file` from `model.safetensors.index.json`, or from the file headers otherwise."""
    from safetensors import safe_open

    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / file for key, file in weight_map.items()}
    files = [folder / _SINGLE_FILE] if (folder / _SINGLE_FILE).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"No safetensors weights found in {folder} (expected {_SINGLE_FILE} or {_INDEX_FILE}). Streaming loads "
            "weights only from safetensors (a pickled pytorch_model.bin would have to be loaded whole): convert it "
            "once where the model fits (`save_pretrained(..., safe_serialization=True)`, the default), or pass "
            "`init=True` (`--init`) to profile the architecture at initialisation."
        )
    keys: dict[str, Path] = {}
    for file in files:
        err = safetensors_error(file)  # a bad header, a file cut short or unreadable
        if err is not None:
            raise ValueError(unreadable_safetensors(file, err))
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys.update(dict.fromkeys(handle.keys(), file))
    return keys


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the loader's per-call "Loading weights" bar (we load one block at a time and show our own)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
