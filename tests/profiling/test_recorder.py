"""ResidualStreamRecorder: snapshot pairs, hooks always removed, padding excluded, subsampling, NaN detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_koopman.profiling import ResidualStreamRecorder, default_probe_inputs, find_residual_blocks
from hf_koopman.profiling.inputs import prepare_batch
from hf_koopman.testing_utils import tiny_model, tiny_peft_model


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _record(model, batch, **kwargs):
    batch = prepare_batch(batch, model)
    with ResidualStreamRecorder(model, **kwargs) as rec, torch.no_grad():
        rec.attention_mask = {
            "": batch.get("attention_mask"),
            "encoder": batch.get("attention_mask"),
            "decoder": batch.get("decoder_attention_mask"),
        }
        model(**batch)
    return rec


@pytest.mark.parametrize(
    "arch", ["gpt2", "llama", "mistral", "mixtral", "qwen2_moe", "mamba", "mamba2", "bert", "vit", "t5"]
)
def test_snapshot_pairs_chain_through_depth(arch):
    model = tiny_model(arch)
    batch = default_probe_inputs(model, num_tokens=96, seed=1)
    rec = _record(model, batch, num_samples=40)
    snaps = rec.snapshots()
    d = model.config.get_text_config().hidden_size if arch != "t5" else model.config.d_model
    expected = 4 if arch == "t5" else 2
    assert len(snaps) == expected
    for _, X, Y in snaps:
        assert X.shape == Y.shape and X.shape[1] == d and 2 <= X.shape[0] <= 40
        assert torch.isfinite(X).all() and torch.isfinite(Y).all()
        assert not torch.equal(X, Y)  # the block did something
    # same token indices in every transition: what leaves block 0 is exactly what enters block 1
    assert torch.equal(snaps[0][2], snaps[1][1])
    assert _no_hooks_left(model)


def test_hooks_removed_on_exception():
    model = tiny_model("llama")
    batch = default_probe_inputs(model, num_tokens=32)
    with pytest.raises(RuntimeError, match="boom"):
        with ResidualStreamRecorder(model):

            def explode(module, args, output):
                raise RuntimeError("boom")

            handle = model.model.layers[1].register_forward_hook(explode)
            try:
                model(**batch)
            finally:
                handle.remove()
    assert _no_hooks_left(model)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_padding_is_ignored(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    plain = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded_ids = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 7, dtype=torch.long)], dim=1)
    padded = {"input_ids": padded_ids, "attention_mask": padded_mask}
    rec_plain = _record(model, plain, num_samples=16, seed=3)
    rec_padded = _record(model, padded, num_samples=16, seed=3)
    assert rec_padded.tokens_seen == rec_plain.tokens_seen == {b.name: 40 for b in find_residual_blocks(model)}
    for (_, X0, Y0), (_, X1, Y1) in zip(rec_plain.snapshots(), rec_padded.snapshots()):
        torch.testing.assert_close(X1, X0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Y1, Y0, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_never_sampled():
    model = tiny_model("gpt2")
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    rec = _record(model, {"input_ids": ids, "attention_mask": mask}, num_samples=None)
    assert rec.snapshots()[0][1].shape[0] == 18
    # with no mask, every position counts
    rec_all = _record(model, {"input_ids": ids}, num_samples=None)
    assert rec_all.snapshots()[0][1].shape[0] == 24


def test_batch_of_one_and_multi_batch_subsampling():
    model = tiny_model("gpt2")
    one = {"input_ids": torch.randint(0, 128, (1, 9))}
    assert _record(model, one, num_samples=64).snapshots()[0][1].shape == (9, 32)
    batches = [{"input_ids": torch.randint(0, 128, (2, 30))} for _ in range(3)]
    with ResidualStreamRecorder(model, num_samples=50, seed=0) as rec, torch.no_grad():
        for batch in batches:
            model(**batch)
    name, X, Y = rec.snapshots()[0]
    assert X.shape == Y.shape == (50, 32) and rec.tokens_seen[name] == 180
    # every kept row is a real token state of the first block's input
    with ResidualStreamRecorder(model, num_samples=None) as full, torch.no_grad():
        for batch in batches:
            model(**batch)
    all_rows = full.snapshots()[0][1]
    assert all(((all_rows - row).abs().sum(1) == 0).any() for row in X)


def test_nan_activation_names_the_layer():
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    batch = default_probe_inputs(model, num_tokens=16)
    with pytest.raises(ValueError, match=r"output of block 'model\.layers\.1'"):
        _record(model, batch)
    assert _no_hooks_left(model)


class _Narrowing(nn.Module):
    """A block of the user's own whose output is narrower than its input."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 4)

    def forward(self, x):
        return self.f(x)


def test_non_residual_block_is_rejected():
    model = nn.Sequential(nn.Linear(8, 8), _Narrowing())
    with pytest.raises(ValueError, match="not a width-preserving residual block"):
        with ResidualStreamRecorder(model, blocks=[model[1]]), torch.no_grad():
            model(torch.randn(3, 5, 8))


class _Residual(nn.Module):
    """A block of the user's own: x + f(x)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.f = nn.Linear(width, width)

    def forward(self, x):
        return x + self.f(x)


class _PairBlock(nn.Linear):
    _not_a_token_stream = "its activations are (B, n, n, C) pair tensors; use another block list"


def test_blocks_whose_class_opts_out_are_refused_with_the_reason():
    model = nn.Sequential(_Residual(8), _PairBlock(8, 8))
    with pytest.raises(ValueError, match=r"block '1' \(_PairBlock\) is not read .* use another block list"):
        ResidualStreamRecorder(model, blocks=[model[1]])
    ResidualStreamRecorder(model, blocks=[model[0]])  # other blocks of the same model are read


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Residual(8)])

    def forward(self, x):
        for _ in range(3):
            x = self.layers[0](x)
        return x


def test_weight_shared_block_gives_one_transition_per_call():
    model = _Shared()
    with ResidualStreamRecorder(model, blocks="layers", num_samples=8) as rec, torch.no_grad():
        model(torch.randn(2, 6, 8))
        model(torch.randn(2, 6, 8))  # a second forward must not create more transitions
    assert [name for name, _, _ in rec.snapshots()] == ["layers.0", "layers.0@1", "layers.0@2"]
    assert rec.tokens_seen == {"layers.0": 24, "layers.0@1": 24, "layers.0@2": 24}


def test_peft_model_is_recorded_through_the_wrapper():
    model = tiny_peft_model("llama")
    rec = _record(model, default_probe_inputs(model.get_base_model(), num_tokens=32), num_samples=16)
    assert [n for n, _, _ in rec.snapshots()] == ["model.layers.0", "model.layers.1"]
    assert _no_hooks_left(model)


def test_num_samples_validation():
    with pytest.raises(ValueError, match="num_samples"):
        ResidualStreamRecorder(tiny_model("gpt2"), num_samples=1)


def test_width_changing_lists_are_dropped_only_when_auto_discovered():
    from transformers.modeling_layers import GradientCheckpointingLayer

    class Stem(GradientCheckpointingLayer):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.f = nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.f(x)

    class Res(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.f(x)

    class TwoLists(nn.Module):  # like wav2vec2: a strided feature extractor, then residual blocks
        def __init__(self):
            super().__init__()
            self.stem = nn.ModuleList([Stem(4, 8), Stem(8, 8)])
            self.layers = nn.ModuleList([Res(), Res()])

        def forward(self, x):
            for module in [*self.stem, *self.layers]:
                x = module(x)
            return x

    model = TwoLists()
    with ResidualStreamRecorder(model, on_width_change="drop") as rec, torch.no_grad():
        model(torch.randn(2, 5, 4))
    assert [name for name, _, _ in rec.snapshots()] == ["layers.0", "layers.1"]
    assert list(rec.dropped) == ["stem"]
    # the dropped list's blocks do not count as layers that saw no tokens (profile()'s token cap reads the minimum)
    assert rec.tokens_seen == {"layers.0": 10, "layers.1": 10} and set(rec.positions_seen) == {"layers.0", "layers.1"}
    with pytest.raises(ValueError, match=r"block 'stem\.0' maps"):
        with ResidualStreamRecorder(model), torch.no_grad():
            model(torch.randn(2, 5, 4))


def test_consecutive_transitions_share_storage():
    """Y of block l and X of block l+1 are the same token states: stored once (halves the recorder's memory)."""
    model = tiny_model("llama", num_hidden_layers=3)
    rec = _record(model, default_probe_inputs(model, num_tokens=100), num_samples=64)
    snaps = rec.snapshots()
    assert all(snaps[i][2].data_ptr() == snaps[i + 1][1].data_ptr() for i in range(len(snaps) - 1))


def test_finiteness_check_has_no_false_positives_or_negatives():
    from hf_koopman.profiling.recorder import _all_finite

    x = torch.randn(64, 8)
    assert _all_finite(x)
    assert _all_finite(torch.full((64, 8), 3e38))  # the float32 sum overflows, the values are finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[5, 3] = bad
        assert not _all_finite(y)
    z = x.clone()
    z[0, 0], z[1, 1] = float("inf"), float("-inf")  # inf + (-inf) = nan: still caught
    assert not _all_finite(z)
    assert not _all_finite(torch.tensor([[float("nan")]], dtype=torch.bfloat16))


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_snapshot_sources_index_the_live_activations(arch):
    """With `detach=False` each recorded piece is `token_view(source)[rows]` of a tensor on the autograd graph (what
    KSS's activation-space cap injects into); with `detach=True` nothing is kept."""
    from hf_koopman.profiling.recorder import _as_tokens

    model = tiny_model(arch)
    batch = prepare_batch(default_probe_inputs(model, num_tokens=64, seed=2), model)
    with ResidualStreamRecorder(model, num_samples=24, detach=False) as rec:
        model(**batch)
    sources = rec.snapshot_sources()
    pieces = {id(piece) for piece, _, _ in sources}
    assert len(pieces) == len(sources) >= len(rec.snapshots()) + 1  # consecutive blocks share a piece
    for piece, source, rows in sources:
        assert source.requires_grad and piece.requires_grad
        torch.testing.assert_close(piece, _as_tokens(source, "b")[0][rows])
    for _, X, Y in rec.snapshots():
        assert any(X is p for p, _, _ in sources) and any(Y is p for p, _, _ in sources)
    assert _record(model, batch, num_samples=24).snapshot_sources() == []
