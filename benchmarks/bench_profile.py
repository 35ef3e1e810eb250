"""Benchmark of `hf_koopman.profile` on GPT-2 small (124M, random init from the embedded config), 2048 probe tokens.

Measured side by side in one run:

1. **Time**: a plain forward (no hooks), the forward with the `ResidualStreamRecorder` hooks that produces the
   snapshots, and the spectral analysis (`profile_from_snapshots`: whitened rank-32 randomized DMD + features for all 12
   layers). Target: analysis <= 25 % of the forward that produced the snapshots. Medians over `--repeats`.
2. **Memory**: peak RSS increase (psutil, sampled every 2 ms) of one forward pass over the loaded model, in fresh
   subprocesses: plain forward,
   forward with the recorder (N = 2048 per layer, subsampled inside the hooks), and `output_hidden_states=True` (what the
   hooks replace: keeps every (B, T, d) state of every layer). Run at 2048 and `--big-tokens` tokens to show that
   the recorder's footprint is O(L·N·d), independent of the number of tokens.

    OMP_NUM_THREADS=2 python benchmarks/bench_profile.py [--repeats 3] [--big-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _build(num_tokens: int):
    from transformers import AutoModel

    from hf_koopman.profiling import default_probe_inputs
    from hf_koopman.profiling.architectures import load_architecture_config

    torch.manual_seed(0)
    model = AutoModel.from_config(load_architecture_config("gpt2")).eval()
    batch = default_probe_inputs(model, num_tokens=num_tokens, seed=0)
    return model, batch


class _RssSampler:
    """Samples this process's RSS every 2 ms in a thread; `peak_mb` is the maximum seen while active."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.002)

    def __enter__(self) -> _RssSampler:
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def memory_child(mode: str, num_tokens: int, num_samples: int) -> None:
    """Runs in a subprocess: prints the peak-RSS increase (over the loaded model) of one forward in `mode`."""
    import gc

    from hf_koopman.profiling import ResidualStreamRecorder

    model, batch = _build(num_tokens)
    with torch.no_grad():  # warm-up on a tiny batch so one-off allocations do not count as forward memory
        model(input_ids=batch["input_ids"][:1, :8])
    gc.collect()
    kept = 0
    with torch.no_grad(), _RssSampler() as rss:
        if mode == "plain":
            out = model(**batch)
        elif mode == "hooks":
            with ResidualStreamRecorder(model, num_samples=num_samples) as rec:
                out = model(**batch)
            unique = {t.data_ptr(): t for _, X, Y in rec.snapshots() for t in (X, Y)}  # Y_l and X_l+1 share storage
            kept = sum(t.numel() for t in unique.values()) * 4
        elif mode == "hidden_states":
            out = model(**batch, output_hidden_states=True)
            kept = sum(h.numel() for h in out.hidden_states) * 4
        else:
            raise ValueError(mode)
    print(json.dumps({"mode": mode, "tokens": num_tokens, "peak_increase_mb": rss.increase_mb,
                      "kept_mb": kept / 2**20}))


def time_run(repeats: int, num_samples: int, rank: int) -> dict:
    from hf_koopman.profiling import ResidualStreamRecorder, profile_from_snapshots

    model, batch = _build(2048)
    plain, hooked, analysis = [], [], []
    result = None
    with torch.no_grad():
        model(**batch)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            plain.append(time.perf_counter() - t0)
            with ResidualStreamRecorder(model, num_samples=num_samples) as rec:
                t0 = time.perf_counter()
                model(**batch)
                hooked.append(time.perf_counter() - t0)
            snapshots = rec.snapshots()
            t0 = time.perf_counter()
            result = profile_from_snapshots(snapshots, rank=rank)
            analysis.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in (("plain", plain), ("hooked", hooked), ("analysis", analysis))}
    return {
        "forward_plain_s": med["plain"],
        "forward_with_hooks_s": med["hooked"],
        "analysis_s": med["analysis"],
        "analysis_over_forward": med["analysis"] / med["hooked"],
        "hook_overhead": med["hooked"] / med["plain"] - 1,
        "layers": len(result.layers),
        "tokens": int(batch["input_ids"].numel()),
        "all_runs": {"plain": plain, "hooked": hooked, "analysis": analysis},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--big-tokens", type=int, default=8192)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        memory_child(args.child[0], int(args.child[1]), args.num_samples)
        return 0

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, GPT-2 small random init, rank {args.rank}, "
          f"N {args.num_samples}")
    timing = time_run(args.repeats, args.num_samples, args.rank)
    print(f"\n== time (median of {args.repeats}), {timing['tokens']} tokens, {timing['layers']} layers")
    print(f"plain forward          {timing['forward_plain_s']:8.3f} s")
    print(f"forward with hooks     {timing['forward_with_hooks_s']:8.3f} s   hook overhead {100 * timing['hook_overhead']:+.1f} %")
    print(f"spectral analysis      {timing['analysis_s']:8.3f} s")
    print(f"analysis / forward     {100 * timing['analysis_over_forward']:8.1f} %   (target <= 25 %)")

    memory = []
    if not args.skip_memory:
        print("\n== peak RSS increase of one forward (fresh subprocess each)")
        for tokens in (2048, args.big_tokens):
            for mode in ("plain", "hooks", "hidden_states"):
                cmd = [sys.executable, __file__, "--child", mode, str(tokens), "--num-samples", str(args.num_samples)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row = json.loads(out)
                memory.append(row)
                print(f"{tokens:6d} tokens  {mode:<14} peak +{row['peak_increase_mb']:8.1f} MB   kept {row['kept_mb']:7.1f} MB")
        for tokens in (2048, args.big_tokens):
            rows = {r["mode"]: r for r in memory if r["tokens"] == tokens}
            plain = max(rows["plain"]["peak_increase_mb"], 1.0)
            print(f"{tokens:6d} tokens  hooks / plain = {rows['hooks']['peak_increase_mb'] / plain:5.2f}x   "
                  f"hidden_states / plain = {rows['hidden_states']['peak_increase_mb'] / plain:5.2f}x")
    print(json.dumps({"timing": {k: v for k, v in timing.items() if k != "all_runs"}, "memory": memory}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
