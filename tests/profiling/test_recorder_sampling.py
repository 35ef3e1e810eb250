"""The recorder's sample: the same rows however the inputs are batched or padded, the decoder's first input not
confused with the encoder's output, detached snapshots, what is named when the embedding is not finite, the padding
counts, a flat (tokens, d) stream masked (each test fails under a mutation of recorder.py a review found uncaught)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_koopman.profiling.recorder import ResidualStreamRecorder
from hf_koopman.testing_utils import tiny_model

def _snap(model, batches, **kw):
    with ResidualStreamRecorder(model, **kw) as rec, torch.no_grad():
        for b in batches:
            rec.attention_mask = b.get("attention_mask")
            model(**b)
    return rec


def _same_rows(a, b):
    a, b = a[torch.argsort(a[:, 0])], b[torch.argsort(b[:, 0])]
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_the_sample_does_not_depend_on_how_the_rows_are_batched():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 128, (3, 30), generator=torch.Generator().manual_seed(0))
    one = _snap(model, [{"input_ids": ids}], num_samples=16).snapshots()
    three = _snap(model, [{"input_ids": ids[i:i + 1]} for i in range(3)], num_samples=16).snapshots()
    assert all(_same_rows(a[1], b[1]) for a, b in zip(one, three))


def test_padding_does_not_change_the_sample_of_later_batches():
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (1, 10), generator=g), torch.randint(0, 128, (1, 10), generator=g)
    padded = {"input_ids": torch.cat([a, torch.zeros(1, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1).long()}
    plain = _snap(model, [{"input_ids": a}, {"input_ids": b}], num_samples=8).snapshots()
    pad = _snap(model, [padded, {"input_ids": b}], num_samples=8).snapshots()
    assert all(_same_rows(x[1], y[1]) for x, y in zip(plain, pad))


def test_the_decoder_first_block_input_is_not_the_encoder_output():
    model = tiny_model("t5")
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    rec = _snap(model, [{"input_ids": ids, "decoder_input_ids": ids}], num_samples=8)
    snaps = dict((n, (x, y)) for n, x, y in rec.snapshots())
    enc_last = max(n for n in snaps if n.startswith("encoder.block."))
    assert not torch.equal(snaps["decoder.block.0"][0], snaps[enc_last][1])


def test_snapshots_are_detached_outside_no_grad():
    model = tiny_model("gpt2")
    with ResidualStreamRecorder(model, num_samples=8) as rec:
        model(input_ids=torch.randint(0, 128, (1, 10)))
    assert not rec.snapshots()[0][1].requires_grad and not rec.snapshots()[0][2].requires_grad


def test_a_nan_embedding_is_named_as_the_embedding_output():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="embedding output"):
        _snap(model, [{"input_ids": torch.randint(0, 128, (1, 6))}], num_samples=8)


def test_positions_seen_counts_padding_and_tokens_seen_does_not():
    model = tiny_model("gpt2")
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    rec = _snap(model, [{"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": mask}], num_samples=8)
    assert set(rec.positions_seen.values()) == {16} and set(rec.tokens_seen.values()) == {13}


class _Flat(nn.Module):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
        def forward(self, h):
            return h + 0.1 * torch.tanh(self.lin(h))
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList([self.Block(), self.Block()])
    def forward(self, input_ids):
        h = self.emb(input_ids).reshape(-1, 8)
        for layer in self.layers:
            h = layer(h)
        return h


def test_a_flat_token_stream_uses_the_mask():
    model = _Flat()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with ResidualStreamRecorder(model, blocks="layers", num_samples=None, attention_mask=mask) as rec, torch.no_grad():
        model(torch.randint(0, 20, (2, 6)))
    assert set(rec.tokens_seen.values()) == {10}
