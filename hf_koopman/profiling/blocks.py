"""Locate the residual blocks of any `transformers` model, without per-architecture tables.

RKSP (rksp_paper.md §1.4) pairs the residual stream entering block ℓ with the stream leaving it, so the first job is to
know which modules are "the blocks". We ask the model itself, in this order:

1. an explicit user override (`layers="model.layers"`, a list of dotted paths or a list of modules);
2. the classes that transformers records as `hidden_states` (`_can_record_outputs["hidden_states"]`, per sub-model);
3. modules that are `GradientCheckpointingLayer` instances (406 of 524 modeling files in transformers 5.23);
4. classes named in `_no_split_modules` (collected over every sub-`PreTrainedModel`);
5. as a last resort, a homogeneous `nn.ModuleList` whose length is `config.num_hidden_layers`.

Signals 2-4 only count for modules that sit in an `nn.ModuleList` / `nn.Sequential` (this drops `*Embeddings`,
`MambaMixer` ...). When block lists nest (Swin stages hold lists of Swin layers, ALBERT groups hold layers) the
innermost lists win, because an outer "stage" may change the width and is then not a residual map.
"""

from __future__ import annotations

import contextlib

from hf_koopman.logging_utils import get_logger
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from torch import nn


__all__ = [
    "ResidualBlock", "check_token_stream", "eager_calls", "find_residual_blocks", "nested_block_lists", "unwrap_model"
]

logger = get_logger(__name__)


class ResidualBlock(NamedTuple):
    """One residual block: `name` is its dotted path in the unwrapped model, `stack` labels its tower.

    `stack` is `""` for single-stack models, `"encoder"` / `"decoder"` for encoder-decoder models, and the dotted path
    of the enclosing list for other multi-list models (e.g. the stages of a Swin encoder).
    """

    name: str
    module: nn.Module
    stack: str


def check_token_stream(blocks: Sequence[ResidualBlock]) -> None:
    """Refuse blocks whose class says that their activations are not a stream of token states.

    A block class opts out with a class attribute `_not_a_token_stream` holding the reason and the alternative (e.g.
    ReyNet's blocks map `(B, n, n, C)` pair tensors, which the `(B, C, H, W)` reading of 4-D maps would scramble).

    Raises:
        ValueError: naming the first such block and its class's reason.
    """
    for block in blocks:
        reason = getattr(type(block.module), "_not_a_token_stream", None)
        if reason:
            raise ValueError(
                f"block {block.name!r} ({type(block.module).__name__}) is not read as a residual stream of token "
                f"states: {reason}"
            )


def _compiled_inner(module: nn.Module) -> nn.Module | None:
    """The module a `torch.compile` wrapper (`OptimizedModule`) holds, or `None`."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def eager_module(module: nn.Module) -> nn.Module:
    """`module` without its `torch.compile` wrappers (the same parameters), other wrappers kept."""
    while (inner := _compiled_inner(module)) is not None:
        module = inner
    return module


@contextlib.contextmanager
def eager_calls(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` and its sub-modules run their eager forward: the compiled call that
    `nn.Module.compile()` installs in place (`_compiled_call_impl`) is set aside, and put back afterwards.

    A diagnostic forward with recording hooks would otherwise pay for a compilation (seconds for a tiny model) and
    break the graph at every hook; `torch.compile(model)` wrappers are unwrapped by `eager_module` instead.
    """
    saved = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    if saved:
        logger.info("profiling the eager forward of %d module(s) compiled in place (module.compile())", len(saved))
    for module, _ in saved:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in saved:
            module._compiled_call_impl = call


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip PEFT, DDP / DataParallel, FSDP and `torch.compile` wrappers; returns the underlying `nn.Module`."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and type(model).__module__.startswith("peft"):
            model = get_base()  # PeftModel.base_model is the tuner (LoraModel), not the HF backbone
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        inner = getattr(model, "_fsdp_wrapped_module", None) or _compiled_inner(model)
        if isinstance(inner, nn.Module):  # FSDP1 wrapper / torch.compile OptimizedModule
            model = inner
            continue
    return model


#: what a PEFT model's `named_modules()` puts before the wrapped model's paths: `base_model.model.` for adapters
#: (`PeftModel` -> tuner -> model), `base_model.` for prompt learning (`PeftModel` -> model)
_PEFT_PREFIXES = ("base_model.model.", "base_model.")


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)`; a path written from the task model (`model.layers`, `transformer.h`) also resolves
    on its base model (`LlamaModel`, `GPT2Model`, what the CLI profiles) by dropping the leading `base_model_prefix`,
    one written from the base model (`layers`, `h`) on the task model (what `--stream` builds),
    and a path copied from a PEFT model's `named_modules()` (`base_model.model.transformer.h`) on the model it wraps
    (`model` is unwrapped, `unwrap_model`)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and path.startswith(prefix + ".") and not hasattr(model, prefix):
            return model.get_submodule(path[len(prefix) + 1:])
        base = model._modules.get(prefix) if prefix else None
        if isinstance(base, nn.Module):  # a path written from the base model (`h`) on the task model (`transformer.h`)
            try:
                return base.get_submodule(path)
            except AttributeError:
                pass
        for peft in _PEFT_PREFIXES if "base_model" not in model._modules else ():  # a real `base_model` is no prefix
            if path.startswith(peft):
                try:
                    return _submodule(model, path[len(peft):])
                except AttributeError:
                    continue
        raise


def _is_torch_layer(module: nn.Module) -> bool:
    """Whether `module` is one of torch's own layers with no sub-modules (`nn.Linear`, `nn.GELU`, `nn.LayerNorm`,
    `nn.Dropout`, ...): one operation, never a residual block, whose output is x + f(x) (a skip connection written in
    the parent's `forward` is not in the layer's output)."""
    return type(module).__module__.startswith("torch.nn.") and next(module.children(), None) is None


def _check_not_torch_layers(model: nn.Module, blocks: list[ResidualBlock], layers: Any) -> list[ResidualBlock]:
    """`blocks` unchanged, or a `ValueError` when a `layers=` override names torch layers rather than blocks (the
    message names the block lists auto-discovery finds, if any)."""
    # an nn.Identity among blocks stands for a pruned one (x + 0); alone, or only identities, it is no block list
    # (a vision model's drop_path at rate 0 is one)
    pruned = [isinstance(b.module, nn.Identity) for b in blocks]
    among_blocks = not all(pruned)
    single = [b for b, gone in zip(blocks, pruned) if _is_torch_layer(b.module) and not (gone and among_blocks)]
    if single:
        kinds = "/".join(sorted({type(b.module).__name__ for b in single}))
        found = _discovered_lists(model)
        fix = (f"leave layers=None: auto-discovery finds the blocks in {', '.join(map(repr, found))}" if found else
               "pass the list of those blocks; a skip connection written in the model's own forward() leaves no "
               "block module to profile")
        raise ValueError(
            f"layers={layers!r} names {len(single)} single torch layer(s) ({kinds}), not residual blocks: RKSP reads "
            "the residual stream entering and leaving each block, so each block must be a module whose output is "
            f"x + f(x) (a transformer layer, a ResNet block), not one operation inside it. To fix it, {fix}."
        )
    return blocks


def _resolve_override(model: nn.Module, layers: str | Sequence[str] | Sequence[nn.Module]) -> list[ResidualBlock]:
    return _check_not_torch_layers(model, _named_override(model, layers), layers)


def _named_override(model: nn.Module, layers: str | Sequence[str] | Sequence[nn.Module]) -> list[ResidualBlock]:
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(layers, str):
        try:
            target = _submodule(model, layers)
        except AttributeError as err:
            raise ValueError(
                f"layers={layers!r} is not a sub-module of {type(model).__name__}: {err}. Pass the dotted path of the "
                f"block list, e.g. one of {_describe_candidates(model)}."
            ) from None
        modules = list(target.children()) if isinstance(target, (nn.ModuleList, nn.Sequential)) else [target]
        if not modules:
            raise ValueError(f"layers={layers!r} points to an empty {type(target).__name__}; it holds no blocks.")
        return [ResidualBlock(names[id(m)], m, "") for m in modules]
    if isinstance(layers, nn.Module):
        raise TypeError("layers= must be a dotted path or a *list* of modules; wrap a single block in a list.")
    layers = list(layers)
    if not layers:
        raise ValueError("layers= is an empty list; pass the blocks to profile or leave it as None for auto-discovery.")
    blocks = []
    for item in layers:
        if isinstance(item, str):
            try:
                module = _submodule(model, item)
            except AttributeError:
                raise ValueError(f"layers entry {item!r} is not a sub-module of {type(model).__name__}.") from None
        elif isinstance(item, nn.Module):
            module = item
        else:
            raise TypeError(f"layers entries must be dotted paths or nn.Module instances, got {type(item).__name__}.")
        if id(module) not in names:
            raise ValueError(
                f"layers entry {type(module).__name__} is not a sub-module of {type(model).__name__} (after unwrapping "
                "PEFT/DDP/FSDP); pass modules taken from the model you profile."
            )
        blocks.append(ResidualBlock(names[id(module)], module, ""))
    # blocks from more than one block list are labelled by their list, as auto-discovery labels them: each list's
    # tower then gets its own mask (`mask_routes`) and its own row in `by_stack()`, the report and the plots. The list
    # of a block is its nearest ModuleList / Sequential / ModuleDict ancestor, else its parent (`_enclosing_list`), so
    # `model.layers.{i}.mlp` are one list's blocks. A list inside a discovered block (T5's `encoder.block.{i}.layer`)
    # gives way to the discovered list (`encoder.block`): the sub-modules of every block of a tower are one stack, in
    # T5 as in Llama (`_discovered_list`).
    lists = [_enclosing_list(model, b.name) for b in blocks]
    if len(set(lists)) > 1:
        discovered = _discovered_lists(model)
        lists = [_discovered_list(path, discovered) for path in lists]
    containers = list(dict.fromkeys(lists))
    if len(containers) > 1:
        labels = dict(zip(containers, _stack_labels(containers)))
        blocks = [b._replace(stack=labels[path]) for b, path in zip(blocks, lists)]
    return blocks


def _enclosing_list(model: nn.Module, name: str) -> str:
    """Dotted path of the nearest `ModuleList` / `Sequential` / `ModuleDict` that holds the module `name`, else of its
    parent (`text_model.encoder` -> `text_model`: whole towers named one by one)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:cut])
        if isinstance(model.get_submodule(path), (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            return path
    return name.rsplit(".", 1)[0] if "." in name else ""


def _discovered_lists(model: nn.Module) -> list[str]:
    """Dotted paths of the block lists that auto-discovery finds in `model`; none when it finds no block list (a
    `layers=` override is then the only way to name the blocks)."""
    try:
        blocks = find_residual_blocks(model)
    except ValueError:
        return []
    return list(dict.fromkeys(b.name.rsplit(".", 1)[0] for b in blocks if "." in b.name))


def _discovered_list(path: str, discovered: Sequence[str]) -> str:
    """The discovered block list one of whose blocks holds the list at `path` (`encoder.block` for T5's
    `encoder.block.0.layer`), else `path`: a list that is itself discovered (Swin's stage lists) or lies outside every
    discovered list keeps its own path."""
    return next((outer for outer in discovered if path.startswith(f"{outer}.") and "." in path[len(outer) + 1:]), path)


def _record_classes(model: nn.Module) -> tuple[set[type], set[str], set[str]]:
    """Classes / class names that transformers records as hidden states, and `_no_split_modules` names."""
    classes: set[type] = set()
    class_names: set[str] = set()
    no_split: set[str] = set()
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None)
        if isinstance(spec, dict) and spec.get("hidden_states") is not None:
            entries = spec["hidden_states"]
            for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
                if isinstance(entry, type):
                    classes.add(entry)
                elif isinstance(entry, str):
                    class_names.add(entry)
                elif getattr(entry, "layer_name", None) is None:  # OutputRecorder on a whole block class
                    if getattr(entry, "target_class", None) is not None:
                        classes.add(entry.target_class)
                    if getattr(entry, "class_name", None):
                        class_names.add(entry.class_name)
        split = getattr(type(module), "_no_split_modules", None)
        if split:
            no_split.update(str(s) for s in split)
    return classes, class_names, no_split


def _containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]


def _describe_candidates(model: nn.Module, limit: int = 8) -> str:
    rows = []
    for name, container in _containers(model):
        kinds = sorted({type(c).__name__ for c in container})
        rows.append((len(container), f"{name!r} ({len(container)} x {'/'.join(kinds)})"))
    rows.sort(key=lambda r: -r[0])
    return ", ".join(r[1] for r in rows[:limit]) or "none (the model has no nn.ModuleList / nn.Sequential)"


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        config = config.get_text_config()
    except Exception:  # noqa: BLE001 - plain PretrainedConfig without sub-configs
        pass
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def _stack_labels(paths: list[str]) -> list[str]:
    if len(paths) == 1:
        return [""]
    labels = []
    for path in paths:
        parts = path.split(".")
        label = (
            "decoder" if any("decoder" in p for p in parts)
            else "encoder" if any("encoder" in p for p in parts)
            else ""
        )
        labels.append(label)
    if len(set(labels)) == len(labels) and all(labels):
        return labels
    return list(paths)  # ambiguous (e.g. Swin stages): the list path is the label


def find_residual_blocks(
    model: nn.Module, layers: str | Sequence[str] | Sequence[nn.Module] | None = None
) -> list[ResidualBlock]:
    """Ordered residual blocks of `model`.

    Args:
        model (`nn.Module`):
            Any `PreTrainedModel` (head or base), possibly wrapped by PEFT, DDP, FSDP or `torch.compile`.
        layers (`str`, `list[str]` or `list[nn.Module]`, *optional*):
            Override: dotted path of the block list (`"model.layers"`), dotted paths of individual blocks, or the block
            modules themselves. Paths are relative to the *unwrapped* model.

    Returns:
        `list[ResidualBlock]` in execution order (registration order; encoders are registered before decoders).

    Raises:
        ValueError: when no block list can be identified; the message lists the candidate containers and the
            `layers=` override to use.
    """
    model = unwrap_model(model)
    if layers is not None:
        return _resolve_override(model, layers)

    classes, class_names, no_split = _record_classes(model)
    from transformers.modeling_layers import GradientCheckpointingLayer


    def is_block(module: nn.Module) -> bool:
        cls = type(module)
        inner = getattr(module, "original_module", None)  # PEFT `modules_to_save` on a whole block wraps it
        if cls.__name__ == "ModulesToSaveWrapper" and isinstance(inner, nn.Module):
            return is_block(inner)
        return (
            isinstance(module, tuple(classes))
            or cls.__name__ in class_names
            or isinstance(module, GradientCheckpointingLayer)
            or cls.__name__ in no_split
        )

    containers = _containers(model)
    chosen = [(n, c) for n, c in containers if all(is_block(child) for child in c)]
    if not chosen:  # last resort: a homogeneous list as long as the config says the model is deep
        depth = _num_hidden_layers(model)
        chosen = [
            (n, c)
            for n, c in containers
            if depth is not None and len(c) == depth and len({type(child) for child in c}) == 1
        ]
    # innermost lists win: drop a list when another chosen list lives inside one of its children
    paths = [n for n, _ in chosen]
    chosen = [(n, c) for n, c in chosen if not any(p != n and p.startswith(f"{n}.") for p in paths)]
    if not chosen:
        # the example names this model's longest list of composite modules (the path the user most likely means);
        # a list of torch layers (an MLP's Linear / GELU) holds operations, not blocks, and the model itself ("")
        # has no path
        candidates = [(n, c) for n, c in _containers(model) if n and not all(_is_torch_layer(m) for m in c)]
        found = (f"Could not identify the residual blocks of {type(model).__name__}: no module list matches the blocks "
                 "that transformers records as hidden states, GradientCheckpointingLayer, _no_split_modules or "
                 f"num_hidden_layers. Candidates: {_describe_candidates(model)}.")
        if not candidates:
            raise ValueError(
                f"{found} None of them holds blocks (modules whose output is x + f(x), not single torch layers): pass "
                "the blocks' dotted paths, e.g. `profile(model, layers=['block1', 'block2'])`, "
                "`RKSPCallback(layers=[...])` or `KSSTrainingArguments(kss_layers=[...])`; a skip connection written "
                "in the model's own forward() leaves no block module to profile."
            )
        example = max(candidates, key=lambda nc: len(nc[1]))[0]
        raise ValueError(
            f"{found} Pass the block list explicitly, e.g. `profile(model, layers={example!r})`, "
            f"`RKSPCallback(layers={example!r})`, `KSSTrainingArguments(kss_layers={example!r})` or "
            f"`hf-koopman profile ... --layers {example}`."
        )
    labels = _stack_labels([n for n, _ in chosen])
    blocks = [
        ResidualBlock(f"{path}.{child_name}" if path else child_name, child, label)
        for (path, container), label in zip(chosen, labels)
        for child_name, child in container.named_children()
    ]
    logger.debug("found %d residual blocks in %d list(s): %s", len(blocks), len(chosen), [n for n, _ in chosen])
    return blocks


def nested_block_lists(blocks: Sequence[ResidualBlock]) -> list[ResidualBlock]:
    """Block lists nested inside `blocks`: the fallback when the discovered blocks are not width-preserving.

    Hierarchical vision models (Swin v2, Hiera, FocalNet ...) record whole *stages* as hidden states; a stage
    downsamples, so it is not a residual map, but it holds a homogeneous list of residual blocks. A nested list counts
    when all its children share one class and each child has at least two sub-modules with parameters, one of them
    composite (an attention / MLP block, not a bare conv + norm layer); only the outermost such lists are returned, in
    execution order.
    """
    found: list[tuple[str, nn.Module]] = []
    for outer in blocks:
        for sub_name, sub in outer.module.named_modules():
            if not sub_name or not isinstance(sub, (nn.ModuleList, nn.Sequential)) or len(sub) == 0:
                continue
            if len({type(child) for child in sub}) != 1:
                continue
            with_params = [c for c in next(iter(sub)).children() if any(True for _ in c.parameters())]
            composite = any(any(True for _ in c.children()) for c in with_params)  # attention / MLP sub-modules
            if len(with_params) >= 2 and composite:  # excludes bare conv + norm units
                found.append((f"{outer.name}.{sub_name}", sub))
    paths = [p for p, _ in found]
    found = [(p, c) for p, c in found if not any(q != p and p.startswith(f"{q}.") for q in paths)]
    labels = _stack_labels([p for p, _ in found]) if found else []
    return [
        ResidualBlock(f"{path}.{child_name}", child, label)
        for (path, container), label in zip(found, labels)
        for child_name, child in container.named_children()
    ]
