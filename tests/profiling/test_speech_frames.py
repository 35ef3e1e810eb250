"""Speech models whose convolutional feature encoder turns a `(B, samples)` waveform into `(B, frames)` token states
(wav2vec2 and its family): a padded batch's waveform mask becomes the frames' mask, and the feature encoder's strided
convolutions, which block discovery also finds, are left out as not width-preserving."""

from __future__ import annotations

import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from hf_koopman.profiling import profile

LENGTHS = [1600, 800, 1200, 400]


def _model() -> Wav2Vec2ForCTC:
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, vocab_size=12, pad_token_id=0, feat_extract_norm="layer",
                            do_stable_layer_norm=True)
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(config).eval()


def _clips() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=generator) for n in LENGTHS]


def _padded(clips: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    values = torch.zeros(len(clips), max(len(c) for c in clips))
    mask = torch.zeros(values.shape, dtype=torch.long)
    for row, clip in enumerate(clips):
        values[row, : len(clip)], mask[row, : len(clip)] = clip, 1
    return {"input_values": values, "attention_mask": mask}


def test_a_padded_waveform_batch_profiles_as_its_clips_one_by_one():
    model = _model()
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(LENGTHS)).sum())
    kwargs = dict(num_samples=frames, layers="wav2vec2.encoder.layers", progress=False)
    padded = profile(model, [_padded(_clips())], **kwargs)
    alone = profile(model, [_padded([clip]) for clip in _clips()], **kwargs)
    assert set(padded.meta["tokens_seen_per_layer"].values()) == {frames}  # the padding frames are left out
    assert padded.meta["tokens_seen_per_layer"] == alone.meta["tokens_seen_per_layer"]
    for a, b in zip(padded.features, alone.features):
        assert abs(a.nonlinearity - b.nonlinearity) < 1e-3 and abs(a.spectral_radius - b.spectral_radius) < 1e-3


def _kss_trainer(tmp_path, *, repeats: int, **kwargs):
    """A `KSSTrainer` with KSS on every step over the clips `repeats` times, each with 3 CTC labels, padded per batch
    by a collator that returns the waveform mask; `kwargs` set the remaining `KSSTrainingArguments`."""
    from hf_koopman.training import KSSTrainer, KSSTrainingArguments

    clips = _clips() * repeats
    labels = [torch.randint(1, 12, (3,), generator=torch.Generator().manual_seed(i)) for i in range(len(clips))]

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return len(clips)

        def __getitem__(self, i):
            return {"clip": clips[i], "labels": labels[i]}

    def collate(items):
        return {**_padded([item["clip"] for item in items]), "labels": torch.stack([item["labels"] for item in items])}

    args = KSSTrainingArguments(str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                kss_every_n_steps=1, remove_unused_columns=False, **kwargs)
    return KSSTrainer(model=_model().train(), args=args, train_dataset=Clips(), data_collator=collate)


def test_kss_trainer_leaves_the_feature_encoder_out_and_keeps_the_padding_out(tmp_path, caplog):
    import logging

    trainer = _kss_trainer(tmp_path, repeats=2, max_steps=2, per_device_train_batch_size=4, kss_layer_fraction=1.0)
    with caplog.at_level(logging.WARNING):
        trainer.train()  # the strided feature encoder was sampled at step 0: left out, not raised on
    assert trainer.kss_steps == [0, 1]
    assert [b.name for b in trainer._kss_blocks] == ["wav2vec2.encoder.layers.0", "wav2vec2.encoder.layers.1"]
    assert "does not match the token grid" not in caplog.text  # the frames' mask was found


def test_an_audio_dataset_is_pointed_at_a_dataloader_with_its_collator():
    import pytest

    datasets = pytest.importorskip("datasets")
    audio = datasets.Dataset.from_dict({"input_values": [clip.tolist() for clip in _clips()], "labels": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=r"a DataLoader with your collator \(DataLoader\(dataset"):
        profile(_model(), audio, num_samples=16, progress=False)


def test_the_frames_mask_is_used_only_on_the_grid_of_the_frames(caplog):
    import logging

    from transformers import SEWConfig, SEWModel

    from hf_koopman.profiling import ResidualStreamRecorder

    recorder = ResidualStreamRecorder(_model(), "wav2vec2.encoder.layers")
    mask = _padded(_clips())["attention_mask"]
    assert recorder._frame_mask(mask, (4, 1)) is None  # a convolution's channels, read as a token grid
    frames = recorder._frame_mask(mask, (4, 79))
    assert frames.sum(-1).tolist() == [79, 39, 59, 19]
    # SEW squeezes the frames before its encoder: its grid is not the frames, and the mask is not claimed for it
    sew = SEWModel(SEWConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                             num_conv_pos_embedding_groups=4, squeeze_factor=2)).eval()
    with caplog.at_level(logging.WARNING):
        profile(sew, [_padded(_clips())], num_samples=16, layers="encoder.layers", progress=False)
    assert "does not match the token grid" in caplog.text


def test_kss_micro_batches_of_one_step_sample_the_same_blocks(tmp_path, monkeypatch):
    from hf_koopman.training import KSSTrainer

    chosen: dict[int, list[list[str]]] = {}
    select = KSSTrainer._kss_select_blocks

    def spy(self, model, step):
        blocks = select(self, model, step)
        chosen.setdefault(step, []).append([b.name for b in blocks])
        return blocks

    monkeypatch.setattr(KSSTrainer, "_kss_select_blocks", spy)
    trainer = _kss_trainer(tmp_path, repeats=4, max_steps=3, per_device_train_batch_size=2, kss_layer_fraction=0.5,
                           kss_seed=1, gradient_accumulation_steps=2)
    trainer.model.config.layerdrop = 0.0
    trainer.train()
    assert any("conv_layers" in name for name in chosen[0][0])  # the feature encoder was sampled at step 0 ...
    assert all(runs[0] == runs[1] for runs in chosen.values())  # ... and both micro-batches of a step agree
    assert not any("conv_layers" in name for runs in list(chosen.values())[1:] for run in runs for name in run)
