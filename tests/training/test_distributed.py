"""Two real processes on CPU (`accelerate launch`, gloo) vs one process: DDP and FSDP2.

Same global batch: 2 ranks x 2 sequences (GA 1) against 1 process x 2 sequences x GA 2 (FSDP: 2 ranks x 1 sequence
x GA 2 against 1 x 1 x GA 4), sequential sampling, so each rank micro-batch is one of the single process's. The task loss, the KSS penalty (mean over
micro-batches = mean over ranks), the pre-clip gradient norm and the gradient-cap factor (each rank caps its own
micro-batch, so the mean over ranks equals the single process's mean over micro-batches) must agree up to float32
reduction-order noise: tolerance rel 1e-4 over 4 optimizer steps (2 of them with KSS). The guard, tripped by an
infinite gradient on rank 1 only (which DDP's averaging spreads), and then by a loss raised on rank 1 only (which only
the guard's all-reduce spreads), must roll back both ranks at the same steps to the same weights and finish the run.

The FSDP run uses `scripts/accelerate_configs/fsdp.yaml` unchanged: accelerate alone would fall back to DDP on CPU;
`KSSTrainer` promotes the run to FSDP2 (`hf_koopman.training.fsdp`), so the parameters must be DTensors with each rank
holding half of the elements, the KSS hooks must sit on the `FSDPGPT2Block`s, and the RKSP profile (at init and every
2 steps) must run on both ranks; the saved `model.safetensors` must hold the full, gathered weights.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import warnings

import pytest

import ddp_worker


REPO = Path(__file__).resolve().parents[2]
WORDS = "the of and to in spectral koopman residual stream layer model training loss gradient norm".split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_processes(
    tmp_path: Path, config: str, ga: int = 1, per_device: int = 2, guard_window: int = 1
) -> tuple[list[dict], list[dict], dict]:
    """Runs the worker on 2 processes with `config` (GA `ga`, `per_device` sequences per micro-batch) and meanwhile
    the 1-process reference with the same global batch (GA `2 * ga`); returns the results. `guard_window > 1` also
    runs the guard with `check_every_n_steps=guard_window` (results in `multi/guard-window-rank*.json`)."""
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_KOOPMAN_TEST_GUARD_WINDOW": str(guard_window)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = tmp_path / "multi"
    for attempt in (1, 2):
        shutil.rmtree(out, ignore_errors=True)  # callers read tmp_path / "multi": the retry reuses the name
        out.mkdir()
        returncode, output, single = _run_once(tmp_path, config, text, out, env, ga, per_device, attempt)
        if returncode == 0:
            break
        # one retry: once in ~4 full-suite runs on the 2-core CI box, a launcher child died with "I/O operation on
        # closed file" before training started; a real failure fails both attempts and is reported below
        warnings.warn(f"2-process launch failed on attempt {attempt} (rc={returncode}); error lines: "
                      f"{_error_lines(output)}; output tail: {output[-1500:]}")
    assert returncode == 0, output[-4000:]
    ranks = [json.loads((out / f"trajectory-rank{r}.json").read_text()) for r in (0, 1)]
    guards = [json.loads((out / f"guard-rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, guards, single


def _error_lines(output: str, keep: int = 30) -> str:
    """The lines of a failed launch that say why (Python tracebacks, C++ aborts), which the output tail can miss."""
    marks = ("Error", "error:", "Traceback", "terminate called", "what():", "Abort", "Signal")
    return "\n".join([line for line in output.splitlines() if any(m in line for m in marks)][-keep:])


def _run_once(tmp_path, config, text, out, env, ga, per_device, attempt):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "scripts" / "accelerate_configs" / config),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        str(Path(ddp_worker.__file__)), str(text), str(out), str(ga), str(per_device),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        shutil.rmtree(tmp_path / "single", ignore_errors=True)
        single = ddp_worker.run_trajectory(str(text), tmp_path / "single", ga=2 * ga, per_device=per_device)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output, single


def _trajectory(result: dict) -> list[tuple]:
    keys = ("loss", "kss/penalty", "grad_norm", "kss/grad_scale")
    return [(h["step"], *(h.get(k) for k in keys)) for h in result["log_history"] if "loss" in h]


def _check_matches_single_process(ranks: list[dict], single: dict) -> None:
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["dist_world_size"] for r in ranks] == [2, 2]
    assert single["world_size"] == 1
    ref = _trajectory(single)
    assert [row[0] for row in ref] == [1, 2, 3, 4]
    assert [row[2] is not None for row in ref] == [True, False, True, False]  # KSS on steps 0 and 2
    got = [_trajectory(r) for r in ranks]
    for rank_rows in got:  # every rank logs the reduced loss / penalty / grad norm
        assert [row[0] for row in rank_rows] == [1, 2, 3, 4]
        for (_, loss, pen, norm, _), (_, ref_loss, ref_pen, ref_norm, _) in zip(rank_rows, ref):
            assert loss == pytest.approx(ref_loss, rel=1e-4)
            assert norm == pytest.approx(ref_norm, rel=1e-4)
            assert (pen is None) == (ref_pen is None)
            if pen is not None:
                assert pen == pytest.approx(ref_pen, rel=1e-4)
    # the cap factor is per process (mean over its micro-batches): its mean over ranks is the reference's mean
    for i, ref_row in enumerate(ref):
        if ref_row[4] is None:
            assert all(rows[i][4] is None for rows in got)
            continue
        assert 0.0 < ref_row[4] < 1.0  # the cap is really active in this setting (alpha = 0.5)
        assert (got[0][i][4] + got[1][i][4]) / 2 == pytest.approx(ref_row[4], rel=1e-4)
    # the periodic RKSP monitoring (steps 2 and 4) and the init profile ran on every rank
    for result in (*ranks, single):
        assert result["init_verdict"] is not None
        assert sum("rksp/score" in h for h in result["log_history"]) == 3


def _check_guard(guards: list[dict], ddp: bool = True) -> None:
    assert [g["global_step"] for g in guards] == [8, 8]  # both ranks finished after the rollback
    assert all(g["divergence"] is None for g in guards)
    # the snapshot interval is "auto" (timed per process) and reduced with the decision: the same on every rank
    restored = [g["events"][0]["restored_step"] for g in guards]
    assert restored[0] == restored[1] in (0, 1)
    for g in guards:
        assert [(e["step"], e["action"]) for e in g["events"]] == [(3, "rollback"), (6, "rollback")]
        assert g["finite"]
    # step 6: only rank 1's loss is raised and the gradients are untouched, so rank 0 trips through the all-reduce alone
    assert guards[0]["events"][1]["restored_step"] == guards[1]["events"][1]["restored_step"]
    assert "loss > 50 or non-finite on another process" in guards[0]["events"][1]["causes"][0]
    assert "loss > 50 or non-finite (step loss here" in guards[1]["events"][1]["causes"][0]
    assert all(len(g["events"][1]["causes"]) == 1 for g in guards)  # the gradient norm stayed sane
    if ddp:  # DDP: the guard reads the averaged pre-clip gradient, non-finite on both ranks alike
        for g in guards:
            assert "non-finite (norm here: " in g["events"][0]["causes"][0]
            assert "on another process" not in g["events"][0]["causes"][0]
    assert [e["new_lr"] for e in guards[0]["events"]] == [e["new_lr"] for e in guards[1]["events"]]
    # identical weights on both ranks after rolling back and training on
    assert guards[0]["weights_sum"] == guards[1]["weights_sum"] and guards[0]["weights_sq"] == guards[1]["weights_sq"]
    # one all-reduce per optimizer step, and under DDP one for the check of the final update (skipped on FSDP shards)
    assert len(guards[0]["reduce_seconds"]) == 8 + ddp


@pytest.mark.slow
def test_two_process_run_matches_single_process_and_guard_stops_all_ranks(tmp_path):
    ranks, guards, single = _launch_two_processes(tmp_path, "ddp.yaml", guard_window=2)
    assert [r["model_class"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert all(r["sharding"]["local_fraction"] == 1.0 for r in ranks)
    _check_matches_single_process(ranks, single)
    _check_guard(guards)
    # check_every_n_steps=2: the fault of step 3 (rank 1 only) is folded on that rank and found at the step-4 check;
    # both ranks roll back to the state validated at the step-2 check and end with identical weights
    windowed = [json.loads((tmp_path / "multi" / f"guard-window-rank{r}.json").read_text()) for r in (0, 1)]
    for g in windowed:
        assert g["global_step"] == 8 and g["divergence"] is None and g["finite"]
        assert [(e["step"], e["first_checked_step"], e["restored_step"], e["action"]) for e in g["events"]] == [
            (4, 3, 1, "rollback")]
        assert len(g["reduce_seconds"]) <= 5  # checks at steps 2, 4, 6, 8 (and an epoch end): not one per step
    assert windowed[0]["weights_sum"] == windowed[1]["weights_sum"]
    assert windowed[0]["weights_sq"] == windowed[1]["weights_sq"]
    # relative_loss_threshold: one reference on both ranks, the all-reduced maximum of the first check
    assert windowed[0]["reference_loss"] == windowed[1]["reference_loss"] > 0
    # a checkpoint every step, the in-memory copy kept once (step 0): the loss fault of step 5 on rank 1 makes both
    # ranks restore checkpoint-3 (validated at step 4, newer than the copy), read back by every rank
    saved = [json.loads((tmp_path / "multi" / f"guard-checkpoints-rank{r}.json").read_text()) for r in (0, 1)]
    for g in saved:
        assert g["global_step"] == 8 and g["divergence"] is None and g["finite"]
        assert [(e["step"], e["restored_step"], e["action"]) for e in g["events"]] == [(5, 3, "rollback")]
    assert saved[0]["weights_sum"] == saved[1]["weights_sum"] and saved[0]["weights_sq"] == saved[1]["weights_sq"]


@pytest.mark.slow
def test_fsdp_two_process_run_shards_the_model_and_matches_single_process(tmp_path):
    import torch
    from safetensors.torch import load_file

    # with gradient accumulation (2 micro-batches of 1 sequence per rank vs 4 in one process): FSDP2's no_sync and
    # the cap's extra autograd passes on every micro-batch
    ranks, guards, single = _launch_two_processes(tmp_path, "fsdp.yaml", ga=2, per_device=1)
    for result in ranks:
        assert result["distributed_type"] == "DistributedType.FSDP"
        sharding = result["sharding"]
        assert sharding["fsdp"] and "FSDPGPT2Block" in sharding["fsdp_modules"]
        assert sharding["dtensor_params"] == sharding["num_params"] > 0  # every parameter is a DTensor shard
        assert sharding["full_numel"] == single["sharding"]["full_numel"]
        assert abs(sharding["local_fraction"] - 0.5) < 0.02  # each rank holds about half of the elements
        assert result["kss_block_classes"] == ["FSDPGPT2Block"]  # KSS hooks on the FSDP-wrapped blocks
    assert sum(r["sharding"]["local_numel"] for r in ranks) >= single["sharding"]["full_numel"]
    _check_matches_single_process(ranks, single)
    assert all(g["distributed_type"] == "DistributedType.FSDP" for g in guards)
    _check_guard(guards, ddp=False)  # FSDP2: the norm is read from the reduce-scattered shards
    # save_model gathered the shards: full shapes, same keys as the single-process checkpoint
    saved = load_file(str(tmp_path / "multi" / "traj" / "model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "traj" / "model.safetensors"))
    # the gathered FSDP state dict has separate storages for tied weights, so transformers also writes the tied
    # `lm_head.weight` (identical to the embedding); every other key is as in the single-process checkpoint
    assert set(saved) - set(reference) <= {"lm_head.weight"} and set(reference) <= set(saved)
    if "lm_head.weight" in saved:
        torch.testing.assert_close(saved["lm_head.weight"], saved["transformer.wte.weight"], rtol=0, atol=0)
    for key in reference:  # and the trained weights agree with the single-process run
        # (Adam normalises tiny gradients to ~lr-sized steps, so allow 5% of one lr = 1e-3 step per element)
        torch.testing.assert_close(saved[key], reference[key], rtol=1e-3, atol=5e-5)
