"""Smoke test of `benchmarks/bench_guard.py --paired`: both arms train, the guard's parts are timed, and the timing
wrappers are removed afterwards."""

from __future__ import annotations

import math

import pytest

bench_guard = pytest.importorskip("benchmarks.bench_guard")


@pytest.mark.parametrize("check_activations", [True, False])
def test_paired_overhead_times_the_guards_parts(check_activations):
    from hf_koopman.training import guard

    read, capture = guard._squared_norm, guard.StateSnapshot.capture
    row = bench_guard.paired_overhead(32, 0.0, blocks=2, block=3, snapshot_every=2, layers=2,
                                      check_activations=check_activations)
    assert guard._squared_norm is read and guard.StateSnapshot.capture is capture  # wrappers removed
    assert row["check_activations"] is check_activations
    assert math.isfinite(row["overhead"]) and row["plain_step_cpu_ms"] > 0
    # without clipping the guard reads the gradients once per step in on_pre_optimizer_step: the read is timed
    assert row["grad_read_cpu_ms_per_step"] > 0
    # snapshot every 2 passing steps over 6 timed steps: captures happened and were timed
    assert row["snapshot_cpu_ms_per_step"] > 0 and row["snapshot_cpu_ms_each"] > 0
    # the read runs inside the callback's event here, so it cannot exceed the time spent in the events
    assert row["grad_read_cpu_ms_per_step"] <= row["callback_cpu_ms_per_step"] + 1e-9
