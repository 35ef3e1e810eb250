"""`hf-koopman` command line.

    hf-koopman profile gpt2 --init --out hf_koopman_out/gpt2-init
    hf-koopman profile ./my-checkpoint --text-file notes.txt --num-samples 4096
    hf-koopman profile llama-2-7b --init --stream --dtype bfloat16       # one block at a time
    hf-koopman architectures                                             # embedded configs usable with --init

Subcommands register themselves in `_COMMANDS` (name -> (add_arguments, run)); add one by writing those two functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hf_koopman.logging_utils import get_logger
from hf_koopman.out_of_memory import is_out_of_memory
from hf_koopman.optional_imports import MissingOptionalDependency, import_optional


__all__ = ["main", "make_parser", "load_model"]

logger = get_logger(__name__)  # handler set by main(); heavy imports stay inside the commands

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
           "fp16": "float16"}


# -------------------------------------------------------------------------------------------------------- model loading
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def _read_json(path: Path) -> dict:
    """`path` parsed as a JSON object, or a `ValueError` naming the file and what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file ({err}); it must be a transformers config.json.") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix the file or "
            "re-create it with model.config.save_pretrained(folder)."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not an object; it is not a transformers config.json."
        )
    return data


def _config_from_json_file(path: Path):
    from transformers import AutoConfig

    data = _read_json(path)
    if "model_type" not in data:
        raise ValueError(f"{path} has no 'model_type' key; it is not a transformers config.json.")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _looks_like_path(spec: str) -> bool:
    """Whether MODEL / --dataset `spec` is written as a filesystem path rather than a name or Hub id.

    `./x`, `../x`, `/x`, `~/x`, `a/b/c` and `*.json` are paths. `owner/name` is a Hub id even when a local folder
    `owner` exists (downloads often land in `org/model` folders); `_local_miss` adds a hint to the errors then.
    """
    normal = spec.replace(os.altsep, os.sep) if os.altsep else spec
    if normal.startswith(("." + os.sep, ".." + os.sep, os.sep, "~")) or normal.endswith(".json"):
        return True
    return len(_path_parts(spec)) >= 3


def _path_parts(spec: str) -> list[str]:
    """The non-empty `/`-separated parts of `spec` (either separator on Windows)."""
    return [part for part in spec.replace(os.altsep or os.sep, os.sep).split(os.sep) if part]


def _local_miss(spec: str) -> str:
    """A sentence for MODEL `spec` read as a Hub id where a local folder was perhaps meant (a typo in a path?):
    `owner/name` when a local folder `owner` exists but holds no `name`, a bare name when a folder of a close name
    exists here."""
    parts = _path_parts(spec)
    if len(parts) == 2 and Path(parts[0]).is_dir():
        return f" There is a local folder {parts[0]!r}, but no {spec!r} in it: check the path if you meant a folder."
    if len(parts) == 1:
        import difflib

        try:
            here = [p.name for p in Path.cwd().iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            here = []
        close = difflib.get_close_matches(parts[0], here, n=1, cutoff=0.8)
        if close:
            return f" There is no local folder {parts[0]!r} here; did you mean {close[0]!r}?"
    return ""


def _is_connection_error(err: BaseException) -> bool:
    """Whether `err` (or an exception it was raised from) is a failure to reach the Hub: no network or offline mode.

    huggingface_hub, httpx, requests and datasets each wrap it in their own types, so the chain is read by class name.
    """
    names = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "ConnectionError",
             "ReadTimeout", "Timeout"}
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)) or {c.__name__ for c in type(current).__mro__} & names:
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _no_hub_hint(spec: str) -> str:
    """What works without the Hub for MODEL `spec`: --init on an embedded architecture, or a local folder."""
    from hf_koopman.profiling.architectures import known_architectures, resolve_architecture_name

    if resolve_architecture_name(spec) is not None:
        return (f"{spec!r} is an embedded architecture: pass --init to profile it at random initialisation without "
                "the Hub, or pass a local folder with pretrained weights")
    return (f"pass --init with an embedded architecture ({', '.join(known_architectures())}) to profile it at random "
            "initialisation without the Hub, or pass a local save_pretrained folder")


def _unreachable(what: str, spec: str, err: BaseException) -> str:
    """The message for a Hub connection failure while loading `what` for MODEL `spec`, with what works offline."""
    return (f"could not reach the Hub to load {what} ({_first_line(err)}). Without network: {_no_hub_hint(spec)}; set "
            "HF_HUB_OFFLINE=1 to skip the connection retries.")


# weight files of a save_pretrained folder (single file or shards); training_args.bin is not one of them
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")

# folder names that say nothing about the model (Trainer and export layouts): the run is named `<parent>/<folder>`
_GENERIC_FOLDER_NAMES = ("model", "checkpoint", "final", "best", "last", "latest")


def _folder_display_name(folder: Path) -> str:
    """The name of a run on `folder`: its last component, or `<parent>/<last>` when the last is generic
    (`model`, `checkpoint`, `final`, `checkpoint-<N>`, ...), so that runs on different checkpoints stay apart."""
    folder = folder.resolve()
    name = folder.name
    generic = name.lower() in _GENERIC_FOLDER_NAMES or re.fullmatch(r"checkpoint[-_]\d+", name.lower()) is not None
    return f"{folder.parent.name}/{name}" if generic and folder.parent.name else name


def resolve_config(spec: str, *, init: bool) -> tuple[Any, str | None, str]:
    """`(config, weights source or None, display name)` for MODEL = local path, embedded architecture or Hub id."""
    from transformers import AutoConfig

    from hf_koopman.profiling.architectures import (
        known_architectures,
        load_architecture_config,
        resolve_architecture_name,
    )

    path = Path(spec).expanduser()
    if path.is_file():
        config = _config_from_json_file(path)
        if not init:  # a WARNING, not INFO: the user may expect trained weights next to the file
            logger.warning(
                "%s: config.json only: profiling the architecture at random initialisation (no weights). Pass the "
                "save_pretrained folder with model.safetensors to profile trained weights, or --init to silence this.",
                path,
            )
        # "config" says nothing: name the run after the folder holding config.json (or the model type)
        stem = path.stem if path.stem != "config" else (_folder_display_name(path.parent) or config.model_type)
        return config, None, f"{stem} (init)"
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            from hf_koopman.profiling.streaming import missing_config_message

            shadowed = resolve_architecture_name(spec) if not _looks_like_path(spec) else None
            hint = (f" The folder {spec!r} here shadows the embedded architecture {shadowed!r} (an earlier --out?): "
                    "run from another directory, or rename the folder." if shadowed else "")
            raise ValueError(missing_config_message(path) + hint)
        data = _read_json(config_file)
        if "model_type" not in data:
            raise ValueError(
                f"{config_file} has no 'model_type' key; re-create it with model.config.save_pretrained()."
            )
        from huggingface_hub.errors import StrictDataclassError

        from hf_koopman.profiling.streaming import needs_remote_code, remote_code_message

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # never the folder's own code
        except (ValueError, KeyError, TypeError, OSError, StrictDataclassError) as err:  # a field of the wrong type
            if needs_remote_code(err):
                raise ValueError(remote_code_message(path)) from None
            raise ValueError(
                f"{config_file} could not be loaded as a transformers config ({err}); fix the file or re-create it "
                "with model.config.save_pretrained(folder)."
            ) from None
        if not init and not any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES):
            raise ValueError(
                f"{path} has a config.json but no weights (no model.safetensors or pytorch_model.bin): pass --init to "
                "profile the architecture at random initialisation, or point to a folder with model.safetensors "
                "(written by model.save_pretrained(folder))."
            )
        return config, (None if init else str(path)), _folder_display_name(path)
    if _looks_like_path(spec):
        raise ValueError(
            f"{spec}: no such file or folder. Check the path, or pass an embedded architecture name (see "
            "`hf-koopman architectures`) or a Hub id."
        )
    canonical = resolve_architecture_name(spec)
    if canonical is not None and (init or _offline()):
        if not init:
            raise ValueError(
                f"{spec!r} is an embedded architecture config without weights and the Hub is offline: pass --init to "
                "profile it at random initialisation, or a local folder with pretrained weights."
            )
        return load_architecture_config(canonical), None, f"{canonical} (init)"
    if _offline():
        raise ValueError(
            f"{spec!r} is not a local path nor an embedded architecture ({', '.join(known_architectures())}) and the "
            f"Hub is offline (HF_HUB_OFFLINE=1).{_local_miss(spec)}"
        )
    from hf_koopman.profiling.streaming import needs_remote_code, remote_code_message

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False)  # never a repository's own code
    except ValueError as err:
        if needs_remote_code(err):
            raise ValueError(remote_code_message(spec)) from None
        raise
    except OSError as err:
        if _is_connection_error(err):
            raise ValueError(_unreachable(f"{spec!r}", spec, err) + _local_miss(spec)) from None
        raise ValueError(f"could not load a config for {spec!r} from the Hub: {err}{_local_miss(spec)}") from err
    return config, (None if init else spec), spec + (" (init)" if init else "")


# config attributes that hold the depth of one stack: `--num-layers N` sets each the config has, so that an
# encoder-decoder (T5: num_layers / num_decoder_layers; BART: encoder_layers / decoder_layers) gets N blocks per stack
_STACK_DEPTH_KEYS = ("num_hidden_layers", "num_layers", "num_encoder_layers", "num_decoder_layers", "encoder_layers",
                     "decoder_layers")


# config attributes with one entry per layer (Qwen2 / Gemma 3 `layer_types`, GPT-Neo `attention_layers`)
_PER_LAYER_KEYS = ("layer_types", "attention_layers")


def _set_num_layers(config: Any, num_layers: int) -> None:
    """Override the depth of every stack of `config` with `num_layers` (`--num-layers`)."""
    if num_layers < 1:
        raise ValueError(f"--num-layers must be >= 1, got {num_layers}.")
    config.num_hidden_layers = num_layers
    for key in _STACK_DEPTH_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, num_layers)
    for key in _PER_LAYER_KEYS:  # one entry per layer: cut, or repeat the config's own pattern, to the new depth
        pattern = getattr(config, key, None)
        if isinstance(pattern, list) and pattern and len(pattern) != num_layers:
            setattr(config, key, [pattern[i % len(pattern)] for i in range(num_layers)])


def load_model(
    spec: str, *, init: bool = False, dtype: str = "float32", num_layers: int | None = None, seed: int = 0,
    device: str = "cpu", text_inputs: bool = True,
) -> tuple[Any, Any, str]:
    """Build or load MODEL for profiling -> `(model, tokenizer or None, display name)`, on `device`.

    The base `AutoModel` is used: the residual blocks live there, and the LM / task head does not affect them. A model
    built with `--init` is initialised on the CPU (the same weights for a seed whatever the device), then moved.
    `text_inputs=False` (no text to tokenise) keeps a missing tokenizer quiet: it only matters for text.
    """
    model, tokenizer, name, _ = _load_model(spec, init=init, dtype=dtype, num_layers=num_layers, seed=seed,
                                            device=device, text_inputs=text_inputs)
    return model, tokenizer, name


def _run_config(spec: str, *, init: bool, num_layers: int | None) -> tuple[Any, str | None, str]:
    """`resolve_config` for a run, with `--num-layers` applied; the run name says what was profiled: ` (init)` for a
    folder profiled with --init (its weights are ignored, so its name alone would read as the checkpoint; config.json,
    architecture and Hub names are marked by `resolve_config`) and ` [N layers]` for --num-layers."""
    config, weights, name = resolve_config(spec, init=init)
    if init and Path(spec).expanduser().is_dir():
        name = f"{name} (init)"
    if num_layers is not None:
        if weights is not None:
            raise ValueError("--num-layers only applies to --init models (it would drop pretrained blocks).")
        _set_num_layers(config, num_layers)
        per_stack = " per stack" if getattr(config, "is_encoder_decoder", False) else ""
        name = f"{name} [{num_layers} layer{'s' if num_layers != 1 else ''}{per_stack}]"
    return config, weights, name


def _load_model(
    spec: str, *, init: bool, dtype: str, num_layers: int | None, seed: int, device: str, text_inputs: bool,
    text_file: bool = False,
) -> tuple[Any, Any, str, str]:
    """`load_model`, plus where the weights come from: `"pretrained"` (a checkpoint) or `"init"` (built from a config
    at random initialisation), for `meta["weights"]` of the profile. With `text_file`, a model that brings no
    tokenizer at all is said to read the text as byte-level ids."""
    import torch

    config, weights, name = _run_config(spec, init=init, num_layers=num_layers)
    torch_dtype = getattr(torch, _DTYPES[dtype])
    with _model_memory(name):
        model = _build_or_load(config, weights, spec, torch_dtype, seed).to(device)
    source = _tokenizer_source(spec, weights)
    tokenizer = _load_tokenizer(source, warn=text_inputs) if source is not None else None
    if source is None and text_file:
        _say_byte_ids(spec)
    return model.eval(), tokenizer, name, ("init" if weights is None else "pretrained")


def _say_byte_ids(spec: str) -> None:
    """Warn that text inputs are read as byte-level ids for MODEL, which brings no tokenizer (an embedded config, a
    config.json)."""
    logger.warning("no tokenizer is read for %s (an embedded config, a config.json, or a Hub id with --init): the "
                   "text is read as byte-level ids (one id per byte, within the vocabulary), not as the model's "
                   "tokens; profile a local folder that holds the model's tokenizer files for real tokens.", spec)


@contextlib.contextmanager
def _model_memory(name: str) -> Iterator[None]:
    """An allocation failure while the model is built, loaded or moved becomes a ValueError about the model's own
    memory (not the probe's, which `main` reports)."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise ValueError(
            f"out of memory while building or loading {name} ({_first_line(err)}): its weights need more memory than "
            "is free. Use --stream (one block at a time, on the CPU), a smaller --dtype for "
            "pretrained weights (e.g. bfloat16), or --init --num-layers N for a quick look at the architecture."
        ) from err


def _build_or_load(config: Any, weights: str | None, spec: str, torch_dtype: Any, seed: int) -> Any:
    """The model of `config` at random initialisation (seeded), or with the weights at `weights`."""
    import torch
    from transformers import AutoModel

    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = AutoModel.from_config(config, trust_remote_code=False)
            except (AssertionError, ValueError, TypeError, IndexError) as err:  # an inconsistent config
                raise ValueError(
                    f"transformers could not build a {getattr(config, 'model_type', 'model')} from the config of "
                    f"{spec} ({type(err).__name__}: {_first_line(err) or 'no message'}): its fields are inconsistent "
                    "(e.g. a pad_token_id or another token id at or above vocab_size). Fix the config.json, or use an "
                    "embedded config (`hf-koopman profile gpt2 --init`)."
                ) from err
        model = model.to(torch_dtype)
    else:
        if Path(weights).is_dir():
            _check_safetensors(Path(weights))
        try:
            model = _load_base_model(AutoModel, weights, torch_dtype)
        except OSError as err:  # a Hub id whose config is cached but whose weights cannot be downloaded
            if _is_connection_error(err):
                raise ValueError(_unreachable(f"the weights of {weights!r}", spec, err)) from None
            if not Path(weights).expanduser().exists() and "does not appear to have a file named" in str(err):
                # after its retries huggingface_hub reports a refused connection as a missing file
                raise ValueError(
                    f"could not load the weights of {weights!r} ({_first_line(err)}). They are not in the local cache "
                    "and the Hub did not provide them: no network or a refused connection (HF_HUB_OFFLINE=1 skips the "
                    f"retries), or a repository without weight files. Without network: {_no_hub_hint(spec)}."
                ) from None
            raise ValueError(f"could not load the weights of {weights}: {err}") from err
    return model


class _QuietHeadReport(logging.Filter):
    """Drops transformers' load report when its rows are only UNEXPECTED / MISSING (named by `_load_base_model` in its
    own terms); a report with MISMATCH or CONVERSION rows, which transformers raises on right after, stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


#: model -> the weights of its residual blocks and embeddings that its checkpoint lacked (randomly initialised), for
#: the profile's `meta["weights_not_in_checkpoint"]`
_NOT_IN_CHECKPOINT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _record_weights(result: Any, model: Any, weights: str) -> None:
    """`meta["weights"]` (`"pretrained"` / `"init"`) and, where the checkpoint lacked some of the profiled weights,
    `meta["weights_not_in_checkpoint"]` (their names), which the report and the summary line state."""
    result.meta["weights"] = weights
    missing = _NOT_IN_CHECKPOINT.get(model)
    if missing:
        result.meta["weights_not_in_checkpoint"] = list(missing)


def _load_base_model(auto_model: Any, weights: str, torch_dtype: Any) -> Any:
    """`AutoModel.from_pretrained(weights)` with transformers' load report replaced by what it means here.

    A checkpoint saved from a task model (`...ForCausalLM` with an untied head, a classifier) holds head tensors the
    base model does not have; transformers reports them as UNEXPECTED, which reads like a failure although the residual
    blocks load completely: they are named at info level. Weights the base model needs but the checkpoint lacks are
    randomly initialised: a warning when they sit in a residual block or an embedding (they change the profile), info
    otherwise (a pooler that a masked-LM checkpoint never had runs after the blocks). Other transformers warnings, and
    a report with shape mismatches, are left as they are.
    """
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _QuietHeadReport()
    report_logger.addFilter(quiet)
    try:
        model, info = auto_model.from_pretrained(weights, dtype=torch_dtype, output_loading_info=True,
                                                 trust_remote_code=False)
    except RuntimeError as err:  # transformers raises after its report on shape mismatches and failed conversions
        if is_out_of_memory(err):  # the allocator's RuntimeError: `_model_memory` names the model's memory
            raise
        raise ValueError(f"could not load the weights of {weights}: {err} The tensors named there do not fit the "
                         "model that config.json describes: check that the config belongs to these weights.") from err
    finally:
        report_logger.removeFilter(quiet)
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.info("not loaded: %d checkpoint tensor(s) the base model has no place for (a task head: %s); the "
                    "residual blocks are in the base model", len(unexpected), _shown(unexpected))
    if missing:
        from hf_koopman.profiling import find_residual_blocks

        try:
            prefixes = tuple(f"{block.name}." for block in find_residual_blocks(model))
        except ValueError:  # unknown structure: every missing weight may matter
            prefixes = ("",)
        profiled = [k for k in missing if k.startswith(prefixes) or "embed" in k or k.split(".")[0] in ("wte", "wpe")]
        other = [k for k in missing if k not in profiled]
        if profiled:
            _NOT_IN_CHECKPOINT[model] = profiled
            logger.warning("%d weight(s) of %s are not in %s and were randomly initialised (%s): the profile describes "
                           "a partly random model. Check that the checkpoint is complete.", len(profiled),
                           type(model).__name__, weights, _shown(profiled))
        if other:
            logger.info("randomly initialised, outside the residual blocks and the embeddings (not in %s): %s",
                        weights, _shown(other))
    return model


def _tokenizer_source(spec: str, weights: str | None) -> str | None:
    """Where MODEL's tokenizer is: its weights (a folder or Hub id), or the folder of a run with --init."""
    local = Path(spec).expanduser()
    return weights or (str(local) if local.is_dir() else None)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def _check_safetensors(folder: Path) -> None:
    """Open the header of every `*.safetensors` file in `folder`;
    a truncated or overwritten one becomes a clear error."""
    from hf_koopman.files import safetensors_error, unreadable_safetensors

    for file in sorted(folder.glob("*.safetensors")):
        err = safetensors_error(file)
        if err is not None:
            raise ValueError(unreadable_safetensors(file, err))


def _load_tokenizer(source: str, *, warn: bool = True) -> Any:
    """The tokenizer saved with the model, or None when there is none (a warning when `warn`: text input is given)."""
    from transformers import AutoTokenizer

    log = logger.warning if warn else logger.debug  # without text input the byte-level fallback never happens
    path = Path(source)
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        log(
            "%s has no tokenizer files (%s): text inputs fall back to byte-level ids. Save the tokenizer there with "
            "tokenizer.save_pretrained(%s) to profile on real tokens.", path, ", ".join(_TOKENIZER_FILES[:4]), path,
        )
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - many checkpoints ship no tokenizer; text input then falls back
        log("could not load a tokenizer from %s (%s): text inputs fall back to byte-level ids", source, err)
        return None
    try:
        empty = len(tokenizer) == 0 or not tokenizer("a b c")["input_ids"]
    except Exception:  # noqa: BLE001
        empty = True
    if empty:
        log("the tokenizer in %s is empty: text inputs fall back to byte-level ids", source)
        return None
    return tokenizer


def _read_text_chunks(path: Path, max_length: int, tokenizer: Any) -> list[str]:
    """--text-file as pieces of about `max_length` tokens, as `profile(model, text, tokenizer=...)` splits a text: 4
    characters per token with a tokenizer, 1 for byte-level ids (one id per byte), so that a piece fills one sequence
    instead of being cut at `max_length` with most of its text unread."""
    _check_text_file(path)
    from hf_koopman.profiling.inputs import split_text

    chars_per_token = 4 if tokenizer is not None else 1
    chunks = split_text(path.read_text(encoding="utf-8", errors="replace"), max_length, chars_per_token)
    if not chunks:
        raise ValueError(f"--text-file {path} is empty.")
    return chunks


# suffixes of the data files --dataset reads; a --dataset name ending in one is a path, never a Hub dataset name
#: the `datasets` builder of a local data file by its format suffix; .txt and any other file (.md, .log, no suffix)
#: are read as plain text, one example per line: a suffix is never taken for a name to look up on the Hub
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".arrow": "arrow"}
_DATA_FILE_SUFFIXES = (".txt", *_FILE_BUILDERS)
#: compressions `datasets` decompresses when it reads a data file (the format is the suffix before them)
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
#: archives hold files, not lines of text: refused rather than read as text
_ARCHIVE_SUFFIXES = (".tar", ".zip", ".tgz", ".7z", ".rar")


def _plain_suffix(path: Path) -> str:
    """The format suffix of a data file, after any compression suffix (`data.jsonl.gz` -> `.jsonl`), lower case."""
    suffix = path.suffix.lower()
    if suffix in _COMPRESSION_SUFFIXES:
        suffix = Path(path.stem).suffix.lower()
    return suffix


def _check_data_file_split(name: str, split: str | None) -> None:
    """A data file (`--dataset data.jsonl`) is read as one split, "train": any other --split is an error, not ignored;
    slices of it ("train[:100]") are honoured."""
    if split is not None and split.split("[", 1)[0] != "train":
        raise ValueError(
            f"--dataset {name} is a data file, and datasets reads a data file as one split named 'train', so there is "
            f"no split {split!r}: drop --split (or pass --split train), or pass a dataset folder written by "
            f"dataset_dict.save_to_disk(folder) that has a {split!r} split."
        )


def _load_dataset(name: str, split: str | None):
    """--dataset as a dataset: a save_to_disk folder, a data file (one split, "train") or a Hub name; `split` is
    --split (`None`: train)."""
    datasets = import_optional("datasets", extra="datasets", feature="hf-koopman profile --dataset")

    path = Path(name).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            own = None if loaded.split is None else str(loaded.split)
            # one Dataset has no splits to pick from: --split is refused, not ignored, unless it names the Dataset's
            # own split (train for one saved without a name, as the default split)
            if split is not None and split != (own or "train"):
                raise ValueError(
                    f"--dataset {name} holds one dataset (dataset.save_to_disk), "
                    + (f"the {own!r} split, " if own else "")
                    + f"not a DatasetDict with a {split!r} split: drop --split, or save a DatasetDict that has it "
                    "(dataset_dict.save_to_disk(folder))."
                )
            return loaded
        split = split or "train"
        if split not in loaded:
            splits = list(loaded)
            raise ValueError(
                f"--dataset {name} has no split {split!r}; its splits are {', '.join(splits) or 'none'}: pick one "
                f"with --split{f', e.g. --split {splits[0]}' if splits else ''}."
            )
        return loaded[split]
    if path.is_file():
        _check_data_file_split(name, split)
        suffix = _plain_suffix(path)
        if suffix in _ARCHIVE_SUFFIXES or path.suffix.lower() in _ARCHIVE_SUFFIXES:
            raise ValueError(f"--dataset {name} is an archive: extract it and pass the data file (or the folder "
                             "dataset.save_to_disk wrote).")
        builder = _FILE_BUILDERS.get(suffix, "text")
        if builder == "text" and suffix not in (".txt", ".md", ".text"):
            logger.warning("--dataset %s: read as plain text, one example per line (%s)", name,
                           "no file extension" if not suffix else f"{suffix} is not one of "
                           f"{', '.join(_DATA_FILE_SUFFIXES)}")
        options = {"delimiter": "\t"} if suffix == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split=split or "train", **options)
    split = split or "train"
    if _plain_suffix(path) in _DATA_FILE_SUFFIXES:
        raise ValueError(
            f"--dataset {name}: no such file or folder; the data file does not exist (a name ending in "
            f"{''.join(path.suffixes[-2:]) if path.suffix.lower() in _COMPRESSION_SUFFIXES else path.suffix} is a "
            "path, not a dataset name): check the path."
        )
    if _looks_like_path(name):
        raise ValueError(f"--dataset {name}: no such file or folder; check the path.")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets wraps offline / network failures in several types (ConnectionError, ...)
        offline = _offline() or os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes")
        if not (_is_connection_error(err) or (offline and isinstance(err, OSError))):
            raise
        why = ("the Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline
               else f"the Hub could not be reached ({err})")
        raise ValueError(
            f"--dataset {name!r} is a dataset name, which needs the Hub, and {why}. Use local data instead: a file "
            "(--dataset path/to/file.txt, .jsonl, .csv or .parquet, or --text-file path/to/file.txt) or a local "
            f"dataset folder written by dataset.save_to_disk(folder).{_local_miss(name)}"
        ) from None


def _cap_max_length(args: argparse.Namespace, model_or_config: Any) -> None:
    """Cut `args.max_length` to the model's position table, as `profile()` does, before the text is split: pieces
    then fill a sequence (not cut at the table with most of their text unread), and a streamed forward never indexes
    past the table. A warning when the user gave --max-length, an info note for the default."""
    from hf_koopman.profiling.probes import max_sequence_length

    # the usable positions as profile() reads them (RoBERTa-style tables lose padding_idx + 1 given a model)
    limit = max_sequence_length(model_or_config) if model_or_config is not None else None
    if limit is None or args.max_length <= limit:
        return
    log = logger.warning if getattr(args, "max_length_given", True) else logger.info
    log("--max-length %d exceeds the %d positions of this model: sequences are cut at %d tokens (pass --max-length "
        "%d or less to silence this).", args.max_length, limit, limit, limit)
    args.max_length = limit


# ---------------------------------------------------------------------------------------------------------- profile
_DEFAULT_MAX_LENGTH = 256


def _add_model_input_arguments(parser: argparse.ArgumentParser, *, stream: bool = False) -> None:
    """MODEL and the probe-input arguments shared by `profile` and `max-lr` (`stream=True`: --max-tokens' help says
    how --stream reads it)."""
    parser.add_argument("model", metavar="MODEL",
                        help="local save_pretrained folder or config.json, an embedded architecture name (see "
                             "`hf-koopman architectures`), or a Hub id (when online)")
    parser.add_argument("--init", action="store_true",
                        help="profile the architecture at random initialisation (ignore pretrained weights)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text-file", type=Path, help="profile on this text file (default: synthetic probe tokens)")
    source.add_argument("--dataset", help="datasets name, save_to_disk folder or data file to profile on "
                        "(.csv, .tsv, .json, .jsonl, .parquet, .arrow, optionally .gz; any other file as plain "
                        "text, one example per line)")
    parser.add_argument("--split", help="split of --dataset (default: train; a data file has only train)")
    parser.add_argument("--num-samples", type=int,
                        help="token states N per layer (default: 2048, or 2.62 x the hidden size for models wider "
                             "than 782, where the sampling error term of the paper's Theorem 4 falls below 1; the "
                             "verdict reads N >= 2 x and is free of the sampling caution at N >= 8 x the hidden size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, probe, subsampling and DMD (default: 0)")
    parser.add_argument("--layers", help="dotted path of the block list inside the model when auto-discovery fails, "
                                         "e.g. layers or model.layers")
    parser.add_argument("--num-layers", type=int,
                        help="with --init: blocks per stack, i.e. num_hidden_layers and, for encoder-decoders, the "
                             "decoder depth too (quick look at big models)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype (default: float32)")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the forward and the analysis, e.g. cuda or cuda:1 (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward for text inputs (default: 8)")
    parser.add_argument("--max-length", type=int,
                        help=f"tokens per sequence for text inputs, at most the model's positions (default: "
                             f"{_DEFAULT_MAX_LENGTH})")
    streamed = ("; with --stream, batches of --batch-size sequences until --num-samples tokens, all in the one "
                "forward a streamed run makes, which holds them at once") if stream else ""
    parser.add_argument("--max-tokens", type=int,
                        help=f"stop reading inputs once this many tokens reached every layer (default: 16 x "
                             f"--num-samples, at most 32768 and at least --num-samples{streamed})")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (weight loading included)")
    parser.add_argument("--stream", action="store_true",
                        help="stream the model one block at a time (for models that do not fit in memory)")


def _add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_input_arguments(parser, stream=True)
    parser.add_argument(
        "--rank", type=int, default=None, metavar="R",
        help="analyse the rank-R approximation instead of the full spectrum (default: full spectrum). The paper's "
             "stated recipe is R = 32; it keeps the R directions of largest output energy and is biased toward "
             "expanding modes, so the verdict thresholds do not apply to it")
    parser.add_argument("--learning-rate", type=float,
                        help="planned learning rate (used by a calibrated risk estimator)")
    parser.add_argument("--estimator", type=Path,
                        help="risk-estimator JSON fitted on your own runs (RiskEstimator.fit / save_json; default: the "
                             "estimator shipped with hf_koopman)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: hf_koopman_out/NAME, with -init under --init or for a "
                             "config.json; NAME is org--name for a Hub id org/name; for a local folder its last two "
                             "path components joined by -- (e.g. meta-llama--Llama-2-7b for models/meta-llama/"
                             "Llama-2-7b), just its name for a folder in the current folder (parent--name for "
                             "checkpoint-N, model, final ...), and org--name for a Hub cache snapshot "
                             "models--org--name/snapshots/HASH; NAME-2, NAME-3 ... where it holds an earlier "
                             "profile or other files; an explicit --out replaces an earlier profile)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _check_model_input_arguments(args: argparse.Namespace) -> bool | None:
    """Validate the shared arguments; hide the progress bars when asked. Returns False (no bars) or None (bars as
    transformers' progress-bar switch says: `HF_HUB_DISABLE_PROGRESS_BARS=1` hides them)."""
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be >= 1 (omit it for the full spectrum), got {args.rank}.")
    if args.num_samples is not None and args.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2, got {args.num_samples}.")
    if args.max_tokens is not None and args.num_samples is not None and args.max_tokens < args.num_samples:
        raise ValueError(f"--max-tokens ({args.max_tokens}) must be >= --num-samples ({args.num_samples}).")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (sequences per forward), got {args.batch_size}.")
    args.max_length_given = args.max_length is not None  # only a --max-length the user gave is worth a warning
    if args.max_length is None:
        args.max_length = _DEFAULT_MAX_LENGTH
    if args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2 (tokens per sequence), got {args.max_length}.")
    learning_rate = getattr(args, "learning_rate", None)
    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"--learning-rate must be a positive finite number (e.g. 3e-4), got {learning_rate}; omit it "
                         "when no learning rate is planned.")
    if args.split is not None and args.dataset is None:
        raise ValueError(f"--split {args.split} selects a split of --dataset, and no --dataset was given, so it would "
                         f"be ignored; pass --dataset NAME_OR_FOLDER --split {args.split}, or drop --split.")
    if args.dataset is not None and Path(args.dataset).expanduser().is_file():  # before the model loads
        _check_data_file_split(args.dataset, args.split)
    if args.text_file is not None:
        _check_text_file(args.text_file)
    if hasattr(args, "out") and args.out is None:  # profile, not max-lr: one folder per model, not one shared folder
        args.out = _free_default_out(_default_out(args.model, init=args.init))
    if getattr(args, "out", None) is not None:
        args.out = args.out.expanduser()  # --out=~/x reaches us unexpanded (the shell expands ~ only at a word start)
        _check_out_folder(args.out, plots=not getattr(args, "no_plots", False))
    _check_device(args.device, stream=getattr(args, "stream", False))
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        args.restore_progress = hf_logging.is_progress_bar_enabled()  # main() switches it back on afterwards
        hf_logging.disable_progress_bar()  # also the "Loading weights" bar of from_pretrained
    return False if args.no_progress else None  # None: transformers' switch (HF_HUB_DISABLE_PROGRESS_BARS) decides


def _default_out(spec: str, *, init: bool) -> Path:
    """`hf_koopman_out/<name>`, with `-init` under --init or for a config.json (as the quickstart's
    `hf_koopman_out/gpt2-init`); `<name>` is `_local_out_name` for a local folder (or a config.json's folder), a Hub id
    as `org--name` (as the Hub cache names it), an embedded architecture by its name. Different models land in
    different folders; a second profile of the same model goes next to the first (`_free_default_out`)."""
    path = Path(spec).expanduser()
    if path.name == "config.json":  # a config alone builds the model at initialisation
        path, init = path.parent, True
    if path.is_file():  # another file: named without its suffix, so MODEL's own error is the one reported
        name = f"{_local_out_name(path.parent)}--{path.stem}"
    else:
        name = _local_out_name(path) if path.exists() else spec.strip("/").replace("/", "--")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return Path("hf_koopman_out") / f"{slug}{'-init' if init else ''}"


def _free_default_out(out: Path) -> Path:
    """The default folder `out`, or, where it holds anything (an earlier profile, or files of the user's), the first
    of `<out>-2`, `<out>-3`, ... that does not exist: the profiles of one model before and after fine-tuning both
    stay. An explicit --out replaces an earlier profile (with a warning), as `SpectralProfile.save` does. (Two runs
    started together may still pick the same free folder: the folder is chosen here, and written at the end.)"""
    try:
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError:  # unreadable: leave it to the save, which names the problem
        return out
    if not taken:
        return out
    k = 2
    while out.with_name(f"{out.name}-{k}").exists():
        k += 1
    kept = out.with_name(f"{out.name}-{k}")
    held = "an earlier profile" if (out / "profile.json").exists() else "other files"
    logger.warning("%s holds %s: this profile is written to %s instead (--out %s writes there).", out, held, kept, out)
    return kept


def _local_out_name(folder: Path) -> str:
    """The `--out` name of a local model folder, which keeps apart two organisations' models of the same name as a
    Hub id `org/name` does:

    - a Hugging Face cache snapshot `.../models--org--name/snapshots/<hash>` (or a folder inside one): `org--name`
      (plus the folders below the snapshot), the name the Hub cache gives it;
    - a folder in the current folder (or the current folder itself): its name, or `<parent>--<name>` for a generic
      name (`checkpoint-500`, `model`, `final`, ...) as the run is named;
    - any other folder: its last two components, `<parent>--<name>`, of its path relative to the current folder (the
      absolute path when outside it), e.g. `models/meta-llama/Llama-2-7b` -> `meta-llama--Llama-2-7b`.
    """
    folder = folder.resolve()
    parts = folder.parts
    for i in range(len(parts) - 2):  # the Hub cache: models--<org>--<name>/snapshots/<commit hash>/...
        if parts[i].startswith("models--") and len(parts[i]) > len("models--") and parts[i + 1] == "snapshots":
            return "--".join([parts[i].removeprefix("models--"), *parts[i + 3:]])
    try:
        relative = folder.relative_to(Path.cwd().resolve()).parts
    except ValueError:  # outside the current folder
        relative = parts[1:]  # without the root
    if len(relative) <= 1:
        return _folder_display_name(folder).replace("/", "--")
    return "--".join(relative[-2:])


def _check_text_file(path: Path) -> None:
    """--text-file must name an existing regular file."""
    if path.is_dir():
        raise ValueError(f"--text-file {path} is a folder; pass a text file, or --dataset {path} for a folder written "
                         "by dataset.save_to_disk(folder).")
    if not path.exists():
        raise ValueError(f"--text-file {path} does not exist; check the path.")
    if not path.is_file():
        raise ValueError(f"--text-file {path} is not a regular file; pass a text file.")


def _check_out_folder(out: Path, plots: bool = True) -> None:
    """--out must be a folder, or a path where one can be created (no existing file on the way)."""
    if not out.exists() and out.suffix.lower() == ".json":
        raise ValueError(f"--out {out} names a JSON file, but profile writes profile.json, report.md and the plots "
                         f"into a folder; pass a folder, e.g. --out {out.with_suffix('')}.")
    if out.exists() and not out.is_dir():
        folder = out.with_suffix("") if out.suffix else Path(f"{out}_profile")
        raise ValueError(f"--out {out} is an existing file, but profile writes profile.json, report.md and the plots "
                         f"into a folder; pass a folder path, e.g. --out {folder}.")
    file = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if file is not None:
        raise ValueError(f"--out {out}: {file} is an existing file, so no folder can be created below it; pass "
                         "a folder path with --out.")
    from hf_koopman.profiling.report import files_not_from_a_profile

    foreign = files_not_from_a_profile(out, plots) if out.is_dir() else []
    if foreign:
        raise ValueError(f"--out {out} holds {', '.join(foreign)} but no profile.json, so they are not an earlier "
                         "profile's, and profile would replace them; pass another folder with --out, or move them.")


def _check_device(device: str, stream: bool = False) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device ({err}); use e.g. cpu, cuda or cuda:0.") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu, or install a CUDA build of torch on a machine with a GPU.")
    if stream and parsed.type != "cpu":
        raise ValueError("--stream loads one block at a time on the CPU (for models larger than memory); "
                         "drop --device, or drop --stream to profile on the GPU.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: no MPS device is available to torch (torch.backends.mps.is_available() "
                         "is False); use --device cpu, or run on Apple silicon with a macOS build of torch.")
    if parsed.type == "meta":
        raise ValueError("--device meta holds shapes without data, so no forward pass or analysis can run on it; use "
                         "--device cpu or cuda.")


def _load_model_and_inputs(args: argparse.Namespace) -> tuple[Any, Any, str, Any, str]:
    """`(model, tokenizer, display name, inputs, weights)` from MODEL, --text-file / --dataset (None: synthetic probe);
    `weights` is `"pretrained"` or `"init"` (see `_load_model`)."""
    model, tokenizer, name, weights = _load_model(
        args.model, init=args.init, dtype=_DTYPES[args.dtype], num_layers=args.num_layers, seed=args.seed,
        device=args.device, text_inputs=args.text_file is not None or args.dataset is not None,
        text_file=args.text_file is not None,
    )
    inputs: Any = None
    if args.text_file is not None or args.dataset is not None:
        _cap_max_length(args, model)
    if args.text_file is not None:
        inputs = _read_text_chunks(args.text_file, args.max_length, tokenizer)
    elif args.dataset is not None:
        inputs = _load_dataset(args.dataset, args.split)
    else:
        _check_default_probe(model)
    return model, tokenizer, name, inputs, weights


def _check_default_probe(model: Any) -> None:
    """Fail before profiling, in CLI terms, when no synthetic probe exists for `model` and no input flag was given."""
    from hf_koopman.profiling import default_probe_inputs
    from hf_koopman.profiling.probes import NoDefaultProbeError

    try:
        default_probe_inputs(model, num_tokens=2)  # a tiny batch: this only asks whether a probe can be built
    except NoDefaultProbeError as err:
        reason = err.reason  # without the library's Python-API advice
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        takes = getattr(model, "main_input_name", None)
        if takes in ("input_ids", "pixel_values"):
            fix = ("pass inputs with --text-file path/to/file.txt or --dataset (a data file, or a save_to_disk folder "
                   "with text, input_ids or pixel_values columns)")
        else:
            fix = (f"--text-file and --dataset supply text, input_ids or pixel_values, and this model takes {takes!r}: "
                   "profile it from Python with hf_koopman.profile(model, inputs) and a batch of its own inputs")
        raise ValueError(f"{reason}, so {model_type!r} models have no default probe input; {fix}.") from None


def _run_profile(args: argparse.Namespace) -> int:
    from hf_koopman.profiling import profile
    from hf_koopman.risk import TENTATIVE, in_fitted_range, load_estimator, low_precision_dtype, shown_probability

    rank = args.rank
    progress = _check_model_input_arguments(args)
    estimator = None if args.estimator is None else load_estimator(args.estimator.expanduser())  # before the model
    if args.stream:
        result = _run_streaming(args, rank, progress)
    else:
        model, tokenizer, name, inputs, weights = _load_model_and_inputs(args)
        result = profile(
            model,
            inputs,
            num_samples=args.num_samples,
            rank=rank,
            seed=args.seed,
            layers=args.layers,
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            max_length=args.max_length,
            max_tokens=args.max_tokens,
            learning_rate=args.learning_rate,
            model_name=name,
            progress=progress,
        )
        _record_weights(result, model, weights)  # for the report: at initialisation it describes the architecture
    if estimator is not None:
        result.set_risk_estimator(estimator)
    try:
        written = result.save(args.out, plots=not args.no_plots)
    except OSError as err:  # a read-only or full disk, a file that appeared at --out since the check ...
        raise ValueError(
            f"--out {args.out}: could not write the profile ({err}); pass a writable folder with --out."
        ) from None
    score = "n/a" if result.score is None else f"{result.score:.3f}"
    notes = []
    if result.verdict_reason.startswith(TENTATIVE):  # the score's sampling band, the η_nl gate's, or both
        rule = result.rule
        spans = rule.score_band_crossed(result)
        gate = len(rule.gate_verdicts(result)) > 1
        why = [why for why, found in (("the sampling error spans a threshold", spans),
                                      ("layers near the η_nl gate can change it", gate)) if found]
        notes.append(f"tentative: {' and '.join(why) or 'see the report'}")
    if result.meta.get("weights") == "pretrained" and result.verdict != "uninformative":
        notes.append("extrapolated: pretrained weights, and the thresholds come from initialisations")
    beyond = result.rule.beyond_radius(result) if result.verdict != "uninformative" else []
    if beyond:
        many = len(beyond) != 1
        notes.append(f"outside the rule's range: {len(beyond)} layer{'s' if many else ''} with ρ > "
                     f"{result.rule.max_spectral_radius:g}, largest {beyond[0][1]:.3g}; see the report")
    if result.meta.get("weights_not_in_checkpoint"):
        notes.append(f"partly random: {len(result.meta['weights_not_in_checkpoint'])} profiled weights were not in "
                     "the checkpoint")
    if result.meta.get("blocks_not_run"):
        notes.append(f"partial: the inputs did not reach {len(result.meta['blocks_not_run'])} of the "
                     f"{result.meta.get('num_blocks')} blocks (see the warning)")
    count = len(result.layers)
    noun = f"{count} layer{'s' if count != 1 else ''}"
    layers = "" if result.model_name.endswith(f"[{noun}]") else f"{noun}, "  # --num-layers names it
    print(f"{result.model_name}: {layers}mean M≈1 = {score}, verdict: {result.verdict.upper()}"
          + (f" ({'; '.join(notes)})" if notes else ""))
    if result.verdict == "uninformative":  # why, and what would make it informative, in the CLI's own option names
        why = result.verdict_reason.replace(" (for RKSPCallback a larger `probe_batch_size`)", "")
        for name, option in (("num_samples", "--num-samples"), ("max_tokens", "--max-tokens")):
            why = re.sub(rf"(?<![\w-])`?{name}`?(?![\w])", option, why)
        print("  why: " + why)
    assessment = result.risk_assessment() if result.meta.get("learning_rate") is not None else None
    if assessment is not None:  # the planned learning rate's calibrated risk; its caveats are in the report
        lr = f"  P(divergence) at learning rate {assessment.learning_rate:g}:"
        shown = shown_probability(assessment.probability)
        if result.verdict == "uninformative":
            print(f"{lr} n/a (computed from an uninformative spectrum, not a reading of this model; see report)")
        elif in_fitted_range(assessment):
            print(f"{lr} {shown} (inside the estimator's fitted range)")
        else:
            why = ("; ".join(issue.describe() for issue in assessment.outside) if assessment.outside
                   else "ranges unknown for " + ", ".join(assessment.unknown) if assessment.unknown else "see report")
            print(f"{lr} {shown} (extrapolated: {why}; see report)")
    if result.degenerate_layers:
        print(f"  {len(result.degenerate_layers)} degenerate layer(s): RKSP is uninformative there (see report)")
    undersampled = result.undersampled_layers
    if undersampled:
        print(f"  {len(undersampled)} layer(s) left out for too few token states (N/d < "
              f"{result.rule.min_samples_per_dim:g}): mean M≈1 and the verdict read {len(result.informative_layers)} "
              f"of {len(result.layers)} layers; more or longer inputs include them (see report)")
    if (dtype := low_precision_dtype(result)) is not None:
        print(f"  ρ and κ(V) are unreliable in {dtype} (its rounding of the activations moves them; the masses and the "
              "verdict hold up): profile with --dtype fp32 for them (see report)")
    for label, path in written.items():
        print(f"  {label}: {path}")
    return 0


def _run_streaming(args: argparse.Namespace, rank: int | None, progress: bool | None):
    try:
        from hf_koopman.profiling.streaming import profile_streaming
    except ImportError as err:
        raise ValueError(f"--stream is unavailable in this installation ({err}); run without --stream.") from err

    if args.dataset is not None:
        raise ValueError("--stream takes --text-file or the default probe, not --dataset.")
    config, weights, name = _run_config(args.model, init=args.init, num_layers=args.num_layers)
    inputs = None
    if args.text_file is not None:
        from hf_koopman.profiling.streaming import _build_skeleton

        _cap_max_length(args, _build_skeleton(config))  # on the meta device: its position table, no weights
        inputs = _stream_text_batch(args, config, _tokenizer_source(args.model, weights))
    result = profile_streaming(
        weights if weights is not None else config,
        inputs,
        init=weights is None,
        num_samples=args.num_samples,
        rank=rank,
        seed=args.seed,
        layers=args.layers,
        dtype=_DTYPES[args.dtype],
        progress=progress,
        model_name=name,
        learning_rate=getattr(args, "learning_rate", None),  # max-lr solves for it
    )
    result.meta["weights"] = "init" if weights is None else "pretrained"
    return result


def _stream_text_batch(args: argparse.Namespace, config: Any, source: str | None) -> dict[str, Any]:
    """--text-file as the one batch a streamed forward takes: batches of --batch-size sequences of at most --max-length
    tokens until their tokens reach --max-tokens, or --num-samples without it, as `profile()` reads batches (all in one
    forward: a streamed forward runs the model once and holds all its tokens, so it reads no more than N needs)."""
    from hf_koopman.profiling.probes import default_num_samples

    tokenizer = _load_tokenizer(source) if source is not None and Path(source).is_dir() else None
    if source is None:
        _say_byte_ids(args.model)
    if tokenizer is not None and tokenizer.pad_token is None:  # GPT-2 style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token

    def encode(texts: list[str]) -> dict[str, Any]:
        if tokenizer is None:
            from hf_koopman.profiling.inputs import byte_tokenize

            return byte_tokenize(texts, config.vocab_size, args.max_length)
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))

    chunks = _read_text_chunks(args.text_file, args.max_length, tokenizer)
    wanted = args.max_tokens if args.max_tokens is not None else (
        args.num_samples if args.num_samples is not None else default_num_samples(config))
    seen, rows = 0, 0
    while rows < len(chunks) and seen < wanted:
        batch = encode(chunks[rows : rows + args.batch_size])
        mask = batch.get("attention_mask")
        seen += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        rows += args.batch_size
    return encode(chunks[:rows])


# -------------------------------------------------------------------------------------------------------- architectures
def _add_architectures_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")


def _run_architectures(args: argparse.Namespace) -> int:
    from hf_koopman.profiling.architectures import known_architectures, load_architecture_config

    rows = []
    for name in known_architectures():
        config = load_architecture_config(name)
        rows.append({"name": name, "model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
                     "hidden_size": getattr(config, "hidden_size", None)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:<14} {row['model_type']:<10} layers={row['num_hidden_layers']:<3} "
                  f"d={row['hidden_size']}")
    return 0


# ---------------------------------------------------------------------------------------------------------- max-lr
def _add_max_lr_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_input_arguments(parser, stream=True)
    parser.add_argument("--risk", type=float, default=0.1,
                        help="divergence probability to stay at or below (default: 0.1)")
    parser.add_argument("--estimator", type=Path,
                        help="risk-estimator JSON (default: the estimator shipped with hf_koopman)")
    parser.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                        help="another input the estimator needs (e.g. norm=pre_ln); repeatable")
    parser.add_argument("--level", type=float, default=0.95, help="coverage of the interval (default: 0.95)")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # refused with the reason


def _parse_context(items: Sequence[str]) -> dict[str, Any]:
    """`["norm=pre_ln", "warmup_steps=10"]` -> `{"norm": "pre_ln", "warmup_steps": 10.0}` (numbers parsed)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--context {item!r} must be KEY=VALUE, e.g. --context norm=pre_ln.")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _warn_unread_context(context: dict[str, Any], estimator: Any) -> None:
    """Warn about --context keys the estimator never reads (the library ignores them silently).

    An estimator reads its feature keys (`required_keys`) and the inputs whose training range it checks
    (`training_ranges["inputs"]`, e.g. model_type).
    """
    from hf_koopman.risk import RiskEstimator

    est = estimator if estimator is not None else RiskEstimator.default()
    read = set(est.required_keys) | set(est.training_ranges.get("inputs", {}))
    unread = [key for key in context if key not in read]
    if unread:
        which = "--estimator" if estimator is not None else "the shipped risk estimator"
        them = "it" if len(unread) == 1 else "them"
        logger.warning(
            "--context %s: ignored, %s does not read %s; the keys it reads are: %s. Drop %s, or pass an --estimator "
            "fitted with %s.", ", ".join(unread), which, them, ", ".join(sorted(read)), them, them,
        )


def _run_max_lr(args: argparse.Namespace) -> int:
    from hf_koopman.max_lr import _refuse_rank, suggest_max_lr
    from hf_koopman.profiling import profile

    _refuse_rank(args.rank, "max-lr", "--rank")
    if not 0.0 < args.risk < 1.0:
        raise ValueError(f"--risk must be a probability strictly between 0 and 1, got {args.risk}.")
    if not 0.0 < args.level < 1.0:
        raise ValueError(f"--level must be in (0, 1), got {args.level}.")
    progress = _check_model_input_arguments(args)
    context = _parse_context(args.context)
    if "learning_rate" in context:
        raise ValueError("max-lr solves for the learning rate: drop learning_rate from --context.")
    estimator = None
    if args.estimator is not None:
        from hf_koopman.risk import load_estimator

        estimator = load_estimator(args.estimator.expanduser())  # a bad file fails before the model is built
    if context:
        _warn_unread_context(context, estimator)
    if args.stream:
        result = _run_streaming(args, None, progress)
    else:
        model, tokenizer, name, inputs, weights = _load_model_and_inputs(args)
        result = profile(
            model, inputs, num_samples=args.num_samples, seed=args.seed, layers=args.layers,
            tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length, max_tokens=args.max_tokens,
            model_name=name, progress=progress,
        )
        _record_weights(result, model, weights)  # as `hf-koopman profile` records it: the answer's first caveat says
    suggestion = suggest_max_lr(result, risk=args.risk, estimator=estimator, level=args.level, context=context)
    print(json.dumps(suggestion.to_dict(), indent=2) if args.json else suggestion.describe())
    _warn_low_precision(result)
    return 0


def _warn_low_precision(result: Any) -> None:
    """A log warning when the profile's model ran in float16 / bfloat16, whose rounding moves ρ and κ(V) (both
    risk-estimator inputs): the fix is --dtype fp32."""
    from hf_koopman.risk import low_precision_dtype

    if (dtype := low_precision_dtype(result)) is not None:
        logger.warning("ρ and κ(V) are unreliable in %s (its rounding of the activations moves them; the masses and "
                       "the verdict hold up), and the risk estimate reads them: run again with --dtype fp32", dtype)


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "profile": ("RKSP spectral profile of a model -> profile.json, report.md, PNG plots",
                _add_profile_arguments, _run_profile),
    "architectures": ("list the embedded architecture configs usable offline with --init",
                      _add_architectures_arguments, _run_architectures),
    "max-lr": ("learning rate at which the calibrated divergence probability reaches --risk, with its caveats",
               _add_max_lr_arguments, _run_max_lr),
}


#: examples shown at the end of each subcommand's --help
_EXAMPLES = {
    "profile": """examples:
  hf-koopman profile gpt2 --init                          # an embedded config at random init, synthetic probe
  hf-koopman profile ./my-checkpoint --text-file data.txt # a save_pretrained folder on your own text
  hf-koopman profile llama-2-7b --init --stream           # one block in memory at a time
  hf-koopman profile gpt2 --init --learning-rate 3e-4     # adds the calibrated divergence probability""",
    "architectures": """examples:
  hf-koopman architectures          # names usable with --init
  hf-koopman architectures --json""",
    "max-lr": """examples:
  hf-koopman max-lr gpt2 --init                  # the rate at a 10 % divergence probability
  hf-koopman max-lr ./my-checkpoint --risk 0.05 --json""",
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-koopman", description="Koopman spectral diagnostics for Hugging Face models (RKSP / KSS). Options "
        "take hyphens or underscores (--num-samples or --num_samples).",
    )
    from hf_koopman import __version__

    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # -v also after the subcommand; SUPPRESS keeps a subcommand without -v from resetting a -v given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, run) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                                 epilog=_EXAMPLES.get(name), formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
        command.set_defaults(_run=run)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever `sys.stderr` is when a record is emitted, so that `main()` called
    again in one process (a notebook, a test run) does not write to a stderr that has since been replaced or closed."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


_NEGATIVE_NUMBER = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


def _valued_options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Every option string of `parser` and its subcommands, mapped to whether it takes one value."""
    out: dict[str, bool] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for option, takes in _valued_options(sub).items():
                    out[option] = out.get(option, False) or takes
        elif action.option_strings:
            for option in action.option_strings:
                out[option] = out.get(option, False) or action.nargs in (None, 1, "?")
    return out


def _hyphenated(argv: Sequence[str], options: dict[str, bool]) -> list[str]:
    """`argv` with `--option_name` spelled `--option-name` where that names an option (as `HfArgumentParser` accepts
    both spellings, so do we); values, and tokens after a bare `--`, are left as they are."""
    out, rest = [], False
    for token in argv:
        name, sep, value = token.partition("=")
        spelled = "--" + name[2:].replace("_", "-")
        if not rest and name.startswith("--") and "_" in name and spelled in options:
            token = spelled + sep + value
        rest = rest or token == "--"
        out.append(token)
    return out


def _takes_value(token: str, options: dict[str, bool]) -> bool:
    """Whether `token` names an option that takes a value, also as a unique `--` prefix (as argparse accepts it)."""
    if token in options:
        return options[token]
    matches = [o for o in options if token.startswith("--") and o.startswith(token)]
    return len(matches) == 1 and options[matches[0]]


def _join_negative_numbers(argv: Sequence[str], options: dict[str, bool]) -> list[str]:
    """`--opt -1e-3` as `--opt=-1e-3` for an option that takes a value (`_valued_options`): argparse reads a negative
    number in scientific notation (or -inf, -nan) as an option, and the user then got "expected one argument" instead
    of the option's own range check. Nothing after `--` is touched."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if out and "=" not in out[-1] and _takes_value(out[-1], options) and _NEGATIVE_NUMBER.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


class _NoTokenizerSaid(logging.Filter):
    """Drops the library's "no tokenizer given" warning (see `main`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("no tokenizer given")


_NO_TOKENIZER_SAID = _NoTokenizerSaid()


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: Sequence[str], tokens: list[str]) -> None:
    """Exit with the usage and error of `parser` for arguments given before the subcommand, else of the subcommand
    (argparse would print the top-level usage for both), naming the subcommands that do take an option given here."""
    if tokens.index(unknown[0]) < tokens.index(command):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    hints = []
    for token in unknown:
        name = token.partition("=")[0]
        owners = [other for other, sub in commands.items()
                  if other != command and name in _valued_options(sub)]
        if name.startswith("-") and owners:
            hints.append(f"{name} is an option of {' and '.join(f'hf-koopman {o}' for o in owners)}, not of {command}")
    commands[command].error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")
                            + f"; see hf-koopman {command} --help")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-koopman` console script; returns the exit status."""
    parser = make_parser()
    options = _valued_options(parser)
    tokens = _join_negative_numbers(_hyphenated(sys.argv[1:] if argv is None else argv, options), options)
    args, unknown = parser.parse_known_args(tokens)
    if unknown:
        _unrecognized(parser, args.command, unknown, tokens)
    from hf_koopman import _register_auto_classes

    _register_auto_classes()  # deferred by `import hf_koopman` in the console script until the arguments parse
    package_logger = logging.getLogger("hf_koopman")  # configure our own logger only, never the root logger
    if not any(getattr(h, "_hf_koopman_cli", False) for h in package_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._hf_koopman_cli = True  # type: ignore[attr-defined]
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.verbose:  # library loggers follow the transformers verbosity (hf_koopman.logging_utils)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_debug()
    os.environ.setdefault("MPLBACKEND", "Agg")
    # the CLI says in its own terms when text falls back to byte-level ids (a checkpoint without tokenizer files);
    # the library's warning names a Python argument, and for --init byte-level ids are what is meant
    inputs_logger = logging.getLogger("hf_koopman.profiling.inputs")
    inputs_logger.addFilter(_NO_TOKENIZER_SAID)
    try:
        if getattr(args, "dataset", None):  # before the model loads: a missing extra is named at once
            import_optional("datasets", extra="datasets", feature=f"hf-koopman {args.command} --dataset")
        code = args._run(args)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here rather than at interpreter exit
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe (e.g. a data worker's) broke: a real error
            raise
        _silence_stdout()
        return 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, MissingOptionalDependency) as err:
        if args.verbose:
            raise
        print(f"hf-koopman {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if args.verbose or not is_out_of_memory(err):
            raise
        print(f"hf-koopman {args.command}: error: {_out_of_memory_message(args, err)}", file=sys.stderr)
        return 2
    finally:
        inputs_logger.removeFilter(_NO_TOKENIZER_SAID)
        if getattr(args, "restore_progress", False):  # --no-progress holds for this command only
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`| head`): poll reports an error on its write end. `True`
    where that cannot be told (no poll, no file descriptor), the usual cause of a BrokenPipeError in a CLI."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _silence_stdout() -> None:
    """Point stdout at devnull once its reader has gone, so that the flush at exit raises no second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured): nothing is flushed to a pipe
        pass


def _out_of_memory_message(args: argparse.Namespace, err: BaseException) -> str:
    """What ran out of memory and the flags that need less of it."""
    if type(err).__name__ == "InsufficientMemoryError":  # --stream's own check, which already names the budget
        return str(err)
    what = f"out of memory ({_first_line(err)})"
    if not hasattr(args, "num_samples"):
        return f"{what}."
    num_samples = args.num_samples
    stream = (" or --stream to build one block at a time for models larger than memory"
              if hasattr(args, "stream") and not args.stream else "")
    if num_samples is None:  # the default, sized to the model's width
        return (f"{what}: the probe's tokens (--num-samples, by default 2048 or 2.62 x the hidden size) and their "
                f"residual states at every layer are held in memory; pass a smaller --num-samples{stream}.")
    return (f"{what}: the probe needs {num_samples} tokens in memory (--num-samples), with their residual states at "
            f"every layer; pass a smaller --num-samples (e.g. {max(2, num_samples // 4)}){stream}.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
