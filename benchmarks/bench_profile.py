"""Benchmark of `hf_koopman.profile` on GPT-2 small (124M, random init from the embedded config), 2048 probe tokens.

Measured side by side in one run (issue #19, item 3):

1. **Time**: a plain forward (no hooks), the forward with the `ResidualStreamRecorder` hooks that produces the
   snapshots, and the spectral analysis of all 12 layers by `profile_from_snapshots` with its default recipe (the full
   spectrum, `rank=None`: Cholesky-whitened exact DMD + features). Target: analysis <= 1x the plain forward. The
   rank-32 approximation (`rank=32`, the paper's randomized recipe) is timed in the same loop for reference. Each
   phase is timed in wall-clock and in process CPU time (all threads); the repeats interleave the phases so that load
   changes on a shared machine hit all of them alike. Medians over `--repeats`. With `--breakdown` the full-spectrum
   analysis is split into the bare `whitened_dmd` (with eigenvectors, called as `profile_from_snapshots` calls it,
   and eigenvalues only) and the rest.
2. **Memory**: peak RSS increase (psutil, sampled every 2 ms) of one forward pass over the loaded model, in fresh
   subprocesses: plain forward,
   forward with the recorder (N = 2048 per layer, subsampled inside the hooks), and `output_hidden_states=True` (what the
   hooks replace: keeps every (B, T, d) state of every layer). Run at 2048 and `--big-tokens` tokens to show that
   the recorder's footprint is O(L·N·d), independent of the number of tokens.

    OMP_NUM_THREADS=2 python benchmarks/bench_profile.py --repeats 5 --skip-memory --breakdown --json results/bench_profile.json

3. **Floor** (`--floor LAYERS`): each dense operation of the default analysis timed alone in one thread on real
   layers' operands (`formulation_floor`); their sum is what this implementation costs without any overhead around
   the calls, compared with the forward's CPU time.
4. **One thread** (`--one-thread`): the plain forward and the analysis again with torch limited to one thread,
   interleaved, CPU time: the ratio without any threading effect on either side.
5. **Least work** (`--least-work`, alone): the least work any implementation of the same per-layer outputs does
   (`least_work`, checked against the library's outputs), the plain forward and this analysis in paired rounds, in two
   threads and in one: whether a bound can be claimed, and how far this implementation sits above it.

    OMP_NUM_THREADS=2 python benchmarks/bench_profile.py --least-work --repeats 25 \
        --json results/bench_profile_least_work_xeon.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


class _Clock:
    """Wall-clock and process CPU time (user + sys of all threads) of a block."""

    def __enter__(self) -> "_Clock":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def time_run(repeats: int, num_samples: int, rank: int, breakdown: bool = False, floor_layers: int = 0,
             one_thread: bool = False) -> dict:
    from hf_koopman.koopman import whitened_dmd
    from hf_koopman.profiling import ResidualStreamRecorder, profile_from_snapshots
    from hf_koopman.profiling.profiler import _stack_chunk

    model, batch = _build(2048)
    runs: dict[str, list[tuple[float, float]]] = {}

    def record(name: str, clock: _Clock) -> None:
        runs.setdefault(name, []).append((clock.wall, clock.cpu))

    full = approx = None
    with torch.no_grad():
        model(**batch)  # warm-up
        with ResidualStreamRecorder(model, num_samples=num_samples) as rec:
            model(**batch)
        # warm-up of the analysis (thread pools, LAPACK workspaces)
        profile_from_snapshots(rec.snapshots(), progress=False)
        for _ in range(repeats):
            with _Clock() as c:
                model(**batch)
            record("plain", c)
            with ResidualStreamRecorder(model, num_samples=num_samples) as rec:
                with _Clock() as c:
                    model(**batch)
            record("hooked", c)
            snapshots = rec.snapshots()
            with _Clock() as c:
                full = profile_from_snapshots(snapshots, progress=False)  # the default: full spectrum
            record("analysis_full", c)
            with _Clock() as c:
                approx = profile_from_snapshots(snapshots, rank=rank, progress=False)
            record("analysis_rank", c)
            if breakdown:
                X, Y = _stack_chunk(snapshots)  # as profile_from_snapshots stacks them (Y[l] is X[l + 1])
                with _Clock() as c:
                    whitened_dmd(X, Y, keep_eigenvectors=False)  # as profile_from_snapshots calls it
                record("dmd_full_vectors", c)
                with _Clock() as c:
                    whitened_dmd(X, Y, eigenvectors=False)
                record("dmd_full_values_only", c)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    plain_w, plain_c = med["plain"]
    out = {
        "tokens": int(batch["input_ids"].numel()),
        "layers": len(full.layers),
        "identifiable_modes_full": int(len(full.eigenvalues[0])),
        "rank_approximation": rank,
        "median_wall_s": {k: w for k, (w, _) in med.items()},
        "median_cpu_s": {k: c for k, (_, c) in med.items()},
        "full_over_forward_wall": med["analysis_full"][0] / plain_w,
        "full_over_forward_cpu": med["analysis_full"][1] / plain_c,
        "rank_over_forward_wall": med["analysis_rank"][0] / plain_w,
        "rank_over_forward_cpu": med["analysis_rank"][1] / plain_c,
        "hook_overhead": med["hooked"][0] / plain_w - 1,
        "paired_ratio_wall": paired_ratio([w for w, _ in runs["analysis_full"]], [w for w, _ in runs["plain"]]),
        "paired_ratio_cpu": paired_ratio([c for _, c in runs["analysis_full"]], [c for _, c in runs["plain"]]),
        "all_runs_wall_cpu": runs,
        "full_layer_mean": _layer_mean(full),
        "rank_layer_mean": _layer_mean(approx),
    }
    if one_thread:
        snapshots = rec.snapshots()
        with torch.no_grad():
            analysis = lambda: profile_from_snapshots(snapshots, progress=False)  # noqa: E731
            rounds = _one_thread_interleaved({"plain": lambda: model(**batch), "analysis_full": analysis}, repeats)
        cpu = {name: statistics.median(v) for name, v in rounds.items()}
        out["one_thread_cpu_s"] = cpu
        out["one_thread_full_over_forward_cpu"] = cpu["analysis_full"] / cpu["plain"]
        out["one_thread_paired_cpu_ratio"] = paired_ratio(rounds["analysis_full"], rounds["plain"])
        out["one_thread_runs_cpu"] = rounds
    if floor_layers:
        X, Y = _stack_chunk(rec.snapshots())
        rows = formulation_floor(X, Y, floor_layers, repeats)
        layers = X.shape[0]
        for row in rows:
            row["all_layers_cpu_s"] = row["cpu_s_per_layer"] * layers
            row["over_forward_cpu"] = row["all_layers_cpu_s"] / plain_c
        with torch.no_grad():  # the operations run in one thread: the forward's CPU time in one thread too
            forward_one = _one_thread_cpu(lambda: model(**batch), repeats)
        total = sum(r["all_layers_cpu_s"] for r in rows)
        out["floor"] = {"timed_layers": min(floor_layers, layers), "rows": rows, "all_layers_cpu_s": total,
                        "over_forward_cpu": total / plain_c, "forward_one_thread_cpu_s": forward_one,
                        "over_forward_one_thread_cpu": total / forward_one}
    return out


def _one_thread_cpu(fn, repeats: int) -> float:
    """Median process CPU time (s) of `fn()` with torch limited to one thread, after one warm-up call."""
    return statistics.median(_one_thread_interleaved({"fn": fn}, repeats)["fn"])


def paired_ratio(num: list[float], den: list[float], level: float = 0.95) -> dict:
    """Median of the paired ratios `num[i] / den[i]` (one interleaved round each) and its distribution-free interval.

    The interval is `[r_(k), r_(n+1-k)]` of the sorted ratios with the largest `k` such that a Binomial(n, 1/2)
    falls below `k` with probability at most `(1 - level) / 2`: it covers the population median with probability at
    least `level` whatever the distribution of the ratios. `None` bounds when `n` is too small for that level.
    """
    ratios = sorted(a / b for a, b in zip(num, den, strict=True))
    n, tail, k, below = len(ratios), (1 - level) / 2, 0, 0.0
    while k < n and below + math.comb(n, k) / 2**n <= tail:  # below = P(Bin(n, 1/2) < k + 1)
        below += math.comb(n, k) / 2**n
        k += 1
    low, high = (ratios[k - 1], ratios[n - k]) if k else (None, None)
    return {"n": n, "median": statistics.median(ratios), "low": low, "high": high, "level": level}


def _one_thread_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Process CPU times (s) of each `fns[name]()` per round with torch limited to one thread, the calls interleaved
    in every round (after one warm-up round), so that load changes hit all of them alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in fns}
    try:
        for round_ in range(repeats + 1):
            for name, fn in fns.items():
                start = time.process_time()
                fn()
                if round_:
                    times[name].append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    return times


def formulation_floor(X: torch.Tensor, Y: torch.Tensor, layers: int, repeats: int, eps: float = 1e-5) -> list[dict]:
    r"""Each dense operation of the default full-spectrum analysis, timed alone on real layers' data.

    The list is the `O(N d^2)` and `O(d^3)` work of `whitened_dmd` + `spectral_features` as implemented today (see
    `hf_koopman/koopman/dmd.py`): per layer the Gram products $D^\top X$ and $D^\top D$ (the latter from the blocks of
    its upper triangle, `_symmetric_gram`; the input covariance comes from the previous layer's), the float64
    Cholesky factors $L$ of $S_{xx} + \epsilon I$ and $R$ of $S_{xx}$, the operator $I + (L^{-1}S_{dx}R^{-\top}R^{-1})L$
    (three right-sided triangular solves and a product), $P = (S_{xx} + \epsilon I)^{-1}$ for the traces of
    $\eta_{nl}$, `eig` with right eigenvectors, the LU inverse of their real form (left eigenvectors), the two norm
    estimates of kappa(V), and the ResDMD quadratic forms (a right-sided triangular solve and two products). Each call
    runs in one thread on the `(N, d)` / `(d, d)` float32 operands of a real layer (float64 where the code factorises
    in float64), warm, median of `repeats`; the table keeps the median over `layers` layers. The sum is what this
    implementation costs with no Python, casts, checks or copies around the calls: the floor of this implementation,
    not of every implementation. Raises `RuntimeError` if a timed layer's operator does not have `whitened_dmd`'s
    eigenvalues (moduli within 1e-3 of the spectral radius).

    Args:
        X, Y: `(L, N, d)` stacked snapshots as `profile_from_snapshots` stacks them.
    Returns:
        one dict per operation: `what`, `calls_per_layer`, `cpu_s_per_layer` (median over the timed layers).
    """
    from hf_koopman.koopman import whitened_dmd
    from hf_koopman.koopman.dmd import _conjugate_pairs, _norm2, _symmetric_gram, _to_real_form

    f64 = torch.float64
    solve = torch.linalg.solve_triangular
    d = X.shape[-1]
    eye64 = torch.eye(d, dtype=f64)
    per_layer: dict[str, list[float]] = {}
    calls: dict[str, int] = {}
    for layer in range(min(layers, X.shape[0])):
        x = X[layer].float()
        xc = x - x.mean(0)
        dc = Y[layer].float() - x
        dc -= dc.mean(0)
        n1 = x.shape[0] - 1
        sxx, sdx, sdd = _symmetric_gram(xc) / n1, dc.mT @ xc / n1, _symmetric_gram(dc) / n1
        s64 = sxx.to(f64)
        chol = torch.linalg.cholesky(s64 + eps * eye64).float()
        root = torch.linalg.cholesky(s64).float()

        def operator():
            b = solve(chol.mT, solve(root.mT, sdx, upper=True, left=False).mT, upper=True, left=False).mT
            return solve(root, b, upper=False, left=False) @ chol

        op = operator() + torch.eye(d)
        lam, vec = torch.linalg.eig(op)
        order = torch.argsort(lam.abs(), descending=True, stable=True)
        lam, vec = lam[order], vec[:, order]
        start = _conjugate_pairs(lam)
        real = _to_real_form(vec, start, 2.0**0.5) if start is not None else torch.cat([vec.real, vec.imag], -1)
        real = real[:, :d].contiguous()
        lu, piv = torch.linalg.lu_factor(real)
        real_inv = torch.linalg.lu_solve(lu, piv, torch.eye(d), left=False)
        ref = whitened_dmd(X[layer : layer + 1], Y[layer : layer + 1], eigenvectors=False).eigenvalues[0]
        gap = float((lam.abs().to(f64) - ref.abs()).abs().max())
        if gap > 1e-3 * float(ref.abs().max()):  # the timed operands must be the library's operator
            raise RuntimeError(f"layer {layer}: the floor's operator differs from whitened_dmd's (moduli off by {gap:.2g})")
        ops = [
            ("Gram products D^T X and D^T D (upper-triangle blocks), (N, d) operands", 2,
             lambda: (dc.mT @ xc, _symmetric_gram(dc))),
            ("Cholesky of S_xx + eps I and of S_xx (float64)", 2,
             lambda: (torch.linalg.cholesky_ex(s64 + eps * eye64), torch.linalg.cholesky_ex(s64))),
            ("operator: three right-sided triangular solves, a product", 4, operator),
            ("traces: Cholesky inverse P", 1, lambda: torch.cholesky_inverse(chol)),
            ("eig with right eigenvectors", 1, lambda: torch.linalg.eig(op)),
            ("left eigenvectors: LU inverse of the real form (right-sided)", 2,
             lambda: torch.linalg.lu_solve(*torch.linalg.lu_factor(real), torch.eye(d), left=False)),
            ("kappa(V): norm estimates of V and V^-1", 2, lambda: (_norm2(real), _norm2(real_inv))),
            ("ResDMD: right-sided triangular solve, two products", 3,
             lambda: (lambda w: (w @ sdd, w @ sdx.mT))(solve(chol, real_inv, upper=False, left=False))),
        ]
        for what, count, fn in ops:
            per_layer.setdefault(what, []).append(_one_thread_cpu(fn, repeats))
            calls[what] = count
    return [{"what": k, "calls_per_layer": calls[k], "cpu_s_per_layer": statistics.median(v)}
            for k, v in per_layer.items()]


def least_work(states: list[torch.Tensor], parallel: bool = False, eps: float = 0.0) -> list[dict]:
    r"""The least work any implementation of the profile's per-layer outputs does here, as one tight sequence.

    The outputs: the eigenvalues of the whitened operator, $\kappa(V)$ of its unit-norm eigenvectors, and the ResDMD
    residual of each mode, which needs the left eigenvectors (rows of $V^{-1}$). Per layer, with the cheapest routine
    available on this machine for each step (`torch.linalg.eig`, MKL, is the fastest eigensolver here): the input
    covariance $S_{xx}$ (shared: layer l's output covariance is layer l + 1's input covariance, so the L + 1 chained
    states need L + 1 symmetric Grams) and the cross Gram $S_{yx}$; a float32 Cholesky factor $L$ of
    $S_{xx} + \epsilon I$; the whitened operator $L^{-1}S_{yx}L^{-\top}$ (two triangular solves); `eig` with right
    eigenvectors; the LU factorisation and inverse of their real form (left eigenvectors; $V^{-1}$ for $\kappa(V)$); the ResDMD forms from
    $u^* \tilde S_{yy} u = w^* S_{yy} w$, $w = L^{-\top}u$ (one triangular solve, one product), using
    $u^*\tilde S_{yx}u = \lambda\|u\|^2$ for exact left eigenvectors. Left out, so the sum is a lower bound: the
    norm estimates of $\kappa(V)$, the features, every check, and the accuracy safeguards of `whitened_dmd` (float64
    factorisations, update-form Grams).

    Args:
        states: L + 1 `(N, d)` float32 residual-stream states; layer l maps `states[l]` to `states[l + 1]`.
        parallel: layers side by side in worker threads, each in one thread (as `whitened_dmd` runs them).
    Returns:
        per layer: `eigenvalues` `(d,)` complex, `residuals` `(d,)` float, `kappa_parts`: the real forms of V and
        V^-1 that a norm estimate of kappa(V) would read (column scaling, O(d^2), is left out too).
    """
    from hf_koopman.koopman.dmd import _conjugate_pairs, _map_layers, _symmetric_gram, _to_real_form

    solve = torch.linalg.solve_triangular
    n1 = states[0].shape[0] - 1
    d = states[0].shape[-1]
    eye = torch.eye(d)
    centred = _map_layers(lambda k: states[k] - states[k].mean(0), len(states), parallel)
    grams = _map_layers(lambda k: _symmetric_gram(centred[k]) / n1, len(states), parallel)

    def layer(i: int) -> dict:
        syx = centred[i + 1].mT @ centred[i] / n1
        chol = torch.linalg.cholesky(grams[i] + eps * eye)
        op = solve(chol.mT, solve(chol, syx, upper=False), upper=True, left=False)  # L^-1 S_yx L^-T
        lam, vec = torch.linalg.eig(op)
        start = _conjugate_pairs(lam)
        real = _to_real_form(vec, start) if start is not None else vec.real  # (Re v, Im v) per pair
        lu, piv = torch.linalg.lu_factor(real)
        rows = torch.linalg.lu_solve(lu, piv, eye, left=False)  # real form of V^-1: left eigenvectors as rows
        w = solve(chol, rows, upper=False, left=False)  # rows w_j^T = u_j^T L^-1
        q_yy, norm2 = ((w @ grams[i + 1]) * w).sum(-1), rows.square().sum(-1)
        if start is not None:  # a pair's rows (a, b) make u = a - ib: u^* G u = a^T G a + b^T G b
            idx = start.nonzero().flatten()
            for q in (q_yy, norm2):
                q[idx] += q[idx + 1]
                q[idx + 1] = q[idx]
        res = (q_yy / norm2 - lam.abs().square()).clamp_min(0.0).sqrt()
        return {"eigenvalues": lam, "residuals": res, "kappa_parts": (real, rows)}

    return _map_layers(layer, len(states) - 1, parallel)


def check_least_work(X: torch.Tensor, Y: torch.Tensor, layers: list[dict]) -> None:
    """Raises `RuntimeError` unless `least_work`'s `layers` give `whitened_dmd(X, Y)`'s outputs: eigenvalue moduli
    within 1e-3 of the spectral radius and the same number of modes below the ResDMD threshold 0.1 in every layer.

    Args:
        X, Y: `(L, N, d)` stacked snapshots as `profile_from_snapshots` stacks them.
    """
    from hf_koopman.koopman import whitened_dmd
    from hf_koopman.koopman.features import resdmd_residuals

    ref = whitened_dmd(X, Y)
    for i, out in enumerate(layers):
        lam = out["eigenvalues"]
        order = torch.argsort(lam.abs(), descending=True, stable=True)
        gap = float((lam.abs()[order].double() - ref.eigenvalues[i].abs()).abs().max())
        reliable = int((out["residuals"] < 0.1).sum()), int((resdmd_residuals(ref.layer(i)) < 0.1).sum())
        if gap > 1e-3 * float(ref.eigenvalues[i].abs().max()) or reliable[0] != reliable[1]:
            raise RuntimeError(f"layer {i}: least_work differs from whitened_dmd (moduli off by {gap:.2g}, "
                               f"reliable modes {reliable[0]} against {reliable[1]})")


def checked_snapshots(
    model: torch.nn.Module, batch: dict, num_samples: int
) -> tuple[list, torch.Tensor, torch.Tensor, list]:
    """One forward of `model` on `batch` recorded at N = `num_samples`: `(snapshots, X, Y, states)`, the recorder's
    `(name, X, Y)` triples, their `(L, N, d)` stacks as `profile_from_snapshots` makes them and the L + 1 float32
    states `least_work` takes. Raises `RuntimeError` (`check_least_work`) unless the least work gives the library's
    outputs on them."""
    from hf_koopman.profiling import ResidualStreamRecorder
    from hf_koopman.profiling.profiler import _stack_chunk

    with torch.no_grad(), ResidualStreamRecorder(model, num_samples=num_samples) as rec:
        model(**batch)
    snapshots = rec.snapshots()
    X, Y = _stack_chunk(snapshots)
    states = [x.float().contiguous() for x in X] + [Y[-1].float().contiguous()]
    check_least_work(X, Y, least_work(states))
    return snapshots, X, Y, states


def least_work_rounds(repeats: int, num_samples: int) -> dict:
    """`least_work` against the plain forward and this library's analysis (`profile_from_snapshots`, default recipe),
    paired rounds: in each round the two-thread forward, the least work with layers on the two cores and the analysis
    (wall, CPU), then the three again in one thread. Raises `RuntimeError` (`check_least_work`) unless the least
    work gives the library's outputs on these snapshots.
    """
    from hf_koopman.profiling import profile_from_snapshots

    model, batch = _build(2048)
    snapshots, _, _, states = checked_snapshots(model, batch, num_samples)

    # name -> (whether it runs in one thread, the call); the least work runs its layers on the cores otherwise
    plan = {
        "forward_two_threads": (False, lambda: model(**batch)),
        "least_work_two_cores": (False, lambda: least_work(states, parallel=True)),
        "analysis_two_threads": (False, lambda: profile_from_snapshots(snapshots, progress=False)),
        "forward_one_thread": (True, lambda: model(**batch)),
        "least_work_one_thread": (True, lambda: least_work(states)),
        "analysis_one_thread": (True, lambda: profile_from_snapshots(snapshots, progress=False)),
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in plan}
    threads = torch.get_num_threads()
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 warms up
            clocks = []
            for name, (one, call) in plan.items():
                torch.set_num_threads(1 if one else threads)
                with _Clock() as c:
                    call()
                clocks.append((name, c))
            torch.set_num_threads(threads)
            for name, c in clocks if round_ else ():
                runs[name].append((c.wall, c.cpu))
    col = {k: ([w for w, _ in v], [c for _, c in v]) for k, v in runs.items()}
    return {
        "threads": threads,
        "median_wall_cpu_s": {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in col.items()},
        "one_thread_cpu": paired_ratio(col["least_work_one_thread"][1], col["forward_one_thread"][1]),
        "one_thread_cpu_over_two_thread_forward_cpu":
            paired_ratio(col["least_work_one_thread"][1], col["forward_two_threads"][1]),
        "two_cores_cpu": paired_ratio(col["least_work_two_cores"][1], col["forward_two_threads"][1]),
        "two_cores_wall": paired_ratio(col["least_work_two_cores"][0], col["forward_two_threads"][0]),
        "analysis_over_least_work_two_threads_wall":
            paired_ratio(col["analysis_two_threads"][0], col["least_work_two_cores"][0]),
        "analysis_over_least_work_one_thread_cpu":
            paired_ratio(col["analysis_one_thread"][1], col["least_work_one_thread"][1]),
        "analysis_over_forward_two_threads_wall":
            paired_ratio(col["analysis_two_threads"][0], col["forward_two_threads"][0]),
        "analysis_over_forward_one_thread_cpu":
            paired_ratio(col["analysis_one_thread"][1], col["forward_one_thread"][1]),
        "all_runs_wall_cpu": runs,
    }


def _layer_mean(result) -> dict:
    feats = result.features
    keys = ("near_unit_mass", "unstable_mass", "spectral_radius")
    return {k: sum(float(getattr(f, k)) for f in feats) / len(feats) for k in keys}


def _interval(r: dict) -> str:
    if r["low"] is None:
        return f"median {r['median']:.3f}x of {r['n']} (too few rounds for a {r['level']:.0%} interval)"
    return f"median {r['median']:.3f}x, {r['level']:.0%} interval [{r['low']:.3f}, {r['high']:.3f}] ({r['n']} rounds)"


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`) and whether it has AVX-512, or `platform.processor()` elsewhere."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    return f"{name} ({'with' if ' avx512f' in info else 'without'} AVX-512)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=32, help="rank of the approximation timed for reference")
    parser.add_argument("--big-tokens", type=int, default=8192)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the bare whitened_dmd (with eigenvectors / eigenvalues only)")
    parser.add_argument("--floor", type=int, default=0, metavar="LAYERS",
                        help="also time each dense operation of the analysis alone on this many layers "
                             "(`formulation_floor`)")
    parser.add_argument("--one-thread", action="store_true",
                        help="also time the plain forward and the analysis in one thread, interleaved (CPU time)")
    parser.add_argument("--least-work", action="store_true",
                        help="only time `least_work` (the least work of any implementation) against the forward, "
                             "paired rounds (`--repeats` of them)")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        memory_child(args.child[0], int(args.child[1]), args.num_samples)
        return 0

    load_before = os.getloadavg()
    print(f"{cpu_model()}; torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs; GPT-2 small random init, N "
          f"{args.num_samples}; load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if args.least_work:
        return _least_work_main(args, load_before)
    timing = time_run(args.repeats, args.num_samples, args.rank, args.breakdown, args.floor, args.one_thread)
    load_after = os.getloadavg()
    timing["load_average_before"], timing["load_average_after"] = load_before, load_after
    timing["cpu_model"] = cpu_model()  # the ratio depends on the CPU: its GEMMs and its eigensolver scale differently
    w, c = timing["median_wall_s"], timing["median_cpu_s"]
    print(f"\n== time (median of {args.repeats}, interleaved), {timing['tokens']} tokens, {timing['layers']} layers")
    print(f"{'':34s} {'wall (s)':>9s} {'CPU (s)':>9s}")
    labels = [("plain", "plain forward"), ("hooked", "forward with hooks"),
              ("analysis_full", "analysis, full spectrum (default)"),
              ("analysis_rank", f"analysis, rank-{args.rank} approximation"),
              ("dmd_full_vectors", "  bare whitened_dmd, full"), ("dmd_full_values_only", "  bare, eigenvalues only")]
    for key, label in labels:
        if key in w:
            print(f"{label:34s} {w[key]:9.3f} {c[key]:9.3f}")
    print(f"hook overhead {100 * timing['hook_overhead']:+.1f} % (wall)")
    ok = timing["full_over_forward_wall"] <= 1.0
    print(f"full spectrum / plain forward:  wall {timing['full_over_forward_wall']:.2f}x, CPU "
          f"{timing['full_over_forward_cpu']:.2f}x   (target <= 1x: {'MET' if ok else 'NOT MET'} on wall time)")
    for key, what in (("paired_ratio_wall", "wall"), ("paired_ratio_cpu", "CPU")):
        print(f"full spectrum / plain forward, paired rounds, {what}: {_interval(timing[key])}")
    print(f"rank-{args.rank} / plain forward:        wall {timing['rank_over_forward_wall']:.2f}x, CPU "
          f"{timing['rank_over_forward_cpu']:.2f}x   (reference)")
    print(f"layer means, full spectrum: {timing['full_layer_mean']}")
    print(f"layer means, rank-{args.rank}:      {timing['rank_layer_mean']}")
    if "one_thread_cpu_s" in timing:
        one = timing["one_thread_cpu_s"]
        print(f"one thread, interleaved (CPU s): plain forward {one['plain']:.3f}, analysis {one['analysis_full']:.3f}"
              f" = {timing['one_thread_full_over_forward_cpu']:.2f}x; paired rounds: "
              f"{_interval(timing['one_thread_paired_cpu_ratio'])}")
    if "floor" in timing:
        floor = timing["floor"]
        print(f"\n== dense operations of the analysis, each alone (one thread, CPU s; median of "
              f"{floor['timed_layers']} layers) against the plain forward's CPU time")
        print("| operation | calls per layer | per layer (s) | all layers (s) | / forward CPU |\n|---|---|---|---|---|")
        for r in floor["rows"]:
            print(f"| {r['what']} | {r['calls_per_layer']} | {r['cpu_s_per_layer']:.4f} | {r['all_layers_cpu_s']:.3f} "
                  f"| {r['over_forward_cpu']:.3f}x |")
        print(f"| **sum** | | | {floor['all_layers_cpu_s']:.3f} | **{floor['over_forward_cpu']:.2f}x** |")
        print(f"plain forward in one thread: {floor['forward_one_thread_cpu_s']:.3f} CPU s; the sum over it: "
              f"{floor['over_forward_one_thread_cpu']:.2f}x")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

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
    summary = {"timing": {k: v for k, v in timing.items() if k != "all_runs_wall_cpu"}, "memory": memory}
    print(json.dumps(summary, default=str))
    if args.json:
        summary["timing"]["all_runs_wall_cpu"] = timing["all_runs_wall_cpu"]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _least_work_main(args: argparse.Namespace, load_before: tuple[float, float, float]) -> int:
    out = least_work_rounds(args.repeats, args.num_samples)
    load_after = os.getloadavg()
    out["load_average_before"], out["load_average_after"], out["cpu_model"] = load_before, load_after, cpu_model()
    print(f"\n== least work of any implementation / plain forward, {args.repeats} paired rounds")
    for key, label in (("median_wall_cpu_s", None),):
        for name, (w, c) in out[key].items():
            print(f"{name:24s} wall {w:7.3f} s  CPU {c:7.3f} s")
    for key, label in (("one_thread_cpu", "one thread, CPU"),
                       ("one_thread_cpu_over_two_thread_forward_cpu", "one thread against the two-thread forward, CPU"),
                       ("two_cores_cpu", "layers on two cores, CPU"), ("two_cores_wall", "layers on two cores, wall"),
                       ("analysis_over_least_work_two_threads_wall", "this analysis / least work, two threads, wall"),
                       ("analysis_over_least_work_one_thread_cpu", "this analysis / least work, one thread, CPU"),
                       ("analysis_over_forward_two_threads_wall", "this analysis / forward, two threads, wall"),
                       ("analysis_over_forward_one_thread_cpu", "this analysis / forward, one thread, CPU")):
        print(f"{label}: {_interval(out[key])}")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
