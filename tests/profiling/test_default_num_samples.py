"""The default number of token states N is sized to the model's width, so that a wide model gets a verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from hf_koopman.profiling import default_num_samples, profile
from hf_koopman.profiling.profiler import _SnapshotAnalysis
from hf_koopman.profiling._streaming_weights import InitWeights
from hf_koopman.profiling.streaming import profile_streaming


def _wide_gpt2() -> GPT2Config:  # d = 1024 > 782: the paper's 2048 token states would give N/d = 2.0
    return GPT2Config(n_embd=1024, n_layer=1, n_head=8, vocab_size=500, n_positions=256, bos_token_id=0,
                      eos_token_id=0)


def test_default_num_samples_is_the_papers_2048_or_phi_squared_times_the_width():
    assert default_num_samples(None) == 2048
    assert default_num_samples(768) == 2048  # GPT-2 small keeps the paper's N
    assert default_num_samples(1024) == 2681 == math.ceil((3 + 5 ** 0.5) / 2 * 1024)
    assert default_num_samples(4096) == 10724  # 7B
    assert default_num_samples(_wide_gpt2()) == 2681  # a config
    assert default_num_samples(torch.nn.Linear(2, 2)) == 2048  # a module that names no width
    # at that N, Theorem 4's sampling term sqrt(d/N) + d/N is below 1
    for d in (1024, 1600, 4096, 8192):
        n = default_num_samples(d)
        assert math.sqrt(d / n) + d / n < 1 <= math.sqrt(d / (n - 1)) + d / (n - 1) or n == 2048


def test_a_wide_model_is_profiled_on_enough_token_states_for_a_verdict():
    torch.manual_seed(0)
    result = profile(GPT2LMHeadModel(_wide_gpt2()), progress=False)
    assert result.settings["num_samples"] == 2681
    assert result.meta["num_samples_requested"] == 2681
    assert result.settings["samples_per_dim_min"] >= result.rule.min_samples_per_dim
    assert "N/d = 2.62" in result.verdict_reason  # read, with the sampling caution, not refused as too few


def test_streaming_sizes_its_default_probe_and_memory_plan_the_same_way():
    result = profile_streaming(_wide_gpt2(), progress=False)
    assert result.meta["num_samples_requested"] == 2681 and result.settings["num_samples"] == 2681


def test_the_cli_default_is_sized_to_the_width(tmp_path):
    from hf_koopman.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(_wide_gpt2().to_dict()))
    out = tmp_path / "out"
    assert main(["profile", str(config), "--init", "--no-plots", "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "profile.json").read_text())
    assert saved["settings"]["num_samples"] == 2681


def test_streaming_analyses_each_layer_as_its_block_finishes(monkeypatch):
    """Memory holds a chunk of layers' snapshots, not every layer's: with chunk_size=1 each layer's analysis runs
    before the next block is built, and the features equal those of one analysis after the stream."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    events: list[str] = []
    materialise, analyse = InitWeights.materialise, _SnapshotAnalysis._analyse

    def built(self, module, index, *args, **kwargs):
        events.append(f"block {index}")
        return materialise(self, module, index, *args, **kwargs)

    def analysed(self):
        events.append(f"analyse {len(self.pending)}")
        return analyse(self)

    monkeypatch.setattr(InitWeights, "materialise", built)
    monkeypatch.setattr(_SnapshotAnalysis, "_analyse", analysed)
    one = profile_streaming(config, num_samples=256, chunk_size=1, progress=False)
    assert events == ["block 0", "analyse 1", "block 1", "analyse 1", "block 2", "analyse 1", "block 3", "analyse 1"]
    assert one.meta["streaming"]["analysis_chunk_size"] == 1
    events.clear()
    whole = profile_streaming(config, num_samples=256, progress=False)  # one chunk of all four layers, at the end
    assert events == ["block 0", "block 1", "block 2", "block 3", "analyse 4"]
    for (_, a), (_, b) in zip(one.layers, whole.layers):
        assert a.near_unit_mass == b.near_unit_mass
        assert a.spectral_radius == pytest.approx(b.spectral_radius, rel=1e-5)


def test_numpy_widths_and_streaming_chunk_sizes_are_checked():
    import numpy as np

    assert default_num_samples(np.int64(4096)) == 10724
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
            profile_streaming(config, num_samples=64, chunk_size=bad, progress=False)


def test_a_chunk_size_function_sizes_each_chunk_from_its_first_layer():
    """Streaming sizes each chunk for its own layers' N and d (a vision tower wider than the text one gets fewer
    layers per batched call), not for the text config's width."""
    g = torch.Generator().manual_seed(0)
    narrow = [(f"text.{i}", torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)) for i in range(5)]
    wide = [(f"vision.{i}", torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)) for i in range(5)]
    calls: list[int] = []
    analyse = _SnapshotAnalysis._analyse

    def counted(self):
        calls.append(len(self.pending))
        return analyse(self)

    analysis = _SnapshotAnalysis(rank=None, chunk_size=lambda n, d: 32 // d, progress=False)
    _SnapshotAnalysis._analyse = counted
    try:
        for name, X, Y in wide + narrow:
            analysis.add(name, X, Y)
        analysis.finish()
    finally:
        _SnapshotAnalysis._analyse = analyse
    assert analysis.chunk_sizes == [2, 2, 2, 4, 4] and calls == [2, 2, 1, 4, 1]


def test_profile_from_snapshots_batches_no_more_layers_than_fit_its_memory_budget(monkeypatch):
    """At the default N of a 7B-width model, eight layers in one batched call would take ~13 GB of working memory: the
    default chunk holds as many as fit 4 GiB (two at d = 4096, one per core in the eigen step), eight for small models."""
    from hf_koopman.profiling import profiler
    from hf_koopman.profiling.profiler import _analysis_bytes_per_layer, _analysis_chunk_size, profile_from_snapshots

    assert _analysis_bytes_per_layer(10724, 4096) * 8 > 12 * 10**9
    assert _analysis_chunk_size(10724, 4096) == 2 and _analysis_chunk_size(2048, 4096) == 8
    assert _analysis_chunk_size(2048, 768) == 8 and _analysis_chunk_size(4 * 10724, 16384) == 1
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(64, 8, generator=g) for _ in range(8)]
    snapshots = [(f"h.{i}", states[i], states[i + 1]) for i in range(7)]
    calls: list[int] = []
    analyse = _SnapshotAnalysis._analyse

    def counted(self):
        calls.append(len(self.pending))
        return analyse(self)

    monkeypatch.setattr(_SnapshotAnalysis, "_analyse", counted)
    whole = profile_from_snapshots(snapshots, progress=False)
    assert calls == [7]
    calls.clear()
    monkeypatch.setattr(profiler, "_analysis_bytes_per_layer", lambda n, d: (4 << 30) // 3)  # three layers fit
    chunked = profile_from_snapshots(snapshots, progress=False)
    assert calls == [3, 3, 1]
    for (_, a), (_, b) in zip(whole.layers, chunked.layers):  # the chunk changes rounding only
        assert a.near_unit_mass == b.near_unit_mass
        assert a.spectral_radius == pytest.approx(b.spectral_radius, rel=1e-5)


def test_the_default_max_tokens_reads_16_n_but_no_more_than_32768():
    from hf_koopman.profiling.profiler import default_max_tokens
    from hf_koopman.testing_utils import tiny_model

    assert default_max_tokens(256) == 4096 and default_max_tokens(2048) == 32768
    assert default_max_tokens(10724) == 32768  # 7B width: 3 N, not 171584 tokens through the model
    assert default_max_tokens(40000) == 40000  # never fewer than N
    read = []

    def batches():  # 256 tokens a batch, far more than profile needs
        for i in range(100):
            read.append(i)
            yield {"input_ids": torch.randint(1, 90, (4, 64), generator=torch.Generator().manual_seed(i))}

    result = profile(tiny_model("gpt2"), batches(), num_samples=64, progress=False)
    assert result.meta["tokens_seen"] == 16 * 64 and len(read) == 4


def test_the_progress_bars_say_which_layers_are_being_analysed(capsys):
    """A batched analysis can take minutes at d = 4096: the bar names the layers it is on instead of standing still."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    profile_streaming(config, num_samples=64, chunk_size=1, progress=True)
    err = capsys.readouterr().err
    assert "analysing model.layers.0" in err and "analysing model.layers.1" in err
    said: list[str] = []
    g = torch.Generator().manual_seed(0)
    analysis = _SnapshotAnalysis(rank=None, progress=False, status=said.append)
    for i in range(3):
        analysis.add(f"h.{i}", torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g))
    analysis.finish()
    assert said == ["analysing h.0 .. h.2", ""]
