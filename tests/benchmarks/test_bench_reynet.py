"""Smoke test of `benchmarks/bench_reynet.py`: every contender runs, the checkpointed layer reproduces the layer, and
the report carries a verdict for every ReyNet layer shape."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_reynet  # noqa: E402


def test_bench_layers_runs_and_reports_a_verdict_per_shape():
    lines: list[str] = []
    met = bench_reynet.bench_layers([6, 8], lines, channels=4, rounds=1)
    assert isinstance(met, bool)
    report = "\n".join(lines)
    verdicts = [line for line in lines if line.startswith("  ReyNet") and line.endswith(("met", "NOT met"))]
    assert len(verdicts) == 5, report
    assert report.count("| vs ") == 5 * 3 * 2  # 5 ReyNet shapes x 3 IEGN implementations x 2 sizes


def test_channel_last_iegn_contender_matches_the_basis():
    torch.manual_seed(0)
    cl = bench_reynet._IEGNLayerChannelsLast(3)
    ref = bench_reynet._IEGNLayer(3, factorized=False)
    ref.load_state_dict(cl.state_dict())
    X = torch.randn(2, 5, 5, 3)
    torch.testing.assert_close(cl(X), ref(X.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
