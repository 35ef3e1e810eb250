"""KSS re-measured on the faithful operator in the paper's No-Norm regime (issue #23; plan: `results/kss_v2/PURPOSE.md`).

The grids (timing, pilot, comparison, max stable LR), the gradient-scale measurement of the faithful operator, the
pilot's reading rule, and the markdown / summary built from the rows. Trials run through
`research.experiments.sweep.execute` (the `KSSTrainer` back-end), so every arm shares one code path.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .stats import fisher_exact
from .sweep import RunSpec

__all__ = [
    "HIDDEN",
    "HEADS",
    "BATCH",
    "WARMUP",
    "LRS",
    "PILOT_LAYERS",
    "PILOT_SEEDS",
    "RATIO_SEEDS",
    "TRIALS",
    "FIRST_SEED",
    "REQUIRED_ARMS",
    "OPTIONAL_ARMS",
    "MAX_LR_NORMS",
    "MAX_LR_LRS",
    "make_spec",
    "timing_specs",
    "pilot_specs",
    "comparison_specs",
    "max_lr_specs",
    "pick_setting",
    "gradient_ratio",
    "arm_table",
    "summary_keys",
    "merge_summary",
    "summary_from_results",
    "report",
]

HIDDEN = 128
HEADS = 4
BATCH = 16
WARMUP = 100  # the low end of the paper's 100-1000 warmup steps
STEPS = 200  # optimizer steps per trial (pilot and comparison alike), fixed from the timing run (PURPOSE.md)
LRS = (0.005, 0.0075, 0.01)  # the paper's "LR 0.005-0.01"; trial t uses LRS[t % 3]
PILOT_LAYERS = (4, 6, 8)
PILOT_SEEDS = tuple(range(900, 903))  # one trial per LR and depth (the timing run's cut, PURPOSE.md)
RATIO_SEEDS = (950, 951, 952)
TRIALS = 24
FIRST_SEED = 100
REQUIRED_ARMS = ("none", "clip1.0", "kss0.15-uncapped", "kss0.15")
OPTIONAL_ARMS = ("kss0.10-uncapped", "kss0.20-uncapped")
MAX_LR_NORMS = ("none", "pre_ln", "rmsnorm")
MAX_LR_LRS = (0.003, 0.01, 0.03, 0.1)
PAPER_TABLE3 = {"none": 66.7, "clip1.0": 58.3, "kss0.10-uncapped": 25.0, "kss0.15-uncapped": 12.5,
                "kss0.20-uncapped": 8.3}
ARM_LABELS = {
    "none": "control (α = 0)",
    "clip1.0": "gradient clipping 1.0",
    "kss0.10-uncapped": "KSS α = 0.10, paper-literal gradient",
    "kss0.15-uncapped": "KSS α = 0.15, paper-literal gradient",
    "kss0.20-uncapped": "KSS α = 0.20, paper-literal gradient",
    "kss0.15": "KSS α = 0.15, product default (gradient cap 0.5, activations)",
}


def make_spec(layers: int, seed: int, lr: float, method: str, steps: int, *, norm: str = "none",
              group: str = "kss_v2") -> RunSpec:
    """One trial at d = `HIDDEN`, through `KSSTrainer` (all arms share the back-end)."""
    return RunSpec(norm=norm, learning_rate=lr, seed=seed, hidden_size=HIDDEN, num_layers=layers, num_heads=HEADS,
                   task="assoc_recall", max_steps=steps, batch_size=BATCH, warmup_steps=WARMUP, method=method,
                   backend="trainer", group=group)


def timing_specs(steps: int = 30) -> list[RunSpec]:
    """The timing run of `PURPOSE.md` step 0 (seed 999, used for nothing else)."""
    return [make_spec(4, 999, 0.01, "none", steps, group="kss_v2_timing"),
            make_spec(8, 999, 0.01, "none", steps, group="kss_v2_timing"),
            make_spec(8, 999, 0.01, "kss0.15-uncapped", steps, group="kss_v2_timing")]


def pilot_specs(steps: int) -> list[RunSpec]:
    """Control only, L in `PILOT_LAYERS`, seeds `PILOT_SEEDS` (LR cycling); seed-major so a partial pilot is balanced."""
    return [make_spec(layers, seed, LRS[i % len(LRS)], "none", steps, group="kss_v2_pilot")
            for i, seed in enumerate(PILOT_SEEDS) for layers in PILOT_LAYERS]


def comparison_specs(layers: int, steps: int, *, arms: Sequence[str] = REQUIRED_ARMS + OPTIONAL_ARMS,
                     trials: int = TRIALS) -> list[RunSpec]:
    """Trial-major over the required arms first, then over the optional ones (a cut run drops optional arms first)."""
    specs = []
    for group in (REQUIRED_ARMS, OPTIONAL_ARMS):
        chosen = [a for a in group if a in arms]
        for t in range(trials):
            for arm in chosen:
                specs.append(make_spec(layers, FIRST_SEED + t, LRS[t % len(LRS)], arm, steps))
    return specs


def max_lr_specs(layers: int, steps: int) -> list[RunSpec]:
    """Step 4 of the plan: norms x LRs x seeds 0-2, with and without KSS (`kss0.15`, the product default)."""
    return [make_spec(layers, seed, lr, method, steps, norm=norm, group="kss_v2_max_lr")
            for seed in range(3) for norm in MAX_LR_NORMS for lr in MAX_LR_LRS for method in ("none", "kss0.15")]


def _rate(rows: Sequence[dict[str, Any]]) -> float:
    return sum(bool(r["diverged"]) for r in rows) / len(rows) if rows else float("nan")


def pick_setting(pilot_rows: Iterable[dict[str, Any]], *, low: float = 0.5, high: float = 2 / 3) -> dict[str, Any]:
    """The pilot's reading rule: the depth whose control divergence rate is closest to `[low, high]` (0 inside it);
    ties go to the smaller depth. Returns the chosen depth, its rate, whether it lies inside, and every depth's rate."""
    by_layers: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in pilot_rows:
        by_layers[int(r["num_layers"])].append(r)
    if not by_layers:
        raise ValueError("no pilot rows: run `python -m research.scripts.kss_v2 pilot` first.")
    rates = {layers: _rate(rows) for layers, rows in sorted(by_layers.items())}

    def distance(rate: float) -> float:
        return 0.0 if low <= rate <= high else round(min(abs(rate - low), abs(rate - high)), 9)  # ties stay ties

    best = min(rates, key=lambda layers: (distance(rates[layers]), layers))
    return {"num_layers": best, "rate": rates[best], "inside": distance(rates[best]) == 0.0,
            "rates": {str(k): v for k, v in rates.items()}, "trials": {str(k): len(v) for k, v in by_layers.items()}}


def gradient_ratio(layers: int, seed: int, lr: float, *, steps_before: int = 0, alpha: float = 0.15,
                   ranks: Sequence[int | None] = (None, 32), norm: str = "none") -> dict[str, Any]:
    """Parameter-gradient norms of `alpha * mean_{sampled layers} L_KSS` and of the task loss on one training batch.

    The model is trained `steps_before` plain AdamW steps first (warmup `WARMUP`, the trial's data order). Layers are
    sampled as `KSSTrainer` samples them at that step (`kss_seed = seed`, 50 %), all token states of the batch are the
    snapshots, and the penalty is Eq. 14 with the `KSSConfig` defaults. `ranks`: `None` = the full spectrum.
    """
    from hf_koopman.koopman.shaping import differentiable_dmd_eigenvalues, eigenvalue_modulus, kss_penalty
    from hf_koopman.profiling import ResidualStreamRecorder, find_residual_blocks
    from hf_koopman.training import KSSConfig

    from .runner import train_run
    from .sweep import build_model, task_datasets

    spec = make_spec(layers, seed, lr, "none", max(steps_before, 1), norm=norm, group="kss_v2_ratio")
    train_ds, _ = task_datasets(spec)
    model = build_model(spec)
    out: dict[str, Any] = {"num_layers": layers, "seed": seed, "learning_rate": lr, "step": steps_before,
                           "alpha": alpha, "norm": norm}
    if steps_before:
        res = train_run(model, train_ds, learning_rate=lr, max_steps=steps_before, batch_size=BATCH,
                        warmup_steps=WARMUP, weight_decay=0.01, seed=seed)
        out["diverged_before"] = res.diverged
        if res.diverged:
            return out
    cfg = KSSConfig(alpha=alpha, seed=seed)
    blocks = find_residual_blocks(model)
    count = max(1, math.ceil(cfg.layer_fraction * len(blocks) - 1e-9))
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + steps_before)
    chosen = torch.randperm(len(blocks), generator=gen)[:count].sort().values.tolist()
    batch = {k: torch.as_tensor(v) for k, v in train_ds.with_format("torch")[:BATCH].items()}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    with ResidualStreamRecorder(model, [blocks[i] for i in chosen], num_samples=cfg.num_samples, seed=seed,
                                detach=False, check_finite=False) as rec:
        task = model(**batch).loss
    snaps = rec.snapshots()
    X = torch.stack([s[1] for s in snaps])
    Y = torch.stack([s[2] for s in snaps])

    def norm_of(grads) -> float:
        return float(torch.stack([g.double().square().sum() for g in grads if g is not None]).sum().sqrt())

    out["task_grad"] = norm_of(torch.autograd.grad(task, params, retain_graph=True, allow_unused=True))
    out["task_loss"] = float(task)
    for rank in ranks:
        key = "full" if rank is None else f"r{rank}"
        ev = differentiable_dmd_eigenvalues(X, Y, rank=rank, eps=cfg.eps, oversample=cfg.oversample,
                                            power_iters=cfg.power_iters,
                                            generator=torch.Generator().manual_seed(cfg.seed * 7919 + steps_before))
        penalty = kss_penalty(ev, temperature=cfg.temperature, tau_u=cfg.tau_u, tau_l=cfg.tau_l, gamma=cfg.gamma,
                              beta=cfg.beta).mean()
        grads = torch.autograd.grad(alpha * penalty, params, retain_graph=True, allow_unused=True)
        mod = eigenvalue_modulus(ev.detach())
        out[f"kss_grad_{key}"] = norm_of(grads)
        out[f"ratio_{key}"] = out[f"kss_grad_{key}"] / out["task_grad"]
        out[f"penalty_{key}"] = float(penalty)
        out[f"modes_{key}"] = int(ev.shape[-1])
        out[f"spectral_radius_{key}"] = float(mod.max(dim=-1).values.mean())
        out[f"near_unit_{key}"] = float(((mod >= cfg.tau_l) & (mod <= cfg.tau_u)).double().mean())
    return out


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _per_step(r: dict[str, Any]) -> float:
    return r["train_seconds"] / r["steps_run"] if r.get("steps_run") else float("nan")


def arm_table(rows: Sequence[dict[str, Any]], arms: Sequence[str] = REQUIRED_ARMS + OPTIONAL_ARMS,
              control: str = "none") -> list[dict[str, Any]]:
    """Per arm: trials, divergences, rate, Fisher p vs `control`, accuracy and M≈1 of the runs that finished,
    overhead (median training seconds per step over all runs, relative to the control's; diverged runs count up to
    their stop, and KSS runs every 10th step whatever the length) and the divergence steps/causes."""
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_arm[r["method"]].append(r)
    base = by_arm.get(control, [])
    base_step = statistics.median([_per_step(r) for r in base if r.get("steps_run")] or [float("nan")])
    out = []
    for arm in arms:
        rs = sorted(by_arm.get(arm, []), key=lambda r: r["seed"])
        if not rs:
            continue
        k, n = sum(bool(r["diverged"]) for r in rs), len(rs)
        kb, nb = sum(bool(r["diverged"]) for r in base), len(base)
        done = [r for r in rs if not r["diverged"]]
        step = statistics.median([_per_step(r) for r in rs if r.get("steps_run")] or [float("nan")])
        out.append({
            "arm": arm, "trials": n, "diverged": k, "rate": k / n,
            "fisher_p": None if arm == control or not nb else fisher_exact([[k, n - k], [kb, nb - kb]]),
            "accuracy": _mean([r.get("eval_accuracy") for r in done]),
            "near_unit_after": _mean([r.get("final_near_unit_mass_mean") for r in done]),
            "near_unit_init": _mean([r.get("near_unit_mass_mean") for r in rs]),
            "seconds_per_step": step, "overhead": step / base_step - 1 if base_step == base_step else float("nan"),
            "divergence_steps": sorted(r["divergence_step"] for r in rs if r["diverged"]),
            # 1-based steps 1, 11, 21, ... carry the KSS term (global_step % 10 == 0 before the update)
            "on_kss_step": sum(1 for r in rs if r["diverged"] and r["divergence_step"] % 10 == 1),
            "causes": dict(Counter(r["divergence_reason"] for r in rs if r["diverged"])),
            "seeds_diverged": [r["seed"] for r in rs if r["diverged"]],
            "paper_rate": PAPER_TABLE3.get(arm),
        })
    return out


def summary_keys(table: Sequence[dict[str, Any]], setting: str) -> dict[str, Any]:
    """The `results/summary.json` keys this experiment owns (`baseline_divergence_rate`, `kss_divergence_rate` from
    the product-default KSS arm, `kss_divergence_rate_uncapped` from the paper-literal one, `kss_setting`)."""
    by = {t["arm"]: t for t in table}

    def rate(arm: str) -> float | None:
        return by[arm]["rate"] if arm in by else None

    return {
        "baseline_divergence_rate": rate("none"),
        "kss_divergence_rate": rate("kss0.15"),
        "kss_divergence_rate_uncapped": rate("kss0.15-uncapped"),
        "kss_setting": setting,
        # JSON has no NaN: a metric with no run to average over (e.g. accuracy when every run diverged) is null
        "kss_v2": {t["arm"]: {k: None if isinstance(t[k], float) and not math.isfinite(t[k]) else t[k]
                              for k in ("trials", "diverged", "rate", "fisher_p", "accuracy", "near_unit_after",
                                        "overhead", "divergence_steps")} for t in table},
    }


SUMMARY_KEYS = ("baseline_divergence_rate", "kss_divergence_rate", "kss_divergence_rate_uncapped")


def merge_summary(summary: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """`summary` with this experiment's keys. The d = 32 prevention grid's values of the same names, written by
    `research.scripts.reproduce`, are kept as `prevention_d32_<key>` (only when `summary` does not already hold this
    experiment's keys, i.e. has no `kss_setting`)."""
    out = dict(summary)
    if keys and "kss_setting" not in out:
        for key in SUMMARY_KEYS:
            if key in out:
                out[f"prevention_d32_{key}"] = out[key]
    out.update(keys)
    return out


def summary_from_results(root: Any) -> dict[str, Any]:
    """This experiment's summary keys from the rows under `root/kss_v2/` (empty if the comparison has not run)."""
    from pathlib import Path

    from .sweep import read_rows

    runs = read_rows(Path(root) / "kss_v2" / "runs.jsonl")
    pilot = read_rows(Path(root) / "kss_v2" / "pilot.jsonl")
    if not runs or not pilot:
        return {}
    table = arm_table(runs)
    return summary_keys(table, setting_label(pick_setting(pilot), table[0]["trials"]))


def setting_label(setting: dict[str, Any] | None, trials: int = TRIALS) -> str:
    """The `kss_setting` string of `results/summary.json`."""
    layers = setting["num_layers"] if setting else "?"
    return (f"No-Norm research GPT d={HIDDEN} L={layers}, associative recall, AdamW, LR 0.005/0.0075/0.01, warmup "
            f"{WARMUP}, {STEPS} steps, {trials} trials per arm; kss_divergence_rate: KSS alpha=0.15 with the default gradient "
            "cap, kss_divergence_rate_uncapped: paper-literal gradient; full spectrum every 10 steps on 50% of blocks "
            "(results/kss_v2.md)")


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def report(*, timing: Sequence[dict], pilot: Sequence[dict], ratios: Sequence[dict], runs: Sequence[dict],
           max_lr: Sequence[dict], setting: dict[str, Any] | None, steps: int | None) -> tuple[str, dict[str, Any]]:
    """`results/kss_v2.md` and the summary keys, from the rows of each stage."""
    lines = ["# KSS v2: faithful operator, the paper's No-Norm regime (issue #23)", "",
             "Generated by `python -m research.scripts.kss_v2 report` from `results/kss_v2/*.jsonl`; the plan, "
             "written before the runs, is `results/kss_v2/PURPOSE.md`, the reading `results/kss_v2/OUTCOME.md`.", "",
             f"Research GPT, No-Norm, d = {HIDDEN}, {HEADS} heads, associative recall (seq 64, vocab 256, 4 pairs), "
             f"batch {BATCH}, AdamW, warmup {WARMUP} steps then constant LR, T = {steps} steps, LR (0.005, 0.0075, "
             "0.01)[t mod 3], all arms through `KSSTrainer`, one CPU core. Divergence: loss > 50, gradient norm > "
             "500 (before clipping) or non-finite, on the task loss (`hf_koopman/training/divergence.py`). KSS: full "
             "whitened spectrum (`rank=None`), every 10 steps, 50 % of the blocks, paper defaults otherwise.", ""]
    if timing:
        lines += ["## 0. Timing run (30 steps, seed 999)", "", "| run | steps | train s | s/step |", "|---|---|---|---|"]
        for r in timing:
            lines.append(f"| L={r['num_layers']} {r['method']} | {r['steps_run']} | {r['train_seconds']:.1f} | "
                         f"{_per_step(r):.3f} |")
        lines.append("")
    if pilot:
        lines += ["## 1. Pilot: control divergence per depth", "",
                  "| L | trials | diverged | rate | divergence steps | median s/step |", "|---|---|---|---|---|---|"]
        by: dict[int, list[dict]] = defaultdict(list)
        for r in pilot:
            by[int(r["num_layers"])].append(r)
        for layers, rs in sorted(by.items()):
            steps_d = sorted(r["divergence_step"] for r in rs if r["diverged"])
            lines.append(f"| {layers} | {len(rs)} | {sum(bool(r['diverged']) for r in rs)} | {_rate(rs):.3f} | "
                         f"{steps_d or '—'} | {statistics.median([_per_step(r) for r in rs]):.3f} |")
        if setting:
            where = ("inside [1/2, 2/3]" if setting["inside"] else
                     "outside [1/2, 2/3]: no depth lands in it, so the nearest one is used, ties to the smaller depth")
            lines += ["", f"Chosen by the reading rule: **L = {setting['num_layers']}** (control rate "
                      f"{setting['rate']:.3f}, {where}).", ""]
    if ratios:
        lines += ["## 2. Gradient scale of the faithful operator (α = 0.15, 50 % of the blocks)", "",
                  "| seed | LR | step | task grad | KSS grad, full spectrum (modes) | ratio full | KSS grad, r = 32 | "
                  "ratio r = 32 | ρ full | M≈1 full |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ratios:
            if r.get("diverged_before"):
                lines.append(f"| {r['seed']} | {r['learning_rate']:g} | {r['step']} | diverged before the "
                             "measurement | | | | | | |")
                continue
            lines.append(f"| {r['seed']} | {r['learning_rate']:g} | {r['step']} | {r['task_grad']:.3g} | "
                         f"{r['kss_grad_full']:.3g} ({r['modes_full']}) | {r['ratio_full']:.3g} | "
                         f"{r['kss_grad_r32']:.3g} | {r['ratio_r32']:.3g} | {r['spectral_radius_full']:.3f} | "
                         f"{r['near_unit_full']:.3f} |")
        lines.append("")
    table: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    if runs:
        table = arm_table(runs)
        summary = summary_keys(table, setting_label(setting, table[0]["trials"]))
        lines += ["## 3. Comparison (same seeds, LRs, data order and initial weights in every arm)", "",
                  "| arm | diverged | rate | paper rate | Fisher p vs control | accuracy (finished runs) | "
                  "M≈1 init | M≈1 after (finished runs) | s/step (median, all runs) | overhead | causes | median "
                  "divergence step | on a step ≡ 1 mod 10 | divergence steps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in table:
            paper = "—" if t["paper_rate"] is None else f"{t['paper_rate']:.1f}%"
            lines.append(
                f"| {ARM_LABELS.get(t['arm'], t['arm'])} (`{t['arm']}`) | {t['diverged']}/{t['trials']} | "
                f"{100 * t['rate']:.1f}% | {paper} | {_f(t['fisher_p'], 4)} | {_f(t['accuracy'])} | "
                f"{_f(t['near_unit_init'])} | {_f(t['near_unit_after'])} | {_f(t['seconds_per_step'])} | "
                f"{'—' if t['arm'] == 'none' else _f(100 * t['overhead'], 1) + '%'} | {t['causes'] or '—'} | "
                f"{statistics.median(t['divergence_steps']) if t['divergence_steps'] else '—'} | "
                f"{t['on_kss_step']}/{t['diverged']} | {t['divergence_steps'] or '—'} |")
        lines += ["", "Seeds that diverged, per arm: " + "; ".join(
            f"`{t['arm']}` {t['seeds_diverged'] or '—'}" for t in table), ""]
        paired = _paired(runs, "none", "kss0.15")
        if paired:
            lines += [f"Paired by trial, control vs `kss0.15`: {paired}.", ""]
        paired = _paired(runs, "none", "kss0.15-uncapped")
        if paired:
            lines += [f"Paired by trial, control vs `kss0.15-uncapped`: {paired}.", ""]
    if max_lr:
        from .analysis import max_stable_lr_table

        mtab = max_stable_lr_table(max_lr)
        lines += ["## 4. Max stable LR (< 20 % divergence, seeds 0-2 per LR)", "",
                  "| norm | without KSS | with KSS (`kss0.15`) | rates without | rates with |", "|---|---|---|---|---|"]
        for norm in MAX_LR_NORMS:
            cells = mtab.get(norm, {})
            a, b = cells.get("none"), cells.get("kss0.15")

            def fmt(c: dict | None) -> str:
                if c is None:
                    return "—"
                return ("≥" if c["censored"] else "") + ("< min" if c["max_stable_lr"] is None else f"{c['max_stable_lr']:g}")

            def rates(c: dict | None) -> str:
                return "—" if c is None else ", ".join(f"{k}: {v:.2f} (n={c['trials_per_lr'][k]})"
                                                       for k, v in c["rates"].items())

            lines.append(f"| {norm} | {fmt(a)} | {fmt(b)} | {rates(a)} | {rates(b)} |")
        readings = max_lr_reading(mtab)
        lines += ["", "Reading (rule fixed in `PURPOSE.md` before the step-4 trials: a difference counts only when KSS "
                  "moves the max stable LR by at least one rung and the two cells differ by >= 2/3 at a rung in "
                  "between):", ""]
        lines += [f"* {norm}: {text}" for norm, text in readings.items()]
        lines.append("")
        summary["kss_max_stable_lr"] = {
            norm: {m: (mtab.get(norm, {}).get(m) or {}).get("max_stable_lr") for m in ("none", "kss0.15")}
            | {"reading": readings.get(norm)} for norm in MAX_LR_NORMS}
    elif runs:
        lines += ["## 4. Max stable LR", "", "Not run: cut first, as `PURPOSE.md` orders, to fit the time budget.", ""]
    return "\n".join(lines) + "\n", summary


def max_lr_reading(mtab: dict[str, dict[str, Any]], *, min_difference: float = 2 / 3) -> dict[str, str]:
    """Step 4's reading rule per normalisation, from `analysis.max_stable_lr_table`: KSS raises (lowers) the max stable
    LR only if it is at least one rung higher (lower) than the control's and, at some rung from the lower max stable
    LR (exclusive) to the higher one (inclusive), the control's divergence rate exceeds KSS's (or the reverse) by at
    least `min_difference`; otherwise there is no measurable difference at this number of seeds."""
    out = {}
    for norm, cells in mtab.items():
        a, b = cells.get("none"), cells.get("kss0.15")
        if a is None or b is None:
            out[norm] = "not measured in both arms"
            continue
        lrs = sorted(float(k) for k in set(a["rates"]) & set(b["rates"]))
        low = float("-inf")
        ma = a["max_stable_lr"] if a["max_stable_lr"] is not None else low
        mb = b["max_stable_lr"] if b["max_stable_lr"] is not None else low
        n = min(min(a["trials_per_lr"].values()), min(b["trials_per_lr"].values()))
        if ma == mb == low:
            out[norm] = (f"no stable LR on this ladder with or without KSS (>= 20 % divergence already at the lowest "
                         f"LR, n = {n} per LR): no difference")
            continue
        if ma == mb:
            out[norm] = f"the same max stable LR with and without KSS (n = {n} per LR): no difference"
            continue
        lo, hi = min(ma, mb), max(ma, mb)
        between = [lr for lr in lrs if lo < lr <= hi]
        gap = max(((a["rates"][f"{lr:g}"] - b["rates"][f"{lr:g}"]) * (1 if mb > ma else -1) for lr in between),
                  default=0.0)
        direction = "raises" if mb > ma else "lowers"
        if gap >= min_difference - 1e-9:
            out[norm] = f"KSS {direction} the max stable LR (n = {n} per LR; largest rate difference {gap:.2f})"
        else:
            out[norm] = (f"KSS {direction} the max stable LR by one or more rungs, but the cells differ by at most "
                         f"{gap:.2f} (< {min_difference:.2f}): observed at n = {n}, no measurable difference")
    return out


def _paired(rows: Sequence[dict], a: str, b: str) -> str:
    ra = {r["seed"]: bool(r["diverged"]) for r in rows if r["method"] == a}
    rb = {r["seed"]: bool(r["diverged"]) for r in rows if r["method"] == b}
    common = sorted(set(ra) & set(rb))
    if not common:
        return ""
    c = Counter((ra[s], rb[s]) for s in common)
    text = (f"both stable {c[(False, False)]}, both diverged {c[(True, True)]}, only {a} diverged "
            f"{c[(True, False)]}, only {b} diverged {c[(False, True)]} (n = {len(common)})")
    sa = {r["seed"]: r["divergence_step"] for r in rows if r["method"] == a and r["diverged"]}
    sb = {r["seed"]: r["divergence_step"] for r in rows if r["method"] == b and r["diverged"]}
    both = sorted(set(sa) & set(sb))
    if both:
        diff = [sb[s] - sa[s] for s in both]
        text += (f"; where both diverged, `{b}` diverged earlier in {sum(d < 0 for d in diff)}, at the same step in "
                 f"{sum(d == 0 for d in diff)}, later in {sum(d > 0 for d in diff)} trials (median step difference "
                 f"{statistics.median(diff):+g})")
    return text
