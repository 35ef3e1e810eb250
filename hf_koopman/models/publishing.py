"""Publishing research models to the Hugging Face Hub (shared by ReyNet and EquivCNP).

A published folder works two ways:

* with `hf_koopman` installed, `import hf_koopman` registers the classes with the Auto classes, so
  `AutoModel.from_pretrained(folder)` needs no `trust_remote_code`;
* without it, the folder carries its own modelling code (every `*.py` of the model package except `__init__.py`) and a
  *complete* `auto_map` (config, base model and every head), so `AutoModel.from_pretrained(folder,
  trust_remote_code=...)` with the flag set works. `save_pretrained` alone only maps the class that was saved, which is why the map is
  written here rather than through `register_for_auto_class` (that would also mutate class state globally).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

__all__ = ["save_for_hub", "render_model_card", "populate_offline_hub_cache", "run_without_hf_koopman"]

logger = logging.getLogger(__name__)

_AUTO_KEYS_REQUIRED = ("AutoConfig", "AutoModel")


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
    `card_data`/`eval_results`; the template body only holds prose and `{{ variables }}`.
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
    return ModelCard.from_template(card_meta, template_str="---\n{{ card_data }}\n---\n" + body, **dict(template_vars or {}))


def save_for_hub(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    *,
    code_dir: str | os.PathLike,
    auto_map: Mapping[str, str],
    card_template: str | os.PathLike,
    card_data: Mapping[str, Any],
    eval_results: Sequence[Mapping[str, Any]] = (),
    template_vars: Mapping[str, Any] | None = None,
    push_to_hub: str | None = None,
) -> Path:
    """Write a Hub-ready folder: `config.json` with a complete `auto_map`, `model.safetensors`, the remote-code files
    and a model card `README.md`. Optionally upload it.

    Args:
        model (`PreTrainedModel`): the model to save (any head).
        output_dir (`str | PathLike`): destination folder (created).
        code_dir (`str | PathLike`): the model package; every `*.py` except `__init__.py` is copied as remote code.
        auto_map (`Mapping[str, str]`): e.g. `{"AutoConfig": "configuration_reynet.ReyNetConfig", "AutoModel": ...}`.
        card_template (`str | PathLike`): Markdown body rendered with Jinja2 (`template_vars`).
        card_data (`Mapping`): `huggingface_hub.ModelCardData` keyword arguments.
        eval_results (`Sequence[Mapping]`): `huggingface_hub.EvalResult` keyword arguments, serialised as `model-index`.
        push_to_hub (`str`, *optional*): repo id; uploaded only when a token is configured and the Hub is reachable.

    Returns:
        `Path` of the written folder.
    """
    code_dir = Path(code_dir)
    _check_auto_map(auto_map, code_dir)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    model.save_pretrained(out)  # safetensors only in transformers v5
    for src in sorted(code_dir.glob("*.py")):
        if src.name != "__init__.py":
            shutil.copyfile(src, out / src.name)

    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = dict(auto_map)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    card = render_model_card(card_template, card_data=card_data, eval_results=eval_results, template_vars=template_vars)
    card.save(out / "README.md")

    if push_to_hub:
        _try_push(out, push_to_hub)
    return out


def _try_push(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE or get_token() is None:
        logger.warning("Not pushing %s to %s: offline mode or no Hub token configured; the folder is ready.", folder, repo_id)
        return
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except Exception as err:  # network failures must not lose the local folder
        logger.warning("Push to %s failed (%s); the folder %s is intact.", repo_id, err, folder)
    else:
        logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)


def populate_offline_hub_cache(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike) -> Path:
    """Lay `folder` out as a cached Hub repo (`models--org--name/{refs/main, snapshots/<sha>}`) under `cache_dir`.

    With `HF_HUB_CACHE=cache_dir` (or `HF_HOME=<dir>` and `cache_dir=<dir>/hub`) and `HF_HUB_OFFLINE=1` set before Python
    starts, `from_pretrained(repo_id)` then resolves from this cache without any network. Returns the snapshot folder.
    """
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    sha = "0" * 39 + "1"
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / sha
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha, encoding="utf-8")
    return snapshot


def run_without_hf_koopman(
    code: str, *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -c code` in a subprocess in which `import hf_koopman` raises ImportError.

    This is how a Hub user without our package sees a published folder. The blocker is installed before `code` runs;
    the working directory defaults to a neutral place so the repository checkout is not importable either.
    """
    prelude = "import sys\nsys.modules['hf_koopman'] = None\n"
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(cwd) if cwd is not None else str(Path(os.path.expanduser("~"))),
        timeout=timeout,
    )
