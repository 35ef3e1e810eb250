"""Task data for the RKSP experiments, as `datasets.Dataset` objects (torch-formatted).

* associative recall (paper App. D.1): `[k1, v1, ..., k_n, v_n, p_1 .. p_m, q]`, label = value of the queried key;
* the paper's synthetic LM generator (App. D.2): repetition / sequential / random segments;
* WikiText-2 at byte level: **train on `valid.txt`, evaluate on `test.txt`** (the train split is not available offline;
  `test.txt` is the WikiText-103 test split);
* MNIST test set (IDX files) with a seeded train/test split, as the CIFAR-10 stand-in.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from datasets import Dataset

from research.data.data_dir import resolve_data_dir

__all__ = [
    "associative_recall_dataset",
    "synthetic_lm_dataset",
    "wikitext2_datasets",
    "mnist_datasets",
    "read_idx",
    "resolve_data_dir",
]


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer.")


def associative_recall_dataset(
    num_samples: int, *, seq_len: int = 64, vocab_size: int = 256, num_pairs: int = 4, seed: int = 0
) -> Dataset:
    r"""Associative recall (paper App. D.1, Table 11: seq 64, vocab 256, 4 pairs).

    Layout of one sequence: `[k_1, v_1, ..., k_n, v_n, p_1, ..., p_m, q]` with `m = seq_len - 2n - 1`. The paper does not
    specify the tokens, so we choose: keys are distinct tokens from the lower half of the vocabulary `[1, V/2)`, values
    and filler tokens `p_i` are drawn uniformly from the upper half `[V/2, V)` (so the query, a key, is never confused with
    filler), token 0 is unused. The query `q` is one of the keys, the label is its value. Train with
    `RKSPGPTForSequenceClassification(num_labels=vocab_size)`: cross-entropy on the last position.

    Returns:
        `datasets.Dataset` with `input_ids` `(num_samples, seq_len)` int64 and `labels` `(num_samples,)` int64.
    """
    _check_positive(num_samples=num_samples, seq_len=seq_len, vocab_size=vocab_size, num_pairs=num_pairs)
    half = vocab_size // 2
    if half - 1 < num_pairs:
        raise ValueError(f"vocab_size={vocab_size} too small for {num_pairs} distinct keys in [1, {half}).")
    if seq_len < 2 * num_pairs + 1:
        raise ValueError(f"seq_len={seq_len} must be >= 2*num_pairs+1 = {2 * num_pairs + 1}.")
    rng = np.random.default_rng(seed)
    # distinct keys per row: argsort of uniform noise gives a random permutation of [1, half)
    keys = np.argsort(rng.random((num_samples, half - 1)), axis=1)[:, :num_pairs] + 1
    values = rng.integers(half, vocab_size, size=(num_samples, num_pairs))
    ids = rng.integers(half, vocab_size, size=(num_samples, seq_len))  # filler
    ids[:, 0 : 2 * num_pairs : 2] = keys
    ids[:, 1 : 2 * num_pairs : 2] = values
    which = rng.integers(0, num_pairs, size=num_samples)
    rows = np.arange(num_samples)
    ids[:, -1] = keys[rows, which]
    labels = values[rows, which]
    ds = Dataset.from_dict({"input_ids": ids.astype(np.int64), "labels": labels.astype(np.int64)})
    return ds.with_format("torch")


def _synthetic_sequence(rng: np.random.Generator, seq_len: int, vocab_size: int, low: int) -> np.ndarray:
    out: list[int] = []
    while len(out) < seq_len:
        kind = rng.integers(3)
        if kind == 0:  # repetition: a pattern of length 2-5 repeated 2-4 times
            pattern = rng.integers(low, vocab_size, size=rng.integers(2, 6)).tolist()
            out.extend(pattern * int(rng.integers(2, 5)))
        elif kind == 1:  # sequential: a contiguous integer run of length 5-15 (wrapping inside [low, V))
            n, start = int(rng.integers(5, 16)), int(rng.integers(low, vocab_size))
            out.extend(low + (start - low + i) % (vocab_size - low) for i in range(n))
        else:  # random: i.i.d. tokens, length 5-15
            out.extend(rng.integers(low, vocab_size, size=rng.integers(5, 16)).tolist())
    return np.asarray(out[:seq_len], dtype=np.int64)


def synthetic_lm_dataset(num_samples: int, *, seq_len: int = 256, vocab_size: int = 10_000, seed: int = 0) -> Dataset:
    r"""The paper's synthetic LM generator (App. D.2): concatenated repetition / sequential / random segments,
    tokens from `{10, ..., V-1}`, truncated to `seq_len`; next-token CE over positions `1..T-1`.

    Returns:
        `datasets.Dataset` with `input_ids` and `labels` (equal; the causal-LM head shifts) `(num_samples, seq_len)`.
    """
    _check_positive(num_samples=num_samples, seq_len=seq_len, vocab_size=vocab_size)
    if vocab_size <= 11:
        raise ValueError(f"vocab_size={vocab_size} must exceed 11 (tokens come from {{10, ..., V-1}}).")
    rng = np.random.default_rng(seed)
    ids = np.stack([_synthetic_sequence(rng, seq_len, vocab_size, 10) for _ in range(num_samples)])
    return Dataset.from_dict({"input_ids": ids, "labels": ids.copy()}).with_format("torch")


def _byte_blocks(text: str, seq_len: int) -> np.ndarray:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    n = len(data) // seq_len
    if n == 0:
        raise ValueError(f"text of {len(data)} bytes is shorter than seq_len={seq_len}.")
    return data[: n * seq_len].reshape(n, seq_len)


def wikitext2_datasets(
    data_dir: str | os.PathLike | None = None, *, seq_len: int = 64, max_train: int | None = None, max_eval: int | None = None
) -> tuple[Dataset, Dataset]:
    r"""WikiText-2 raw text as byte-level LM blocks (vocabulary 256, no tokenizer download needed).

    **Train on `wikitext-2/valid.txt`, evaluate on `wikitext-2/test.txt`** (the WikiText-103 test split): the train
    split is not shipped offline. Perplexities computed on these blocks are *per byte*.

    Returns:
        `(train, eval)` datasets with `input_ids`, `labels` `(n, seq_len)`.
    """
    _check_positive(seq_len=seq_len)
    root = resolve_data_dir(data_dir) / "wikitext-2"
    out = []
    for name, cap in (("valid.txt", max_train), ("test.txt", max_eval)):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected WikiText-2 raw files under <data_dir>/wikitext-2/")
        blocks = _byte_blocks(path.read_text(encoding="utf-8"), seq_len)
        if cap is not None:
            blocks = blocks[:cap]
        out.append(Dataset.from_dict({"input_ids": blocks, "labels": blocks.copy()}).with_format("torch"))
    return out[0], out[1]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array (MNIST format: magic, dims, big-endian sizes)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX data type code {raw[2]:#x}.")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values (truncated file?).")
    return data.reshape(shape)


def mnist_datasets(
    data_dir: str | os.PathLike | None = None, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Dataset, Dataset]:
    r"""The MNIST **test set** (10,000 digits; the training set is not shipped) split into train / test with a seeded
    permutation. Pixels scaled to [0, 1] and normalised by the MNIST mean/std (0.1307, 0.3081).

    Returns:
        `(train, test)` datasets with `pixel_values` `(n, 1, 28, 28)` float32 and `labels` `(n,)` int64.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    root = resolve_data_dir(data_dir) / "mnist"
    images = read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"MNIST images ({len(images)}) and labels ({len(labels)}) differ in count.")
    pixels = ((images - 0.1307) / 0.3081)[:, None]
    perm = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    parts = []
    for idx in (perm[n_test:], perm[:n_test]):
        parts.append(Dataset.from_dict({"pixel_values": pixels[idx], "labels": labels[idx]}).with_format("torch"))
    return parts[0], parts[1]
