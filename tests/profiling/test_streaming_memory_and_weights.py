"""Streaming's memory plan and weights: the plan and the refusal count the dtype asked for and the block's
activations, a block's weights are freed before the next one is built, a block's checkpoint keys are its own (not
those of a block whose name it prefixes), blocks streamed from safetensors in bfloat16 are bfloat16, and the CLI passes
`--stream`'s seed and dtype through and prints the profile's own score."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_koopman.cli import main
from hf_koopman.profiling import find_residual_blocks
from hf_koopman.profiling import _streaming_weights as weights_module
from hf_koopman.profiling import streaming
from hf_koopman.profiling.streaming import InsufficientMemoryError, estimate_streaming_memory, profile_streaming

N = 64


def _llama(**kw) -> LlamaConfig:
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def test_the_memory_plan_counts_the_block_in_the_dtype_asked_for():
    full = estimate_streaming_memory(_llama(), num_tokens=N, num_samples=N)
    half = estimate_streaming_memory(_llama(), num_tokens=N, num_samples=N, dtype="bfloat16")
    assert half["block"] * 2 == full["block"] and half["non_block"] * 2 == full["non_block"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_block_and_its_activations_must_fit_the_budget(dtype):
    plan = estimate_streaming_memory(_llama(), num_tokens=N, num_samples=N, dtype=dtype)
    need = plan["block"] + plan["working"]
    with pytest.raises(InsufficientMemoryError, match="activations"):  # the block alone fits: not enough
        profile_streaming(_llama(), num_samples=N, dtype=dtype, memory_limit=need - 1, progress=False)
    prof = profile_streaming(_llama(), num_samples=N, dtype=dtype, memory_limit=need, progress=False)  # just fits
    assert len(prof.layers) == 3


def test_a_bfloat16_block_is_checked_at_its_own_size_while_streaming(monkeypatch):
    half = estimate_streaming_memory(_llama(), num_tokens=N, num_samples=N, dtype="bfloat16")
    full = estimate_streaming_memory(_llama(), num_tokens=N, num_samples=N)
    calls = []

    def available() -> int:  # plenty for the plan before the stream; then room for one bfloat16 block, not more
        calls.append(None)
        return 10**12 if len(calls) == 1 else (half["block"] + full["block"]) // 2

    monkeypatch.setattr(streaming, "_available_memory", available)
    prof = profile_streaming(_llama(), num_samples=N, dtype="bfloat16", progress=False)
    assert len(prof.layers) == 3 and len(calls) > 1  # the check before each block ran


def test_each_block_is_freed_before_the_next_is_built(monkeypatch):
    real = weights_module.InitWeights.materialise
    built: list[list[bool]] = []

    def spy(self, module, index):
        blocks = [b.module for b in find_residual_blocks(self.model)]
        built.append([any(p.device.type != "meta" for p in b.parameters()) for b in blocks])
        return real(self, module, index)

    monkeypatch.setattr(weights_module.InitWeights, "materialise", spy)
    profile_streaming(_llama(), num_samples=N, progress=False)
    assert built == [[False, False, False]] * 3  # no block holds real weights when the next is built


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama(**kw)).eval()
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_blocks_keys_are_its_own_not_those_of_a_block_its_name_prefixes(tmp_path):
    folder = _saved(tmp_path, num_hidden_layers=12)  # model.layers.1 is a prefix of model.layers.10 and .11
    skeleton = streaming._build_skeleton(_llama(num_hidden_layers=12))
    names = [b.name for b in find_residual_blocks(skeleton)]
    loaded = weights_module.SafetensorsWeights(folder, skeleton, names)
    for name in names:
        targets = [loaded.targets.get(key, key) for key in loaded.block_keys[name]]
        assert targets and all(t.startswith(name + ".") for t in targets), name


def test_blocks_streamed_from_safetensors_in_bfloat16_are_bfloat16(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    real = weights_module.SafetensorsWeights.materialise
    dtypes: set[torch.dtype] = set()

    def spy(self, module, index, name):
        out = real(self, module, index, name)
        dtypes.update(p.dtype for p in module.parameters())
        return out

    monkeypatch.setattr(weights_module.SafetensorsWeights, "materialise", spy)
    profile_streaming(folder, num_samples=N, dtype="bfloat16", progress=False)
    assert dtypes == {torch.bfloat16}


def test_the_cli_streams_with_the_seed_and_dtype_asked_for_and_prints_the_profiles_score(tmp_path, capsys):
    config = tmp_path / "tiny-llama.json"
    _llama().to_json_file(config)
    out = tmp_path / "out"
    assert main(["profile", str(config), "--init", "--stream", "--seed", "7", "--dtype", "bf16",
                 "--num-samples", str(N), "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "profile.json").read_text())
    assert data["meta"]["streaming"]["seed"] == 7 and data["meta"]["streaming"]["dtype"] == "bfloat16"
    printed = re.search(r"mean M≈1 = ([0-9.]+)", capsys.readouterr().out)
    assert printed and float(printed.group(1)) == pytest.approx(data["score"], abs=5e-4)
