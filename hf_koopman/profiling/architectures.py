"""Architecture configs shipped with the package (`hf_koopman/configs/*.json`), so `--init` profiling works offline.

Each JSON file holds the public `config.json` fields of a well-known checkpoint (written from public knowledge of those
configs; provenance in the `_hf_koopman_source` key), enough to build the architecture at random initialisation.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


__all__ = ["known_architectures", "load_architecture_config", "resolve_architecture_name"]

_ALIASES = {
    "gpt2-small": "gpt2",
    "openai-community/gpt2": "gpt2",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "openai-community/gpt2-xl": "gpt2-xl",
    "llama2-7b": "llama-2-7b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "llama-3-8b-base": "llama-3-8b",
    "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "mistral-7b-v0.1": "mistral-7b",
    "mistralai/mistral-7b-v0.1": "mistral-7b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "state-spaces/mamba-130m-hf": "mamba-130m",
    "state-spaces/mamba2-130m": "mamba2-130m",
    "bert-base-uncased": "bert-base",
    "google-bert/bert-base-uncased": "bert-base",
    "all-minilm-l6-v2": "minilm-l6",
    "sentence-transformers/all-minilm-l6-v2": "minilm-l6",
    "vit-base-patch16-224": "vit-base",
    "google/vit-base-patch16-224": "vit-base",
    "t5": "t5-small",
    "google-t5/t5-small": "t5-small",
    "eleutherai/pythia-160m": "pythia-160m",
    "qwen/qwen2-0.5b": "qwen2-0.5b",
}


def _config_dir():
    return resources.files("hf_koopman").joinpath("configs")


def known_architectures() -> list[str]:
    """Names of the embedded architecture configs (e.g. `gpt2`, `llama-2-7b`, `vit-base`)."""
    return sorted(p.name[: -len(".json")] for p in _config_dir().iterdir() if p.name.endswith(".json"))


def resolve_architecture_name(name: str) -> str | None:
    """Canonical embedded-config name for `name` (case-insensitive, common Hub ids accepted), or `None`."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in known_architectures() else None


#: special-token ids of a config that must lie inside its vocabulary
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def load_architecture_config(name: str, **overrides: Any) -> PreTrainedConfig:
    """`PretrainedConfig` of an embedded architecture; `overrides` replace attributes (e.g. `num_hidden_layers=4`).
    A smaller `vocab_size` override moves the special-token ids it no longer holds (GPT-2's 50256) to 0, unless they
    are overridden too: transformers flags ids outside the vocabulary.

    Raises:
        `ValueError` naming the known architectures when `name` is not one of them.
    """
    from transformers import AutoConfig

    canonical = resolve_architecture_name(name)
    if canonical is None:
        raise ValueError(
            f"unknown architecture {name!r}; embedded configs: {', '.join(known_architectures())}. For other models "
            "pass a local folder / config.json, or a Hub id when online."
        )
    data = json.loads(_config_dir().joinpath(f"{canonical}.json").read_text(encoding="utf-8"))
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.pop("model_type")
    data.update(overrides)
    vocab = overrides.get("vocab_size")
    if isinstance(vocab, int):
        for key in _TOKEN_ID_KEYS:
            if key not in overrides and isinstance(data.get(key), int) and data[key] >= vocab:
                data[key] = 0
    config = AutoConfig.for_model(model_type, **data)
    config.name_or_path = canonical
    return config
