"""Task generators: associative recall semantics, the synthetic LM segments, WikiText-2 / MNIST readers."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from research.experiments import (
    associative_recall_dataset,
    mnist_datasets,
    read_idx,
    synthetic_lm_dataset,
    wikitext2_datasets,
)


def test_associative_recall_label_is_value_of_queried_key():
    ds = associative_recall_dataset(200, seq_len=64, vocab_size=256, num_pairs=4, seed=3)
    ids, labels = ds[:]["input_ids"].numpy(), ds[:]["labels"].numpy()
    assert ids.shape == (200, 64) and labels.shape == (200,)
    for row, y in zip(ids, labels):
        keys, values = row[0:8:2], row[1:8:2]
        assert len(set(keys.tolist())) == 4 and keys.min() >= 1 and keys.max() < 128
        assert values.min() >= 128
        q = row[-1]
        assert q in keys
        assert y == values[list(keys).index(q)]
        assert row[8:-1].min() >= 128  # filler never looks like a key
    again = associative_recall_dataset(200, seed=3)
    assert np.array_equal(again[:]["input_ids"].numpy(), ids)
    assert not np.array_equal(associative_recall_dataset(200, seed=4)[:]["input_ids"].numpy(), ids)


def test_associative_recall_rejects_bad_shapes():
    with pytest.raises(ValueError, match="seq_len"):
        associative_recall_dataset(4, seq_len=8, num_pairs=4)
    with pytest.raises(ValueError, match="num_samples"):
        associative_recall_dataset(0)


def test_synthetic_lm_segments():
    ds = synthetic_lm_dataset(20, seq_len=128, vocab_size=1000, seed=0)
    ids = ds[:]["input_ids"].numpy()
    assert ids.shape == (20, 128) and ids.min() >= 10 and ids.max() < 1000
    assert np.array_equal(ids, ds[:]["labels"].numpy())
    # sequential segments make "next = current + 1" far more common than chance (1/990)
    assert np.mean(np.diff(ids, axis=1) == 1) > 0.2


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")


def test_mnist_seeded_split_from_fake_files(tmp_path):
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 255, (50, 28, 28)))
    _write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.arange(50) % 10)
    train, test = mnist_datasets(tmp_path, test_fraction=0.2, seed=1)
    assert len(train) == 40 and len(test) == 10
    assert tuple(train[:]["pixel_values"].shape) == (40, 1, 28, 28)
    t2, _ = mnist_datasets(tmp_path, test_fraction=0.2, seed=1)
    assert np.array_equal(t2[:]["labels"].numpy(), train[:]["labels"].numpy())


def test_real_data_readers(data_dir):
    train, test = wikitext2_datasets(data_dir, seq_len=64, max_train=10, max_eval=5)
    assert tuple(train[:]["input_ids"].shape) == (10, 64) and len(test) == 5
    assert int(train[:]["input_ids"].max()) < 256
    mtrain, mtest = mnist_datasets(data_dir, seed=0)
    assert len(mtrain) + len(mtest) == 10_000 and len(mtest) == 2000
