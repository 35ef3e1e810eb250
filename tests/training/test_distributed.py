"""Two real processes on CPU (`accelerate launch` with scripts/accelerate_configs/ddp.yaml, gloo) vs one process.

Same global batch: 2 ranks x 2 sequences (GA 1) against 1 process x 2 sequences x GA 2, sequential sampling, so
each rank sees exactly one of the single process's micro-batches. The task loss, the KSS penalty (mean over
micro-batches = mean over ranks) and the logged trajectory must agree up to float32 reduction-order noise:
tolerance rel 1e-4 over 4 optimizer steps (2 of them with KSS). The guard, tripped by an infinite loss on rank 1
only, must stop both ranks at the same step.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ddp_worker


REPO = Path(__file__).resolve().parents[2]
WORDS = "the of and to in spectral koopman residual stream layer model training loss gradient norm".split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_matches_single_process_and_guard_stops_all_ranks(tmp_path):
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "scripts" / "accelerate_configs" / "ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(Path(ddp_worker.__file__)), str(text), str(tmp_path / "ddp"),
    ]
    (tmp_path / "ddp").mkdir()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = ddp_worker.run_trajectory(str(text), tmp_path / "single", ga=2, per_device=2)  # meanwhile
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-4000:]

    ranks = [json.loads((tmp_path / "ddp" / f"trajectory-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["dist_world_size"] for r in ranks] == [2, 2]
    assert single["world_size"] == 1

    def trajectory(result):
        return [(h["step"], h["loss"], h.get("kss/penalty")) for h in result["log_history"] if "loss" in h]

    ref = trajectory(single)
    assert [s for s, _, _ in ref] == [1, 2, 3, 4]
    assert [p is not None for _, _, p in ref] == [True, False, True, False]  # KSS on steps 0 and 2
    for result in ranks:  # every rank logs the reduced values
        got = trajectory(result)
        assert [s for s, _, _ in got] == [1, 2, 3, 4]
        for (_, loss, pen), (_, ref_loss, ref_pen) in zip(got, ref):
            assert loss == pytest.approx(ref_loss, rel=1e-4)
            assert (pen is None) == (ref_pen is None)
            if pen is not None:
                assert pen == pytest.approx(ref_pen, rel=1e-4)

    guards = [json.loads((tmp_path / "ddp" / f"guard-rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["global_step"] for g in guards] == [3, 3]  # rank 0 saw a finite loss but stopped too
    assert all(g["divergence"]["step"] == 3 for g in guards)
    assert guards[0]["divergence"]["loss"] != "inf" and guards[1]["divergence"]["loss"] == "inf"
    assert "on another process" in guards[0]["divergence"]["causes"][0]
