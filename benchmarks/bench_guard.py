#!/usr/bin/env python
"""Divergence-guard overhead: the same healthy training run with and without `RKSPCallback`'s guard, side by side.

Model: the research GPT with pre-LN (`research.experiments.sweep.build_model`), associative recall, batch 16,
AdamW, constant lr 1e-3 (no trip happens). Arms: `plain` (no callback) and `guard` (`RKSPCallback(profile_at_init=
False)`, i.e. the guard only: loss hook, gradient norm, block-output check, the per-step CPU snapshot of weights and
optimizer state, one host sync). Each round trains both arms for `--steps` steps from the same initial weights, the
order alternating between rounds (ABBA) so slow load drifts hit both alike; the per-step time is `train_runtime /
steps` from the Trainer's own metrics, and the overhead is the median over rounds of guard / plain - 1 (with min and
max). Two settings: no gradient clipping (the norm is read in `on_pre_optimizer_step`) and `max_grad_norm=1` (the
pre-clip norm is read at the end of each backward pass, `GradNormTap`). Sizes: d 64 and d 256 (L 4).

Whole Trainer runs scatter by tens of percent between rounds on a shared machine, so `--paired` measures the same
thing at the step level: two copies of the model with identical weights train side by side in one process, one
plain and one with the guard's callback events called exactly where the Trainer calls them (`on_step_begin`,
forward + backward, clipping, `on_pre_optimizer_step`, AdamW, `on_optimizer_step`, `on_step_end`); the two arms
alternate step by step (ABBA), each step is timed in process CPU time, and the overhead is the median over blocks of
`--block` steps of (guard CPU time / plain CPU time) - 1, with its interquartile range, and the ratio of the totals
with a 95% block-bootstrap CI (2,000 resamples of the blocks); also the CPU time spent inside the callback's events
per step (the guard's own code, measured directly, without its hooks inside forward and backward), and on CPU two of
its parts wherever they run: its one read of all gradients (`guard._squared_norm`, inside the autograd end-of-backward
callback when clipping is on) and its snapshot copies (`StateSnapshot.capture`). `--no-check-activations` and
`--snapshot-every 1000000000` switch the block-output sums and the snapshot off, to time them by difference. The
Trainer's own per-step work (data loading, logging) is absent from both arms, so this ratio is an upper bound on the
overhead in a Trainer.

On a GPU (`--device cuda`) the paired arms alternate by blocks of `--block` steps timed in wall-clock time between
device syncs (see `paired_overhead`); `--layers` sets the depth and `--check-every` the guard's `check_every_n_steps`.

Also timed: the guard's one all-reduce per step (4 float64 numbers) between 2 gloo processes on this machine, median
over 200 calls. Target (issue 20): overhead <= 1 % per step on CPU.

    python -m benchmarks.bench_guard --out results/safety_net_overhead.json   # replaces its section of safety_net.md
    python -m benchmarks.bench_guard --paired --out results/safety_net_paired.json
    python -m benchmarks.bench_guard --paired --device cuda --sizes 256 1024 --layers 8 --clips 1.0 --blocks 40 \
        --out results/safety_net_paired_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


REPO = Path(__file__).resolve().parents[1]


def train_once(spec, train_ds, guard: bool, clip: float, steps: int) -> float:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from research.experiments.sweep import build_model
    from hf_koopman.training import RKSPCallback

    model = build_model(spec)
    callbacks = [RKSPCallback(profile_at_init=False)] if guard else []
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-3,
            lr_scheduler_type="constant", max_grad_norm=clip, seed=0, logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        out = trainer.train()
    return out.metrics["train_runtime"] / steps


def overhead(hidden: int, clip: float, rounds: int, steps: int) -> dict:
    from research.experiments.sweep import RunSpec, task_datasets

    spec = RunSpec(norm="pre_ln", learning_rate=1e-3, seed=0, hidden_size=hidden, task="assoc_recall", max_steps=steps)
    train_ds, _ = task_datasets(spec, num_train=16 * steps, num_eval=16)
    train_once(spec, train_ds, True, clip, 5)  # warm-up
    ratios, plain_times = [], []
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        t = {arm: train_once(spec, train_ds, arm, clip, steps) for arm in order}
        ratios.append(t[True] / t[False] - 1)
        plain_times.append(t[False])
    return {"hidden_size": hidden, "max_grad_norm": clip, "rounds": rounds, "steps": steps,
            "plain_step_ms": 1000 * statistics.median(plain_times),
            "overhead_median": statistics.median(ratios), "overhead_min": min(ratios), "overhead_max": max(ratios)}


def paired_overhead(hidden: int, clip: float, blocks: int, block: int, snapshot_every: int | str = "auto",
                    device: str = "cpu", layers: int | None = None, check_every: int = 1,
                    check_activations: bool = True) -> dict:
    """Step-level overhead of the guard (see the module docstring): `blocks` x `block` steps per arm.

    On a GPU (`device="cuda"`) the arms alternate block by block instead of step by step and each block is timed in
    wall-clock time between device syncs, so that the plain arm keeps queueing kernels ahead as a Trainer does and the
    guard's one host sync per step is paid where it would be."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from research.experiments.sweep import RunSpec, build_model, task_datasets
    from hf_koopman.training import RKSPCallback

    extra = {} if layers is None else {"num_layers": layers}
    spec = RunSpec(norm="pre_ln", learning_rate=1e-3, seed=0, hidden_size=hidden, task="assoc_recall",
                   max_steps=blocks * block, **extra)
    gpu = device != "cpu"
    train_ds, _ = task_datasets(spec, num_train=16 * 8, num_eval=16)
    batches = [{k: torch.stack([train_ds[i][k] for i in range(j * 16, (j + 1) * 16)]) for k in ("input_ids", "labels")}
               for j in range(8)]
    plain, guarded = build_model(spec), build_model(spec)
    guarded.load_state_dict(plain.state_dict())
    plain.to(device), guarded.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    clock = time.perf_counter if gpu else time.process_time

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    optims = {arm: torch.optim.AdamW(m.parameters(), lr=1e-3) for arm, m in (("plain", plain), ("guard", guarded))}
    callback = RKSPCallback(profile_at_init=False, snapshot_every_n_steps=snapshot_every,
                            check_every_n_steps=check_every, check_activations=check_activations)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_grad_norm=clip, report_to="none", use_cpu=not gpu,
                                 learning_rate=1e-3)
        state, control = TrainerState(), TrainerControl()
        callback.on_train_begin(args, state, control, model=guarded, optimizer=optims["guard"])

        clipping = [0.0]  # process time of the Trainer's own clipping in the plain arm (a norm over all gradients)
        inside = [0.0]  # process time spent inside the callback's events (the guard's own code, without its hooks)
        parts = _GuardParts(clock)  # the guard's gradient read and snapshot copies, wherever they run

        def event(fn, **kw) -> None:
            start = clock()
            fn(args, state, control, **kw)
            inside[0] += clock() - start

        def step(arm: str, batch: dict) -> float:
            if arm == "plain":  # the callback times its steps from one on_step_begin to the next: hide the plain
                wall = time.perf_counter()  # arm's step in between, or the "auto" snapshot budget is spent twice
                spent = _step(arm, batch)
                if callback._step_started is not None:
                    callback._step_started += time.perf_counter() - wall
                return spent
            return _step(arm, batch)

        def _step(arm: str, batch: dict) -> float:
            model, optim = (guarded, optims["guard"]) if arm == "guard" else (plain, optims["plain"])
            start = clock()
            if arm == "guard":
                event(callback.on_step_begin)
            model(**batch).loss.backward()
            if clip > 0:
                clip_start = clock()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if arm == "plain":
                    clipping[0] += clock() - clip_start
            if arm == "guard":
                event(callback.on_pre_optimizer_step, model=model, optimizer=optim)
            optim.step()
            if arm == "guard":
                event(callback.on_optimizer_step, model=model, optimizer=optim)
            optim.zero_grad()
            if arm == "guard":
                state.global_step += 1
                event(callback.on_step_end, model=model, optimizer=optim)
            return clock() - start

        for i in range(10):  # warm-up, and the "auto" snapshot interval settles
            step("plain", batches[i % 8]), step("guard", batches[i % 8])
        inside[0] = clipping[0] = 0.0
        totals = []  # (plain, guard) CPU seconds per block
        parts.start()
        try:
            sync()
            for b in range(blocks):
                t = {"plain": 0.0, "guard": 0.0}
                if gpu:  # whole blocks per arm, ABBA over blocks, synced only at block boundaries
                    for arm in (("plain", "guard") if b % 2 == 0 else ("guard", "plain")):
                        start = time.perf_counter()
                        for i in range(block):
                            step(arm, batches[i % 8])
                        sync()
                        t[arm] = time.perf_counter() - start
                else:
                    for i in range(block):
                        order = ("plain", "guard") if (b * block + i) % 2 == 0 else ("guard", "plain")
                        for arm in order:
                            t[arm] += step(arm, batches[i % 8])
                totals.append((t["plain"], t["guard"]))
        finally:
            parts.stop()
        watched = len(callback._watch.names) if callback._watch is not None else 0
        interval = callback._snapshot_interval()
        callback.on_train_end(args, state, control)
    ratios = [g / p - 1 for p, g in totals]
    plain_ms = [1000 * p / block for p, _ in totals]
    overall = sum(g for _, g in totals) / sum(p for p, _ in totals) - 1
    gen = torch.Generator().manual_seed(0)
    boot = []
    for _ in range(2000):  # block bootstrap of the ratio of totals
        idx = torch.randint(len(totals), (len(totals),), generator=gen).tolist()
        boot.append(sum(totals[i][1] for i in idx) / sum(totals[i][0] for i in idx) - 1)
    boot.sort()
    q = statistics.quantiles(ratios, n=4)
    steps = blocks * block
    return {"hidden_size": hidden, "num_layers": spec.num_layers, "device": device, "check_every_n_steps": check_every,
            "clock": "wall, synced per block" if gpu else "process CPU time",
            "max_grad_norm": clip, "blocks": blocks, "block": block,
            "plain_step_cpu_ms": statistics.median(plain_ms), "overhead": overall,
            "overhead_ci95": [boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]],
            "overhead_median": statistics.median(ratios), "overhead_q1": q[0], "overhead_q3": q[2],
            "callback_cpu_ms_per_step": 1000 * inside[0] / steps,
            "callback_share": inside[0] / sum(p for p, _ in totals), "clip_cpu_ms_per_step": 1000 * clipping[0] / steps,
            "snapshot_interval": interval, "check_activations": check_activations, "watched_blocks": watched,
            # CPU only (on a GPU these calls only queue kernels): the parts of the guard's cost
            "grad_read_cpu_ms_per_step": None if gpu else 1000 * parts.read / steps,
            "snapshot_cpu_ms_per_step": None if gpu else 1000 * parts.capture / steps,
            "snapshot_cpu_ms_each": None if gpu or not parts.captures else 1000 * parts.capture / parts.captures}


class _GuardParts:
    """Process time of the guard's one read of all gradients (`guard._squared_norm`, also where it runs inside the
    autograd end-of-backward callback) and of its snapshot copies (`StateSnapshot.capture`), measured by wrapping the
    two functions for the timed blocks only."""

    def __init__(self, clock) -> None:
        self.clock, self.read, self.capture, self.captures = clock, 0.0, 0.0, 0
        self._saved = None

    def start(self) -> None:
        from hf_koopman.training import guard

        read, capture = guard._squared_norm, guard.StateSnapshot.capture

        def timed_read(params, *args):
            start = self.clock()
            try:
                return read(params, *args)
            finally:
                self.read += self.clock() - start

        def timed_capture(snapshot, *args, **kwargs):
            start = self.clock()
            try:
                return capture(snapshot, *args, **kwargs)
            finally:
                self.capture += self.clock() - start
                self.captures += 1

        self._saved = (read, capture)
        guard._squared_norm, guard.StateSnapshot.capture = timed_read, timed_capture

    def stop(self) -> None:
        from hf_koopman.training import guard

        if self._saved is not None:
            guard._squared_norm, guard.StateSnapshot.capture = self._saved
            self._saved = None


def _allreduce_worker(rank: int, port: int, calls: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from hf_koopman.training.guard import reduce_max

    x = torch.zeros(4, dtype=torch.float64)  # the guard's one all-reduce per step carries four numbers
    for _ in range(20):
        reduce_max(x.clone())
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        reduce_max(x.clone()).tolist()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def allreduce_seconds(calls: int = 200) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.spawn(_allreduce_worker, args=(port, calls, out), nprocs=2, join=True)
        return statistics.median(json.loads(Path(out).read_text()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "safety_net_overhead.json")
    parser.add_argument("--paired", action="store_true", help="step-level paired measurement (see the docstring)")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="model widths d")
    parser.add_argument("--snapshot-every", default="auto",
                        help="the guard's snapshot_every_n_steps (paired mode); a huge value isolates the copy's cost")
    parser.add_argument("--clips", type=float, nargs="+", default=[0.0, 1.0],
                        help="max_grad_norm settings (paired mode; 1.0 is the Trainer's default, 0 = no clipping)")
    parser.add_argument("--device", default="cpu", help="paired mode: `cuda` times a GPU (wall clock, see above)")
    parser.add_argument("--layers", type=int, help="paired mode: model depth (default: the sweep's)")
    parser.add_argument("--check-every", type=int, default=1, help="paired mode: the guard's check_every_n_steps")
    parser.add_argument("--no-check-activations", action="store_true",
                        help="paired mode: RKSPCallback(check_activations=False), to time the block-output sums")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    if args.paired:
        if args.device == "cpu":
            torch.set_num_threads(1)
        every = "auto" if args.snapshot_every == "auto" else int(args.snapshot_every)
        rows = [paired_overhead(h, c, args.blocks, args.block, every, args.device, args.layers, args.check_every,
                                 not args.no_check_activations)
                for h in args.sizes for c in args.clips]
        result = {"rows": rows, "load_before": load, "load_after": os.getloadavg()[0], "torch": torch.__version__,
                  "threads": torch.get_num_threads(),
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device}
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        for r in rows:
            lo, hi = r["overhead_ci95"]
            print(f"d={r['hidden_size']} L={r['num_layers']} clip={r['max_grad_norm']}: plain "
                  f"{r['plain_step_cpu_ms']:.1f} ms/step ({r['clock']}), "
                  f"guard overhead {100 * r['overhead']:+.2f} % [95% CI {100 * lo:+.2f}, {100 * hi:+.2f}] "
                  f"(block median {100 * r['overhead_median']:+.2f} %), inside the callback "
                  f"{r['callback_cpu_ms_per_step']:.3f} ms/step = {100 * r['callback_share']:.2f} %, "
                  f"the Trainer's own clipping {r['clip_cpu_ms_per_step']:.3f} ms/step, "
                  f"snapshot every {r['snapshot_interval']} steps"
                  + ("" if r["grad_read_cpu_ms_per_step"] is None else
                     f"; the guard's gradient read {r['grad_read_cpu_ms_per_step']:.3f} ms/step, its snapshot copies "
                     f"{r['snapshot_cpu_ms_per_step']:.3f} ms/step"))
        return
    rows = [overhead(h, c, args.rounds, args.steps) for h in args.sizes for c in (0.0, 1.0)]
    try:  # a second measurement: a failed gloo start must not lose the rows above
        reduce_s = allreduce_seconds()
    except Exception as err:  # noqa: BLE001
        print(f"all-reduce timing failed ({type(err).__name__}: {err}); the overhead rows stand", file=sys.stderr)
        reduce_s = None
    result = {"rows": rows, "allreduce_seconds_median": reduce_s, "load_before": load, "load_after": os.getloadavg()[0],
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    lines = ["## Overhead", "", f"`python -m benchmarks.bench_guard` ({args.rounds} rounds x {args.steps} steps per arm, "
             f"load average {load:.1f} before, {result['load_after']:.1f} after; {args.out.name}).", "",
             "| d | clipping | plain step (ms) | guard overhead, median [min, max] over rounds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['hidden_size']} | {'max_grad_norm=1' if r['max_grad_norm'] else 'off'} | "
                     f"{r['plain_step_ms']:.1f} | {100 * r['overhead_median']:+.1f} % "
                     f"[{100 * r['overhead_min']:+.1f}, {100 * r['overhead_max']:+.1f}] |")
    lines += ["", "All-reduce of the guard's 4 numbers, 2 gloo processes on this machine: "
              + (f"{1e6 * reduce_s:.0f} µs per step (median of 200)." if reduce_s is not None else "not measured (the "
                 "gloo processes failed to start)."), ""]
    print("\n".join(lines))
    if args.out.resolve().parent != (REPO / "results").resolve():
        args.out.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")  # results/ is left as it is
        return
    # results/safety_net.md: the generated part of its "## Overhead" section (from the heading to the all-reduce line)
    # is replaced; the written reading after it and the later sections are kept; no such section: appended
    md = REPO / "results" / "safety_net.md"
    text = md.read_text(encoding="utf-8")
    generated = "\n".join(lines).rstrip() + "\n"
    if "\n## Overhead\n" not in text:
        md.write_text(text.rstrip() + "\n\n" + generated, encoding="utf-8")
        return
    start = text.index("\n## Overhead\n") + 1
    section_end = text.find("\n## ", start)
    section_end = len(text) if section_end == -1 else section_end + 1
    last = text.find("All-reduce of the guard's", start, section_end)
    end = text.find("\n", last) + 1 if last != -1 else section_end
    md.write_text(text[:start] + generated + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
