#!/usr/bin/env python
"""EquivCNP side-by-side measurements on one machine, in one run:

1. cost: forward+backward time of EquivCNP (T(1)) vs ConvCNP vs CNP on the same 1-D training batches (ratios), and of
   EquivCNP's T(1) grid route (LieConv as a 1-D convolution) vs the generic pairwise LieConv route on the same model;
2. exactness: equivariance error of our EquivCNP vs the same network fed the raw coordinate as an extra feature (what
   the released 1-D EquivCNP did), under random translations, for T(1), and under rotations for SO(2).

Usage (from the repository root): OMP_NUM_THREADS=1 python -m benchmarks.bench_equivcnp [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from research.data.equivcnp_gp import sample_training_batch
from hf_koopman.models.equivcnp import CNPConfig, CNPModel, ConvCNPConfig, ConvCNPModel, EquivCNPConfig, EquivCNPModel, get_group


class RawCoordinateEquivCNP(EquivCNPModel):
    """EquivCNP with the raw coordinate appended to the encoder features (the released 1-D model's `[t, h⁰, h¹]`)."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Linear(1 + config.y_dim + config.x_dim, config.hidden_size)

    def encode(self, points, context_x, context_y, context_mask):
        return torch.cat([super().encode(points, context_x, context_y, context_mask), points], -1)


def _time(model, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
    return (time.perf_counter() - t0) / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [sample_training_batch("rbf", 16, gen) for _ in range(args.repeats)]
    eq_cfg = EquivCNPConfig(group="T1", hidden_size=32, num_layers=4, points_per_unit=24, radius=0.25, num_neighbours=16)
    pairwise = EquivCNPModel(eq_cfg)
    pairwise.grid_convolution = False
    models = {"EquivCNP": EquivCNPModel(eq_cfg), "EquivCNP (pairwise)": pairwise, "ConvCNP": ConvCNPModel(ConvCNPConfig()),
              "CNP": CNPModel(CNPConfig())}
    for m in models.values():  # warm-up
        m(**batches[0]).loss.backward()
    # round-robin over models per batch, so that load changes on a shared machine hit every model alike
    times = dict.fromkeys(models, 0.0)
    for b in batches:
        for name, m in models.items():
            times[name] += _time(m, [b]) / len(batches)
    print("1. forward+backward per batch of 16 tasks (same batches, same process):")
    for name, t in times.items():
        print(f"   {name:20s} {1e3 * t:8.1f} ms   ratio to ConvCNP {t / times['ConvCNP']:6.2f}x")
    print(f"   EquivCNP grid route speed-up over the pairwise route: {times['EquivCNP (pairwise)'] / times['EquivCNP']:.2f}x")

    print("2. equivariance error (max |Δ mean|) under 5 random group elements, eval mode:")
    for group, cfg in (("T1", eq_cfg), ("SO2", EquivCNPConfig(group="SO2", hidden_size=16, num_layers=2))):
        g = get_group(group)
        x_dim = cfg.x_dim
        cx, cy, tx = torch.rand(4, 20, x_dim) * 2 - 1, torch.randn(4, 20, 1), torch.rand(4, 50, x_dim) * 2 - 1
        for label, cls in (("ours", EquivCNPModel), ("raw coordinate in features", RawCoordinateEquivCNP)):
            torch.manual_seed(1)
            m = cls(cfg).eval()
            with torch.no_grad():
                ref = m(cx, cy, tx).mean
                err = max(
                    float((m(g.act(a, cx), cy, g.act(a, tx)).mean - ref).abs().max())
                    for a in (g.random_element(gen) for _ in range(5))
                )
                scale = float(ref.std())
            print(f"   {group:4s} {label:28s} max error {err:.2e} (output std {scale:.2e})")


if __name__ == "__main__":
    main()
