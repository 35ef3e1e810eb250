"""Human-readable results page and summary keys of the held-out-family divergence study (issue #22).

`render_markdown` turns the dict of `heldout_analysis.analyse` plus the rows it was computed from into
`results/heldout_risk.md`, reading the numbers with the fixed reading rules of `results/heldout_risk/PURPOSE.md`.
`spectrum_verdict` states rule 1 mechanically from the paired-bootstrap CIs; `summary_keys` returns the numbers
issue #22 asks for in `results/summary.json`. Every number is taken from the report or the rows passed in.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence

from .heldout_analysis import EXPLORATORY_SETS, GOAL_WITHIN_2X, sigma_from_within_2x

PRIMARY = "primary_leave_one_family_out"
SECONDARY = "secondary_leave_one_variant_out"
RULE1_COMPARISON = "all - config+curvature+lr"
SHIPPED = "spectrum+lr"
NOT_INIT_TIME = ("gradient+lr",)
GOAL_ECE = 0.05  # ... with held-out ECE <= 0.05
MIN_CLASS = 10  # rule 3: fewer diverged or stable runs than this -> shown, not interpreted

VERDICT_ADDS = "the spectrum adds information beyond config and curvature on unseen families"
VERDICT_NONE = "no measurable added information at this scale"
VERDICT_HURTS = "the spectrum hurts transfer"


# ---- formatting ---------------------------------------------------------------------------------------------------
def _f(v: Any, nd: int = 3, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{float(v):+.{nd}f}" if sign else f"{float(v):.{nd}f}"


def _ci(ci: Sequence[float] | None, nd: int = 3, sign: bool = False) -> str:
    if not ci or len(ci) != 2:
        return "[n/a]"
    return f"[{_f(ci[0], nd, sign)}, {_f(ci[1], nd, sign)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _ci_excludes_zero(ci: Sequence[float] | None) -> bool:
    return bool(ci) and (ci[0] > 0 or ci[1] < 0)


# ---- readings -----------------------------------------------------------------------------------------------------
def spectrum_verdict(report: Mapping[str, Any]) -> str:
    """Rule 1 read mechanically from the primary split's paired CIs of `all - config+curvature+lr`: adds information
    only if the ΔAUROC CI lies above 0 and the Δlog-loss CI below 0; hurts transfer if the ΔAUROC CI lies below 0 or
    the Δlog-loss CI above 0; otherwise no measurable added information."""
    d = report[PRIMARY]["paired_differences"].get(RULE1_COMPARISON)
    if d is None:
        return f"not computed ({RULE1_COMPARISON} missing from the report)"
    lo_a, hi_a = d["delta_auroc_ci"]
    lo_l, hi_l = d["delta_log_loss_ci"]
    if lo_a > 0 and hi_l < 0:
        return VERDICT_ADDS
    if hi_a < 0 or lo_l > 0:
        return VERDICT_HURTS
    return VERDICT_NONE


def best_init_time_model(split: Mapping[str, Any]) -> str:
    """Name of the highest-AUROC model of a split among the init-time feature sets (gradient statistics excluded)."""
    cands = {k: m["auroc"] for k, m in split["models"].items()
             if k not in NOT_INIT_TIME and k not in EXPLORATORY_SETS and m.get("auroc") is not None}
    return max(cands, key=cands.get)


def _within(split: Mapping[str, Any], name: str, risk: str = "risk_0.1") -> float | None:
    entry = split.get("max_lr", {}).get(name, {}).get(risk)
    return None if entry is None else entry.get("within_2x")


def summary_keys(report: Mapping[str, Any]) -> dict[str, Any]:
    """Keys issue #22 asks for in results/summary.json, from the primary split of `report`."""
    prim = report[PRIMARY]
    shipped = prim["models"][SHIPPED]
    best = best_init_time_model(prim)
    diffs = prim["paired_differences"]

    def diff(name: str) -> dict[str, Any] | None:
        d = diffs.get(name)
        if d is None:
            return None
        return {"delta": d["delta_auroc"], "ci": list(d["delta_auroc_ci"]), "comparison": name,
                "delta_log_loss": d["delta_log_loss"], "delta_log_loss_ci": list(d["delta_log_loss_ci"])}

    return {
        "heldout_family_auroc": shipped["auroc"],
        "heldout_family_auroc_ci": list(shipped["auroc_ci"]),
        "heldout_family_ece": shipped["ece"],
        "max_lr_within_2x": {
            "risk": 0.1, SHIPPED: _within(prim, SHIPPED), "all": _within(prim, "all"),
            "best_init_time": {"model": best, "value": _within(prim, best)},
        },
        "heldout_spectrum_added_auroc": diff(RULE1_COMPARISON),
        "heldout_spectrum_vs_lr_auroc": diff(f"{SHIPPED} - lr"),
        "heldout_verdict": spectrum_verdict(report),
        "heldout_n_runs": report.get("n_runs"),
    }


# ---- rows ---------------------------------------------------------------------------------------------------------
def tier_status(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, int]]:
    """(tier label, runs present, runs planned) for each tier of the seed-major order of `study_grid()`: a tier is
    one seed and the even (ratio-4) or odd rungs of the ladder. Present = run_id of the grid found in `rows`."""
    from research.experiments.heldout_risk import LR_LADDER, study_grid

    present = {r.get("run_id") for r in rows}
    planned: dict[tuple[int, int], list[str]] = defaultdict(list)
    for run in study_grid():
        rung = min(range(len(LR_LADDER)), key=lambda k: abs(math.log(LR_LADDER[k] / run.learning_rate)))
        planned[(run.model.seed, rung % 2)].append(run.run_id)
    out = []
    for (seed, parity), ids in planned.items():
        label = f"seed {seed}, {'even' if parity == 0 else 'odd'} rungs"
        out.append((label, sum(i in present for i in ids), len(ids)))
    return out


def _class_counts(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[int, int]]:
    c: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        c[str(r.get(key))][0 if r.get("diverged") else 1] += 1
    return {k: (v[0], v[1]) for k, v in c.items()}


def _mean(vals: Sequence[Any]) -> float | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


def kan_rows(rows: Sequence[Mapping[str, Any]], family: str = "rksp_kan") -> list[list[str]]:
    """Rule 8 table rows for `family`, one per shape (layers, width, init std): init M≈1 mean, η_nl mean, ρ max,
    κ(V) mean (means over inits), verdict counts, and diverged/runs per learning-rate rung."""
    by_shape: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("family") == family:
            by_shape[(r.get("num_layers"), r.get("hidden_size"), r.get("init_std"))].append(r)
    out = []
    for shape in sorted(by_shape, key=lambda s: tuple(-1 if x is None else x for x in s)):
        rs = by_shape[shape]
        inits = {r.get("model_id"): r for r in rs}.values()  # init features repeat over the rungs of one init
        verdicts = Counter(str(r.get("verdict")) for r in inits)
        per_rung: dict[float, list[int]] = defaultdict(lambda: [0, 0])
        for r in rs:
            per_rung[float(r["learning_rate"])][0] += bool(r.get("diverged"))
            per_rung[float(r["learning_rate"])][1] += 1
        rung_s = ", ".join(f"{lr:g}: {d}/{n}" for lr, (d, n) in sorted(per_rung.items()))
        out.append([f"L{shape[0]} d{shape[1]} std{shape[2]}", str(len(inits)),
                    _f(_mean([r.get("near_unit_mass_mean") for r in inits])),
                    _f(_mean([r.get("nonlinearity_mean") for r in inits])),
                    _f(max((r["spectral_radius_max"] for r in inits if r.get("spectral_radius_max") is not None),
                           default=None)),
                    _f(_mean([r.get("eigvec_condition_mean") for r in inits]), 1),
                    ", ".join(f"{k} x{v}" for k, v in verdicts.most_common()), rung_s])
    return out


# ---- page ---------------------------------------------------------------------------------------------------------
def _split_table(split: Mapping[str, Any]) -> list[str]:
    rows = [[f"`{k}`", f"{_f(m['auroc'])} {_ci(m.get('auroc_ci'))}", _f(m.get("ece")), _f(m.get("log_loss")),
             _f(m.get("brier"))] for k, m in split["models"].items()]
    return _table(("model", "AUROC [95% CI]", "ECE", "log-loss", "Brier"), rows)


def _diff_table(split: Mapping[str, Any]) -> list[str]:
    rows = []
    for k, d in split["paired_differences"].items():
        rows.append([f"`{k}`", _f(d["delta_auroc"], sign=True), _ci(d["delta_auroc_ci"], sign=True),
                     "yes" if _ci_excludes_zero(d["delta_auroc_ci"]) else "no",
                     _f(d["delta_log_loss"], sign=True), _ci(d["delta_log_loss_ci"], sign=True),
                     "yes" if _ci_excludes_zero(d["delta_log_loss_ci"]) else "no"])
    return _table(("comparison", "ΔAUROC", "95% CI", "excl. 0", "Δlog-loss", "95% CI", "excl. 0"), rows)


def _goal_lines(split: Mapping[str, Any], name: str, label: str) -> list[str]:
    m = split["models"].get(name, {})
    entry = split.get("max_lr", {}).get(name)
    if entry is None:
        return [f"* {label} `{name}`: no max-lr entry in report.json (not computed)."]
    r1 = entry.get("risk_0.1", {})
    r5 = entry.get("risk_0.5", {})
    w, ece = r1.get("within_2x"), m.get("ece")
    parts = []
    if w is None:
        parts.append("max-lr goal: not computed")
    elif w >= GOAL_WITHIN_2X:
        parts.append(f"max-lr goal **met** ({_f(w)} >= {GOAL_WITHIN_2X})")
    else:
        parts.append(f"max-lr goal **missed** by {_f(GOAL_WITHIN_2X - w)} ({_f(w)} < {GOAL_WITHIN_2X})")
    if ece is None:
        parts.append("ECE goal: not computed")
    elif ece <= GOAL_ECE:
        parts.append(f"ECE goal **met** ({_f(ece)} <= {GOAL_ECE})")
    else:
        parts.append(f"ECE goal **missed** by {_f(ece - GOAL_ECE)} ({_f(ece)} > {GOAL_ECE})")
    lines = [f"* {label} `{name}`: " + "; ".join(parts) + "."]
    for risk, e in (("0.1", r1), ("0.5", r5)):
        if e:
            lines.append(f"  * risk {risk}: within 2x {_f(e.get('within_2x'))} of {e.get('n_bracketed')} bracketed "
                         f"inits; median log2(suggested/measured) {_f(e.get('median_log2_ratio'), 2, True)}; "
                         f"suggested below measured {_f(e.get('below_measured'))}; censored {e.get('n_censored')} "
                         f"({e.get('censored_consistent')} consistent with the censoring).")
    per_family = r1.get("per_family")
    if not per_family:
        lines.append("  * per family: not in report.json (not computed).")
    else:
        lines.append("  * per family at risk 0.1 (within 2x / bracketed inits): " + ", ".join(
            f"{fam} {_f(v['within_2x'])} / {v['n_bracketed']}" for fam, v in per_family.items()) + ".")
    return lines


def _bound_lines(bound: Mapping[str, Any] | None) -> list[str]:
    """The section that says why the max-lr goal is missed, from `heldout_analysis.max_lr_bound`."""
    if not bound:
        return []
    req, goal = bound["required_within_2x_risk_0.5"], bound["goal"]
    sigma_req = sigma_from_within_2x(req)
    L = ["### Why the max-lr goal is missed (diagnostic beside the plan, rule 6)", "",
         "The fitted models are logistic in log lr with one slope for all inits. For such an estimator, if it is "
         "calibrated, the error of its 50 % point is logistic with the curve's own scale σ, and its 10 % point lies "
         "ln 9 · σ below its 50 % point; its within-2x fraction at risk 0.1 then follows from its within-2x fraction "
         "at risk 0.5 (`calibrated_within_2x` in `research/experiments/heldout_analysis.py`, checked on simulated "
         f"calibrated estimators in the tests). To reach the goal ({_f(goal, 2)} at risk 0.1) it needs its 50 % "
         f"point within 2x of the threshold for **{_f(req)}** of inits (σ ≤ {_f(sigma_req, 2)} octave). This is a "
         "reference value, not a bound for every estimator: one whose slope varies by init (steep where it is sure) "
         "can do better at the same accuracy. Picture: "
         "[`heldout_risk/max_lr_bound.png`](heldout_risk/max_lr_bound.png).", ""]
    per = bound.get("per_model", {})
    L += _table(("model", "within 2x at risk 0.5", "σ (octaves)", "calibrated reference at risk 0.1",
                 "measured at risk 0.1", "50 % point > 4x above T", "50 % point > 4x below T"),
                [[f"`{k}`", _f(v["within_2x_risk_0.5"]), _f(v["sigma_octaves"], 2),
                  _f(v["calibrated_within_2x_risk_0.1"]), _f(v["measured_within_2x_risk_0.1"]),
                  _f(v.get("above_4x_risk_0.5")), _f(v.get("below_4x_risk_0.5"))]
                 for k, v in per.items()]) + [""]
    spread = bound.get("seed_spread", {})
    if spread.get("n_pairs"):
        L += [f"Seeds of one configuration, compared on the rungs both ran ({spread['n_pairs']} pairs; left out: "
              f"{spread['left_out_non_monotone']} with a non-monotone ladder, {spread['left_out_censored']} censored): "
              f"same rung {_f(spread['same_rung'], 2)}, one rung apart {_f(spread['one_rung'], 2)}, two or more "
              f"{_f(spread['two_or_more_rungs'], 2)} (rungs of {', '.join(_f(x, 0) for x in spread['rung_octaves'])} "
              "octave). Where seeds mostly share a rung, the label's seed-to-seed noise does not stop a predictor "
              "that sees the configuration from placing the threshold within 2x.", ""]
    refs = {k: v["calibrated_within_2x_risk_0.1"] for k, v in per.items()}
    if refs and max(refs.values()) < goal:
        top = max(refs.values())
        best = [k for k, v in refs.items() if v == top]
        halves = {k: v["within_2x_risk_0.5"] for k, v in per.items()}
        L += [f"**Reading.** Every model's reference value lies below the goal (highest {_f(top)}: "
              f"{', '.join(f'`{k}`' for k in best)}). A calibrated logistic estimator with a single slope in log lr "
              f"needs its 50 % point within 2x of the threshold for {_f(req)} of inits to meet the goal; the best "
              f"fitted model reaches {_f(max(halves.values()))} on families it never saw."]
        top_half = max(halves, key=lambda k: halves[k])
        over = per[top_half].get("above_4x_by_variant_risk_0.5") or {}
        if over:
            n_over = sum(over.values())
            L[-1] += (f" Its largest misses are overshoots: {n_over} inits have a 50 % point more than 4x above the "
                      "threshold, of which " + ", ".join(f"{n} `{v}`" for v, n in over.items()) + ".")
        L[-1] += (" Meeting the goal at this accuracy would need a per-init slope, i.e. knowing which inits are "
                  "uncertain.")
        L += [""]
    return L


CURVATURE_MODELS = ("curvature+lr", "config+curvature+lr", "all")
CURVATURE_SCORES = ("lr · λ_max(H) / 2 (GD theory)", "lr · λ_max(P⁻¹H) / 38 (Adam theory)")


def curvature_refresh_summary(before: Mapping[str, Any], after: Mapping[str, Any],
                              refreshed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Before/after of recomputing the curvature features (`heldout_risk --refresh-curvature`): per init, how far
    the estimates moved and how many converged; for the models and unfitted scores that read curvature, the
    held-out AUROC [CI] and log-loss of both analyses, and the rule-1 difference."""
    def moved(key: str) -> dict[str, Any]:
        pairs = [(r.get(f"old_{key}"), r.get(key)) for r in refreshed]
        pairs = [(float(o), float(n)) for o, n in pairs if isinstance(o, (int, float)) and isinstance(n, (int, float))]
        ratios = sorted(abs(n - o) / max(abs(n), 1e-12) for o, n in pairs)
        return {"n": len(pairs), "median_relative_change": ratios[len(ratios) // 2] if ratios else None,
                "changed_over_10pct": sum(r > 0.1 for r in ratios), "changed_over_50pct": sum(r > 0.5 for r in ratios)}

    def converged(prefix: str, old: bool) -> int:
        key = f"old_{prefix}_converged" if old else f"{prefix}_converged"
        return sum(bool(r.get(key)) for r in refreshed)

    out: dict[str, Any] = {"n_inits": len(refreshed),
                           "code_commit": sorted({str(r.get("curvature_code_commit")) for r in refreshed})}
    for prefix, key in (("hessian", "hessian_top_eig"), ("adam", "adam_sharpness")):
        out[key] = {**moved(key), "converged_before": converged(prefix, True), "converged_after": converged(prefix, False)}
    models = {}
    for name in CURVATURE_MODELS:
        b, a = before[PRIMARY]["models"].get(name, {}), after[PRIMARY]["models"].get(name, {})
        models[name] = {"before": {k: b.get(k) for k in ("auroc", "auroc_ci", "log_loss")},
                        "after": {k: a.get(k) for k in ("auroc", "auroc_ci", "log_loss")}}
    out["models"] = models
    out["scores"] = {name: {"before": {k: before.get("unfitted_scores", {}).get(name, {}).get(k) for k in ("auroc", "auroc_ci")},
                            "after": {k: after.get("unfitted_scores", {}).get(name, {}).get(k) for k in ("auroc", "auroc_ci")}}
                     for name in CURVATURE_SCORES}
    rule = "all - config+curvature+lr"
    out["rule_1"] = {"before": before[PRIMARY].get("paired_differences", {}).get(rule),
                     "after": after[PRIMARY].get("paired_differences", {}).get(rule)}
    return out


def _refresh_lines(info: Mapping[str, Any] | None) -> list[str]:
    if not info:
        return []
    L = ["## Curvature features re-measured", "",
         f"The curvature features of all {info['n_inits']} inits were recomputed without retraining (the recorded "
         f"labels; code {', '.join(info['code_commit'])}): `hf_koopman.curvature` now finds the top eigenvalue by "
         "Lanczos. The first analysis used a shifted power iteration that, when a negative eigenvalue dominated, "
         "stalled near the spectrum's average and reported that as converged. Same inits, probe batch and "
         "mini-batches; at most 20 Hessian-vector products per quantity (before: up to 40). Old values beside the "
         "new in `heldout_risk/curvature_refresh.jsonl`; the first analysis in "
         "`heldout_risk/report_before_curvature_refresh.json`.", ""]
    rows = []
    for key, label in (("hessian_top_eig", "λ_max(H)"), ("adam_sharpness", "λ_max(P⁻¹H)")):
        e = info[key]
        rows.append([label, str(e["n"]), _f(e["median_relative_change"]), str(e["changed_over_10pct"]),
                     str(e["changed_over_50pct"]), f"{e['converged_before']} → {e['converged_after']}"])
    L += _table(("estimate", "inits", "median |new - old| / |new|", "changed > 10 %", "changed > 50 %",
                 "converged (before → after)"), rows) + [""]
    rows = [[f"`{name}`", f"{_f(m['before']['auroc'])} {_ci(m['before']['auroc_ci'])}",
             f"{_f(m['after']['auroc'])} {_ci(m['after']['auroc_ci'])}", _f(m["before"]["log_loss"]),
             _f(m["after"]["log_loss"])] for name, m in info["models"].items()]
    rows += [[name, f"{_f(m['before']['auroc'])} {_ci(m['before']['auroc_ci'])}",
              f"{_f(m['after']['auroc'])} {_ci(m['after']['auroc_ci'])}", "", ""] for name, m in info["scores"].items()]
    L += _table(("model or score (leave one family out)", "AUROC before", "AUROC after", "log-loss before",
                 "log-loss after"), rows) + [""]
    b, a = info["rule_1"]["before"] or {}, info["rule_1"]["after"] or {}
    if b and a:
        L += [f"Rule 1 (`all - config+curvature+lr`): ΔAUROC {_f(b.get('delta_auroc'), sign=True)} "
              f"{_ci(b.get('delta_auroc_ci'), sign=True)} before, {_f(a.get('delta_auroc'), sign=True)} "
              f"{_ci(a.get('delta_auroc_ci'), sign=True)} after; Δlog-loss {_f(b.get('delta_log_loss'), sign=True)} "
              f"{_ci(b.get('delta_log_loss_ci'), sign=True)} before, {_f(a.get('delta_log_loss'), sign=True)} "
              f"{_ci(a.get('delta_log_loss_ci'), sign=True)} after.", ""]
    return L


def render_markdown(report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, total_runs: int) -> str:
    """The results page `results/heldout_risk.md` from `report` (the dict of `heldout_analysis.analyse`) and the
    `rows` it was computed from; `total_runs` is the size of the planned grid."""
    prim, sec = report[PRIMARY], report.get(SECONDARY)
    n_inits = report.get("n_model_inits", len({r.get("model_id") for r in rows}))
    fams = report.get("families") or sorted({str(r.get("family")) for r in rows})
    L: list[str] = ["# Held-out-family divergence study (issue #22): results", ""]
    L += ["Plan, metrics and reading rules: [`heldout_risk/PURPOSE.md`](heldout_risk/PURPOSE.md). This page is "
          "generated by `research/experiments/heldout_report.py` from `heldout_risk/report.json` and "
          "`heldout_risk/runs.jsonl`.", ""]
    verdict = spectrum_verdict(report)
    L += [f"**Answer (rule 1, on {report['n_runs']} of {total_runs} planned runs):** {verdict}.", ""]

    # what was run
    L += ["## What was run", ""]
    thr = report.get("thresholds", {})
    L += [f"* {report['n_runs']} of {total_runs} planned runs, {report['n_diverged']} diverged; {n_inits} model "
          f"inits; {len(fams)} families: {', '.join(fams)}.",
          f"* Measured thresholds: {thr.get('bracketed')} bracketed, {thr.get('right_censored')} right-censored, "
          f"{thr.get('left_censored')} left-censored, {thr.get('non_monotone')} non-monotone ladders."]
    tiers = tier_status(rows)
    complete = [t for t, n, N in tiers if n == N]
    partial = [f"{t} ({n}/{N})" for t, n, N in tiers if 0 < n < N]
    absent = [t for t, n, N in tiers if n == 0]
    L += [f"* Tiers of the seed-major order complete: {', '.join(complete) or 'none'}; partial: "
          f"{', '.join(partial) or 'none'}; not started: {', '.join(absent) or 'none'}.",
          "* Per rule 7, the analysis uses every completed row; no run was selected or dropped by its outcome.", ""]

    L += ["## Primary split: leave one family out", ""] + _split_table(prim) + [""]
    if any(k in EXPLORATORY_SETS for k in prim.get("models", {})):
        L += ["Rows marked *(exploratory)* are not in the plan (rule 6): inputs every `transformers` config carries "
              "(depth, width, init std; no normalisation placement), alone and with the spectrum. They are never "
              "selected as the best model and answer no pre-registered question; a confirmation needs runs they have "
              "not seen.", ""]
    L += ["Reliability diagram: [`heldout_risk/reliability.png`](heldout_risk/reliability.png).", ""]
    L += ["### Paired bootstrap differences (cluster bootstrap over model inits)", ""] + _diff_table(prim) + [""]
    d = prim["paired_differences"].get(RULE1_COMPARISON)
    if d:
        L += [f"**Rule 1.** ΔAUROC(`{RULE1_COMPARISON}`) = {_f(d['delta_auroc'], sign=True)} "
              f"{_ci(d['delta_auroc_ci'], sign=True)}, Δlog-loss = {_f(d['delta_log_loss'], sign=True)} "
              f"{_ci(d['delta_log_loss_ci'], sign=True)}: {verdict}.", ""]

    # rule 2
    lr_ci = prim["models"].get("lr", {}).get("auroc_ci")
    if lr_ci:
        others = {k: m["auroc_ci"] for k, m in prim["models"].items() if k != "lr"}
        above = [k for k, c in others.items() if c[0] > lr_ci[1]]
        below = [k for k, c in others.items() if c[1] < lr_ci[0]]
        over = [k for k in others if k not in above and k not in below]

        def names(ks: list[str]) -> str:
            return ", ".join(f"`{k}`" for k in ks) or "none"

        L += [f"**Rule 2.** `lr` alone: AUROC CI {_ci(lr_ci)}. Overlapping it (not said to predict divergence beyond "
              f"the learning rate): {names(over)}. Entirely above it: {names(above)}. Entirely below it: "
              f"{names(below)}.", ""]

    # per family
    counts = _class_counts(rows, "family")
    best = best_init_time_model(prim)
    show = [k for k in dict.fromkeys(("lr", "config+curvature+lr", SHIPPED, "all", best)) if k in prim["models"]]
    fam_rows = []
    for fam in fams:
        dv, st = counts.get(fam, (0, 0))
        mark = " †" if dv < MIN_CLASS or st < MIN_CLASS else ""
        fam_rows.append([f"{fam}{mark}", str(dv), str(st)]
                        + [_f(prim["models"][k].get("per_group_auroc", {}).get(fam)) for k in show])
    L += ["## Per-family held-out AUROC", ""]
    L += _table(["family (held out)", "diverged", "stable"] + [f"`{k}`" for k in show], fam_rows)
    L += ["", f"† fewer than {MIN_CLASS} diverged or stable runs: shown, not interpreted (rule 3). n/a: the family "
          "lacks one class.", ""]

    # unfitted
    if report.get("unfitted_scores"):
        L += ["## Unfitted scores (AUROC only, no fit)", ""]
        L += _table(("score", "AUROC [95% CI]", "n"),
                    [[k, f"{_f(v.get('auroc'))} {_ci(v.get('auroc_ci'))}", str(v.get("n"))]
                     for k, v in report["unfitted_scores"].items()])
        L += [""]

    L += _refresh_lines(report.get("curvature_refresh"))

    # max lr
    L += ["## Max learning rate (rule 5; goal: within 2x for >= 80% of bracketed inits at risk 0.1, ECE <= 0.05)", ""]
    L += _goal_lines(prim, "all", "all features")
    if best != "all":
        L += _goal_lines(prim, best, "best-AUROC init-time model")
    else:
        L += ["* The best-AUROC init-time model is `all` itself."]
    rows_ml = [[f"`{k}`", _f(e.get("risk_0.1", {}).get("within_2x")), str(e.get("risk_0.1", {}).get("n_bracketed")),
                _f(e.get("risk_0.5", {}).get("within_2x"))] for k, e in prim.get("max_lr", {}).items()]
    L += ["", "All models, fraction of bracketed inits within 2x:", ""]
    L += _table(("model", "risk 0.1", "bracketed", "risk 0.5"), rows_ml) + [""]
    L += _bound_lines(prim.get("max_lr_bound"))

    # secondary
    if sec:
        L += ["## Secondary split: leave one variant out", ""] + _split_table(sec) + [""]
        if sec.get("paired_differences"):
            L += _diff_table(sec) + [""]

    # KAN
    L += ["## KAN transformer (rule 8)", ""]
    kan = kan_rows(rows)
    if kan:
        L += _table(("shape", "inits", "M≈1 mean", "η_nl mean", "ρ max", "κ(V) mean", "verdict",
                     "diverged/runs per lr"), kan)
        L += ["", "To be read next to the paper's Table 18 (d = 256, L = 6, synthetic LM); our KAN is our own "
              "implementation, at CPU scale.", ""]
    else:
        L += ["No `rksp_kan` rows yet (not computed).", ""]
    L += ["Gradient statistics (`gradient+lr`) see the run itself and are not init-time (rule 4); they are shown for "
          "comparison with the paper's Table 2 only.", ""]
    return "\n".join(L)
