"""Helpers shared by the test-suite (and handy for users writing their own tests).

* Tiny, offline model builders (`tiny_config`, `tiny_model`, `tiny_peft_model`): every builder returns a randomly
  initialised model from a config small enough to run a forward pass in milliseconds on a CPU: 2 layers (unless
  overridden), hidden size 32-64, vocabulary 128. Nothing is downloaded.
* Hub folders as a user without hf_koopman sees them (`run_without_hf_koopman`, `populate_offline_hub_cache`).

Example:
    >>> from hf_koopman.testing_utils import tiny_model
    >>> model = tiny_model("llama", num_hidden_layers=3)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


__all__ = [
    "TINY_ARCHITECTURES",
    "tiny_config",
    "tiny_model",
    "tiny_peft_model",
    "populate_offline_hub_cache",
    "run_without_hf_koopman",
]

_VOCAB = 128

# model_type -> (config kwargs, Auto class name used to build it)
_TINY: dict[str, tuple[dict[str, Any], str]] = {
    "gpt2": (
        dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=_VOCAB, bos_token_id=0, eos_token_id=0),
        "AutoModelForCausalLM",
    ),
    "llama": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, vocab_size=_VOCAB),
        "AutoModelForCausalLM",
    ),
    "mistral": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, vocab_size=_VOCAB, sliding_window=64),
        "AutoModelForCausalLM",
    ),
    "mixtral": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, vocab_size=_VOCAB, num_local_experts=4, num_experts_per_tok=2),
        "AutoModelForCausalLM",
    ),
    "qwen2_moe": (
        dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
             max_position_embeddings=128, vocab_size=_VOCAB),
        "AutoModelForCausalLM",
    ),
    "mamba": (
        dict(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=_VOCAB, expand=2, conv_kernel=4),
        "AutoModelForCausalLM",
    ),
    "mamba2": (
        dict(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=_VOCAB, expand=2, conv_kernel=4,
             num_heads=4, head_dim=16, n_groups=1, chunk_size=16),
        "AutoModelForCausalLM",
    ),
    "bert": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=128, vocab_size=_VOCAB),
        "AutoModel",
    ),
    "vit": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8, num_channels=3),
        "AutoModel",
    ),
    "t5": (
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=_VOCAB,
             decoder_start_token_id=0),
        "AutoModel",
    ),
    "bart": (
        dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, vocab_size=_VOCAB),
        "AutoModel",
    ),
}

TINY_ARCHITECTURES: tuple[str, ...] = tuple(_TINY)


def tiny_config(arch: str, **overrides: Any) -> PreTrainedConfig:
    """`PretrainedConfig` of a tiny `arch` (one of `TINY_ARCHITECTURES`); `overrides` replace config attributes.

    `num_hidden_layers` is accepted for every architecture (mapped to `n_layer` / `num_layers` ... by the config).
    """
    from transformers import AutoConfig

    if arch not in _TINY:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}.")
    kwargs = {**_TINY[arch][0]}
    depth = overrides.pop("num_hidden_layers", None)
    if depth is not None:  # set at construction so that derived fields (e.g. layer_types) follow
        names = {"gpt2": ("n_layer",), "t5": ("num_layers", "num_decoder_layers"),
                 "bart": ("encoder_layers", "decoder_layers")}.get(arch, ("num_hidden_layers",))
        kwargs.update({name: depth for name in names})
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    return config


def tiny_model(
    arch: str, *, seed: int = 0, dtype: torch.dtype | None = None, head: bool = True, **overrides: Any
) -> PreTrainedModel:
    """Randomly initialised tiny model of `arch`, in eval mode.

    Args:
        arch (`str`): one of `TINY_ARCHITECTURES`.
        seed (`int`, defaults to 0): torch seed used for the initialisation.
        dtype (`torch.dtype`, *optional*): cast the model (e.g. `torch.bfloat16`).
        head (`bool`, defaults to `True`): build the causal-LM head for decoder LMs (else the base `AutoModel`).
        **overrides: config attributes (see `tiny_config`).
    """
    import transformers

    config = tiny_config(arch, **overrides)
    auto_name = _TINY[arch][1] if head else "AutoModel"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, auto_name).from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def tiny_peft_model(arch: str = "llama", *, r: int = 4, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """`tiny_model(arch)` wrapped with a PEFT LoRA adapter on the attention projections (needs `peft`)."""
    from hf_koopman.optional_imports import import_optional

    peft = import_optional("peft", extra="peft", feature="tiny_peft_model")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    model = tiny_model(arch, seed=seed, **overrides)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------------------
# Hub folders as a user without hf_koopman sees them
# ----------------------------------------------------------------------------------------------------------------------
def populate_offline_hub_cache(folder: str | os.PathLike, repo_id: str, cache_dir: str | os.PathLike) -> Path:
    """Lay `folder` out as a cached Hub repo (`models--org--name/{refs/main, snapshots/<sha>}`) under `cache_dir`.

    With `HF_HUB_CACHE=cache_dir` and `HF_HUB_OFFLINE=1` set before Python starts, `from_pretrained(repo_id)` then
    resolves from this cache without any network. Returns the snapshot folder.
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


# Installed before the user code runs: any `import hf_koopman...` raises ImportError, whatever sys.path holds (an
# editable install puts its own finder on sys.meta_path, so removing paths alone is not enough).
_BLOCKER = """\
import sys


class _BlockHfKoopman:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_koopman" or name.startswith("hf_koopman."):
            raise ImportError(f"{name} is blocked: this process plays a user without hf_koopman")
        return None


sys.meta_path.insert(0, _BlockHfKoopman())
for _name in [m for m in sys.modules if m == "hf_koopman" or m.startswith("hf_koopman.")]:
    del sys.modules[_name]
"""


def run_without_hf_koopman(
    code: str, *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -I -c code` in a subprocess in which `import hf_koopman` raises ImportError.

    This is how a Hub user without our package sees a published folder. Python runs isolated (`-I`: no `PYTHONPATH`,
    no user site, no current directory on `sys.path`), a meta-path blocker refuses every `hf_koopman` module, and the
    working directory defaults to the user's home so the repository checkout is not importable either.
    """
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-I", "-c", _BLOCKER + code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=str(cwd) if cwd is not None else str(Path(os.path.expanduser("~"))),
        timeout=timeout,
    )
