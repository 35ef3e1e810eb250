"""Saving ReyNet and EquivCNP folders, and exporting them for the Hugging Face Hub.

There are two kinds of folder:

* **A checkpoint** (`model.save_pretrained(folder)`, or `save_checkpoint` to add a rendered model card): `config.json`,
  `model.safetensors` and optionally `README.md`. It holds no code. After `import hf_koopman` the Auto classes load it
  (the import registers our model types), with no `trust_remote_code`. The folders under `checkpoints/`
  are of this kind.
* **A Hub export** (`save_for_hub(model, folder)` or `export_for_hub(checkpoint, folder)`; `scripts/publish.py` on the
  command line): the checkpoint plus the model package's modelling files (every `*.py` of the package except
  `__init__.py`, which import only torch, transformers and each other) and a *complete* `auto_map` in `config.json`
  (config, base model and every head); its model card gets the `custom_code` tag. Users without hf_koopman load it
  with `trust_remote_code=True`; users with it still get the registered classes without that flag.

`save_pretrained` after `register_for_auto_class` is not a substitute for the export: it maps only the class that was
saved and mutates class state globally, so the Hub folder is written here instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hf_koopman.files import safetensors_error
from hf_koopman.logging_utils import get_logger

__all__ = [
    "save_checkpoint",
    "save_for_hub",
    "export_for_hub",
    "add_remote_code",
    "remote_code_for",
    "render_model_card",
]

logger = get_logger(__name__)

_AUTO_KEYS_REQUIRED = ("AutoConfig", "AutoModel")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
#: what an export copies from a checkpoint folder (suffixes, any case): safetensors weights, JSON configs, the card and
#: its images, tokenizer and chat-template files that are not pickles; the modelling code is written anew, hidden
#: files (`.DS_Store`, a clone's `.gitattributes`) are left out, and any other file is refused (it may be a pickle)
_PUBLISHED_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".model", ".jinja",
                       ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")


def remote_code_for(model_type: str) -> tuple[Path, dict[str, str]]:
    """The model package folder and the complete `auto_map` that hf_koopman publishes for `model_type`.

    Args:
        model_type (`str`): `config.model_type` of a ReyNet, EquivCNP, CNP or ConvCNP model.

    Returns:
        `(code_dir, auto_map)`: the folder whose `*.py` files (except `__init__.py`) are the remote code, and the map
        from Auto class names to `module.ClassName` inside it.

    Raises:
        ValueError: for any other model type (pass `code_dir` and `auto_map` explicitly for those).
    """
    from . import equivcnp, reynet

    if model_type == "reynet":
        return Path(reynet.__file__).parent, dict(reynet.AUTO_MAP)
    if model_type in equivcnp.AUTO_MAPS:
        return Path(equivcnp.__file__).parent, dict(equivcnp.AUTO_MAPS[model_type])
    raise ValueError(
        f"hf_koopman publishes remote code for model types 'reynet', {', '.join(map(repr, equivcnp.AUTO_MAPS))}; "
        f"got {model_type!r}. Pass code_dir= and auto_map= for other models."
    )


def _checked_code(config: Mapping[str, Any], code_dir: str | os.PathLike | None,
                  auto_map: Mapping[str, str] | None) -> tuple[Path, Mapping[str, str]]:
    """`(code_dir, auto_map)` for a model whose config (as a dict) is `config`: hf_koopman's defaults for its
    `model_type` where not given (`remote_code_for`), checked (`_check_auto_map`)."""
    if code_dir is None or auto_map is None:
        default_dir, default_map = remote_code_for(config.get("model_type", ""))
        code_dir = default_dir if code_dir is None else code_dir
        auto_map = default_map if auto_map is None else auto_map
    _check_auto_map(auto_map, Path(code_dir))
    return Path(code_dir), auto_map


def _check_auto_map(auto_map: Mapping[str, str], code_dir: Path) -> None:
    missing = [key for key in _AUTO_KEYS_REQUIRED if key not in auto_map]
    if missing:
        raise ValueError(f"auto_map must contain {missing} (base config and model) so remote-code users can load it.")
    for key, ref in auto_map.items():
        module, _, cls = ref.rpartition(".")
        if not module or not cls:
            raise ValueError(f"auto_map[{key!r}]={ref!r} must look like 'modeling_file.ClassName'.")
        if not (code_dir / f"{module}.py").is_file():
            raise ValueError(f"auto_map[{key!r}] points to {module}.py, which is not in {code_dir}.")


def render_model_card(
    template: str | os.PathLike,
    *,
    card_data: Mapping[str, Any],
    eval_results: Sequence[Mapping[str, Any]] = (),
    template_vars: Mapping[str, Any] | None = None,
) -> Any:
    """Render a `huggingface_hub.ModelCard` from a Markdown/Jinja2 body and metadata.

    The YAML front matter (library_name, tags, datasets, metrics, `model-index` from `eval_results`) is generated from
    `card_data` and `eval_results`; the template body only holds prose and `{{ variables }}`.

    Args:
        template (`str | PathLike`): path of the Markdown body (see `model_cards/`), without front matter.
        card_data (`Mapping`): `huggingface_hub.ModelCardData` keyword arguments.
        eval_results (`Sequence[Mapping]`): `huggingface_hub.EvalResult` keyword arguments, serialised as `model-index`.
        template_vars (`Mapping`, *optional*): values for the template's `{{ variables }}` (the `card_data` keys are
            available too, as in `ModelCard.from_template`).

    Returns:
        `huggingface_hub.ModelCard`.

    Raises:
        ValueError: when the template uses a variable that neither `template_vars` nor `card_data` defines (rendered
            with jinja2's `StrictUndefined`, so a forgotten value never becomes an empty string in the card).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    body = Path(template).read_text(encoding="utf-8")
    if body.lstrip().startswith("---"):
        raise ValueError(f"{template}: the template must not carry its own YAML front matter; pass card_data instead.")
    data = dict(card_data)
    data.setdefault("library_name", "transformers")
    results = [EvalResult(**r) for r in eval_results]
    if results and "model_name" not in data:
        raise ValueError("card_data needs 'model_name' when eval_results are given (it names the model-index entry).")
    card_meta = ModelCardData(eval_results=results or None, **data)
    values = {**card_meta.to_dict(), **dict(template_vars or {}), "card_data": card_meta.to_yaml()}
    return ModelCard(_render_strict(Path(template), "---\n{{ card_data }}\n---\n" + body, values))


def _render_strict(template: Path, source: str, values: Mapping[str, Any]) -> str:
    """Render the Jinja2 `source` with `StrictUndefined`; a missing variable raises a `ValueError` naming it."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import SandboxedEnvironment

    # sandboxed: a template cannot reach Python internals (os, subprocess) through its objects
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)  # otherwise the defaults of ModelCard.from_template
    try:
        return env.from_string(source).render(**values)
    except jinja2.UndefinedError as err:
        missing = sorted(meta.find_undeclared_variables(env.parse(source)) - set(values))
        what = f"the template variables {missing} have no value" if missing else str(err)
        raise ValueError(f"{template}: {what}; pass them in template_vars (or card_data).") from None


def _write_card(card: Any, folder: Path) -> None:
    """Write `card` (a `ModelCard`, Markdown text of several lines or the path of a Markdown file) as
    `folder/README.md`."""
    if card is None:
        return
    if hasattr(card, "save"):
        card.save(folder / "README.md")
    elif isinstance(card, str) and "\n" in card:
        (folder / "README.md").write_text(card, encoding="utf-8")
    elif isinstance(card, (str, os.PathLike)):
        if not Path(card).is_file():
            raise FileNotFoundError(
                f"card={str(card)!r} is neither Markdown text (several lines) nor an existing file."
            )
        shutil.copyfile(card, folder / "README.md")
    else:
        raise TypeError(
            f"card must be a huggingface_hub.ModelCard, Markdown text or a path; got {type(card).__name__}."
        )


def save_checkpoint(model: PreTrainedModel, folder: str | os.PathLike, *, card: Any = None) -> Path:
    """Write a checkpoint folder: `config.json`, `model.safetensors` and, if given, the model card `README.md`.

    The folder holds no code: after `import hf_koopman` the Auto classes load it. Export it with `export_for_hub` to
    publish it for users without hf_koopman.

    Args:
        model (`PreTrainedModel`): the model to save (any head).
        folder (`str | PathLike`): destination folder (created).
        card (`ModelCard | str | PathLike`, *optional*): e.g. the result of `render_model_card`.

    Returns:
        `Path` of the written folder.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors only in transformers v5
    _write_card(card, out)
    return out


def add_remote_code(
    folder: str | os.PathLike,
    *,
    code_dir: str | os.PathLike | None = None,
    auto_map: Mapping[str, str] | None = None,
) -> Path:
    """Add the modelling files and a complete `auto_map` to a saved folder, in place. A model card `README.md` in
    the folder gets the `custom_code` tag, and a verbatim copy of `config.json` in it the new `auto_map`.

    Args:
        folder (`str | PathLike`): a folder written by `save_pretrained` / `save_checkpoint`.
        code_dir (`str | PathLike`, *optional*): the model package; every `*.py` except `__init__.py` is copied.
            Defaults to hf_koopman's package for the folder's `model_type` (`remote_code_for`).
        auto_map (`Mapping[str, str]`, *optional*): e.g. `{"AutoConfig": "configuration_reynet.ReyNetConfig",
            "AutoModel": "modeling_reynet.ReyNetModel", ...}`; defaults as `code_dir`. Must name at least
            `AutoConfig` and `AutoModel`, in files of `code_dir`.

    Returns:
        `Path` of the folder.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; save the model with save_pretrained first.")
    saved_text = config_path.read_text(encoding="utf-8")
    config = json.loads(saved_text)
    code_dir, auto_map = _checked_code(config, code_dir, auto_map)
    for src in sorted(code_dir.glob("*.py")):
        if src.name != "__init__.py":
            _unlink_link(folder / src.name)
            shutil.copyfile(src, folder / src.name)
    config["auto_map"] = dict(auto_map)
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _unlink_link(config_path)
    config_path.write_text(config_text, encoding="utf-8")
    _update_card_for_code(folder / "README.md", saved_text.strip(), config_text.strip())
    return folder


def _link_stays_home(link: Path, folder: Path) -> bool:
    """Whether the file link `link` in `folder` points inside it, or, for a Hub cache snapshot
    (`models--org--name/snapshots/<revision>/`), into that repository's `blobs/`, where the cache keeps the files."""
    target, home = link.resolve(), folder.resolve()
    if home in target.parents:
        return True
    # the snapshot the folder is (or lies in, a sub-folder of a snapshot), reached through links or not
    root = next((p for p in (home, *home.parents) if p.parent.name == "snapshots"), None)
    return root is not None and (root.parent.parent / "blobs") in target.parents


def _not_what_its_name_says(path: Path) -> bool:
    """Whether a file an export would publish is not what its suffix says: a pickle (protocol 2-5) or a zip archive
    (`torch.save`) under another name, a `.safetensors` file whose header does not read, or a `.json` file that does
    not parse."""
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(4)
    # (a safetensors file starts with its header's length, which may read like a pickle opcode: parsed below instead)
    if suffix != ".safetensors" and ((len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
                                     or head == b"PK\x03\x04"):
        return True
    if suffix == ".safetensors" and safetensors_error(path) is not None:
        return True
    if suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return True
    return False


def _unlink_link(path: Path) -> bool:
    """Remove `path` when it is a symbolic link, so that writing there makes a file of the folder's own instead of
    overwriting the link's target (a file outside the folder, perhaps). Returns whether it was one."""
    if path.is_symlink():
        path.unlink()
        return True
    return False


def _update_card_for_code(card_path: Path, old_config: str, new_config: str) -> None:
    """Bring the model card (if there is one) in line with a folder that now holds code: a verbatim copy of the old
    `config.json` in the card becomes the new one (with `auto_map`), and the metadata gets the Hub's `custom_code`
    tag. Checkpoint folders hold no code, so their cards carry neither."""
    from huggingface_hub import metadata_load, metadata_save

    if not card_path.is_file():
        return
    text = card_path.read_text(encoding="utf-8")
    if _unlink_link(card_path):  # a link's target is not ours to edit: the folder gets its own copy
        card_path.write_text(text, encoding="utf-8")
    if old_config and old_config in text:
        card_path.write_text(text.replace(old_config, new_config), encoding="utf-8")
    meta = metadata_load(card_path) or {}
    tags = list(meta.get("tags") or [])
    if "custom_code" not in tags:
        metadata_save(card_path, {**meta, "tags": [*tags, "custom_code"]})


def save_for_hub(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    *,
    card: Any = None,
    code_dir: str | os.PathLike | None = None,
    auto_map: Mapping[str, str] | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hub-ready folder: `config.json` with a complete `auto_map`, `model.safetensors`, the remote-code files
    and a model card `README.md`. Optionally upload it.

    Args:
        model (`PreTrainedModel`): the model to save (any head).
        output_dir (`str | PathLike`): destination folder (created; must be empty, as everything in it is published,
            unless `overwrite`).
        card (`ModelCard | str | PathLike`, *optional*): the model card, e.g. from `render_model_card`. Without it
            a minimal card is written (metadata, the class and how to load it) that says the model is undocumented;
            pass a real card before publishing.
        code_dir (`str | PathLike`, *optional*): see `add_remote_code`; defaults to hf_koopman's model package.
        auto_map (`Mapping[str, str]`, *optional*): see `add_remote_code`; defaults to hf_koopman's complete map.
        push_to_hub (`str`, *optional*): repo id to upload to, and the card's `from_pretrained("hf-koopman/...")`
            examples are pointed at it. Without a Hub token, or offline, a warning says so and the folder stays local;
            a failed upload raises `RuntimeError` (the folder is complete by then).
        overwrite (`bool`, *optional*, defaults to `False`): replace an earlier export in a non-empty `output_dir`
            (else `FileExistsError`); its files are kept aside until the new export is complete and come back if it
            fails.

    Returns:
        `Path` of the written folder.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_for_hub exports a transformers PreTrainedModel (a config, safetensors weights and its "
                        f"code); got {type(model).__name__}. For a PEFT model, export model.merge_and_unload(); "
                        "otherwise wrap the network in a PreTrainedModel with a PreTrainedConfig, or save it with "
                        "safetensors.torch.save_file.")
    _checked_code(model.config.to_dict(), code_dir, auto_map)  # a bad map is refused before anything is written
    card_input = (Path(card),) if isinstance(card, (str, os.PathLike)) and Path(card).exists() else ()
    earlier = _empty_output(Path(output_dir), overwrite,
                            inputs=(*card_input, *((Path(code_dir),) if code_dir is not None else ())))
    with _replacing(Path(output_dir), earlier):
        out = save_checkpoint(model, output_dir, card=card)
        add_remote_code(out, code_dir=code_dir, auto_map=auto_map)
        if card is None:
            _write_default_card(model, out, push_to_hub)
        else:
            _card_repo_id(out / "README.md", push_to_hub)
    if push_to_hub:
        _try_push(out, push_to_hub)
    return out


def _write_default_card(model: PreTrainedModel, folder: Path, repo_id: str | None) -> None:
    """A minimal `README.md` for a Hub export saved without a card: metadata, the class, and how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    import transformers

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    class_name = type(model).__name__
    entries = [(key, ref) for key, ref in config.get("auto_map", {}).items() if ref.endswith("." + class_name)]
    # an Auto class transformers has (the auto_map may name others, e.g. AutoModelForGraphClassification)
    auto_class = next((key for key, _ in entries if hasattr(transformers, key)), None)
    source = repo_id or f"<user>/{folder.name}"  # the Hub repo id it will have; never a local path
    tags = [tag for tag in ("hf_koopman", config.get("model_type"), "custom_code") if tag]
    data = ModelCardData(library_name="transformers", tags=tags)
    if not entries:
        raise ValueError(f"the auto_map of {folder} names no class {class_name}: pass auto_map= with an entry for it "
                         "(e.g. {'AutoModel': 'modeling_x." + class_name + "'}), or a card= of your own")
    if auto_class is not None:
        load = (f"from transformers import {auto_class}\n\n"
                f"model = {auto_class}.from_pretrained({source!r}, trust_remote_code=True)\n")
    else:  # no Auto class loads this head: take the class from the exported code
        load = ("from transformers.dynamic_module_utils import get_class_from_dynamic_module\n\n"
                f"cls = get_class_from_dynamic_module({entries[0][1]!r}, {source!r})\n"
                f"model = cls.from_pretrained({source!r})\n")
    text = (
        f"---\n{data.to_yaml()}\n---\n# {folder.name}\n\n"
        f"A `{class_name}` (`model_type: {config.get('model_type')}`) from hf_koopman, exported with its modelling "
        "code. This card was written by `save_for_hub` without a description of the model, its training data or its "
        "evaluation.\n\n"
        f"```python\n{load}```\n"
    )
    ModelCard(text).save(folder / "README.md")


#: entries of an export folder that are not published and never cleared: a Hub repository's git clone
_REPO_ENTRIES = (".git", ".gitattributes", ".cache")
#: the hidden folder an overwrite keeps the earlier export in until the new one is complete (one a killed export left
#: is cleared by the next overwrite)
_BACKUP_PREFIX = ".hf_koopman-earlier-export-"


def _empty_output(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> list[Path]:
    """Check that the folder that gets published will hold only what is written now (an upload carries everything in
    it, stale weights or pickles included), and return the files `_replacing` moves out of the way. A folder with
    files is refused, or with `overwrite` its files are replaced, and only when it looks like an earlier export:
    `config.json` and files, no sub-folders (a Hub repository's `.git` clone is kept). Never cleared: the current
    directory or home, a folder holding either, a symlink, or a folder holding one of `inputs` (the card, the code,
    the checkpoint)."""
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; export into a real folder.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose a folder to export into.")
    entries = sorted(p for p in out.iterdir() if p.name not in _REPO_ENTRIES) if out.is_dir() else []
    if not entries:
        return []
    if not overwrite:
        raise FileExistsError(
            f"{out} already holds files ({', '.join(p.name for p in entries[:5])}); everything in the folder would be "
            "published with the export. Choose an empty or new folder, or pass overwrite=True (scripts/publish.py "
            "--overwrite) to clear an earlier export first."
        )
    target = out.resolve()
    protected = {Path.cwd().resolve(), Path.home().resolve()}
    if any(target == p or target in p.parents for p in protected):
        raise ValueError(f"overwrite=True would clear {out}, which is or holds the current or home directory; export "
                         "into a folder of its own.")
    if any(target in Path(p).resolve().parents for p in inputs):
        raise ValueError(f"overwrite=True would clear {out}, which holds an input of this export (the card, the code "
                         "or the checkpoint); move it out first.")
    if not (out / "config.json").is_file() or any(p.is_dir() and not p.name.startswith(_BACKUP_PREFIX)
                                                   for p in entries):
        raise FileExistsError(f"{out} does not look like an earlier export (config.json and files, no folders), so "
                              "overwrite=True does not clear it; choose an empty or new folder.")
    return entries


@contextlib.contextmanager
def _replacing(out: Path, earlier: list[Path]) -> Iterator[None]:
    """Write a new export into `out` in place of the `earlier` files (`_empty_output`): they are moved into a hidden
    folder first and deleted only once the new export is complete; if writing it fails, the files it wrote are
    removed and the earlier ones come back. A warning names what was replaced."""
    if not earlier:
        yield
        return
    backup = Path(tempfile.mkdtemp(prefix=_BACKUP_PREFIX, dir=out))
    moved: list[str] = []

    def put_back() -> None:
        for name in moved:
            os.replace(backup / name, out / name)
        shutil.rmtree(backup, ignore_errors=True)

    try:
        for path in earlier:
            os.replace(path, backup / path.name)
            moved.append(path.name)
    except BaseException:  # an interrupted move: nothing was written yet, the files moved so far come back
        put_back()
        raise
    try:
        yield
    except BaseException:
        for path in out.iterdir():  # what this export wrote before it failed (the earlier one had no folders)
            if path == backup or path.name in _REPO_ENTRIES:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        put_back()
        raise
    shutil.rmtree(backup, ignore_errors=True)
    logger.warning("%s held an earlier export: its files were replaced by this one (%s)", out, ", ".join(moved))


_HUB_REPO_ID = re.compile(r"""(["'])hf-koopman/[A-Za-z0-9._-]+\1""")


def _card_repo_id(card_path: Path, repo_id: str | None) -> None:
    """Point the card's loading examples at the repository it is uploaded to: every quoted `hf-koopman/<name>` (the
    repository our cards name; one model per card) becomes `repo_id`."""
    if repo_id is None or not card_path.is_file():
        return
    text = card_path.read_text(encoding="utf-8")
    card_path.write_text(_HUB_REPO_ID.sub(lambda m: f"{m.group(1)}{repo_id}{m.group(1)}", text), encoding="utf-8")


def export_for_hub(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    code_dir: str | os.PathLike | None = None,
    auto_map: Mapping[str, str] | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy a checkpoint folder (config, safetensors weights, card, images, tokenizer files) and add the remote code
    to the copy. Any other file is refused, so that no pickle is published; hidden files are left out.

    Args:
        checkpoint_dir (`str | PathLike`): a folder written by `save_pretrained` / `save_checkpoint`, e.g.
            `checkpoints/reynet-mutag`.
        output_dir (`str | PathLike`): destination folder (created; must not be `checkpoint_dir`; must be empty, as
            everything in it is published, unless `overwrite`).
        code_dir (`str | PathLike`, *optional*): see `add_remote_code`; defaults to hf_koopman's model package.
        auto_map (`Mapping[str, str]`, *optional*): see `add_remote_code`; defaults to hf_koopman's complete map.
        push_to_hub (`str`, *optional*): repo id to upload to, and the card's
            `from_pretrained("hf-koopman/<folder name>", ...)` examples are pointed at it. Without a Hub token, or
            offline, a warning says so and the folder stays local; a failed upload raises `RuntimeError` (the folder
            is complete by then).
        overwrite (`bool`, *optional*, defaults to `False`): replace an earlier export in a non-empty `output_dir`
            (else `FileExistsError`); its files are kept aside until the new export is complete and come back if it
            fails.

    Returns:
        `Path` of the written folder.
    """
    src, out = Path(checkpoint_dir), Path(output_dir)
    if not (src / "config.json").is_file() or not any((src / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{src} is not a safetensors checkpoint folder (config.json and model.safetensors).")
    src_path, out_path = src.resolve(), out.resolve()
    if out_path == src_path or out_path in src_path.parents or src_path in out_path.parents:
        raise ValueError("export_for_hub writes a copy; choose an output_dir other than the checkpoint folder, outside "
                         "it and not holding it.")
    broken = sorted(p.name for p in src.iterdir() if p.is_symlink() and not p.exists() and not p.name.startswith("."))
    if broken:
        raise ValueError(f"{src} holds symbolic links to nothing ({', '.join(broken)}): a file of the checkpoint is "
                         "missing. Download or copy it again, then export.")
    links = sorted(p.name for p in src.iterdir() if p.is_symlink() and p.is_file() and not p.name.startswith(".")
                   and not _link_stays_home(p, src))
    if links:
        raise ValueError(
            f"{src} holds symbolic links to files outside it ({', '.join(links)}): an export publishes what they point "
            "to. Replace them with the files themselves (cp -L), then export."
        )
    unpublished = sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                         and p.suffix.lower() not in (*_PUBLISHED_SUFFIXES, ".py"))
    if unpublished:
        raise ValueError(
            f"{src} holds files an export does not publish: {unpublished}. An export carries safetensors weights, JSON "
            f"configs, the Markdown card, images and tokenizer files only ({', '.join(_PUBLISHED_SUFFIXES)}), so that "
            "no pickle reaches the Hub: move these files out of the folder (pickled weights: re-save with "
            "save_pretrained, which writes safetensors only)."
        )
    disguised = [p.name for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")
                 and p.suffix.lower() in _PUBLISHED_SUFFIXES and _not_what_its_name_says(p)]
    if disguised:
        raise ValueError(
            f"{src} holds files that are not what their names say ({', '.join(disguised)}: a pickle or a torch.save "
            "archive, or a safetensors / JSON file that does not parse), so the export would publish them under a "
            "safe name. Re-save the checkpoint with save_pretrained, or move them out."
        )
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    _checked_code(config, code_dir, auto_map)  # a bad map is refused before anything is written
    earlier = _empty_output(out, overwrite, inputs=(src, *((Path(code_dir),) if code_dir is not None else ())))
    out.mkdir(parents=True, exist_ok=True)
    with _replacing(out, earlier):
        for path in sorted(src.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in _PUBLISHED_SUFFIXES:
                shutil.copyfile(path, out / path.name)
            elif path.is_file() and path.name.startswith("."):
                logger.info("Not exported: the hidden file %s.", path.name)
        add_remote_code(out, code_dir=code_dir, auto_map=auto_map)
        _card_repo_id(out / "README.md", push_to_hub)
    if push_to_hub:
        _try_push(out, push_to_hub)
    return out


def _try_push(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE or get_token() is None:
        logger.warning(
            "Not pushing %s to %s: offline mode or no Hub token configured; the folder is ready.", folder, repo_id
        )
        return
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as err:
        raise RuntimeError(f"Push to {repo_id} failed ({type(err).__name__}: {err}). The exported folder {folder} is "
                           f"complete; upload it again with `hf upload {repo_id} {folder}`.") from err
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
