"""Padded token positions are never counted as token states by `profile()`: an encoder-decoder fed padded
`input_ids` without labels leaves the padding out of its decoder too, PEFT prompt tuning keeps its virtual tokens in
front of the real ones (a right-padded batch profiles exactly as the same tokens unpadded), and NaN in padded
positions only is no "non-finite activation" error."""

from __future__ import annotations

import math

import pytest
import torch

from hf_koopman.profiling import profile
from hf_koopman.testing_utils import tiny_model


def _padded(batch: int, real: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` rows of `real` token ids (1..127) right-padded with id 0 to `width`, and their attention mask."""
    ids = torch.randint(1, 128, (batch, width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width) < real).long().expand(batch, -1).clone()
    return ids.masked_fill(mask == 0, 0), mask


def test_encoder_decoder_without_labels_leaves_the_padding_out_of_the_decoder():
    model = tiny_model("t5")
    ids, mask = _padded(6, 8, 12)
    prof = profile(model, {"input_ids": ids, "attention_mask": mask}, num_samples=64, progress=False)
    seen = prof.meta["tokens_seen_per_layer"]
    decoder = [name for (name, _), stack in zip(prof.layers, prof.stacks) if stack == "decoder"]
    assert decoder and {seen[name] for name in decoder} == {int(mask.sum())}  # 48, not 6 x 12 = 72
    assert set(seen.values()) == {int(mask.sum())}


def test_prompt_tuning_profiles_right_padded_rows_as_the_same_rows_unpadded():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4))
    ids, mask = _padded(4, 16, 22)
    alone = profile(model, {"input_ids": ids[:, :16]}, num_samples=4096, progress=False)
    padded = profile(model, {"input_ids": ids, "attention_mask": mask}, num_samples=4096, progress=False)
    assert padded.meta["tokens_seen_per_layer"] == alone.meta["tokens_seen_per_layer"]
    assert set(alone.meta["tokens_seen_per_layer"].values()) == {4 * (4 + 16)}
    # the virtual tokens come first: the kept positions are the virtual and the real ones, never the padding
    for (name, want), (_, got) in zip(alone.layers, padded.layers):
        assert got.near_unit_mass == pytest.approx(want.near_unit_mass, abs=1e-5), name
        assert got.nonlinearity == pytest.approx(want.nonlinearity, abs=1e-5), name


def test_nan_in_padded_positions_only_is_not_a_non_finite_activation():
    model = tiny_model("mamba")  # causal with no attention: right padding cannot reach the real positions
    with torch.no_grad():
        model.get_input_embeddings().weight[0] = float("nan")  # the pad id 0 embeds to NaN
    ids, mask = _padded(6, 16, 24)
    prof = profile(model, {"input_ids": ids, "attention_mask": mask}, num_samples=4096, progress=False)
    assert set(prof.meta["tokens_seen_per_layer"].values()) == {6 * 16}
    for name, features in prof.layers:
        assert all(math.isfinite(v) for v in (features.near_unit_mass, features.nonlinearity,
                                              features.spectral_radius)), name
