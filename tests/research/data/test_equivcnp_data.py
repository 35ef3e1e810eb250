"""Data helpers of the EquivCNP experiments: GP tasks, IDX reader, clock digits, affine shifts, pixel tasks."""

from __future__ import annotations

import gzip
import math

import pytest
import torch

from research.data import equivcnp_gp as gp
from research.data import equivcnp_images as imgs


@pytest.mark.parametrize("kernel", gp.KERNELS)
def test_gp_batches_follow_the_protocol(kernel):
    gen = torch.Generator().manual_seed(0)
    b = gp.sample_training_batch(kernel, 4, gen)
    nc, nt = b["context_x"].shape[1], b["target_x"].shape[1]
    assert 3 <= nc <= 49 and 6 <= nt <= 98 and b["target_y"].shape == (4, nt, 1)
    torch.testing.assert_close(b["target_x"][:, :nc], b["context_x"])  # targets include the context
    assert b["context_x"].abs().max() <= 2
    e = gp.sample_evaluation_batch(kernel, 3, gen, num_targets=40)
    assert e["target_x"].shape == (3, 40, 1) and e["target_x"].min() == -4 and e["target_x"].max() == 4
    for i in range(3):  # every context point is one of the targets, with the same value
        cx = e["context_x"][i, e["context_mask"][i], 0]
        match = (cx[:, None] - e["target_x"][i, None, :, 0]).abs().argmin(-1)
        torch.testing.assert_close(e["target_y"][i, match, 0], e["context_y"][i, e["context_mask"][i], 0])
    k = gp.kernel_matrix(kernel, torch.linspace(-2, 2, 30, dtype=torch.float64), torch.linspace(-2, 2, 30, dtype=torch.float64))
    assert torch.linalg.eigvalsh(k).min() > -1e-8 and torch.allclose(k.diagonal(), torch.ones(30, dtype=torch.float64))
    with pytest.raises(ValueError, match="kernel"):
        gp.kernel_matrix("cosine", torch.zeros(2), torch.zeros(2))


def test_idx_reader(tmp_path):
    data = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(header + data.numpy().tobytes())
    torch.testing.assert_close(imgs.read_idx(path), data)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (4).to_bytes(4, "big") + b"abcd")
    with pytest.raises(ValueError, match="IDX"):
        imgs.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(header + b"\x00")
    with pytest.raises(ValueError, match="bytes"):
        imgs.read_idx(short)
    with pytest.raises(FileNotFoundError, match="HF_KOOPMAN_DATA"):
        imgs.load_mnist(tmp_path)


def test_mnist_loads(data_dir):
    x, y = imgs.load_mnist(data_dir)
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and 0 <= x.min() and x.max() <= 1
    assert set(y.tolist()) == set(range(10))


def test_clock_digits_and_affine_shifts():
    d = imgs.draw_clock_digits(torch.arange(10), size=24)
    assert d.shape == (10, 24, 24) and 0 <= d.min() and d.max() <= 1
    ink = d.flatten(1).sum(-1)
    assert ink[8] > ink[0] > ink[1] and ink[8] >= ink.max() - 1e-4  # 8 lights every segment, 1 only two
    assert torch.all(d[8] >= d[1] - 1e-6)  # segments of 1 are a subset of those of 8
    with pytest.raises(ValueError, match="0-9"):
        imgs.draw_clock_digits(torch.tensor([10]))
    same = imgs.affine_images(d, torch.zeros(10), torch.ones(10))
    torch.testing.assert_close(same, d, atol=1e-5, rtol=0)
    r90 = imgs.affine_images(d[:1], torch.tensor([math.pi / 2]), torch.ones(1))
    torch.testing.assert_close(r90[0], torch.rot90(d[0], 1), atol=1e-4, rtol=0)  # counter-clockwise
    small = imgs.affine_images(d, torch.zeros(10), torch.full((10,), 0.4), size=32)
    assert small.shape == (10, 32, 32)
    torch.testing.assert_close(small.flatten(1).sum(-1), ink * 0.16, rtol=0.1, atol=0.5)  # area scales with s²


def test_pixel_tasks():
    coords = imgs.pixel_coordinates(8)
    assert coords.shape == (64, 2) and coords.norm(dim=-1).min() > 0 and coords.abs().max() < 1
    torch.testing.assert_close(coords.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    images = torch.rand(3, 8, 8)
    t = imgs.image_tasks(images, 0.5, torch.Generator().manual_seed(0))
    assert t["target_x"].shape == (3, 64, 2) and t["target_y"].shape == (3, 64, 1)
    for i in range(3):
        m = t["context_mask"][i]
        idx = (t["context_x"][i, m][:, None] - coords[None]).abs().sum(-1).argmin(-1)
        torch.testing.assert_close(t["context_y"][i, m, 0], images[i].reshape(-1)[idx])
    frac = imgs.image_tasks(torch.rand(16, 16, 16), 0.25, torch.Generator().manual_seed(1))["context_mask"].float().sum(-1) / 256
    assert 0.15 < float(frac.mean()) < 0.35
