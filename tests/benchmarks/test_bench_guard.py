"""Smoke test of `benchmarks/bench_guard.py --paired`: both arms train, the guard's parts are timed, the
`check_activations` switch reaches the callback, and the timing wrappers are removed afterwards, also on an error."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_guard
from hf_koopman.training import guard


@pytest.mark.parametrize("clip, check_activations", [(0.0, True), (0.0, False), (1.0, True)])
def test_paired_overhead_times_the_guards_parts(clip, check_activations):
    read, capture = guard._squared_norm, guard.StateSnapshot.capture
    row = bench_guard.paired_overhead(32, clip, blocks=2, block=3, snapshot_every=2, layers=2,
                                      check_activations=check_activations)
    assert guard._squared_norm is read and guard.StateSnapshot.capture is capture  # wrappers removed
    assert (row["watched_blocks"] > 0) is check_activations  # the switch reached RKSPCallback
    assert math.isfinite(row["overhead"]) and row["plain_step_cpu_ms"] > 0
    # the guard reads the gradients once per step (at the end of backward with clipping, in the callback without)
    assert row["grad_read_cpu_ms_per_step"] > 0
    # snapshot every 2 passing steps over 6 timed steps: captures happened and were timed
    assert row["snapshot_cpu_ms_per_step"] > 0 and row["snapshot_cpu_ms_each"] > 0
    if clip == 0.0:  # the read runs inside the callback's event, so it cannot exceed the time spent in the events
        assert row["grad_read_cpu_ms_per_step"] <= row["callback_cpu_ms_per_step"] + 1e-9
    else:
        assert row["clip_cpu_ms_per_step"] > 0


def test_timing_wrappers_are_removed_when_a_step_fails(monkeypatch):
    read, capture = guard._squared_norm, guard.StateSnapshot.capture
    calls = {"n": 0}
    real_step = bench_guard.torch.optim.AdamW.step

    def failing_step(self, *args, **kwargs):  # fails in the timed blocks, after the 2 x 10 warm-up steps
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("boom")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(bench_guard.torch.optim.AdamW, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        bench_guard.paired_overhead(32, 0.0, blocks=2, block=3, snapshot_every=2, layers=2)
    assert guard._squared_norm is read and guard.StateSnapshot.capture is capture
